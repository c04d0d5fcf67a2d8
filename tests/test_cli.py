"""The CLI: configs parse, a tiny run writes its results, bad input fails before any edit."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from editlab.report import REPORT_IMAGES

from helpers import SHARED_DATA, hold_lock, run_cli, tiny_args


@pytest.mark.slow  # starts processes
def test_tiny_fit_writes_results_into_the_run_dir(tmp_path):
    proc = run_cli(tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz")), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line == str(run / "summary.json")
    summary = json.loads((run / "summary.json").read_text())
    for key in ("edits", "steps", "efficacy_success", "efficacy_accuracy", "seconds_total", "seconds_per_step"):
        assert isinstance(summary[key], (int, float)), key
    assert summary["edits"] == 4 and summary["steps"] == 2
    assert summary["method"] == "MEMIT_seq"  # the variant: tiny_args' MEMIT keeps the sequential cache (default)
    cases = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    with gzip.open(SHARED_DATA / "multi_counterfact.json.gz", "rt") as f:
        first_ids = [str(r["case_id"]) for r in json.load(f)[:4]]
    assert [c["case_id"] for c in cases] == first_ids
    assert [c["step"] for c in cases] == [0, 0, 1, 1]
    for c in cases:
        assert {"prob_new", "prob_true", "efficacy_success"} <= set(c["pre"]) and set(c["pre"]) == set(c["post"])
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    assert not (run / "lightning_logs").exists() and not list(run.glob("version_*"))
    # A second run into the same directory is refused before any work, unless --overwrite.
    again = run_cli(tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz")), tmp_path)
    assert again.returncode != 0 and "already holds a finished run" in again.stderr
    assert json.loads((run / "summary.json").read_text()) == summary
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert "edit/z_loss" in metrics[0] and len(metrics) >= 3  # header + one row per step (+ final)


@pytest.mark.slow  # starts processes
def test_bad_record_fails_before_the_model_loads(tmp_path):
    with gzip.open(SHARED_DATA / "multi_counterfact.json.gz", "rt") as f:
        data = json.load(f)[:4]
    del data[2]["requested_rewrite"]["target_new"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    proc = run_cli(tiny_args(tmp_path, str(path)), tmp_path)
    assert proc.returncode != 0
    assert f"case {data[2]['case_id']}" in proc.stderr and "target_new" in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow  # starts processes
def test_unknown_model_type_is_named(tmp_path):
    from transformers import AutoModelForCausalLM, OPTConfig

    from editlab.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(
        OPTConfig(
            vocab_size=len(tok),
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    model.save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    args = tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"))
    args[args.index("--model.model") + 1] = str(tmp_path / "opt")
    proc = run_cli(args, tmp_path)
    assert proc.returncode != 0
    assert "unknown model_type 'opt'" in proc.stderr


@pytest.mark.slow  # starts processes
def test_wandb_offline_run_records_the_step_metrics(tmp_path):
    run = tmp_path / "run"
    args = tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"))
    args += [
        "--trainer.logger+=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={run}",
        "--trainer.logger.name=",
        "--trainer.logger.version=",
        "--trainer.logger+=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.project=editlab-test",
        f"--trainer.logger.save_dir={run}",
        "--trainer.logger.log_model=false",
    ]
    proc = run_cli(args, tmp_path, WANDB_MODE="offline", WANDB_SILENT="true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(run / "summary.json")
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"edit/z_loss", b"edit/seconds_step", b"eval/efficacy_success", b"cases", b"mom2_weight"):
        assert key in blob, key
    assert (run / "metrics.csv").is_file()
    # The report's plots (metrics, quality, norm heatmaps, step statistics) as W&B images.
    media = runs[0] / "files" / "media" / "images"
    logged = sorted(p.relative_to(media).as_posix() for p in media.rglob("*.png"))
    for key in REPORT_IMAGES:
        assert key.encode() in blob, key
        assert sum(name.startswith(f"{key}_") for name in logged) == 1, (key, logged)


@pytest.mark.slow  # starts processes
def test_export_then_editlab_test_reproduces_the_metrics_and_report_compares(tmp_path):
    data = str(SHARED_DATA / "multi_counterfact.json.gz")
    proc = run_cli(tiny_args(tmp_path, data, **{"--model.export": "true"}), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fit = json.loads((tmp_path / "run" / "summary.json").read_text())
    exported = tmp_path / "run" / "edited_model"
    assert (exported / "model.safetensors").is_file()
    args = tiny_args(
        tmp_path, data, **{"--model.model": str(exported), "--trainer.default_root_dir": str(tmp_path / "tested")}
    )
    args += ["--overwrite", "true"]  # harmless here: the directory is new
    test = run_cli(args, tmp_path, command="test")
    assert test.returncode == 0, test.stderr[-3000:]
    assert test.stdout.strip().splitlines()[-1] == str(tmp_path / "tested" / "summary.json")
    tested = json.loads((tmp_path / "tested" / "summary.json").read_text())
    assert tested["timing"] == "test" and tested["evaluated"] == 4
    for key in ("efficacy_success", "generalization_success", "specificity_success", "efficacy_token_accuracy"):
        assert tested[key] == pytest.approx(fit[key], abs=1e-6), key
    report = run_cli(
        [str(tmp_path / "run"), str(tmp_path / "tested"), "--out", str(tmp_path / "cmp")], tmp_path, command="report"
    )
    assert report.returncode == 0, report.stderr[-2000:]
    table = (tmp_path / "cmp" / "report.md").read_text()
    assert "run" in table and "tested" in table


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize(
    ("timing", "expected"),
    [("immediate", ["pre", "immediate", "immediate"]), ("periodic", ["pre", "periodic", "periodic"])],
)
def test_timing_modes_are_recorded(tmp_path, timing, expected):
    extra = {"--model.evaluation.timing": timing, "--model.evaluation.every_n_steps": "1"}
    proc = run_cli(tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"), **extra), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    curve = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    assert [p["timing"] for p in curve] == expected
    assert [p["edits"] for p in curve] == [0, 2, 4]
    # immediate: each point scores only its own step's 2 requests; periodic: all edits so far.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["timing"] == timing and summary["edits"] == 4
    cases = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]
    assert {c["timing"] for c in cases} == {timing} and len(cases) == 4


@pytest.mark.slow  # starts processes
def test_evaluation_pre_false_skips_only_the_before_evaluation(tmp_path):
    data = str(SHARED_DATA / "multi_counterfact.json.gz")
    with_pre = run_cli(tiny_args(tmp_path, data, **{"--model.evaluation.fluency": "false"}), tmp_path)
    assert with_pre.returncode == 0, with_pre.stderr[-3000:]
    args = tiny_args(
        tmp_path,
        data,
        **{
            "--model.evaluation.fluency": "false",
            "--model.evaluation.pre": "false",
            "--trainer.default_root_dir": str(tmp_path / "nopre"),
        },
    )
    no_pre = run_cli(args, tmp_path)
    assert no_pre.returncode == 0, no_pre.stderr[-3000:]
    a = json.loads((tmp_path / "run" / "summary.json").read_text())
    b = json.loads((tmp_path / "nopre" / "summary.json").read_text())
    assert any(k.startswith("pre_") for k in a) and not any(k.startswith("pre_") for k in b)
    for key in ("efficacy_success", "generalization_success", "specificity_success", "edits", "steps"):
        assert b[key] == a[key], key  # the edits and their evaluation do not depend on the skipped one
    cases = [json.loads(line) for line in (tmp_path / "nopre" / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 4 and all("pre" not in c and "post" in c for c in cases)
    curve = [json.loads(line) for line in (tmp_path / "nopre" / "curve.jsonl").read_text().splitlines()]
    assert [p["timing"] for p in curve] == ["final"]


@pytest.mark.slow  # starts processes
def test_the_cache_dir_option_holds_the_runs_caches(tmp_path):
    data = str(SHARED_DATA / "multi_counterfact.json.gz")
    args = tiny_args(
        tmp_path, data, **{"--model.evaluation.fluency": "false", "--model.cache_dir": str(tmp_path / "mine")}
    )
    proc = run_cli(args, tmp_path)  # EDITLAB_CACHE is tmp_path / "cache"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "mine" / "stats").glob("mom2_l*.pt"))) == 2  # layers 0 and 1
    assert not (tmp_path / "cache" / "stats").exists()


# -- user errors: one "editlab: error: …" line, exit status 2 ----------------------------------


def refused_in_process(args: list[str], capsys) -> tuple[int, list[str]]:
    """``editlab fit ARGS`` through main() in this process: its exit status and stderr lines."""
    from editlab.cli import main

    capsys.readouterr()  # what came before (save_tiny's bars) is not the command's
    with pytest.raises(SystemExit) as info:
        main(["fit", *args])
    return info.value.code, capsys.readouterr().err.splitlines()


def assert_one_error(code, lines: list[str], expected: str) -> None:
    assert code == 2, lines
    assert len(lines) <= 3, lines
    assert lines[-1] == f"editlab: error: {expected}", lines


def bad_record_file(tmp_path: Path) -> tuple[Path, str]:
    with gzip.open(SHARED_DATA / "multi_counterfact.json.gz", "rt") as f:
        data = json.load(f)[:4]
    del data[2]["requested_rewrite"]["subject"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path, f"case {data[2]['case_id']} (record 2 of {path}): field 'requested_rewrite.subject' is missing"


def test_malformed_record_is_one_error_line(tmp_path, capsys):
    path, expected = bad_record_file(tmp_path)
    code, lines = refused_in_process(tiny_args(tmp_path, str(path)), capsys)
    assert_one_error(code, lines, expected)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_bad_option_value_is_one_error_line(tmp_path, capsys):
    args = tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"), **{"--data.num_edits": "-5"})
    code, lines = refused_in_process(args, capsys)
    assert_one_error(code, lines, "option num_edits=-5 must be >= 1 (or None for all)")


def test_missing_model_is_one_error_line(tmp_path, capsys):
    args = tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"), **{"--model.model": "/no/such"})
    code, lines = refused_in_process(args, capsys)
    assert_one_error(code, lines, "model /no/such: no such directory, and not a hub model id (owner/name) either")


def test_debug_shows_the_traceback_instead(tmp_path, monkeypatch):
    from editlab.cli import main
    from editlab.errors import ConfigError

    args = tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"), **{"--data.num_edits": "-5"})
    with pytest.raises(ConfigError, match="num_edits=-5"):
        main(["fit", *args, "--debug"])
    monkeypatch.setenv("EDITLAB_DEBUG", "1")
    with pytest.raises(ConfigError, match="num_edits=-5"):
        main(["fit", *args])


@pytest.mark.slow  # starts processes
def test_directory_in_use_is_one_error_line(tmp_path, capsys):
    from editlab.runlock import lock_path, parse_lock

    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        code, lines = refused_in_process(tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz")), capsys)
        lock = lock_path(run)
        assert_one_error(
            code,
            lines,
            f"{run} is in use by another editlab run (process {holder.pid}, lock {lock}); wait for it to end "
            "or choose another --trainer.default_root_dir",
        )
        assert parse_lock(lock.read_text())[0] == holder.pid  # the owner's lock is left alone
        assert sorted(p.name for p in run.iterdir()) == [lock.name]  # nothing else written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # starts processes
def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    import socket

    from editlab.runlock import RunDirInUse, acquire_run_lock, lock_path, lock_text, parse_lock, release_run_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a killed run leaves its lock behind: its pid is no longer alive
    lock_path(tmp_path).write_text(lock_text(dead.pid, socket.gethostname()))
    path = acquire_run_lock(tmp_path)
    assert parse_lock(path.read_text()) == (os.getpid(), socket.gethostname())
    assert acquire_run_lock(tmp_path) == path  # the same process again: already its own
    assert not list(tmp_path.glob("*.stale")) and not list(tmp_path.glob("*.tmp"))
    release_run_lock(path)
    assert not path.exists()
    # A lock from another host cannot be checked for liveness: it is respected.
    lock_path(tmp_path).write_text(lock_text(1, "another-host"))
    with pytest.raises(RunDirInUse, match="process 1 on another-host"):
        acquire_run_lock(tmp_path)


def test_full_disk_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    import errno

    from editlab import files
    from editlab.errors import DiskFullError, user_error_message

    target = files.write_text_atomic(tmp_path / "summary.json", '{"edits": 4}\n')

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(DiskFullError) as info:
        files.write_text_atomic(target, '{"edits": 8}\n')
    assert target.read_text() == '{"edits": 4}\n'  # the previous file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no half-written temporary left
    message = user_error_message(info.value)
    assert message.startswith(f"no space left on device while writing {target}; the previous summary.json")
    with pytest.raises(DiskFullError):
        files.save_torch_atomic({"x": 1}, tmp_path / "state.pt")
    assert not (tmp_path / "state.pt").exists()


def test_step_line_says_where_the_stream_is():
    from editlab.console import step_line

    record = {"step": 3, "edits": 6, "seconds": 12.34, "seconds_z": 10.0, "seconds_solve": 2.2, "z_loss": 0.12345}
    assert step_line(record, 10) == "editlab: step 3/10, 6 edits, 12.3s (z 10.0s, solve 2.2s), z loss 0.1235"
    assert step_line({"step": 1, "edits": 1, "seconds": 0.5}, None) == "editlab: step 1, 1 edits, 0.5s"


@pytest.mark.slow
def test_user_errors_in_a_subprocess_print_one_line(tmp_path):
    """The real stderr of a process: no Lightning start-up lines, no traceback."""
    path, expected = bad_record_file(tmp_path)
    proc = run_cli(tiny_args(tmp_path, str(path)), tmp_path)
    assert_one_error(proc.returncode, proc.stderr.splitlines(), expected)
    args = tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"), **{"--data.num_edits": "-5"})
    proc = run_cli(args, tmp_path)
    assert_one_error(proc.returncode, proc.stderr.splitlines(), "option num_edits=-5 must be >= 1 (or None for all)")
    args = tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"), **{"--model.model": "/no/such"})
    proc = run_cli(args, tmp_path)
    assert_one_error(
        proc.returncode,
        proc.stderr.splitlines(),
        "model /no/such: no such directory, and not a hub model id (owner/name) either",
    )
    run = tmp_path / "busy"
    holder = hold_lock(run)
    try:
        args = tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"))
        args[args.index("--trainer.default_root_dir") + 1] = str(run)
        proc = run_cli(args, tmp_path)
        lines = proc.stderr.splitlines()
        assert_one_error(proc.returncode, lines, lines[-1].removeprefix("editlab: error: "))
        assert f"{run} is in use by another editlab run (process {holder.pid}" in lines[-1]
    finally:
        holder.kill()
        holder.wait()
    # --debug: the traceback, for a bug report.
    proc = run_cli([*tiny_args(tmp_path, str(path)), "--debug"], tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "requested_rewrite.subject" in proc.stderr


@pytest.mark.slow
def test_a_log_file_gets_one_line_per_step_and_two_per_evaluation(tmp_path):
    options = {
        "--model.progress": "true",
        "--model.evaluation.timing": "periodic",
        "--model.evaluation.every_n_steps": "1",
    }
    args = tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"), **options)
    args.remove("--trainer.enable_progress_bar")
    args.remove("false")
    proc = run_cli(args, tmp_path)  # stderr is a pipe, as a log file
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [line for line in proc.stderr.splitlines() if line.startswith("editlab: step ")]
    assert [s.split(",")[0] for s in steps] == ["editlab: step 1/2", "editlab: step 2/2"]
    assert "z loss" in steps[0] and "\r" not in proc.stderr
    evaluations = [line for line in proc.stderr.splitlines() if line.startswith("editlab: evaluati")]
    assert evaluations[0::2] == [
        "editlab: evaluating 4 cases (pre, 0 edits)",
        "editlab: evaluating 2 cases (periodic, 2 edits)",
        "editlab: evaluating 4 cases (periodic, 4 edits)",
    ]
    assert all(
        re.fullmatch(r"editlab: evaluation \((pre|periodic)\) done in \d+\.\ds", line) for line in evaluations[1::2]
    )
    for noise in ("GPU available", "TPU available", "litlogger", "Seed set"):
        assert noise not in proc.stderr, noise


def test_user_errors_are_one_family_that_errors_py_does_not_import():
    # The CLI prints the message of any UserError as its one line; the classes live with the code
    # that raises them, so editlab/errors.py (imported by the lowest floors) imports no editlab module.
    import ast

    from editlab import errors
    from editlab.data.sources import DataError
    from editlab.editing.stats_files import StatsFileError
    from editlab.keyed_cache import StaleCacheError
    from editlab.lightning.editstate import EditStateError
    from editlab.models.delta import DeltaMismatchError

    for cls in (DataError, StatsFileError, StaleCacheError, EditStateError, DeltaMismatchError, errors.ConfigError):
        assert issubclass(cls, errors.UserError), cls
        assert errors.user_error_message(cls("named thing: what to fix\nsecond line")) == (
            "named thing: what to fix; second line"
        )
    tree = ast.parse(Path(errors.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.split(".")[0] == "editlab"], imported
