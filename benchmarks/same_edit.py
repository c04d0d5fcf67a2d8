"""Do two exported runs hold the same edit? (e.g. 1 process vs ``--trainer.devices 2``)

Compares ``edit_delta.safetensors`` (W_t − W_0 of the edited matrices, float64; written by
``--model.export true``) and the numeric entries of ``summary.json`` other than timings, and
writes the figures to JSON. Summary values agree when within ``METRIC_RTOL`` of each other:
continuous metrics (the ``*_magnitude`` probability differences, perplexity) move in their last
float32 digits with the ~1e-10 differences of ΔW that another process count gives, while rates
over a handful of cases differ by whole fractions.

    python -m benchmarks.same_edit runs/dist_d1 runs/dist_d2 --out benchmarks/results/same_edit.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from safetensors.torch import load_file

from editlab import rundir

METRIC_RTOL = 1e-5  # relative; absolute below 1 (magnitudes near 0)


def same_value(a, b) -> bool:
    """Equal, or two numbers within ``METRIC_RTOL`` (absolute for values below 1)."""
    if a == b:
        return True
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return numbers and math.isclose(a, b, rel_tol=METRIC_RTOL, abs_tol=METRIC_RTOL)


def compare(run_a: Path, run_b: Path) -> dict:
    """Max |ΔW_a − ΔW_b| over the edited matrices, the largest |ΔW_a|, and the summary entries that differ."""
    da, db = (load_file(Path(r) / rundir.EDIT_DELTA) for r in (run_a, run_b))
    if da.keys() != db.keys():
        raise ValueError(f"the runs edited different matrices: {sorted(da)} vs {sorted(db)}")
    sa, sb = (json.loads((Path(r) / rundir.SUMMARY).read_text()) for r in (run_a, run_b))
    # threads is a run setting, not a result: Lightning gives each of N processes 1/N of the cores.
    metrics = sorted(
        k for k, v in sa.items() if isinstance(v, (int, float)) and not k.startswith("seconds") and k != "threads"
    )
    return {
        "runs": [str(run_a), str(run_b)],
        "max_abs_delta_difference": max(float((da[k] - db[k]).abs().max()) for k in da),
        "largest_edit": max(float(da[k].abs().max()) for k in da),
        "metrics_compared": len(metrics),
        "metrics_differing": {k: [sa[k], sb.get(k)] for k in metrics if not same_value(sa[k], sb.get(k))},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    report = compare(args.run_a, args.run_b)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
