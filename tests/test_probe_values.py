"""Per-example probe outcomes of a run (editlab.commands.probe_values): the records from hand-made
predictions, the check against the run's own scores, and the runs it refuses. The whole path on a
real run (CLI, final edit state, recomputed predictions) is test_probes' slow end-to-end test."""

from __future__ import annotations

import json

import pytest
import torch

from editlab.commands.probe_values import ProbeValuesError, check_scores, probe_records, run_probe_values
from editlab.metrics.probes import ProbeResult


def result(labels, predictions) -> ProbeResult:
    return ProbeResult("sst2", labels, predictions, torch.zeros(len(labels), 2))


def test_records_hold_each_examples_label_prediction_and_correctness_before_and_after():
    pre, post = result([1, 0, 1], [1, 1, -1]), result([1, 0, 1], [0, 0, 1])  # -1: no unique best word
    records = probe_records({"sst2": pre}, {"sst2": post})
    assert [r["case_id"] for r in records] == ["sst2/0", "sst2/1", "sst2/2"]
    assert [r["pre"]["correct"] for r in records] == [1, 0, 0] and [r["post"]["correct"] for r in records] == [0, 1, 1]
    assert records[2] == {"case_id": "sst2/2", "task": "sst2", "label": 1,
                          "pre": {"prediction": -1, "correct": 0}, "post": {"prediction": 1, "correct": 1}}  # fmt: skip


def test_predictions_that_do_not_give_the_runs_scores_are_refused(tmp_path):
    post = {"sst2": result([1, 0, 1, 1], [1, 0, 0, 1])}  # accuracy 0.75
    check_scores(tmp_path, post, {"probe/sst2/accuracy": 0.75, "probe/sst2/f1": post["sst2"].score("f1")})
    with pytest.raises(
        ProbeValuesError, match=r"probe/sst2/accuracy from the final weights is 0.75, the run reported 0.5"
    ):
        check_scores(tmp_path, post, {"probe/sst2/accuracy": 0.5})


def test_a_run_that_did_not_finish_or_probe_or_keep_its_final_state_is_one_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  model: m\n  evaluation:\n    probes:\n      tasks: [sst2]\n")
    with pytest.raises(ProbeValuesError, match="not a finished run"):
        run_probe_values(run)
    (run / "summary.json").write_text(json.dumps({"method": "MEMIT"}))
    with pytest.raises(ProbeValuesError, match="no edit state"):
        run_probe_values(run)
    (run / "config.yaml").write_text("model:\n  model: m\n  evaluation:\n    probes:\n      tasks: []\n")
    with pytest.raises(ProbeValuesError, match="no probe tasks"):
        run_probe_values(run)
