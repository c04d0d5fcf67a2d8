"""The run's records (RunRecorder, LoggedRows) and the evaluation schedule, without a model."""

from __future__ import annotations

import json

import pytest

from editlab import rundir
from editlab.evaluation import EvaluationSchedule
from editlab.lightning.recorder import LoggedRows, RunRecorder
from editlab.metrics.probes import TASKS, ProbeConfig
from editlab.report import write_run_report
from editlab.types import EditRequest, EditResult


def schedule(timing: str, every: int = 3, probe_every: int = 0) -> EvaluationSchedule:
    probes = ProbeConfig(tasks=list(TASKS)[:1], every_n_steps=probe_every) if probe_every else ProbeConfig()
    return EvaluationSchedule(timing, every, probes)


def test_schedule_after_each_step():
    assert [schedule("immediate").after_step(k) for k in (1, 2, 3)] == ["batch"] * 3
    assert [schedule("periodic").after_step(k) for k in (1, 2, 3, 6)] == ["none", "none", "so_far", "so_far"]
    assert [schedule("final").after_step(k) for k in (1, 3)] == ["none", "none"]
    # Probes every 2 steps, except where a periodic point (which probes) is taken anyway.
    periodic = schedule("periodic", every=3, probe_every=2)
    assert [k for k in range(1, 9) if periodic.probes_after_step(k)] == [2, 4, 8]
    immediate = schedule("immediate", probe_every=2)
    assert [k for k in range(1, 7) if immediate.probes_after_step(k)] == [2, 4, 6]
    assert not any(schedule("periodic").probes_after_step(k) for k in range(1, 7))


def point(step: int, timing: str) -> dict:
    return {"step": step, "edits": step, "timing": timing}


@pytest.mark.parametrize(
    ("timing", "last", "steps", "expected"),
    [
        ("final", point(4, "periodic"), 4, "all"),
        ("periodic", None, 4, "all"),  # nothing evaluated yet (evaluation.pre false)
        ("periodic", point(0, "pre"), 4, "all"),
        ("periodic", point(3, "periodic"), 4, "all"),  # the last step was not a periodic one
        ("periodic", point(6, "periodic"), 6, "last_point"),
        ("immediate", point(4, "immediate"), 4, "immediate"),
        ("immediate", point(0, "pre"), 0, "all"),
    ],
)
def test_schedule_after_the_stream(timing, last, steps, expected):
    assert schedule(timing).at_end(last, steps) == expected


def request(i: int) -> EditRequest:
    return EditRequest(str(i), "{} is in", f"City {i}", "Rome", "Paris")


def test_records_survive_an_edit_state_round_trip(tmp_path):
    rec = RunRecorder(tmp_path)
    rec.add_point("pre", {"efficacy_success": 0.25})
    row = rec.record_step(
        [request(0), request(1)], EditResult({"z_loss": 0.5}, {"layers": [1, 2]}, {"0": {"a": 1}}), 1.5
    )
    assert row == {"step": 1, "edits": 2, "seconds": 1.5, "z_loss": 0.5, "layers": [1, 2]}
    rec.add_step_values({"weight_norm/l1/fro": 2.0})
    rec.logged.log_metrics({"edit/z_loss": 0.5}, step=0)
    again = RunRecorder(tmp_path)
    again.restore(rec.results_json(), rec.steps_done, rec.edits_done)
    assert again.results_json() == rec.results_json()
    assert (again.steps_done, again.edits_done, again.case_step) == (1, 2, {"0": 0, "1": 0})
    assert again.steps[-1]["weight_norm/l1/fro"] == 2.0 and again.logged.rows == [[0, {"edit/z_loss": 0.5}]]
    assert [r.case_id for r in again.done([request(i) for i in range(3)])] == ["0", "1"]


def test_a_step_record_keeps_its_cpu_seconds_beside_its_wall_seconds(tmp_path):
    row = RunRecorder(tmp_path).record_step([request(0)], EditResult(), 9.0, seconds_cpu=2.0)  # waited 7 s of 9
    assert (row["seconds"], row["seconds_cpu"]) == (9.0, 2.0)


def test_seconds_per_step_of_a_resumed_run_counts_the_steps_of_earlier_sittings(tmp_path):
    first = RunRecorder(tmp_path)
    for i, seconds in enumerate((10.0, 20.0)):
        first.record_step([request(i)], EditResult(), seconds)
    resumed = RunRecorder(tmp_path)
    resumed.restore(first.results_json(), first.steps_done, first.edits_done)
    resumed.record_step([request(2)], EditResult(), 60.0)  # the one step of this sitting
    seconds = resumed.clock.seconds(resumed.clock.stream_start, resumed.step_seconds())
    assert seconds["seconds_per_step"] == 30.0  # (10 + 20 + 60) / 3, not this sitting's 60 / 3


def test_report_from_the_records_is_the_report_from_the_files(tmp_path):
    rec = RunRecorder(tmp_path)
    rec.add_point("pre", {"efficacy_success": 0.25, "score": 0.1})
    for i in range(3):
        rec.record_step([request(i)], EditResult({"z_loss": 0.5 / (i + 1)}), 0.1)
        rec.add_step_values({"weight_norm/l1/rel_fro_delta": 0.01 * i})
    rec.add_point("final", {"efficacy_success": 1.0, "score": 0.9})
    rec.write_records([])
    summary = {"method": "MEMIT", "model": "tiny", "edits": 3, "steps": 3, "efficacy_success": 1.0}
    rec.write_summary(summary)
    assert rec.summary_path == tmp_path / rundir.SUMMARY
    from_records = rec.write_report(summary).read_bytes()
    assert write_run_report(tmp_path).read_bytes() == from_records
    assert json.loads((tmp_path / rundir.SUMMARY).read_text()) == summary


def test_logged_rows_replay_into_the_other_loggers_only():
    class Taker:
        def __init__(self):
            self.rows, self.saved = [], 0

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, metrics))

        def save(self):
            self.saved += 1

    rows, taker = LoggedRows(), Taker()
    rows.log_metrics({"a": 1.0}, step=3)
    rows.replay([rows, taker])
    assert taker.rows == [(3, {"a": 1.0})] and taker.saved == 1
    assert rows.rows == [[3, {"a": 1.0}]]  # not recorded twice
