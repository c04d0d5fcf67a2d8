"""``editlab study FILE`` — run a list of ``editlab fit`` runs as one resumable study.

A study file (YAML) names the runs and where they go:

    name: parity_smollm2
    runs_dir: runs/studies/parity      # run directories (stay out of git)
    out: studies/parity                # one results JSON per run and the side-by-side report
    parallel: 2                        # processes at once
    threads: 1                         # intra-op threads per process
    shared_pre: alphaedit_30           # optional: this run's pre-edit point starts the report's
                                       #   curves of the runs with evaluation.pre false
    report: studies/parity/report      # optional: the report's directory (default: OUT/report)
    runs:
      - name: alphaedit_30
        config: configs/alphaedit_smollm2.yaml
        args: [--data.num_edits, "30", --data.edits_per_step, "10"]

Every run is ``editlab fit --config C ARGS --trainer.default_root_dir RUNS_DIR/NAME --ckpt_path last
--threads T``: a study stopped at any moment and started again resumes each unfinished run from its
last edit-state checkpoint, and a finished run is not run again: one with its summary.json, or one
whose results JSON says it finished with the same command (its run directory may live on another
machine; ``--only NAME`` runs a subset). Each finished
run gets ``OUT/NAME.json`` and its per-case values (``OUT/NAME.cases.jsonl.gz``, for paired comparisons
with ``editlab.paired``): ``OUT/NAME.json`` holds its command, the commit it ran on (a dirty tree is named as such), its
seconds, the machine's load while it ran, the per-stage seconds, its summary, its evaluation points
(``curve``), its steps' records (``steps``) and the edited matrices' norms after the last step. When
every run has finished, ``editlab report`` puts them side by side in ``OUT/report``, from the results
JSONs: the committed results redraw the figures without the run directories. ``--collect`` copies
the run directories' records into results JSONs written before they carried them, writes each
finished run's per-example probe outcomes (``OUT/NAME.probes.jsonl.gz``,
editlab.commands.probe_values: from its final edit state and the probe cache; it loads the model),
runs nothing and writes the report. ``--progress`` prints every evaluation point so far of each run,
an unfinished one's from its last edit-state checkpoint, and runs nothing. ``editlab study A.yaml
B.yaml`` runs the runs of several files as one queue in file order, ``--parallel`` processes at once
for all of them (a slot a finished run frees goes to the next run, whichever file it is in); each
file keeps its runs_dir, out, threads and report. SIGTERM stops a study: its runs get the
signal (each finishes its step, saves its state and exits), no further run starts, exit status 143.
``--parallel P`` and ``--threads T`` override the files' (a run that must finish in one sitting can
have both cores: ``--parallel 1 --threads 2``); the thread count is not part of what makes a run
finished, so changing it never runs a finished run again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from editlab import rundir
from editlab.errors import SIGTERM_EXIT
from editlab.files import write_text_atomic
from editlab.paired import CASE_FILE_SUFFIX, PROBE_FILE_SUFFIX, read_case_records, write_case_values, write_records
from editlab.report import (
    fmt,
    fmt_count,
    last_layer_l1_growth,
    load_config,
    load_jsonl,
    markdown_table,
    write_comparison,
)


@dataclass
class StudyRun:
    name: str
    config: str
    args: list[str] = field(default_factory=list)


@dataclass
class Study:
    name: str
    runs_dir: Path
    out: Path
    runs: list[StudyRun]
    parallel: int = 2
    threads: int = 1
    # A run (in ``out``, this file's or another's) whose pre-edit point starts the report's curves of
    # the runs that skip theirs (evaluation.pre false: the unedited model evaluated once per slice).
    shared_pre: str | None = None
    report: Path | None = None  # the side-by-side report's directory (default: out/report)

    @property
    def report_dir(self) -> Path:
        return self.report if self.report is not None else self.out / "report"


class StudyError(ValueError):
    pass


class Launches:
    """The fit processes a study has running, and whether the study was told to stop. Stopped
    (SIGTERM: a scheduler's preemption or time limit), it passes the signal on to them, so each
    finishes its step, saves its edit state and exits, and it starts no further run."""

    def __init__(self) -> None:
        self.running: set[subprocess.Popen] = set()
        self.stopping = False
        self.lock = threading.Lock()  # taken by the pool's threads only, never by the signal handler's

    def start(self, argv: list[str], **popen) -> subprocess.Popen | None:
        with self.lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(argv, **popen)
            self.running.add(proc)
            return proc

    def wait(self, proc: subprocess.Popen) -> int:
        rc = proc.wait()
        with self.lock:
            self.running.discard(proc)
        return rc

    def stop(self, signum: int, frame=None) -> None:
        self.stopping = True
        for proc in list(self.running):
            proc.send_signal(signal.SIGTERM)


@contextmanager
def stop_on_sigterm(launches: Launches) -> Iterator[None]:
    """SIGTERM to this process stops the study (:meth:`Launches.stop`) instead of ending it at once,
    which would leave its fit processes running unattended."""
    previous = signal.signal(signal.SIGTERM, launches.stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_study(path: str | Path) -> Study:
    """Parse and check a study file; every problem is one line naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study file")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file is a mapping with name, runs_dir, out and runs")
    for key in ("name", "runs_dir", "out", "runs"):
        if key not in raw:
            raise StudyError(f"{path}: missing field {key!r}")
    runs, seen = [], set()
    for i, item in enumerate(raw["runs"] or []):
        if not isinstance(item, dict) or "name" not in item or "config" not in item:
            raise StudyError(f"{path}: runs[{i}] needs a name and a config")
        if item["name"] in seen:
            raise StudyError(f"{path}: runs[{i}]: the name {item['name']!r} is used twice")
        if not Path(item["config"]).is_file():
            raise StudyError(f"{path}: runs[{i}] ({item['name']}): no such config {item['config']}")
        seen.add(item["name"])
        runs.append(StudyRun(str(item["name"]), str(item["config"]), [str(a) for a in item.get("args", [])]))
    if not runs:
        raise StudyError(f"{path}: runs is empty")
    study = Study(
        str(raw["name"]),
        Path(raw["runs_dir"]),
        Path(raw["out"]),
        runs,
        int(raw.get("parallel", 2)),
        int(raw.get("threads", 1)),
        raw.get("shared_pre"),
        Path(raw["report"]) if raw.get("report") is not None else None,
    )
    if study.shared_pre is not None and not isinstance(study.shared_pre, str):
        raise StudyError(f"{path}: shared_pre names one run (a results JSON in out), got {study.shared_pre!r}")
    if study.parallel < 1 or study.threads < 1:
        raise StudyError(f"{path}: parallel and threads must be >= 1")
    return study


def run_command(study: Study, run: StudyRun) -> list[str]:
    """The ``editlab fit`` command of one run (resumable, with the study's thread count)."""
    return [
        "editlab",
        "fit",
        "--config",
        run.config,
        *run.args,
        "--trainer.default_root_dir",
        str(study.runs_dir / run.name),
        "--ckpt_path",
        "last",
        "--threads",
        str(study.threads),
    ]


def command_words(command: str) -> list[str]:
    """A run's command line (as a results JSON records it: words joined by spaces, where an argument
    may hold a space) as words, less its ``--threads N``: the thread count changes a run's seconds,
    not what it computes, so a run finished at one thread is finished at two (``--threads``)."""
    words = command.split()
    if "--threads" not in words:
        return words
    at = words.index("--threads")
    return words[:at] + words[at + 2 :]


def commit_of(repo: Path) -> str:
    """The commit the code runs on, with ``-dirty`` when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def step_rows(run_dir: Path) -> list[dict]:
    """steps.jsonl's records ([] without the file)."""
    return load_jsonl(run_dir / rundir.STEPS) or []


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds per edit of each stage, summed over steps.jsonl's ``*seconds*`` values."""
    totals: dict[str, float] = {}
    for row in step_rows(run_dir):
        for key, value in row.items():
            if "seconds" in key and isinstance(value, (int, float)):
                totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def finished_record(study: Study, run: StudyRun) -> dict | None:
    """The results JSON of a finished run, else None. A results JSON with returncode 0 and the same
    command is a finished run even without its run directory (committed results, run elsewhere):
    running it again would spend hours to write the same record."""
    result_path = study.out / f"{run.name}.json"
    if not result_path.is_file():
        return None
    record = json.loads(result_path.read_text())
    recorded = command_words(str(record.get("command", "")))
    same = record.get("returncode") == 0 and recorded == command_words(" ".join(run_command(study, run)))
    return record if same or (study.runs_dir / run.name / rundir.SUMMARY).is_file() else None


def final_weight_norms(run_dir: Path) -> dict[str, float]:
    """The edited matrices' norms after the last step (steps.jsonl's last ``weight_norm/*`` values):
    the growth a table reports, kept with the results when the run directory is gone."""
    rows = step_rows(run_dir)
    return {k: v for k, v in (rows[-1] if rows else {}).items() if k.startswith("weight_norm/")}


def run_records(run_dir: Path) -> dict:
    """What a results JSON keeps of a finished run's directory besides its summary: the evaluation
    points, the steps' records and the edited matrices' last norms (a comparison's figures)."""
    return {
        "curve": load_jsonl(run_dir / rundir.CURVE) or [],
        "steps": step_rows(run_dir),
        "weight_norms_end": final_weight_norms(run_dir),
    }


def collect(study: Study) -> list[str]:
    """Refresh each finished run's results JSON with :func:`run_records` of its run directory (a run
    whose results JSON predates them); run nothing. Returns the names refreshed."""
    refreshed = []
    for run in study.runs:
        record, run_dir = finished_record(study, run), study.runs_dir / run.name
        if record is None or record.get("returncode") != 0 or not (run_dir / rundir.SUMMARY).is_file():
            continue
        fresh = {**record, **run_records(run_dir)}
        if fresh != record:
            write_text_atomic(study.out / f"{run.name}.json", json.dumps(fresh, indent=1) + "\n")
            refreshed.append(run.name)
        if keep_case_values(study, run) and run.name not in refreshed:
            refreshed.append(run.name)
        if keep_probe_values(study, run) and run.name not in refreshed:
            refreshed.append(run.name)
    return refreshed


def keep_probe_values(study: Study, run: StudyRun) -> bool:
    """Write a finished run's per-example probe outcomes beside its results JSON
    (editlab.commands.probe_values: from its final edit state and the probe cache) unless the file
    is there or the run probed nothing. Returns whether it wrote one."""
    run_dir, out = study.runs_dir / run.name, study.out / f"{run.name}{PROBE_FILE_SUFFIX}"
    probes = ((load_config(run_dir) or {}).get("model", {}).get("evaluation", {}).get("probes") or {}).get("tasks")
    if out.is_file() or not probes:
        return False
    from editlab.commands.probe_values import run_probe_values  # loads the model: only here

    write_records(run_probe_values(run_dir), out)
    return True


def case_values_path(study: Study, run: StudyRun) -> Path:
    return study.out / f"{run.name}{CASE_FILE_SUFFIX}"


def keep_case_values(study: Study, run: StudyRun, overwrite: bool = False) -> bool:
    """Write the compact copy of a finished run's cases.jsonl beside its results JSON (paired
    comparisons of runs need the per-case values once the run directory is gone); one already
    there is kept unless ``overwrite`` (a results JSON just written). Returns whether it wrote one."""
    cases, out = study.runs_dir / run.name / rundir.CASES, case_values_path(study, run)
    if not cases.is_file() or (out.is_file() and not overwrite):
        return False
    write_case_values(cases, out)
    return True


def execute(study: Study, run: StudyRun, repo: Path, launcher: list[str] | None, launches: Launches) -> dict:
    """Run one member of the study (or skip it when it has finished) and write its results JSON."""
    run_dir = study.runs_dir / run.name
    result_path = study.out / f"{run.name}.json"
    cmd = run_command(study, run)
    record = finished_record(study, run)
    if record is not None:
        return record
    head = {"name": run.name, "command": " ".join(cmd)}
    if (run_dir / rundir.SUMMARY).is_file():
        # Finished in an earlier sitting whose study process ended before writing the results JSON
        # (fit would refuse the finished directory): the record comes from the run directory, the
        # commit from the checkout the study runs from (a study's worktree stays at one commit).
        record = {**head, "returncode": 0, "commit": commit_of(repo), "threads": study.threads}
        return write_record(study, run, {**record, **finished_run_files(run_dir)})
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(study.threads),
        "MKL_NUM_THREADS": str(study.threads),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
    }
    load_start = os.getloadavg()
    start = time.time()
    # ``launcher`` stands in for the ``editlab`` program (tests run this checkout's module).
    argv = launcher + cmd[1:] if launcher else cmd
    with open(study.runs_dir / f"{run.name}.log", "a") as log:
        proc = launches.start(argv, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc is None:
            return {**head, "returncode": None, "not_started": "the study stopped"}
        rc = launches.wait(proc)
    seconds = time.time() - start
    record = {**head, "returncode": rc, "commit": commit_of(repo)}
    if rc != 0:
        print(f"editlab study: {run.name} failed (exit {rc}); see {study.runs_dir / run.name}.log", file=sys.stderr)
        return record
    record.update(
        {
            "seconds_this_sitting": round(seconds, 1),
            "loadavg_1min_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
            "cpus": os.cpu_count(),
            "threads": study.threads,
            "parallel": study.parallel,
            **finished_run_files(run_dir),
        }
    )
    print(f"editlab study: {run.name} done, {seconds:.0f} s this sitting -> {result_path}", file=sys.stderr)
    return write_record(study, run, record)


def finished_run_files(run_dir: Path) -> dict:
    """What a results JSON takes from a finished run's directory: seconds per edit of each stage,
    the summary and :func:`run_records`."""
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    edits = max(int(summary.get("edits", 0)), 1)
    stage_totals = stage_seconds(run_dir)  # z, keys, solve, ... of every step
    if "seconds_evaluation" in summary:  # every evaluation point, pre-edit one included
        stage_totals["seconds_evaluation"] = summary["seconds_evaluation"]
    return {
        "seconds_per_edit": {k: v / edits for k, v in stage_totals.items()},
        "summary": summary,
        **run_records(run_dir),
    }


def write_record(study: Study, run: StudyRun, record: dict) -> dict:
    """The results JSON of a finished run, and the compact copy of its per-case values."""
    study.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(study.out / f"{run.name}.json", json.dumps(record, indent=1) + "\n")
    keep_case_values(study, run, overwrite=True)
    return record


def run_state(study: Study, run: StudyRun) -> str:
    """``finished``, ``to run``, or for a run started earlier ``started (<its log's last step
    line>)``: a long study's --list says how far each run has come without opening its edit state."""
    if finished_record(study, run) is not None:
        return "finished"
    log = study.runs_dir / f"{run.name}.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    steps = [line for line in lines if line.startswith("editlab: step ")]
    if steps:
        return f"started ({steps[-1].removeprefix('editlab: ')})"
    return "started (no step done)" if (study.runs_dir / run.name).is_dir() else "to run"


PROGRESS_METRICS = [
    "efficacy_success",
    "generalization_success",
    "specificity_success",
    "me_ppl50_perplexity",
    "fluency",
]  # --progress's default columns


def run_progress(study: Study, run: StudyRun) -> tuple[list[dict], list[dict]] | None:
    """(evaluation points, steps' records) of a run so far: a finished run's results JSON, else the
    records its last edit-state checkpoint carries, else None (not started, or no step done)."""
    record = finished_record(study, run)
    if record is not None and "curve" in record:
        return record["curve"], record.get("steps", [])
    path = rundir.edit_state_path(study.runs_dir / run.name)
    if not path.is_file():
        return None
    from editlab.lightning.editstate import load_edit_state  # torch and lightning: only when a run has one

    results = json.loads(load_edit_state(path)["results"])
    return results["curve"], results["steps_log"]


def progress_table(study: Study, metrics: list[str]) -> list[str]:
    """A row per evaluation point of every run so far: its timing, edits, ``metrics`` and the L1
    growth of the last edited layer's matrix at that step (the state of a long study mid-way,
    without waiting for its results JSONs)."""
    rows = []
    for run in study.runs:
        got = run_progress(study, run)
        if got is None:
            continue
        curve, steps = got
        growth_at = {int(row["step"]): last_layer_l1_growth(row) for row in steps if "step" in row}
        for point in curve:
            growth = growth_at.get(int(point.get("step", -1)))
            last = "—" if growth is None else f"{100 * growth:+.1f}%"
            values = [fmt(point.get(key)) for key in metrics]
            rows.append([run.name, str(point.get("timing", "—")), fmt_count(point.get("edits")), *values, last])
    header = ["run", "point", "edits", *metrics, "L1 growth, last layer"]
    return markdown_table(header, rows)


def run_study(
    study: Study, repo: Path, launcher: list[str] | None = None, launches: Launches | None = None
) -> list[dict]:
    """Every run, ``study.parallel`` at a time (``launches``: the processes, for a stop)."""
    return run_studies([study], repo, study.parallel, launcher, launches)[0]


def run_studies(
    studies: list[Study],
    repo: Path,
    parallel: int,
    launcher: list[str] | None = None,
    launches: Launches | None = None,
) -> list[list[dict]]:
    """The runs of several studies in one queue, in file order, ``parallel`` processes at once for
    all of them (a slot a finished run frees goes to the next run, whichever study it is in); each
    study's report once its own runs have finished. Returns each study's records."""
    launches = launches or Launches()
    queue = [(study, run) for study in studies for run in study.runs]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        flat = list(pool.map(lambda item: execute(item[0], item[1], repo, launcher, launches), queue))
    per_study, start = [], 0
    for study in studies:
        records, start = flat[start : start + len(study.runs)], start + len(study.runs)
        write_report(study, records)
        per_study.append(records)
    return per_study


def write_report(study: Study, records: list[dict]) -> None:
    """The side-by-side report of the results JSONs, once every run has finished."""
    finished = zip(study.runs, records, strict=True)
    done = [study.out / f"{run.name}.json" for run, record in finished if record.get("returncode") == 0]
    if len(done) == len(study.runs) and len(done) > 1:
        write_comparison(done, study.report_dir, shared_pre_source(study, done))


def shared_pre_source(study: Study, done: list[Path]) -> Path | None:
    """The results JSON named by ``shared_pre``, once its case file lists the same records as each
    run's that has one: a pre-edit point of other records would start the curves somewhere false."""
    if study.shared_pre is None:
        return None
    source = study.out / f"{study.shared_pre}.json"
    if not source.is_file():
        raise StudyError(f"{study.name}: shared_pre {study.shared_pre}: no results JSON {source}")
    ids = case_ids(study.out / f"{study.shared_pre}{CASE_FILE_SUFFIX}")
    for path in done:
        own = case_ids(path.with_name(f"{path.stem}{CASE_FILE_SUFFIX}"))
        if ids is not None and own is not None and own != ids:
            raise StudyError(
                f"{study.name}: shared_pre {study.shared_pre}: {path.stem} evaluated other records "
                f"({len(own ^ ids)} case ids differ), so it cannot start at that pre-edit point"
            )
    return source


def case_ids(path: Path) -> set[str] | None:
    """The case ids of a run's compact case file, None when there is none."""
    return {str(r["case_id"]) for r in read_case_records(path)} if path.is_file() else None


def select_runs(studies: list[Study], names: list[str], paths: list[str]) -> list[Study]:
    """The studies cut down to the runs named (``--only``), those left with none dropped; a name
    no file has is one error naming the files and their runs."""
    known = {run.name for study in studies for run in study.runs}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise StudyError(
            f"{', '.join(paths)}: --only: no run named {', '.join(unknown)} (runs: {', '.join(sorted(known))})"
        )
    for study in studies:
        study.runs = [run for run in study.runs if run.name in names]
    return [study for study in studies if study.runs]


def study_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="editlab study", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="the study file (YAML); several run as one queue, in order, sharing --parallel's slots",
    )
    parser.add_argument("--list", action="store_true", help="print each run's command and whether it has finished")
    parser.add_argument(
        "--parallel",
        type=int,
        help="processes at once, instead of the file's (several files: the smallest of theirs) "
        "(e.g. 1 while another study shares the machine)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op threads per process, instead of the file's (e.g. 2 with --parallel 1, for a run "
        "that must finish in one sitting on two cores); a run finished at another count is still finished",
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these runs of the files")
    parser.add_argument(
        "--progress",
        nargs="*",
        metavar="KEY",
        help="print every evaluation point so far of each run (finished or from its last checkpoint) with these "
        f"metrics (default: {' '.join(PROGRESS_METRICS)}); run nothing",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="copy finished runs' curve, steps and norms into their results JSONs and write the report; run nothing",
    )
    args = parser.parse_args(argv)
    try:
        studies = [read_study(path) for path in args.files]
        if args.only:
            studies = select_runs(studies, args.only, args.files)
    except StudyError as err:
        print(f"editlab study: error: {err}", file=sys.stderr)
        return 2
    for option, value in (("--parallel", args.parallel), ("--threads", args.threads)):
        if value is not None and value < 1:
            print(f"editlab study: error: {option} must be >= 1", file=sys.stderr)
            return 2
    parallel = args.parallel if args.parallel is not None else min(study.parallel for study in studies)
    for study in studies:
        study.parallel = parallel  # what each results JSON records: the processes that shared the machine
        if args.threads is not None:
            study.threads = args.threads
    if args.list:
        for study in studies:
            for run in study.runs:
                print(f"{run.name}\t{run_state(study, run)}\t{' '.join(run_command(study, run))}")
        return 0
    if args.progress is not None:
        for study in studies:
            print("\n".join(progress_table(study, args.progress or PROGRESS_METRICS)))
        return 0
    try:
        if args.collect:
            for study in studies:
                refreshed = collect(study)
                print(f"editlab study: {study.name}: refreshed {', '.join(refreshed) or 'nothing'}", file=sys.stderr)
                write_report(study, [finished_record(study, run) or {} for run in study.runs])
            return 0
        launches = Launches()
        with stop_on_sigterm(launches):
            per_study = run_studies(studies, Path.cwd(), parallel, launches=launches)
    except StudyError as err:  # e.g. the report's shared pre-edit point: the results JSONs are written
        print(f"editlab study: error: {err}", file=sys.stderr)
        return 2
    if launches.stopping:
        print("editlab study: stopped by SIGTERM; run the same command again to continue", file=sys.stderr)
        return SIGTERM_EXIT  # as its fit processes exit
    failed = [r["name"] for records in per_study for r in records if r.get("returncode") != 0]
    if failed:
        print(f"editlab study: error: runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("\n".join(str(study.out) for study in studies))
    return 0
