"""The finished parts of a unit of work kept in the run directory (editlab.lightning.parts), here
an evaluation point's:
a second attempt at the same point takes them and computes only the rest, with the same values
as one uninterrupted evaluation; another point, another evaluator setting or unreadable file
never gives parts. The killed-and-resumed run through the CLI is in tests/test_resume.py."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

import editlab.evaluation as evaluation
from editlab.data.sources import counterfact_request
from editlab.errors import UserError
from editlab.evaluation import EvaluationConfig, Evaluator
from editlab.lightning.parts import RunParts
from editlab.models.arch import ModelView

from helpers import SHARED_DATA

POINT = {"timing": "periodic", "steps": 3, "weights": "abc"}


def stored(path) -> dict:
    return torch.load(path, weights_only=True)


def test_parts_are_read_back_by_the_same_point_with_their_seconds(tmp_path):
    path = tmp_path / "checkpoints" / "evaluation_parts.pt"
    first = RunParts(path, POINT)
    assert first.get("cases") is None and not first.reused
    cases = [{"case_id": "7", "rewrite": [{"expected": {"nll": 0.1 + 0.2, "exact": True}}]}]
    first.put("cases", cases)
    first.put("me_ppl50", 94.12345678901234)

    again = RunParts(path, POINT)
    assert again.get("cases") == cases and again.get("me_ppl50") == 94.12345678901234  # every bit of the floats
    assert again.get("probes") is None
    assert again.reused == ["cases", "me_ppl50"]
    assert again.reused_seconds() == pytest.approx(sum(stored(path)["seconds"].values()))

    # Another point sees nothing; its first part replaces the file.
    other = RunParts(path, {**POINT, "steps": 4})
    assert other.get("cases") is None and other.reused == []
    other.put("probes", {"probe/sst2/accuracy": 0.5})
    assert RunParts(path, POINT).get("cases") is None
    assert RunParts(path, {**POINT, "steps": 4}).get("probes") == {"probe/sst2/accuracy": 0.5}


@pytest.mark.parametrize("content", [b"not a torch file", {"point": {}}])
def test_an_unreadable_or_foreign_parts_file_is_one_error_naming_it(tmp_path, content):
    path = tmp_path / "evaluation_parts.pt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(UserError, match=r"parts file .*evaluation_parts.pt .*delete it"):
        RunParts(path, POINT)


def requests(n: int):
    with gzip.open(SHARED_DATA / "multi_counterfact.json.gz", "rt") as f:
        records = json.load(f)[:n]
    return [counterfact_request(r, f"record {i}") for i, r in enumerate(records)]


def test_an_evaluation_taking_its_finished_parts_equals_one_computing_all(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    view = ModelView.of(model)
    reqs = requests(3)
    cfg = EvaluationConfig(max_new_tokens=6, generation_cases=2)
    whole = Evaluator(cfg, view, tok, seed=1, progress=False).evaluate(reqs, quality=True)

    # The first attempt dies in the generations: the cases' and greedy answers' parts are kept.
    path = tmp_path / "evaluation_parts.pt"
    first = Evaluator(cfg, view, tok, seed=1, progress=False)
    monkeypatch.setattr(first, "generation_metrics", lambda reqs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        first.evaluate(reqs, quality=True, parts=RunParts(path, POINT))
    assert list(stored(path)["parts"]) == ["cases", "generated"]

    # The second attempt scores no case again and ends with the uninterrupted evaluation's values.
    calls = []
    real = evaluation.evaluate_cases
    monkeypatch.setattr(evaluation, "evaluate_cases", lambda *a, **k: calls.append(1) or real(*a, **k))
    parts = RunParts(path, POINT)
    resumed = Evaluator(cfg, view, tok, seed=1, progress=False).evaluate(reqs, quality=True, parts=parts)
    assert calls == [] and parts.reused == ["cases", "generated"]
    assert resumed == whole
    assert list(stored(path)["parts"]) == ["cases", "generated", "generation"]


def test_the_settings_digest_changes_with_any_option_or_the_seed(tiny_llama):
    model, tok = tiny_llama
    view = ModelView.of(model)
    base = Evaluator(EvaluationConfig(), view, tok, seed=0, progress=False).settings_digest()
    assert Evaluator(EvaluationConfig(), view, tok, seed=0, progress=False).settings_digest() == base
    assert Evaluator(EvaluationConfig(top_k=4), view, tok, seed=0, progress=False).settings_digest() != base
    assert Evaluator(EvaluationConfig(), view, tok, seed=1, progress=False).settings_digest() != base


def test_each_generated_case_carries_its_fluency_and_the_point_their_mean(tiny_llama):
    model, tok = tiny_llama
    reqs = requests(3)
    cfg = EvaluationConfig(max_new_tokens=6, generation_cases=2)
    cases, metrics = Evaluator(cfg, ModelView.of(model), tok, seed=1, progress=False).evaluate(reqs, quality=True)
    values = [case["fluency"] for case in cases[:2]]
    assert "fluency" not in cases[2] and "fluency_by_case" not in metrics  # generated from the first 2 only
    assert metrics["fluency"] == pytest.approx(sum(values) / 2, rel=1e-6)
    assert [evaluation.case_summary(case)["fluency"] for case in cases[:2]] == values  # into cases.jsonl
