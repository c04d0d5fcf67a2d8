"""``editlab stats`` compute → export → import into a fresh cache, compared bit for bit (not run in CI).

    python -m benchmarks.stats_round_trip --out benchmarks/results/stats_export_import_smollm2.json \\
        --config configs/memit_seq_smollm2.yaml --threads 1

Every other option goes to each ``editlab stats`` command unchanged. Two caches under ``--work``
(default: a new temporary directory), both without statistics: ``a`` is filled by ``compute`` and
exported to ``WORK/export``; ``b`` receives the ``import``. The embedded model's converted copy is
shared from ``$EDITLAB_CACHE/models`` (read through a symlink; converting it again in each cache
would only cost time). The result JSON holds the commands with their wall seconds (start-up and
model loading included), what ``compute`` printed (layers, texts, tokens, seconds, tokens/s: the
statistics pass alone), and for every cache entry its key, token count and whether the imported
``sum`` equals the computed one bit for bit (torch.equal) under the same key and file name.
Exit status 0 when every entry is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from editlab.keyed_cache import cache_root

REPO = Path(__file__).resolve().parents[1]
COMPUTED = re.compile(
    r"editlab: (?P<layers>\d+) layers computed from (?P<texts>\d+) texts \((?P<tokens>[\d,]+) tokens\) in "
    r"(?P<seconds>[\d.]+) s, (?P<rate>[\d,]+) tokens/s"
)


def run_stats(cache: Path, argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "EDITLAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "editlab.cli", "stats", *argv], cwd=REPO, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"editlab stats {shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, seconds


def fresh_cache(path: Path, shared_models: Path) -> Path:
    path.mkdir(parents=True)
    if shared_models.is_dir():
        (path / "models").symlink_to(shared_models)
    return path


def compare(a: Path, b: Path) -> list[dict]:
    import torch

    rows = []
    names = sorted({p.name for p in (a / "stats").glob("*.pt")} | {p.name for p in (b / "stats").glob("*.pt")})
    for name in names:
        x = torch.load(a / "stats" / name, weights_only=True) if (a / "stats" / name).exists() else None
        y = torch.load(b / "stats" / name, weights_only=True) if (b / "stats" / name).exists() else None
        same = x is not None and y is not None and x["key"] == y["key"] and x["count"] == y["count"]
        rows.append(
            {
                "file": name,
                "layer": (x or y)["key"]["layer"],
                "module": (x or y)["key"]["module"],
                "tokens": (x or y)["count"],
                "sum": f"{(x or y)['sum'].dtype} {list((x or y)['sum'].shape)}",
                "in_both": x is not None and y is not None,
                "same_key_and_count": same,
                "sum_bit_identical": bool(same and torch.equal(x["sum"], y["sum"])),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--work", help="directory for the two caches and the export (default: a temporary one)")
    args, options = parser.parse_known_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="editlab_stats_"))
    models = cache_root() / "models"
    a, b, export = fresh_cache(work / "a", models), fresh_cache(work / "b", models), work / "export"
    steps = [("compute", a, ["compute", *options]), ("export", a, ["export", str(export), *options])]
    steps.append(("import", b, ["import", str(export), *options]))
    commands, outputs = [], {}
    for name, cache, stats_argv in steps:
        proc, seconds = run_stats(cache, stats_argv)
        outputs[name] = proc.stdout
        line = f"EDITLAB_CACHE={cache} editlab stats {shlex.join(stats_argv)}"
        commands.append({"command": line, "wall_seconds": round(seconds, 1)})
        print(f"{line}: {seconds:.1f} s", file=sys.stderr)
    match = COMPUTED.search(outputs["compute"])
    if match is None:
        raise SystemExit(f"compute computed nothing (a cache that was not fresh?):\n{outputs['compute']}")
    rows = compare(a, b)
    result = {
        "command": "python -m benchmarks.stats_round_trip " + shlex.join([*sys.argv[1:]] if argv is None else argv),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "commands": commands,
        "compute": {
            "layers": int(match["layers"]),
            "texts": int(match["texts"]),
            "tokens_per_layer": int(match["tokens"].replace(",", "")),
            "seconds": float(match["seconds"]),
            "tokens_per_second": int(match["rate"].replace(",", "")),
        },
        "export_files": sorted(p.name for p in export.iterdir()),
        "export_bytes": sum(p.stat().st_size for p in export.iterdir()),
        "entries": rows,
        "all_bit_identical": bool(rows) and all(r["sum_bit_identical"] for r in rows),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("compute", "all_bit_identical")}))
    return 0 if result["all_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
