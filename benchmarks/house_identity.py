"""Bit-identity of a refactor (not run in CI): the same short SmolLM2 runs of every method, before
and after a change of structure, must write identical results and exported weights.

    # at the commit before the change (e.g. from a git worktree of it):
    python -m benchmarks.house_identity run --dir runs/identity/before
    # at the commit after it:
    python -m benchmarks.house_identity run --dir runs/identity/after
    python -m benchmarks.house_identity compare runs/identity/before runs/identity/after \
        --out benchmarks/results/house_identity.json

Each run is ``editlab fit`` at one thread with ``--model.export true``: the demo as ``make demo``
runs it, and every SmolLM2 method config on the first 10 CounterFact records in two steps of 5
(two steps: the second edits weights the first changed, which exercises the sequential state,
rewinding and the caches). The comparison is soak.py's: the JSON and CSV files as text (timing
values and run locations aside) and every exported tensor bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.soak import compare, git_state
from editlab.files import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "multi_counterfact.json.gz"
# name -> config; every SmolLM2 method the refactor touches (the demo is MEMIT_seq).
RUNS = {
    "demo": "configs/demo.yaml",
    "memit": "configs/memit_smollm2.yaml",
    "ece": "configs/ece_smollm2.yaml",
    "ece_twostep": "configs/ece_twostep_smollm2.yaml",
    "nse": "configs/nse_smollm2.yaml",
    "alphaedit": "configs/alphaedit_smollm2.yaml",
    "pmet": "configs/pmet_smollm2.yaml",
    "memit_eac": "configs/memit_eac_smollm2.yaml",
    "rome": "configs/rome_smollm2.yaml",
    "rome_eac": "configs/rome_eac_smollm2.yaml",
    "ft": "configs/ft_smollm2.yaml",
    "iter_memit": "configs/iter_memit_smollm2.yaml",
    "na_memit": "configs/na_memit_smollm2.yaml",
}
STREAM = ["--data.num_edits", "10", "--data.edits_per_step", "5", "--model.evaluation.fluency", "false"]
# ECE and NSE keep z on θ0 in the disk cache: without this, a run finds the z an earlier run (the
# other side of the comparison) stored, and the z code under test never runs.
NO_Z_CACHE = {"ece", "ece_twostep", "nse"}


def command(name: str, run_dir: Path, data: Path) -> list[str]:
    cmd = [sys.executable, "-m", "editlab.cli", "fit", "--config", RUNS[name], "--threads", "1"]
    if name != "demo":
        cmd += ["--data.path", str(data), *STREAM]
    if name in NO_Z_CACHE:
        cmd += ["--model.method.init_args.z_cache", "false"]
    return cmd + ["--model.export", "true", "--trainer.default_root_dir", str(run_dir), "--overwrite", "true"]


def run(args: argparse.Namespace) -> None:
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    for name in args.only or RUNS:
        cmd = command(name, root / name, Path(args.data))
        t0 = time.monotonic()
        with open(root / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"house_identity: {name} failed with exit status {rc} (see {root / name}.log)")
        seconds = round(time.monotonic() - t0, 1)
        add_run(root / "identity_run.json", name, {"command": shlex.join(cmd), "seconds": seconds})
        print(f"{name}: {seconds} s", flush=True)


def add_run(path: Path, name: str, entry: dict) -> None:
    """Record one finished run; two processes with disjoint ``--only`` lists may share a directory
    (each adds its runs as they finish)."""
    record = json.loads(path.read_text()) if path.is_file() else {**git_state(), "runs": {}}
    if record["commit"] != git_state()["commit"]:
        raise SystemExit(f"house_identity: {path} holds runs of commit {record['commit']}; use another --dir")
    record["runs"][name] = entry
    write_text_atomic(path, json.dumps(record, indent=1))


def compare_dirs(args: argparse.Namespace) -> int:
    before, after = Path(args.before), Path(args.after)
    meta = {p: json.loads((p / "identity_run.json").read_text()) for p in (before, after)}
    runs = {name: compare(before / name, after / name) for name in meta[before]["runs"]}
    result = {
        "before": {"dir": str(before), "commit": meta[before]["commit"], "changes": meta[before]["tracked_changes"]},
        "after": {"dir": str(after), "commit": meta[after]["commit"], "changes": meta[after]["tracked_changes"]},
        "commands": {name: meta[before]["runs"][name]["command"] for name in runs},
        "runs": runs,
        "identical": {name: all(f["identical"] for f in files.values()) for name, files in runs.items()},
    }
    result["all_identical"] = all(result["identical"].values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["identical"]), "->", args.out)
    return 0 if result["all_identical"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every config into DIR/<name>")
    r.add_argument("--dir", required=True)
    r.add_argument("--data", default=str(DATA), help="CounterFact file")
    r.add_argument("--only", nargs="*", choices=sorted(RUNS), help="a subset of the runs")
    c = sub.add_parser("compare", help="compare two run directories")
    c.add_argument("before")
    c.add_argument("after")
    c.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args)
        return 0
    return compare_dirs(args)


if __name__ == "__main__":
    sys.exit(main())
