"""Per-example probe predictions of a finished run, before and after its stream, for paired comparisons.

A run reports each probe task's score; whether method B keeps more SST-2 accuracy than method A
on the same 846 examples is a question about the per-example outcomes, which the run does not
write. They follow from its weights: the unedited model, and the final edit state
(``checkpoints/edit_state.pt``: θ₀ + the deltas of the edited matrices). Each task's label
log-probs come from the probe cache, keyed by the weights' fingerprint (the run filled it at its
pre and final points), or are computed when the cache lacks them. The predictions must reproduce
the run's own final scores: a mismatch (other weights, other sets) is an error, never a file.

Records, one per example (``case_id`` "<task>/<index>"): the task, the label, and ``pre`` / ``post``
blocks with the prediction and ``correct`` (0 or 1), the shape editlab.paired reads.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from editlab import rundir
from editlab.errors import UserError
from editlab.keyed_cache import cache_root
from editlab.lightning.editstate import load_edit_state
from editlab.metrics.probes import ProbeConfig, ProbeResult, cached_probe_details, metric_name, probe_cache
from editlab.models.delta import apply_weight_deltas
from editlab.models.fingerprint import model_fingerprint
from editlab.models.load import load_model_and_tokenizer
from editlab.numerics import threads_for
from editlab.report import load_config, load_summary


class ProbeValuesError(UserError, RuntimeError):
    pass


def probe_records(pre: dict[str, ProbeResult], post: dict[str, ProbeResult]) -> list[dict]:
    """One record per example of every task: label, prediction and correctness before and after."""
    records = []
    for task, after in post.items():
        before = pre[task]
        for i, label in enumerate(after.labels):
            blocks = {
                point: {"prediction": r.predictions[i], "correct": int(r.predictions[i] == label)}
                for point, r in (("pre", before), ("post", after))
            }
            records.append({"case_id": f"{task}/{i}", "task": task, "label": label, **blocks})
    return records


def check_scores(run_dir: Path, post: dict[str, ProbeResult], summary: dict) -> None:
    """Each task's scores from the predictions equal the run's final ones (the same weights and sets)."""
    for task, result in post.items():
        for name in ("accuracy", "f1", "mcc"):
            key = metric_name(task, name)
            if key in summary and not math.isclose(result.score(name), summary[key], rel_tol=0, abs_tol=1e-9):
                raise ProbeValuesError(
                    f"{run_dir}: {key} from the final weights is {result.score(name)}, the run reported "
                    f"{summary[key]}: not the run's weights or probe sets"
                )


def run_probe_values(run_dir: str | Path) -> list[dict]:
    """:func:`probe_records` of a finished run from its config, final edit state and summary.json."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    if not config or not (run_dir / rundir.SUMMARY).is_file():
        raise ProbeValuesError(f"{run_dir}: not a finished run (config.yaml and summary.json needed)")
    summary = load_summary(run_dir)
    model_cfg = config.get("model", {})
    probes = ProbeConfig(**(model_cfg.get("evaluation", {}).get("probes") or {}))
    if not probes.tasks:
        raise ProbeValuesError(f"{run_dir}: the run has no probe tasks")
    state_path = rundir.edit_state_path(run_dir)
    if not state_path.is_file():
        raise ProbeValuesError(f"{run_dir}: no edit state ({state_path}): the run had checkpoints off")
    state = load_edit_state(state_path)
    if not state.get("final"):
        raise ProbeValuesError(f"{run_dir}: the edit state is not the final one")
    root = cache_root(model_cfg.get("cache_dir"))
    model, tok = load_model_and_tokenizer(model_cfg["model"], model_cfg.get("dtype", "float32"), cache=root)
    suite, cache = probes.suite(), probe_cache(root)

    def predictions() -> dict[str, ProbeResult]:
        weights = model_fingerprint(model)
        return {t.name: cached_probe_details(model, tok, t, suite.batch_size, cache, weights) for t in suite.tasks}

    # The cache keys name the thread count: the run's, so its entries are found (and the bits match).
    with threads_for(config.get("threads") or None):
        pre = predictions()
        params = dict(model.named_parameters())
        initial = {name: params[name].detach().clone() for name in state["deltas"]}
        with torch.no_grad():
            apply_weight_deltas(model, state["deltas"], initial)
        post = predictions()
    check_scores(run_dir, post, summary)
    print(f"editlab: probe predictions of {run_dir} ({len(post)} tasks)", file=sys.stderr)
    return probe_records(pre, post)


def main(argv: list[str] | None = None) -> int:
    """``python -m editlab.commands.probe_values RUN_DIR OUT``: the records of RUN_DIR into OUT
    (gzipped JSON lines), for a run directory outside a study's runs_dir."""
    import argparse

    from editlab.paired import write_records

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out")
    args = p.parse_args(argv)
    print(write_records(run_probe_values(args.run_dir), Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
