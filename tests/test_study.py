"""``editlab study``: a list of runs, resumable, one results JSON per run and a side-by-side report."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from editlab.commands import study as study_module
from editlab.commands.study import StudyError, final_weight_norms, read_study, run_command, run_study, study_main
from editlab.models.tiny import save_tiny
from editlab.paired import read_case_records

from helpers import REPO, SHARED_DATA


def write_study(tmp_path: Path, runs: list[dict], **extra) -> Path:
    spec = {"name": "s", "runs_dir": str(tmp_path / "runs"), "out": str(tmp_path / "out"), "runs": runs, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_study_file_problems_name_the_field(tmp_path):
    config = REPO / "configs" / "memit_smollm2.yaml"
    with pytest.raises(StudyError, match="missing field 'out'"):
        (tmp_path / "a.yaml").write_text(yaml.safe_dump({"name": "s", "runs_dir": "r", "runs": []}))
        read_study(tmp_path / "a.yaml")
    with pytest.raises(StudyError, match=r"runs\[1\].*used twice"):
        read_study(write_study(tmp_path, [{"name": "a", "config": str(config)}, {"name": "a", "config": str(config)}]))
    with pytest.raises(StudyError, match=r"runs\[0\] \(a\): no such config /no/such.yaml"):
        read_study(write_study(tmp_path, [{"name": "a", "config": "/no/such.yaml"}]))
    with pytest.raises(StudyError, match="parallel and threads"):
        read_study(write_study(tmp_path, [{"name": "a", "config": str(config)}], threads=0))


def test_parallel_option_overrides_the_file(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, [{"name": "a", "config": str(REPO / "configs" / "memit_smollm2.yaml")}], parallel=2)
    seen = []
    monkeypatch.setattr(study_module, "run_studies", lambda studies, repo, parallel, **kw: seen.append(parallel) or [])
    assert study_main([str(path), "--parallel", "1"]) == 0 and seen == [1]
    assert study_main([str(path)]) == 0 and seen == [1, 2]
    assert study_main([str(path), "--parallel", "0"]) == 2
    assert "--parallel must be >= 1" in capsys.readouterr().err


def test_threads_option_overrides_the_file_and_a_run_finished_at_another_count_stays_finished(tmp_path, capsys):
    config = str(REPO / "configs" / "memit_smollm2.yaml")
    path = write_study(tmp_path, [{"name": "a", "config": config, "args": ["--x", "[p, q]"]}], threads=1)
    (tmp_path / "out").mkdir()
    done = {"name": "a", "command": " ".join(run_command(read_study(path), read_study(path).runs[0])), "returncode": 0}
    (tmp_path / "out" / "a.json").write_text(json.dumps(done))
    assert study_main([str(path), "--threads", "2", "--list"]) == 0
    name, state, command = capsys.readouterr().out.strip().split("\t")
    assert (name, state) == ("a", "finished") and command.endswith("--threads 2")
    # Another argument is another run, whatever the thread count.
    (tmp_path / "out" / "a.json").write_text(json.dumps({**done, "command": done["command"].replace("q]", "r]")}))
    assert study_main([str(path), "--threads", "2", "--list"]) == 0
    assert capsys.readouterr().out.split("\t")[1] == "to run"
    assert study_main([str(path), "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_every_run_resumes_with_the_study_thread_count(tmp_path):
    config = REPO / "configs" / "memit_smollm2.yaml"
    study = read_study(write_study(tmp_path, [{"name": "a", "config": str(config), "args": ["--data.num_edits", 30]}]))
    cmd = run_command(study, study.runs[0])
    assert cmd[:4] == ["editlab", "fit", "--config", str(config)]
    assert cmd[4:6] == ["--data.num_edits", "30"]
    assert cmd[cmd.index("--ckpt_path") + 1] == "last" and cmd[cmd.index("--threads") + 1] == "1"
    assert cmd[cmd.index("--trainer.default_root_dir") + 1] == str(tmp_path / "runs" / "a")


@pytest.mark.slow  # launches editlab fit processes
def test_a_two_run_study_writes_results_and_a_report_and_skips_finished_runs(tmp_path, monkeypatch):
    save_tiny(tmp_path / "tiny", "gpt2")
    with gzip.open(SHARED_DATA / "multi_counterfact.json.gz", "rt") as f:
        (tmp_path / "data.json").write_text(json.dumps(json.load(f)[:4]))
    (tmp_path / "corpus.txt").write_text("\n".join(f"Sentence {i} is about a city." for i in range(20)))
    common = [
        "--model.model", str(tmp_path / "tiny"), "--model.progress", "false",
        "--model.method.layers", "[0, 1]", "--model.method.targets.steps", "3",
        "--model.method.context.count", "2", "--model.method.context.length", "3",
        "--model.method.covariance.corpus", str(tmp_path / "corpus.txt"),
        "--model.method.covariance.num_samples", "20", "--model.evaluation.fluency", "false",
        "--model.evaluation.me_ppl", "null",
        "--data.path", str(tmp_path / "data.json"), "--data.num_edits", "4", "--data.edits_per_step", "2",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    runs = [
        {"name": "memit", "config": str(REPO / "configs" / "memit_smollm2.yaml"), "args": common},
        {"name": "memit_seq", "config": str(REPO / "configs" / "memit_seq_smollm2.yaml"), "args": common},
    ]
    study = read_study(write_study(tmp_path, runs, parallel=2, threads=1))
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    records = run_study(study, REPO, launcher=[sys.executable, "-m", "editlab.cli"])
    assert [r["returncode"] for r in records] == [0, 0], (tmp_path / "runs" / "memit.log").read_text()[-2000:]
    for name, method in (("memit", "MEMIT"), ("memit_seq", "MEMIT_seq")):
        record = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert record["summary"]["method"] == method and record["summary"]["threads"] == 1
        assert [row["timing"] for row in record["curve"]] == ["pre", "final"] and len(record["steps"]) == 2
        assert {f"weight_norm/l{layer}/rel_l1_growth" for layer in (0, 1)} <= set(record["weight_norms_end"])
        assert record["command"].endswith("--ckpt_path last --threads 1") and len(record["commit"]) >= 40
        assert record["seconds_per_edit"] and all(v >= 0 for v in record["seconds_per_edit"].values())
        per_edit = record["seconds_per_edit"]["seconds_evaluation"]  # the pre-edit and final points over 4 edits
        assert per_edit > 0 and per_edit == pytest.approx(record["summary"]["seconds_evaluation"] / 4)
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    first = (tmp_path / "out" / "memit.json").read_text()
    again = run_study(study, REPO, launcher=["false"])  # nothing may run: "false" would fail
    assert [r["returncode"] for r in again] == [0, 0] and (tmp_path / "out" / "memit.json").read_text() == first


def test_a_run_whose_results_json_has_its_command_is_finished_without_its_run_directory(tmp_path, capsys):
    config = str(REPO / "configs" / "memit_smollm2.yaml")
    runs = [{"name": "a", "config": config, "args": ["--data.num_edits", "30"]}, {"name": "b", "config": config}]
    study = read_study(write_study(tmp_path, runs, parallel=1))
    (tmp_path / "out").mkdir()
    done = {"name": "a", "command": " ".join(run_command(study, study.runs[0])), "returncode": 0, "summary": {}}
    (tmp_path / "out" / "a.json").write_text(json.dumps(done))
    # b's results JSON is from another command: b is not finished and runs ("false" fails).
    other = {**done, "name": "b", "command": "editlab fit --config other.yaml"}
    (tmp_path / "out" / "b.json").write_text(json.dumps(other))
    records = run_study(study, REPO, launcher=["false"])
    assert records[0] == done and records[1]["returncode"] == 1
    assert study_main([str(tmp_path / "study.yaml"), "--list"]) == 0
    listed = [line.split("\t")[:2] for line in capsys.readouterr().out.splitlines()]
    assert listed == [["a", "finished"], ["b", "to run"]]
    # A run begun earlier: --list quotes its log's last step line.
    (tmp_path / "runs" / "b").mkdir(parents=True)
    assert study_main([str(tmp_path / "study.yaml"), "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split("\t")[1] == "started (no step done)"
    with open(tmp_path / "runs" / "b.log", "a") as log:
        log.write("editlab: step 1/3, 10 edits, 5.0s\nnoise\neditlab: step 2/3, 20 edits, 4.0s\nmore noise\n")
    assert study_main([str(tmp_path / "study.yaml"), "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split("\t")[1] == "started (step 2/3, 20 edits, 4.0s)"
    (tmp_path / "runs" / "b").rmdir()
    # Both finished, neither run directory here: the side-by-side report comes from the results
    # JSONs, b's curve drawn from its record.
    curve = [{"step": 0, "edits": 0, "timing": "pre", "efficacy_success": 0.25},
             {"step": 3, "edits": 30, "timing": "final", "efficacy_success": 0.75}]  # fmt: skip
    b_done = {
        **done, "name": "b", "command": " ".join(run_command(study, study.runs[1])),
        "summary": {"method": "MEMIT", "edits": 30, "efficacy_success": 0.75}, "curve": curve,
    }  # fmt: skip
    (tmp_path / "out" / "b.json").write_text(json.dumps(b_done))
    assert [r["returncode"] for r in run_study(study, REPO, launcher=["false"])] == [0, 0]
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| efficacy success | — | 0.750 |" in report and "b (MEMIT)" in report
    assert "No curve.jsonl data for: a" in report and (tmp_path / "out" / "report" / "compare_metrics.png").is_file()


def test_only_runs_the_named_runs_and_an_unknown_name_is_one_error(tmp_path, monkeypatch, capsys):
    config = str(REPO / "configs" / "memit_smollm2.yaml")
    path = write_study(tmp_path, [{"name": "a", "config": config}, {"name": "b", "config": config}])
    seen = []

    def names(studies, repo, parallel, **kw):
        seen.extend([r.name for r in study.runs] for study in studies)
        return []

    monkeypatch.setattr(study_module, "run_studies", names)
    assert study_main([str(path), "--only", "b"]) == 0 and seen == [["b"]]
    assert study_main([str(path), "--only", "b", "c"]) == 2
    assert "--only: no run named c (runs: a, b)" in capsys.readouterr().err


def finished_run_dir(run_dir: Path, method: str) -> None:
    """A run directory as a finished fit leaves it (summary and steps), for the study to collect."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"method": method, "edits": 10, "seconds_evaluation": 1.0}))
    (run_dir / "steps.jsonl").write_text(json.dumps({"step": 1, "seconds_z": 2.0}) + "\n")


def test_several_study_files_run_as_one_queue_each_run_writing_to_its_own_files_out(tmp_path):
    config = str(REPO / "configs" / "memit_smollm2.yaml")
    one = tmp_path / "one"
    two = tmp_path / "two"
    one.mkdir(), two.mkdir()
    studies = [
        read_study(write_study(one, [{"name": "a", "config": config}])),
        read_study(write_study(two, [{"name": "b", "config": config}, {"name": "c", "config": config}])),
    ]
    for root, name in ((one, "a"), (two, "b"), (two, "c")):
        finished_run_dir(root / "runs" / name, name.upper())
    # "false" stands in for editlab: every run has finished, so none may be launched
    per_study = study_module.run_studies(studies, REPO, 2, launcher=["false"])
    assert [[r["name"] for r in records] for records in per_study] == [["a"], ["b", "c"]]
    assert all(r["returncode"] == 0 for records in per_study for r in records)
    assert json.loads((one / "out" / "a.json").read_text())["summary"]["method"] == "A"
    assert sorted(p.name for p in (two / "out").glob("*.json")) == ["b.json", "c.json"]
    assert not (one / "out" / "b.json").exists() and not (two / "out" / "a.json").exists()
    # each file's report once its own runs have finished (one run alone has nothing to compare)
    assert (two / "out" / "report" / "report.md").is_file() and not (one / "out" / "report").exists()


def test_several_files_share_the_smallest_parallel_and_only_picks_across_them(tmp_path, monkeypatch, capsys):
    config = str(REPO / "configs" / "memit_smollm2.yaml")
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = write_study(tmp_path / "one", [{"name": "a", "config": config}], parallel=2)
    two = write_study(tmp_path / "two", [{"name": "b", "config": config}, {"name": "c", "config": config}], parallel=1)
    seen = []

    def queue(studies, repo, parallel, **kw):
        seen.append((parallel, [[r.name for r in study.runs] for study in studies]))
        return [[] for _ in studies]

    monkeypatch.setattr(study_module, "run_studies", queue)
    assert study_main([str(one), str(two)]) == 0 and seen[-1] == (1, [["a"], ["b", "c"]])
    assert study_main([str(one), str(two), "--parallel", "2", "--only", "c", "a"]) == 0
    assert seen[-1] == (2, [["a"], ["c"]])
    assert study_main([str(two), str(one), "--only", "c"]) == 0 and seen[-1] == (1, [["c"]])  # file a drops out
    assert study_main([str(one), str(two), "--only", "d"]) == 2
    assert f"{one}, {two}: --only: no run named d (runs: a, b, c)" in capsys.readouterr().err


def test_the_final_weight_norms_are_the_last_steps(tmp_path):
    rows = [
        {"step": 1, "weight_norm/l8/rel_l1_growth": 0.1, "z_loss": 2.0},
        {"step": 2, "weight_norm/l8/rel_l1_growth": 0.3},
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert final_weight_norms(tmp_path) == {"weight_norm/l8/rel_l1_growth": 0.3}
    assert final_weight_norms(tmp_path / "absent") == {}


def test_collect_copies_a_finished_runs_records_into_a_results_json_written_before_it_kept_them(tmp_path, capsys):
    config = str(REPO / "configs" / "memit_smollm2.yaml")
    path = write_study(tmp_path, [{"name": "a", "config": config}, {"name": "b", "config": config}])
    study = read_study(path)
    (tmp_path / "out").mkdir()
    for run in study.runs:  # results JSONs as an older editlab wrote them: no curve, no steps
        old = {"name": run.name, "command": " ".join(run_command(study, run)), "returncode": 0,
               "summary": {"method": "MEMIT", "edits": 20}, "weight_norms_end": {}}  # fmt: skip
        (tmp_path / "out" / f"{run.name}.json").write_text(json.dumps(old))
    a_dir = tmp_path / "runs" / "a"  # only a's run directory is here
    a_dir.mkdir(parents=True)
    (a_dir / "summary.json").write_text(json.dumps({"method": "MEMIT", "edits": 20}))
    curve = [{"step": 2, "edits": 20, "timing": "final", "specificity_success": 0.5}]
    steps = [{"step": 1, "weight_norm/l8/rel_l1_growth": 0.1}, {"step": 2, "weight_norm/l8/rel_l1_growth": 0.2}]
    (a_dir / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    (a_dir / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    b_before = (tmp_path / "out" / "b.json").read_text()
    assert study_main([str(path), "--collect"]) == 0
    assert "refreshed a" in capsys.readouterr().err
    a = json.loads((tmp_path / "out" / "a.json").read_text())
    assert a["curve"] == curve and a["steps"] == steps
    assert a["weight_norms_end"] == {"weight_norm/l8/rel_l1_growth": 0.2} and a["summary"]["edits"] == 20
    assert (tmp_path / "out" / "b.json").read_text() == b_before  # no run directory: left as it was
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    assert study_main([str(path), "--collect"]) == 0  # nothing new: nothing rewritten
    assert "refreshed nothing" in capsys.readouterr().err
    # a finished run whose results JSON predates the per-case copy gets it from its cases.jsonl
    (a_dir / "cases.jsonl").write_text(json.dumps({"case_id": "1", "post": {"efficacy_success": 1.0}}) + "\n")
    assert study_main([str(path), "--collect"]) == 0 and "refreshed a" in capsys.readouterr().err
    kept = read_case_records(tmp_path / "out" / "a.cases.jsonl.gz")
    assert kept == [{"case_id": "1", "post": {"efficacy_success": 1.0}}]
    assert not (tmp_path / "out" / "b.cases.jsonl.gz").exists()  # no run directory, nothing to copy
    assert study_main([str(path), "--collect"]) == 0 and "refreshed nothing" in capsys.readouterr().err


def test_progress_shows_every_evaluation_point_so_far_from_results_json_or_checkpoint(tmp_path, capsys):
    from editlab.lightning.editstate import save_edit_state

    config = str(REPO / "configs" / "memit_smollm2.yaml")
    runs = [{"name": n, "config": config} for n in ("done", "midway", "unstarted")]
    study = read_study(write_study(tmp_path, runs))
    (tmp_path / "out").mkdir()
    finished = {
        "name": "done", "command": " ".join(run_command(study, study.runs[0])), "returncode": 0, "summary": {},
        "curve": [{"step": 2, "edits": 20, "timing": "final", "specificity_success": 0.5}],
        "steps": [{"step": 2, "weight_norm/l4/rel_l1_growth": 0.5, "weight_norm/l8/rel_l1_growth": 0.25}],
    }  # fmt: skip
    (tmp_path / "out" / "done.json").write_text(json.dumps(finished))
    # midway: only its last checkpoint, whose results carry the points and steps so far
    results = {
        "curve": [{"step": 0, "edits": 0, "timing": "pre", "specificity_success": 0.75},
                  {"step": 1, "edits": 10, "timing": "periodic", "specificity_success": 0.625}],
        "steps_log": [{"step": 1, "weight_norm/l8/rel_l1_growth": -0.125}],
    }  # fmt: skip
    save_edit_state(tmp_path / "runs" / "midway" / "checkpoints" / "edit_state.pt", {"results": json.dumps(results)})
    path = str(tmp_path / "study.yaml")
    assert study_main([path, "--progress", "specificity_success", "fluency"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | point | edits | specificity_success | fluency | L1 growth, last layer |"
    assert lines[2:] == [
        "| done | final | 20 | 0.500 | — | +25.0% |",  # the highest layer's growth at that step
        "| midway | pre | 0 | 0.750 | — | — |",
        "| midway | periodic | 10 | 0.625 | — | -12.5% |",
    ]
    assert study_main([path, "--progress"]) == 0
    assert "efficacy_success | generalization_success | specificity_success" in capsys.readouterr().out


def test_a_run_that_finished_after_its_study_process_ended_gets_its_results_json_from_the_run_directory(tmp_path):
    config = str(REPO / "configs" / "memit_smollm2.yaml")
    study = read_study(write_study(tmp_path, [{"name": "a", "config": config}]))
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"method": "MEMIT", "edits": 20, "seconds_evaluation": 4.0}))
    steps = [{"step": 1, "seconds_z": 3.0, "seconds_solve": 1.0}, {"step": 2, "seconds_z": 5.0, "seconds_solve": 1.0}]
    (run_dir / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    case = {"case_id": "3", "step": 1, "post": {"specificity_success": 0.6}, "detail": {"post": {}}}
    (run_dir / "cases.jsonl").write_text(json.dumps(case) + "\n")
    # "false" stands in for editlab: launching fit (which refuses a finished directory) would fail
    [record] = run_study(study, REPO, launcher=["false"])
    assert record["returncode"] == 0 and record["summary"]["method"] == "MEMIT" and record["steps"] == steps
    assert record["seconds_per_edit"] == {"seconds_z": 0.4, "seconds_solve": 0.1, "seconds_evaluation": 0.2}
    assert json.loads((tmp_path / "out" / "a.json").read_text()) == record
    # the per-case values beside it, for paired comparisons once the run directory is gone
    kept = read_case_records(tmp_path / "out" / "a.cases.jsonl.gz")
    assert kept == [{"case_id": "3", "step": 1, "post": {"specificity_success": 0.6}}]


FAKE_FIT = """
import pathlib, signal, sys, time
root = pathlib.Path(sys.argv[sys.argv.index("--trainer.default_root_dir") + 1])
root.mkdir(parents=True, exist_ok=True)
def stop(signum, frame):  # as editlab fit: finish the step, save, exit 143
    (root / "got_sigterm").write_text("")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(root / "started").write_text("")
time.sleep(120)
sys.exit(1)
"""


@pytest.mark.slow  # starts processes
def test_sigterm_stops_the_study_passes_it_on_to_its_runs_and_starts_no_other(tmp_path):
    import signal
    import threading
    import time

    config = str(REPO / "configs" / "memit_smollm2.yaml")
    study = read_study(write_study(tmp_path, [{"name": n, "config": config} for n in "abc"], parallel=2))
    (tmp_path / "fake_fit.py").write_text(FAKE_FIT)
    runs = tmp_path / "runs"

    finished = threading.Event()  # the study returned: a late signal would hit pytest itself

    def signal_once_both_run() -> None:
        while not all((runs / n / "started").exists() for n in "ab"):
            if finished.wait(0.05):
                return
        os.kill(os.getpid(), signal.SIGTERM)

    launches = study_module.Launches()
    threading.Thread(target=signal_once_both_run, daemon=True).start()
    start = time.monotonic()
    with study_module.stop_on_sigterm(launches):
        try:
            records = run_study(
                study, REPO, launcher=[sys.executable, str(tmp_path / "fake_fit.py")], launches=launches
            )
        finally:
            finished.set()
    assert time.monotonic() - start < 60  # the runs were stopped, not waited out
    assert launches.stopping and [r["returncode"] for r in records] == [143, 143, None]
    assert (runs / "a" / "got_sigterm").exists() and (runs / "b" / "got_sigterm").exists()
    assert records[2]["not_started"] == "the study stopped" and not (runs / "c").exists()
    assert signal.getsignal(signal.SIGTERM) is not launches.stop  # the handler before the study is back


def test_a_study_stopped_by_sigterm_exits_143_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, [{"name": "a", "config": str(REPO / "configs" / "memit_smollm2.yaml")}])

    def stopped(studies, repo, parallel, launches):
        launches.stop(15)  # as the SIGTERM handler does
        return [[{"name": "a", "returncode": 143}]]

    monkeypatch.setattr(study_module, "run_studies", stopped)
    assert study_main([str(path)]) == 143
    assert "stopped by SIGTERM; run the same command again to continue" in capsys.readouterr().err


def test_collect_writes_the_probe_outcomes_of_a_finished_run_that_probed(tmp_path, capsys, monkeypatch):
    import editlab.commands.probe_values as probe_values
    from editlab.paired import read_case_records

    config = str(REPO / "configs" / "memit_smollm2.yaml")
    path = write_study(tmp_path, [{"name": "probed", "config": config}, {"name": "plain", "config": config}])
    study = read_study(path)
    (tmp_path / "out").mkdir()
    for run in study.runs:
        done = {"name": run.name, "command": " ".join(run_command(study, run)), "returncode": 0,
                "summary": {"method": "MEMIT"}, "curve": [], "steps": [], "weight_norms_end": {}}  # fmt: skip
        (tmp_path / "out" / f"{run.name}.json").write_text(json.dumps(done))
        run_dir = tmp_path / "runs" / run.name
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({"method": "MEMIT"}))
        tasks = "[sst2]" if run.name == "probed" else "[]"
        (run_dir / "config.yaml").write_text(f"model:\n  evaluation:\n    probes:\n      tasks: {tasks}\n")
    record = {"case_id": "sst2/0", "task": "sst2", "label": 1, "pre": {"prediction": 1, "correct": 1},
              "post": {"prediction": 0, "correct": 0}}  # fmt: skip
    asked = []
    monkeypatch.setattr(probe_values, "run_probe_values", lambda run_dir: asked.append(run_dir.name) or [record])
    assert study_main([str(path), "--collect"]) == 0
    assert "refreshed probed" in capsys.readouterr().err and asked == ["probed"]  # plain probed nothing
    assert read_case_records(tmp_path / "out" / "probed.probes.jsonl.gz") == [record]
    assert not (tmp_path / "out" / "plain.probes.jsonl.gz").exists()
    assert study_main([str(path), "--collect"]) == 0 and asked == ["probed"]  # there already: not again


def test_shared_pre_starts_the_report_curves_of_runs_that_skip_it_on_the_same_records(tmp_path, capsys):
    from editlab.paired import write_records

    config = str(REPO / "configs" / "memit_smollm2.yaml")
    runs = [{"name": "a", "config": config}, {"name": "b", "config": config}]
    with pytest.raises(StudyError, match="shared_pre names one run"):
        read_study(write_study(tmp_path, runs, shared_pre=["a"]))
    path = write_study(tmp_path, runs, shared_pre="a", report=str(tmp_path / "elsewhere"))
    study = read_study(path)
    assert study.shared_pre == "a" and study.report_dir == tmp_path / "elsewhere"
    out = tmp_path / "out"
    out.mkdir()
    pre = {"step": 0, "edits": 0, "timing": "pre", "efficacy_success": 0.1}
    final = {"step": 2, "edits": 20, "timing": "final", "efficacy_success": 0.9}
    for run, curve in zip(study.runs, ([pre, final], [final]), strict=True):
        record = {"name": run.name, "command": " ".join(run_command(study, run)), "returncode": 0,
                  "summary": {"method": "MEMIT", "edits": 20}, "curve": curve}  # fmt: skip
        (out / f"{run.name}.json").write_text(json.dumps(record))
        write_records([{"case_id": "1"}, {"case_id": "2"}], out / f"{run.name}.cases.jsonl.gz")
    assert study_main([str(path), "--collect"]) == 0
    report = (tmp_path / "elsewhere" / "report.md").read_text()
    assert "b (MEMIT): no pre-edit evaluation of their own" in report and not (out / "report").exists()
    # b evaluated other records: a's pre-edit point is not b's, and the study says so
    write_records([{"case_id": "1"}, {"case_id": "3"}], out / "b.cases.jsonl.gz")
    capsys.readouterr()
    assert study_main([str(path), "--collect"]) == 2
    assert "error: s: shared_pre a: b evaluated other records (2 case ids differ)" in capsys.readouterr().err
