"""Soak check of resumption (not run in CI): an ``editlab fit`` killed with SIGKILL several times
and resumed with ``--ckpt_path last`` must end byte-identical to the same run left alone.

    python -m benchmarks.soak --config configs/memit_seq_smollm2.yaml --num-edits 200 \
        --edits-per-step 20 --kills 5 --seed 0 --out benchmarks/results/soak_smollm2.json [fit args...]

1. ``DIR/full``: one uninterrupted fit (``--model.export true``).
2. ``DIR/killed``: the same fit with ``--model.checkpoint_every 1``, started and restarted with
   ``--ckpt_path last`` until it finishes; each start but the last is killed (SIGKILL to its
   process group) at the next moment of a seeded plan. The plan covers the three moments a
   crash can meet: inside a step (the edit, e.g. z being optimised), during a checkpoint write,
   and during the final evaluation.
3. Compare steps.jsonl, cases.jsonl, curve.jsonl, summary.json, metrics.csv (as text, timing
   values and the keys that name the run aside) and the exported weights (edit_delta.safetensors,
   edited_model/model.safetensors: every tensor bit for bit and the metadata; the files' bytes too,
   reported apart, since safetensors orders its metadata differently in every process).

The moments are found without touching editlab: benchmarks/soak_markers.py (passed with
``--trainer.callbacks+=``) writes a line at each phase boundary, and a checkpoint write is seen as
editlab's temporary file ``checkpoints/edit_state.pt.<pid>.tmp`` (editlab/files.py
save_torch_atomic). A kill at a fraction of the phase's length in the full run (a step, the
final evaluation) or of the previous checkpoint's size (the temporary file growing) can miss when
this run is faster than the full one or the write is too quick to catch; the soak then tries the
same phase at the next step. Where every kill landed is decided afterwards, from what the killed
process left: its temporary checkpoint file (killed mid-write) or its last marker.

Options other than the soak's own go to ``editlab fit`` unchanged (both runs). ``--seed`` seeds the
kill plan only; the fit's own seed is the config's. Exit status: 0 all identical; 1 a file differs,
a fit failed or a resume did not continue from the checkpoint expected; 2 identical, but a
required moment was never hit (the soak did not test what it claims).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from editlab import rundir

REPO = Path(__file__).resolve().parents[1]
PHASES = ("step", "checkpoint", "final")  # what the plan targets; observed phases use these names
# Observed phases that count as covering each planned one.
COVERS = {"step": {"step"}, "checkpoint": {"checkpoint"}, "final": {"final_eval", "final_write"}}
# Keys that differ between two equal runs: timing, and where the run's files are.
IGNORED_KEYS = {"resumed_from_step", "export_dir", "export_delta", "memory_peak_gib"}
JSON_FILES = (rundir.STEPS, rundir.CASES, rundir.CURVE, rundir.SUMMARY)
BINARY_FILES = (rundir.EDIT_DELTA, f"{rundir.EDITED_MODEL}/model.safetensors")
CSV_FILES = (rundir.METRICS,)
MAX_ATTEMPTS_OVER_KILLS = 20  # a resume loop that does not end is a bug: stop it loudly


# -- arguments ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    # allow_abbrev off: a fit option must never be taken for an abbreviation of the soak's own.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--config", help="editlab fit config (passed through)")
    p.add_argument("--num-edits", type=int, help="--data.num_edits")
    p.add_argument("--edits-per-step", type=int, help="--data.edits_per_step")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs of the killed run (>= 3 covers every phase)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill plan (not of the fit)")
    p.add_argument("--threads", type=int, default=2, help="editlab fit --threads, the same for every process")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--dir", help="run directory (default runs/soak/<out stem>)")
    p.add_argument("--overwrite", action="store_true", help="delete DIR/full and DIR/killed of an earlier soak")
    p.add_argument("--attempt-timeout", type=float, default=6 * 3600, help="seconds one fit process may take")
    args, fit_extra = p.parse_known_args(argv)
    if args.kills < 1:
        p.error("--kills must be >= 1")
    return args, fit_extra


def fit_options(args: argparse.Namespace, fit_extra: list[str]) -> list[str]:
    """The options both runs share; the user's extra options last, so they win."""
    opts = ["--config", args.config] if args.config else []
    if args.num_edits is not None:
        opts += ["--data.num_edits", str(args.num_edits)]
    if args.edits_per_step is not None:
        opts += ["--data.edits_per_step", str(args.edits_per_step)]
    return opts + ["--threads", str(args.threads), "--model.export", "true", *fit_extra]


def fit_command(shared: list[str], run_dir: Path, markers: Path, *extra: str) -> list[str]:
    hooks = ["--trainer.callbacks+=benchmarks.soak_markers.PhaseMarkers", f"--trainer.callbacks.path={markers}"]
    return [
        sys.executable,
        "-m",
        "editlab.cli",
        "fit",
        *shared,
        "--trainer.default_root_dir",
        str(run_dir),
        *hooks,
        *extra,
    ]


def child_env() -> dict[str, str]:
    # The fit imports benchmarks.soak_markers whatever its working directory.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


# -- the kill plan -----------------------------------------------------------------------------
def plan_kills(kills: int, steps: int, rng: random.Random) -> list[dict]:
    """``kills`` targets in the order they occur. Every phase once when there are at least three
    (the final evaluation at most once: it is the end of the run), the rest inside steps or
    checkpoint writes at random steps. ``fraction`` places the kill inside the phase."""
    if kills >= len(PHASES):
        phases = list(PHASES) + [rng.choice(("step", "checkpoint")) for _ in range(kills - len(PHASES))]
    else:
        phases = rng.sample(PHASES, kills)
    plan = []
    for phase in phases:
        if phase == "final":
            # Not near the end: this start's evaluation can be quicker than the full run's.
            plan.append({"phase": "final", "step": steps, "fraction": round(rng.uniform(0.1, 0.6), 3)})
        elif phase == "step":
            plan.append({"phase": "step", "step": rng.randint(1, steps), "fraction": round(rng.uniform(0.1, 0.8), 3)})
        else:  # the checkpoint written after ``step``; fraction: of the previous checkpoint's bytes
            plan.append(
                {"phase": "checkpoint", "step": rng.randint(1, steps), "fraction": round(rng.uniform(0, 0.9), 3)}
            )
    order = {"step": 0, "checkpoint": 1, "final": 2}  # a step comes before the checkpoint after it
    return sorted(plan, key=lambda t: (t["phase"] == "final", t["step"], order[t["phase"]]))


# -- markers -----------------------------------------------------------------------------------
class MarkerReader:
    """The complete lines appended to a marker file since the last call (cheap to call often)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.events, self._partial = path, 0, [], b""

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.events
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        self.events += [json.loads(line) for line in lines if line]
        return self.events


def read_markers(path: Path) -> list[dict]:
    return MarkerReader(path).poll()


def first(events: list[dict], event: str, min_step: int = 0) -> dict | None:
    return next((e for e in events if e["event"] == event and e["step"] >= min_step), None)


def phase_seconds(events: list[dict], run_dir: Path) -> dict:
    """Length of each step's computation and of the final evaluation, from a finished run's markers
    (the evaluation ends when cases.jsonl is written; the report and plots after it are not part of it)."""
    steps = {}
    for e in events:
        if e["event"] == "forward":
            end = next((x for x in events if x["event"] == "end" and x["step"] == e["step"]), None)
            if end is not None:
                steps[e["step"]] = end["t"] - e["t"]
    evaluation = first(events, "final_eval")
    if not steps or evaluation is None:
        raise RuntimeError(f"the full run's markers lack steps or the final evaluation: {events[-5:]}")
    seconds = (run_dir / rundir.CASES).stat().st_mtime - evaluation["wall"]
    if seconds <= 0:
        raise RuntimeError(f"{run_dir}/cases.jsonl is older than the final evaluation's start")
    return {"step": steps, "final_eval": seconds, "steps": max(steps)}


def step_seconds(timings: dict, step: int) -> float:
    return timings["step"].get(step, statistics.median(timings["step"].values()))


# -- deciding when to kill -----------------------------------------------------------------------
def checkpoint_over(events: list[dict], step: int) -> bool:
    """The checkpoint after ``step`` is behind us: the next step computes, or the final phase has
    reached its evaluation or its end."""
    return any((e["event"] == "forward" and e["step"] > step) or e["event"] in ("final_eval", "done") for e in events)


def decide(target: dict, events: list[dict], run_dir: Path, tmp: Path, timings: dict, now: float) -> str:
    """'kill', 'wait', or 'miss' (this occurrence of the phase is over: try it at the next step).
    Mutates ``target`` to remember the occurrence it is waiting for."""
    phase = target["phase"]
    if phase == "step":
        if "deadline" not in target:
            fwd = first(events, "forward", target["step"])
            if fwd is None:
                return "wait"
            target["at"] = fwd["step"]
            target["deadline"] = fwd["t"] + target["fraction"] * step_seconds(timings, fwd["step"])
        if any(e["event"] == "end" and e["step"] == target["at"] for e in events):
            return "miss"
        return "kill" if now >= target["deadline"] else "wait"
    if phase == "checkpoint":
        ended = [e["step"] for e in events if e["event"] == "end" and e["step"] >= target["step"]]
        if not ended:
            return "wait"
        target["at"] = k = ended[0]
        try:
            size = tmp.stat().st_size
        except FileNotFoundError:
            size = None
        last_end = max(e["step"] for e in events if e["event"] == "end")
        if size is not None and last_end == k:  # the temporary file is checkpoint k's
            if "need" not in target:
                state = rundir.edit_state_path(run_dir)
                previous = state.stat().st_size if state.exists() else 0
                target["need"] = int(target["fraction"] * previous)
            target["tmp_bytes"] = size
            return "kill" if size >= target["need"] else "wait"
        return "miss" if checkpoint_over(events, k) else "wait"
    # final: inside the final evaluation, a fraction of its length in the full run
    if first(events, "done") is not None or (run_dir / rundir.SUMMARY).exists():
        return "miss"  # the results are written: the run has finished
    if "deadline" not in target:
        evaluation = first(events, "final_eval")
        if evaluation is None:
            return "wait"
        target["at"] = evaluation["step"]
        target["since_wall"] = evaluation["wall"]
        length = timings["final_eval"] * pace(events, timings)
        target["deadline"] = evaluation["t"] + target["fraction"] * length
    if now >= target["deadline"]:
        return "kill"
    # A kept evaluation part is a moment inside the evaluation that needs no timing: on a tiny model
    # the evaluation lasts a fraction of a second, and a resumed attempt's can be quicker than the
    # full run's, so the deadline alone could fall after its end (no later occurrence to retry on).
    if part_kept_since(run_dir, target["since_wall"]):
        target["trigger"] = "evaluation_part"
        return "kill"
    return "wait"


def part_kept_since(run_dir: Path, wall: float) -> bool:
    """An evaluation part was saved (atomically) after ``wall`` (time.time())."""
    try:
        return (run_dir / rundir.EVALUATION_PARTS).stat().st_mtime >= wall
    except FileNotFoundError:
        return False


def pace(events: list[dict], timings: dict) -> float:
    """How long this attempt's steps took against the same steps of the full run (the median of
    the ratios; 1 when it ran none). The final evaluation has no later occurrence to retry a miss
    on, so its kill moment scales with this: a full run slowed by a loaded machine gave the
    200-edit SmolLM2 soak a deadline past the end of the killed run's quicker evaluation."""
    ratios = []
    for e in events:
        if e["event"] == "forward" and e["step"] in timings["step"]:
            end = first(events, "end", e["step"])
            if end is not None and end["step"] == e["step"]:
                ratios.append((end["t"] - e["t"]) / timings["step"][e["step"]])
    return statistics.median(ratios) if ratios else 1.0


def retarget(target: dict, steps: int) -> dict | None:
    """The same phase at the next step after a miss (kill a checkpoint at first sight from now on:
    its write was quicker than the watcher), or None when no step is left."""
    nxt = target["at"] + 1
    if target["phase"] == "final" or nxt > steps:
        return None
    fraction = 0.0 if target["phase"] == "checkpoint" else target["fraction"]
    return {"phase": target["phase"], "step": nxt, "fraction": fraction, "planned": target["planned"]}


# -- where a kill landed -----------------------------------------------------------------------
def landed(events: list[dict], tmp_left: bool, cases_written: bool, summary_written: bool) -> tuple[str, int]:
    """The phase the process was in when it died, from what it left behind (``*_written``: by this
    process: cases.jsonl is the first result file written, summary.json the last)."""
    last_end = max((e["step"] for e in events if e["event"] == "end"), default=0)
    if summary_written:
        return "after_results", last_end
    if tmp_left:  # save_torch_atomic renames its temporary file when the write is complete
        return "checkpoint", last_end
    if not events:
        return "setup", 0
    last = events[-1]
    if last["event"] == "forward":
        return "step", last["step"]
    if last["event"] == "final_eval":
        return ("final_write" if cases_written else "final_eval"), last["step"]
    return f"after_{last['event']}", last["step"]


def expected_resume(phase: str, step: int) -> int | None:
    """Checkpoints every step: a kill in step k or in the write of checkpoint k resumes after
    step k-1 (the write is atomic); one in the final phase resumes from the final checkpoint."""
    if phase in ("step", "checkpoint"):
        return step - 1
    if phase in ("final_eval", "final_write"):
        return step
    return None


def resumed_step(log: str) -> int | None:
    found = re.search(r"resumed from .* after step (\d+)", log)
    if found:
        return int(found.group(1))
    return 0 if "starting from the first step" in log else None


# -- running -----------------------------------------------------------------------------------
def run_attempt(cmd, run_dir, markers, log, pending, timings, timeout, t_start) -> dict:
    """Start one fit and kill it at the first pending target it reaches (popping the targets it
    misses for good). Returns the attempt's record, with ``kill`` None when it ran to its end."""
    t0 = time.monotonic()
    wall0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    tmp = rundir.edit_state_path(run_dir).with_name(f"{rundir.EDIT_STATE}.{proc.pid}.tmp")
    reader, missed, kill = MarkerReader(markers), [], None
    try:
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{shlex.join(cmd)} ran over {timeout} s (see {log})")
            events = reader.poll()
            if not pending:
                time.sleep(0.05)
                continue
            target = pending[0]
            verdict = decide(target, events, run_dir, tmp, timings, time.monotonic())
            if verdict == "miss":
                missed.append({"phase": target["phase"], "step": target.get("at"), "fraction": target["fraction"]})
                pending.pop(0)
                nxt = retarget(target, timings["steps"])
                if nxt is not None:
                    pending.insert(0, nxt)
                continue
            if verdict == "kill":
                now = time.monotonic()
                os.killpg(proc.pid, signal.SIGKILL)  # the group: nothing the fit started survives
                proc.wait()
                kill = {"planned": target["planned"], "at_step": target["at"], "now": now}
                if "tmp_bytes" in target:
                    kill["tmp_bytes"], kill["tmp_bytes_needed"] = target["tmp_bytes"], target["need"]
                kill["trigger"] = target.get("trigger", "bytes" if "tmp_bytes" in target else "deadline")
                pending.pop(0)
                break
            # A checkpoint write can last milliseconds: watch closely once its step is running.
            close = target["phase"] == "checkpoint" and first(events, "forward", target["step"]) is not None
            time.sleep(0.0005 if close else 0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - t0
    text = Path(log).read_text(errors="replace")
    record = {
        "command": shlex.join(cmd),
        "pid": proc.pid,
        "returncode": proc.returncode,
        "seconds": round(seconds, 3),
        "resumed_from_step": resumed_step(text),
        "log": str(log),
        "missed": missed,
        "kill": None,
    }
    if kill is not None:
        events = read_markers(markers)
        written = [
            (run_dir / n).exists() and (run_dir / n).stat().st_mtime >= wall0 for n in (rundir.CASES, rundir.SUMMARY)
        ]
        phase, step = landed(events, tmp.exists(), *written)
        # Where the phase began: the step's first forward, the marker just before the write, the
        # final evaluation's first forward.
        began = {"step": ("forward",), "checkpoint": ("start", "final")}.get(phase, ("final_eval",))
        phase_start = next((e["t"] for e in reversed(events) if e["event"] in began), None)
        record["kill"] = {
            "phase": phase,
            "step": step,
            "planned": kill["planned"],
            "seconds_into_attempt": round(kill["now"] - t0, 3),
            "seconds_since_soak_start": round(kill["now"] - t_start, 3),
            "seconds_into_phase": round(kill["now"] - phase_start, 3) if phase_start is not None else None,
            "last_marker": events[-1] if events else None,
            "checkpoint_tmp_left": tmp.exists(),
            "expected_resume_step": expected_resume(phase, step),
            "trigger": kill["trigger"],  # what set the moment: deadline, bytes written, evaluation_part
            **(
                {"tmp_bytes": kill["tmp_bytes"], "tmp_bytes_needed": kill["tmp_bytes_needed"]}
                if "tmp_bytes" in kill
                else {}
            ),
        }
    elif proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed with exit status {proc.returncode}:\n{text[-3000:]}")
    return record


# -- comparing -----------------------------------------------------------------------------------
def strip(obj, dropped: set[str]):
    """``obj`` without timing values and run locations, at any depth (names go to ``dropped``)."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if "seconds" in key or key in IGNORED_KEYS:
                dropped.add(key)
            else:
                out[key] = strip(value, dropped)
        return out
    if isinstance(obj, list):
        return [strip(v, dropped) for v in obj]
    return obj


def json_texts(path: Path, dropped: set[str]) -> list[str]:
    """Each JSON value of the file, stripped and written back as text: comparing text, not
    floats, tells -0.0 from 0.0 and compares NaN (keys keep their order)."""
    text = path.read_text()
    values = [json.loads(text)] if path.suffix == ".json" else [json.loads(x) for x in text.splitlines()]
    return [json.dumps(strip(v, dropped)) for v in values]


def csv_rows(path: Path, dropped: set[str]) -> list[dict]:
    with open(path, newline="") as f:
        return [strip(row, dropped) for row in csv.DictReader(f)]


def safetensors_entry(a: Path, b: Path) -> dict:
    """Every tensor bit for bit (dtype, shape, bytes) and the metadata as a mapping. Not the file's
    bytes: safetensors writes the metadata from a Rust HashMap, whose key order changes from one
    process to the next, so two equal exports differ in their header's key order."""
    import torch
    from safetensors import safe_open

    def read(path: Path) -> tuple[dict, dict]:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}

    (ma, ta), (mb, tb) = read(a), read(b)

    def bits(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    differing = {}
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            differing[k] = f"{x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        elif not torch.equal(bits(x), bits(y)):
            differing[k] = float((x.double() - y.double()).abs().max())
    entry = {
        "identical": ma == mb and set(ta) == set(tb) and not differing,
        "compared": "tensors bit for bit, metadata as a mapping",
        "metadata_identical": ma == mb,
    }
    if set(ta) != set(tb):
        entry["tensors_only_in_one"] = sorted(set(ta) ^ set(tb))
    if differing:
        entry["differing_tensors"] = differing  # max |difference|, or the dtype/shape mismatch
    return entry


def compare(full: Path, killed: Path) -> dict[str, dict]:
    result = {}
    for name in (*JSON_FILES, *CSV_FILES, *BINARY_FILES):
        a, b = full / name, killed / name
        if not (a.is_file() and b.is_file()):
            result[name] = {"identical": False, "missing": [str(p) for p in (a, b) if not p.is_file()]}
            continue
        same_bytes = a.read_bytes() == b.read_bytes()
        entry = {"bytes_identical": same_bytes}
        if name in BINARY_FILES:
            entry.update(safetensors_entry(a, b))
        else:
            dropped: set[str] = set()
            read = csv_rows if name in CSV_FILES else json_texts
            ra, rb = read(a, dropped), read(b, dropped)
            entry["identical"] = ra == rb
            entry["ignored_keys"] = sorted(dropped)
            if not entry["identical"]:
                rows = [i for i, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y]
                entry["rows"] = [len(ra), len(rb)]
                entry["first_differing_row"] = rows[0] if rows else min(len(ra), len(rb))
        result[name] = entry
    return result


def git_state() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    # Others edit the tree at the same time: say whether the commit alone describes this code.
    return {"commit": git("rev-parse", "HEAD"), "tracked_changes": git("status", "--porcelain", "--untracked-files=no")}


def fresh_dir(root: Path, overwrite: bool) -> None:
    taken = [p for p in (root / "full", root / "killed", root / "markers", root / "logs") if p.exists()]
    if taken and not overwrite:
        raise SystemExit(f"soak: {root} holds an earlier soak ({', '.join(map(str, taken))}); pass --overwrite")
    for p in taken:
        shutil.rmtree(p)
    for sub in ("markers", "logs"):
        (root / sub).mkdir(parents=True)


def soak(args: argparse.Namespace, fit_extra: list[str]) -> dict:
    t_start = time.monotonic()
    root = Path(args.dir or Path("runs") / "soak" / Path(args.out).stem)
    fresh_dir(root, args.overwrite)
    shared = fit_options(args, fit_extra)
    full_cmd = fit_command(shared, root / "full", root / "markers" / "full.jsonl")
    full = run_attempt(
        full_cmd,
        root / "full",
        root / "markers" / "full.jsonl",
        root / "logs" / "full.log",
        [],
        None,
        args.attempt_timeout,
        t_start,
    )
    timings = phase_seconds(read_markers(root / "markers" / "full.jsonl"), root / "full")
    plan = plan_kills(args.kills, timings["steps"], random.Random(args.seed))
    pending = [{**t, "planned": dict(t)} for t in plan]
    attempts = []
    for i in range(args.kills + MAX_ATTEMPTS_OVER_KILLS):
        markers = root / "markers" / f"killed_{i}.jsonl"
        cmd = fit_command(shared, root / "killed", markers, "--model.checkpoint_every", "1", "--ckpt_path", "last")
        attempts.append(
            run_attempt(
                cmd,
                root / "killed",
                markers,
                root / "logs" / f"killed_{i}.log",
                pending,
                timings,
                args.attempt_timeout,
                t_start,
            )
        )
        # Done when a start ran to its end, or was killed after the results (a race with the end).
        if attempts[-1]["kill"] is None or (root / "killed" / rundir.SUMMARY).exists():
            break
    else:
        raise RuntimeError(f"the killed run did not finish in {len(attempts)} starts")

    kills = [a["kill"] for a in attempts if a["kill"] is not None]
    # Each kill is followed by the start that resumed it: did it continue from the checkpoint expected?
    resumes = [
        {
            "after_kill": n,
            "resumed_from_step": nxt["resumed_from_step"],
            "expected": kill["expected_resume_step"],
            "as_expected": kill["expected_resume_step"] is None
            or nxt["resumed_from_step"] == kill["expected_resume_step"],
            "seconds": nxt["seconds"],
        }
        for n, (kill, nxt) in enumerate((a["kill"], b) for a, b in zip(attempts, attempts[1:], strict=False))
    ]
    hit = sorted({k["phase"] for k in kills})
    files = compare(root / "full", root / "killed")
    return {
        "config": args.config,
        "num_edits": args.num_edits,
        "edits_per_step": args.edits_per_step,
        "steps": timings["steps"],
        "kills_asked": args.kills,
        "seed": args.seed,
        "threads": args.threads,
        "fit_args": shared,
        **git_state(),
        "run_dir": str(root),
        "commands": {"full": full["command"], "killed": [a["command"] for a in attempts]},
        "full_run": {
            "seconds": full["seconds"],
            "step_seconds": timings["step"],
            "final_eval_seconds": timings["final_eval"],
        },
        "plan": plan,
        "kills": kills,
        "missed": [m for a in attempts for m in a["missed"]],
        "resumes": resumes,
        "attempts": [{k: v for k, v in a.items() if k != "kill"} for a in attempts],
        "phases_hit": hit,
        "phases_missing": [p for p in PHASES if not COVERS[p] & set(hit)],
        "stray_tmp_files": sorted(str(p) for p in (root / "killed").rglob("*.tmp")),
        "files": files,
        "identical": all(f["identical"] for f in files.values()),
        "seconds_total": round(time.monotonic() - t_start, 3),
    }


def exit_status(result: dict) -> int:
    if not result["identical"] or not all(r["as_expected"] for r in result["resumes"]):
        return 1
    return 2 if result["phases_missing"] else 0


def main(argv: list[str] | None = None) -> int:
    args, fit_extra = parse_args(argv)
    result = soak(args, fit_extra)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    status = exit_status(result)
    differs = [name for name, f in result["files"].items() if not f["identical"]]
    print(
        f"soak: {len(result['kills'])} kills in {', '.join(result['phases_hit']) or 'no phase'}; "
        + (f"DIFFERS: {', '.join(differs)}" if differs else "every file identical")
        + (f"; never hit: {', '.join(result['phases_missing'])}" if result["phases_missing"] else "")
        + f" -> {out}",
        file=sys.stderr,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
