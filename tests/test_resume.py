"""Reliability of a run on a tiny model, through the real CLI in subprocesses: a run killed with
SIGKILL in the middle of step 6, in a periodic evaluation or after the first z chunk of a step, or
stopped by SIGTERM in step 5, before an evaluation or in its generations, and resumed with
--ckpt_path last ends bit-identical to an uninterrupted one; the same config and seed give the same
run; a checkpoint written after the last step redoes only the final evaluation; resuming is refused
when it would not continue the same run."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from editlab.lightning.cli import EditLabCLI
from editlab.lightning.editstate import edit_state_path, load_edit_state
from editlab.models.tiny import save_tiny

from helpers import REPO, SHARED_DATA, tiny_memit_fit_options

STEPS = 10
KILL_STEP = 6
EVERY = 2  # checkpoints after steps 2, 4, ...: the kill in step 6 resumes from step 4


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    save_tiny(root / "tiny", "gpt2")
    with gzip.open(SHARED_DATA / "multi_counterfact.json.gz", "rt") as f:
        records = json.load(f)[:STEPS]
    (root / "data.json").write_text(json.dumps(records))
    (root / "corpus.txt").write_text(
        "\n".join(f"Sentence number {i} talks about cities and people." for i in range(20))
    )
    return root


def args(base: Path, run: str, *extra: str) -> list[str]:
    opts = {
        # periodic: the curve has points before and after the interruption (steps 3, 6, 9, 10)
        **tiny_memit_fit_options(base),
        "--model.checkpoint_every": str(EVERY),
        "--model.export": "true",
        "--data.path": str(base / "data.json"),
        "--data.edits_per_step": "1",
        "--trainer.default_root_dir": str(base / run),
        "--trainer.enable_progress_bar": "false",
    }
    return [x for kv in opts.items() for x in kv] + list(extra)


def env(base: Path) -> dict[str, str]:
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "EDITLAB_CACHE": str(base / "cache"),
        "PYTHONPATH": path,
    }


def fit(base: Path, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "editlab.cli", "fit", *argv]
    return subprocess.run(cmd, cwd=base, env=env(base), capture_output=True, text=True, timeout=300)


def refused(argv: list[str], capsys) -> str:
    """Run the CLI in-process where it must stop before any work; return what it said."""
    with pytest.raises(SystemExit) as info:
        EditLabCLI(args=["fit", *argv])
    return str(info.value) + capsys.readouterr().err


@pytest.fixture(scope="module")
def full(base) -> Path:
    proc = fit(base, args(base, "full"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "full"


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "edited_model" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    da, db = load_file(a / "edit_delta.safetensors"), load_file(b / "edit_delta.safetensors")
    assert set(da) == set(db) and all(torch.equal(da[k], db[k]) for k in da)


def no_timing(row: dict) -> dict:
    skip = ("export_dir", "export_delta", "resumed_from_step")
    return {k: v for k, v in row.items() if "seconds" not in k and k not in skip}


def jsonl(path: Path) -> list[dict]:
    return [no_timing(json.loads(line)) for line in path.read_text().splitlines()]


def assert_same_results(a: Path, b: Path) -> None:
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert no_timing(sa) == no_timing(sb)
    for name in ("cases.jsonl", "curve.jsonl", "steps.jsonl"):
        assert jsonl(a / name) == jsonl(b / name), name
    with open(a / "metrics.csv") as fa, open(b / "metrics.csv") as fb:
        ra, rb = [no_timing(r) for r in csv.DictReader(fa)], [no_timing(r) for r in csv.DictReader(fb)]
    assert ra == rb


def resumes_to_full(base: Path, full: Path, run: str, after_step: int) -> None:
    """``--ckpt_path last`` on ``run`` continues after ``after_step`` and ends as the uninterrupted run."""
    resumed = fit(base, args(base, run, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after step {after_step}" in resumed.stderr
    assert_same_weights(full, base / run)
    assert_same_results(full, base / run)


def kill_in_step(
    base: Path, run: str, step: int, sig: int = signal.SIGKILL, hang_seconds: float = 600, where: str = "HangInStep"
) -> str:
    """Start a run that hangs in the middle of ``step`` (``where``: HangInEvaluation, in the
    evaluation point after ``step``; HangInGeneration, in that point's generations) and send it
    ``sig`` there; its stderr."""
    marker = base / f"{run}_in_step_{step}"
    hang = [
        f"--trainer.callbacks+=helpers.{where}",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.marker={marker}",
        f"--trainer.callbacks.seconds={hang_seconds}",
    ]
    cmd = [sys.executable, "-m", "editlab.cli", "fit", *args(base, run, *hang)]
    proc = subprocess.Popen(cmd, cwd=base, env=env(base), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"step {step} never started"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    return f"exit {proc.returncode}\n{err}"


@pytest.mark.slow  # starts processes
def test_killed_in_step_6_and_resumed_is_bit_identical(base, full, capsys, monkeypatch):
    monkeypatch.setenv("EDITLAB_CACHE", str(base / "cache"))
    kill_in_step(base, "killed", KILL_STEP)  # in step 6, with one of its two layers already written
    run = base / "killed"
    state = load_edit_state(edit_state_path(run))
    assert state["steps_done"] == 4 and state["edits_done"] == 4 and not state["final"]
    assert not (run / "summary.json").exists() and not list(run.glob("checkpoints/*.tmp"))

    # Restarting the interrupted directory from scratch, or resuming it with other options, is refused.
    said = refused(args(base, "killed"), capsys)
    assert "interrupted run" in said and "--ckpt_path last" in said
    said = refused(args(base, "killed", "--ckpt_path", "last", "--model.method.mom2_weight", "2.0"), capsys)
    assert "model.method.init_args.mom2_weight: 1.0 -> 2.0" in said
    state = load_edit_state(edit_state_path(run))
    assert state["steps_done"] == 4
    earlier = json.loads(state["results"])["curve"]  # the points of the killed sitting: pre, step 3

    resumed = fit(base, args(base, "killed", "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "after step 4" in resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4
    # Each evaluation point keeps its own seconds, the killed sitting's too; the summary sums them all.
    curve = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in earlier] == [0, 3] and [p["step"] for p in curve] == [0, 3, 6, 9, 10]
    assert [p["seconds_evaluation"] for p in curve[:2]] == [p["seconds_evaluation"] for p in earlier]
    assert all(p["seconds_evaluation"] > 0 for p in curve)
    assert summary["seconds_evaluation"] == pytest.approx(sum(p["seconds_evaluation"] for p in curve))
    assert_same_weights(full, run)
    assert_same_results(full, run)
    assert load_edit_state(edit_state_path(run))["final"]

    # A finished run has nothing to resume.
    assert "nothing to resume" in refused(args(base, "killed", "--ckpt_path", "last"), capsys)


@pytest.mark.slow  # starts processes
def test_killed_in_the_first_step_keeps_the_pre_edit_evaluation(base, full):
    # The state written after the pre-edit evaluation: a resumed run does not evaluate the
    # unedited model again (hours on a 2,000-case stream) and ends bit-identical.
    kill_in_step(base, "killed_first", 1)
    run = base / "killed_first"
    state = load_edit_state(edit_state_path(run))
    assert state["steps_done"] == 0 and json.loads(state["results"])["pre"]["metrics"]
    resumes_to_full(base, full, "killed_first", after_step=0)


@pytest.mark.slow  # starts processes
def test_killed_in_a_periodic_evaluation_keeps_the_step_before_it(base, full):
    # The point after step 3 runs when step 4 starts, after the state after step 3 is saved
    # (checkpoints fall after even steps): a crash in an evaluation of an hour loses no step.
    kill_in_step(base, "killed_eval", 3, where="HangInEvaluation")
    state = load_edit_state(edit_state_path(base / "killed_eval"))
    assert state["steps_done"] == 3 and not state["final"]
    assert [p["step"] for p in json.loads(state["results"])["curve"]] == [0]  # point 3 not yet
    resumes_to_full(base, full, "killed_eval", after_step=3)


@pytest.mark.slow  # starts processes
def test_killed_in_the_second_z_chunk_of_a_step_keeps_the_first(base):
    # Two requests per step, z one request per forward, 3 steps: killed in step 2 (the callback's
    # hooks see 1 step done) after the first request's z, the resumed run (from the pre-edit state:
    # checkpoints after even steps) takes that z from checkpoints/step_parts/step_2.pt, computes the second
    # and ends as the uninterrupted run.
    chunked = (
        "--data.num_edits",
        "6",
        "--data.edits_per_step",
        "2",
        "--model.method.targets.requests_per_forward",
        "1",
    )
    full = fit(base, args(base, "full_chunked", *chunked))
    assert full.returncode == 0, full.stderr[-3000:]
    marker = base / "z_chunk_marker"
    hang = [
        "--trainer.callbacks+=helpers.HangInSecondZChunk",
        "--trainer.callbacks.step=1",
        f"--trainer.callbacks.marker={marker}",
    ]
    cmd = [sys.executable, "-m", "editlab.cli", "fit", *args(base, "killed_z", *chunked, *hang)]
    proc = subprocess.Popen(cmd, cwd=base, env=env(base), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the second z chunk never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=240)
    run = base / "killed_z"
    parts = torch.load(run / "checkpoints" / "step_parts" / "step_2.pt", weights_only=True)
    assert parts["unit"]["step"] == 2 and [n.split(",")[0] for n in parts["parts"]] == ["z of requests 0-0"]
    resumed = fit(base, args(base, "killed_z", *chunked, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "editlab: step 2 took 1 part(s) (z of requests 0-0" in resumed.stderr
    assert_same_weights(base / "full_chunked", run)
    assert_same_results(base / "full_chunked", run)
    assert not list((run / "checkpoints").glob("step_parts/*"))


@pytest.mark.slow  # starts processes
def test_sigterm_in_an_evaluation_point_stops_after_its_part_in_progress(base, full):
    # SIGTERM while the point after step 3 generates: the run stops once the generations are kept,
    # not after the rest of the point and step 4; the resumed run takes the point's parts.
    said = kill_in_step(base, "stopped_in_eval", 3, signal.SIGTERM, hang_seconds=2, where="HangInGeneration")
    assert said.startswith("exit 143\n") and "stopped in an evaluation point, its part 'generation' kept" in said
    assert "continues with the evaluation after step 3, then step 4" in said
    run = base / "stopped_in_eval"
    state = load_edit_state(edit_state_path(run))
    assert state["steps_done"] == 3 and [p["step"] for p in json.loads(state["results"])["curve"]] == [0]
    parts = torch.load(run / "checkpoints" / "evaluation_parts.pt", weights_only=True)
    assert list(parts["parts"]) == ["cases", "generated", "generation"] and parts["unit"]["steps"] == 3
    resumed = fit(base, args(base, "stopped_in_eval", "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "took cases, generated, generation from the interrupted sitting" in resumed.stderr
    assert resumed.stderr.count("from the interrupted sitting") == 1  # the later points compute everything
    assert_same_weights(full, run)
    assert_same_results(full, run)
    assert not (run / "checkpoints" / "evaluation_parts.pt").exists()  # gone with the results


@pytest.mark.slow  # starts processes
def test_sigterm_before_a_periodic_evaluation_stops_without_it(base, full):
    # SIGTERM in step 6: the run stops after the step, leaving its evaluation point for the
    # resumed run, which evaluates it first.
    said = kill_in_step(base, "stopped_eval", 6, signal.SIGTERM, hang_seconds=2)
    assert said.startswith("exit 143\n") and "continues with the evaluation after step 6, then step 7" in said
    state = load_edit_state(edit_state_path(base / "stopped_eval"))
    assert state["steps_done"] == 6 and [p["step"] for p in json.loads(state["results"])["curve"]] == [0, 3]
    resumes_to_full(base, full, "stopped_eval", after_step=6)


@pytest.mark.slow  # starts processes
def test_sigterm_in_step_5_saves_the_state_after_it_and_exits_non_zero(base, full):
    # A scheduler's SIGTERM (preemption, time limit): Lightning stops after the step in progress;
    # the state after step 5 is saved although checkpoints fall after even steps, the exit status
    # says the run did not finish, and the resumed run recomputes nothing and ends bit-identical.
    said = kill_in_step(base, "stopped", 5, signal.SIGTERM, hang_seconds=2)
    run = base / "stopped"
    assert said.startswith("exit 143\n") and "stopped after step 5" in said and "stopped by SIGTERM" in said
    assert "continues with step 6" in said
    state = load_edit_state(edit_state_path(run))
    assert state["steps_done"] == 5 and not state["final"] and not (run / "summary.json").exists()
    resumes_to_full(base, full, "stopped", after_step=5)


@pytest.mark.slow  # starts processes
def test_sigterm_in_the_last_step_leaves_only_the_final_evaluation(base, full):
    # In the last step Lightning stops at the epoch's end, before the final evaluation: the state
    # saved is the final one, and the resumed run does only that evaluation.
    said = kill_in_step(base, "stopped_last", STEPS, signal.SIGTERM, hang_seconds=2)
    run = base / "stopped_last"
    assert said.startswith("exit 143\n") and "continues with the final evaluation" in said
    state = load_edit_state(edit_state_path(run))
    assert state["steps_done"] == STEPS and state["final"] and not (run / "summary.json").exists()
    resumes_to_full(base, full, "stopped_last", after_step=STEPS)


@pytest.mark.slow  # starts processes
def test_same_config_and_seed_give_the_same_run(base, full):
    # --ckpt_path last in a new directory: nothing to resume, a first run (restartable jobs).
    again = fit(base, args(base, "again", "--ckpt_path", "last"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting from the first step" in again.stderr
    summary = json.loads((base / "again" / "summary.json").read_text())
    assert "resumed_from_step" not in summary and summary["edits"] == STEPS
    assert_same_weights(full, base / "again")
    assert_same_results(full, base / "again")


@pytest.mark.slow  # starts processes
def test_checkpoint_after_the_last_step_redoes_only_the_final_evaluation(base, full):
    # As if the process had died in the final evaluation: the final edit state and the config, no results.
    run = base / "final_crash"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(edit_state_path(full), edit_state_path(run))
    shutil.copy(full / "config.yaml", run / "config.yaml")
    assert load_edit_state(edit_state_path(run))["final"]
    resumed = fit(base, args(base, "final_crash", "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after step {STEPS}" in resumed.stderr
    assert_same_weights(full, run)
    sa, sb = json.loads((full / "summary.json").read_text()), json.loads((run / "summary.json").read_text())
    assert no_timing(sa) == no_timing(sb)
    for name in ("cases.jsonl", "curve.jsonl", "steps.jsonl"):
        assert jsonl(full / name) == jsonl(run / name), name


@pytest.mark.slow  # starts processes
def test_resuming_with_another_thread_count_says_so(base, full):
    # The bits depend on the thread count: the run records it, and a resumption with another one
    # is told that its results will not be bit-identical to an uninterrupted run's.
    saved = load_edit_state(edit_state_path(full))["numerics"]
    assert saved["torch_version"] == torch.__version__ and saved["threads"] >= 1
    assert f"threads: {saved['threads']}" in (full / "config.yaml").read_text()
    other = saved["threads"] + 1
    run = base / "other_threads"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(edit_state_path(full), edit_state_path(run))
    shutil.copy(full / "config.yaml", run / "config.yaml")
    resumed = fit(base, args(base, "other_threads", "--ckpt_path", "last", "--threads", str(other)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"threads: {saved['threads']} -> {other}" in resumed.stderr and "not be bit-identical" in resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["threads"] == other and summary["torch_version"] == torch.__version__
    assert f"threads: {other}" in (run / "config.yaml").read_text()
