"""The default evaluation computes what the authors' released scripts compute (MEMIT's
``eval_utils_counterfact.py``, ``dsets/zsre.py``, ``summarize.py``; ROME's ``generate_fast``).

Each test pins a hand-checkable case: lengths counted by hand, TF-IDF cosines and probability
differences worked out on paper in the comments.
"""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch

from editlab.data.sources import zsre_request
from editlab.evaluation import EvaluationConfig, Evaluator, case_flags, editing_metrics
from editlab.metrics import PromptMagnitude, clean_text, fluency, generate_ids, generate_token_rows, prob_difference
from editlab.metrics.generation import left_pad, token_budgets, word_tokens
from editlab.models.tiny import tiny_model
from editlab.types import EditRequest


def nll(p: float) -> float:
    """Mean token NLL whose exp(-nll) is the probability ``p``."""
    return -math.log(p)


# ----------------------------------------------------------------------------- generation length


def test_default_generation_is_the_reference_one():
    cfg = EvaluationConfig()
    assert cfg.generation_prompts_per_case is None  # every generation prompt
    assert (cfg.max_new_tokens, cfg.max_length_includes_prompt, cfg.top_k) == (100, True, 5)
    assert cfg.stop_at_eos is False and cfg.clean_texts is True
    req = EditRequest("1", "{} is", "Rome", "Paris", generation_prompts=["a", "b", "c"])
    assert cfg.generation_prompts_of(req) == ["a", "b", "c"]
    assert EvaluationConfig(generation_prompts_per_case=1).generation_prompts_of(req) == ["a"]
    with pytest.raises(ValueError, match="generation_prompts_per_case"):
        EvaluationConfig(generation_prompts_per_case=0)


def test_token_budgets_and_context_length_count_the_prompt():
    # max_out_len=10: prompts of 3, 10 and 12 tokens get 7, 0 and 0 new tokens.
    assert token_budgets([3, 10, 12], 10, includes_prompt=True) == [7, 0, 0]
    assert token_budgets([3, 10, 12], 10, includes_prompt=False) == [10, 10, 10]
    assert EvaluationConfig(max_new_tokens=10).generated_length(4) == 10
    assert EvaluationConfig(max_new_tokens=10).generated_length(12) == 12
    assert EvaluationConfig(max_new_tokens=10, max_length_includes_prompt=False).generated_length(4) == 14


def test_three_prompts_give_three_texts_of_the_full_length_including_the_prompt():
    model, tok = tiny_model("llama")
    prompts = ["Rome", "The Eiffel Tower is located in", "She plays the"]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 3 and max(lengths) < 24  # three different lengths, all below the total
    rows = generate_token_rows(
        model, tok, prompts, 24, top_k=5, seed=0, max_length_includes_prompt=True, stop_at_eos=False
    )
    assert len(rows) == 3
    assert [len(prompt) + len(new) for prompt, new in rows] == [24, 24, 24]
    assert [prompt for prompt, _ in rows] == [tok(p)["input_ids"] for p in prompts]
    plain = generate_token_rows(model, tok, prompts, 24, top_k=5, seed=0, stop_at_eos=False)
    assert [len(new) for _, new in plain] == [24, 24, 24]  # the earlier setting: 24 new tokens each


class AlwaysEos(torch.nn.Module):
    """Says token 1 (the EOS) at every step, whatever the input; the cache is the step count."""

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache):
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], 8)
        logits[:, -1, 1] = 10.0
        return types.SimpleNamespace(logits=logits, cache=(cache or 0) + 1)


def test_sampling_goes_on_past_eos_to_each_rows_own_budget():
    ids, mask = left_pad([[3, 4, 4], [4]], pad_id=0)
    gen = torch.Generator().manual_seed(0)
    # No stop token (the reference): row 0 gets its 2 tokens then pads, row 1 its 4.
    assert generate_ids(AlwaysEos(), ids, mask, [2, 4], 1, gen, [], 0).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    # Stopping at EOS (editlab's earlier setting): one token each.
    assert generate_ids(AlwaysEos(), ids, mask, [2, 4], 1, gen, [1], 0).tolist() == [[1], [1]]
    assert generate_ids(AlwaysEos(), ids, mask, [0, 0], 1, gen, [], 0).shape == (2, 0)


def test_clean_text_is_nfkd_with_blank_lines_as_spaces():
    assert clean_text("café\n\nNext\nline") == "cafe\u0301 Next\nline"
    # The decomposed accent stays in its word, as nltk.word_tokenize leaves it.
    assert word_tokens(clean_text("Le café, déjà.")) == ["Le", "cafe\u0301", ",", "de\u0301ja\u0300", "."]


# ----------------------------------------------------------------------------- fluency and consistency


def write_reference(path) -> None:
    """vocab paris, france, rome, italy with idf 1, 2, 1, 3; snippets about Q142 and Q38."""
    np.save(path / "idf.npy", np.array([1.0, 2.0, 1.0, 3.0]))
    (path / "tfidf_vocab.json").write_text(json.dumps({"paris": 0, "france": 1, "rome": 2, "italy": 3}))
    snippets = [
        {"relation_id": "P17", "target_id": "Q142", "samples": [{"name": "Lyon", "text": "Paris, France."}]},
        {"relation_id": "P17", "target_id": "Q38", "samples": [{"name": "Milan", "text": "Rome Italy"}]},
    ]
    (path / "attribute_snippets.json").write_text(json.dumps(snippets))


def test_evaluator_generates_from_every_prompt_and_scores_the_joined_texts(tmp_path, monkeypatch):
    write_reference(tmp_path)
    texts = {
        "p1": "Paris",
        "p2": "France France",
        "p3": "Rome",  # case 1, about Q142
        "q1": "Italy",
        "q2": "a b a b",
        "q3": "Rome",  # case 2, about Q38
    }
    calls = []

    def fake_generate(model, tok, prompts, max_new_tokens, top_k, seed, **kwargs):
        calls.append((list(prompts), max_new_tokens, top_k, seed, kwargs))
        return [texts[p] for p in prompts]

    monkeypatch.setattr("editlab.evaluation.generate_text", fake_generate)
    requests = [
        EditRequest("1", "{} is in", "X", "France", "Italy", generation_prompts=["p1", "p2", "p3"]),
        EditRequest("2", "{} is in", "Y", "Italy", "France", generation_prompts=["q1", "q2", "q3"]),
    ]
    for req, target in zip(requests, ("Q142", "Q38"), strict=True):
        req.relation_id, req.target_new_id = "P17", target
    cfg = EvaluationConfig(consistency_reference=str(tmp_path), batch_size=4)
    out = Evaluator(cfg, types.SimpleNamespace(model=None), tok=None, seed=3, progress=False).generation_metrics(
        requests
    )
    # One call with all six prompts (batched together), the reference's length rule, seeded.
    assert len(calls) == 1
    prompts, length, top_k, seed, kwargs = calls[0]
    assert prompts == ["p1", "p2", "p3", "q1", "q2", "q3"]
    assert (length, top_k, seed) == (100, 5, 3)
    assert kwargs["max_length_includes_prompt"] and not kwargs["stop_at_eos"] and kwargs["clean"]
    # Consistency on the joined texts. Case 1: "Paris France France Rome" -> idf-weighted counts
    # [1, 4, 1, 0], snippet "Paris, France." -> [1, 2, 0, 0]: cos = 9 / sqrt(18 * 5).
    # Case 2: "Italy a b a b Rome" -> [0, 0, 1, 3], snippet [0, 0, 1, 3]: cos = 1.
    # (Averaging per-text cosines instead would give (1/sqrt5 + 2/sqrt5 + 0) / 3 = 0.447 for case 1.)
    assert out["consistency"] == pytest.approx((9 / math.sqrt(90) + 1.0) / 2, rel=1e-6)
    # Fluency: per case the mean over its texts, then over cases. Only "a b a b" has n-grams
    # repeated or not: H2 of (ab, ba, ab) and H3 = 1 bit; every other text has 0 (fewer than 2 words).
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    f = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert fluency("France France") == 0.0 and fluency("a b a b") == pytest.approx(f)
    assert out["fluency"] == pytest.approx((0.0 + f / 3) / 2, rel=1e-6)
    assert (out["fluency_cases"], out["fluency_texts"]) == (2, 6)
    # Each case's own fluency, kept for its record (cases.jsonl) and taken out of the point's metrics.
    assert out["fluency_by_case"] == {"1": 0.0, "2": pytest.approx(f / 3, rel=1e-12)}
    assert out["generation_setting"] == (
        "every generation prompt per case, 100 tokens including the prompt, top-k 5, seed 3, "
        "not stopped at EOS, NFKD + blank lines cleaned"
    )


def test_earlier_generation_setting_is_one_option_set_away(monkeypatch):
    calls = []

    def fake_generate(model, tok, prompts, max_new_tokens, top_k, seed, **kwargs):
        calls.append((list(prompts), kwargs))
        return ["x y"] * len(prompts)

    monkeypatch.setattr("editlab.evaluation.generate_text", fake_generate)
    cfg = EvaluationConfig(
        generation_prompts_per_case=1, max_length_includes_prompt=False, stop_at_eos=True, clean_texts=False
    )
    req = EditRequest("1", "{} is", "X", "a", "b", generation_prompts=["p1", "p2", "p3"])
    out = Evaluator(cfg, types.SimpleNamespace(model=None), tok=None, progress=False).generation_metrics([req])
    earlier = {"batch_size": 32, "max_length_includes_prompt": False, "stop_at_eos": True, "clean": False}
    assert calls == [(["p1"], earlier)]
    assert out["generation_setting"].startswith("at most 1 generation prompt(s) per case, 100 tokens after the prompt")


# ----------------------------------------------------------------------------- magnitude


def test_prob_difference_and_magnitude_on_hand_made_probabilities():
    # Case 0: expected 0.8 vs 0.1 and 0.5 vs 0.7 -> differences 0.7 and -0.2, case mean 0.25.
    # Case 1: expected 0.3 vs 0.6 -> -0.3. Mean over cases: (0.25 - 0.3) / 2 = -0.025.
    expected = torch.tensor([nll(0.8), nll(0.5), nll(0.3)])
    competitor = torch.tensor([nll(0.1), nll(0.7), nll(0.6)])
    assert prob_difference(expected, competitor).tolist() == pytest.approx([0.7, -0.2, -0.3], abs=1e-6)
    m = PromptMagnitude()
    m.update(expected, competitor, torch.tensor([0, 0, 1]))
    assert float(m.compute()) == pytest.approx(-0.025, abs=1e-6)
    with pytest.raises(ValueError):
        prob_difference(expected, competitor[:2])


def entry(p_expected: float, p_competitor: float | None) -> dict:
    out = {"expected": {"nll": nll(p_expected), "exact": False, "token_acc": 0.0}}
    if p_competitor is not None:
        out["competitor"] = {"nll": nll(p_competitor), "exact": False, "token_acc": 0.0}
    return out


def test_magnitudes_have_the_reference_signs_and_sit_beside_success():
    # Rewrite and paraphrase: p(new) - p(true); neighbourhood: p(true) - p(new) (expected = true
    # there). summarize.py: rewrite_diff, paraphrase_diff, neighborhood_diff.
    cases = [
        {
            "case_id": "1",
            "rewrite": [entry(0.6, 0.2)],  # 0.4
            "paraphrase": [entry(0.3, 0.5), entry(0.9, 0.1)],  # (-0.2 + 0.8) / 2 = 0.3
            "neighborhood": [entry(0.5, 0.25)],  # 0.25
        },
        {
            "case_id": "2",
            "rewrite": [entry(0.1, 0.3)],  # -0.2
            "paraphrase": [entry(0.5, 0.5)],  # 0
            "neighborhood": [entry(0.2, 0.6)],  # -0.4
        },
    ]
    out = editing_metrics(cases)
    assert out["efficacy_magnitude"] == pytest.approx((0.4 - 0.2) / 2, abs=1e-6)
    assert out["generalization_magnitude"] == pytest.approx((0.3 + 0.0) / 2, abs=1e-6)
    assert out["specificity_magnitude"] == pytest.approx((0.25 - 0.4) / 2, abs=1e-6)
    assert out["efficacy_success"] == 0.5  # the success rates are still there
    flags = case_flags(cases[0])
    assert flags["generalization_magnitude"] == pytest.approx(0.3) and flags["specificity_magnitude"] == 0.25
    # zsRE has no competing answer: no magnitude, as the reference prints none for zsRE.
    zsre = [{"case_id": "1", "rewrite": [entry(0.6, None)], "paraphrase": [], "neighborhood": [entry(0.5, None)]}]
    assert not any(k.endswith("_magnitude") for k in editing_metrics(zsre))

    # zsRE's token accuracy per case (what a paired comparison of two zsRE runs needs): the mean
    # over the case's prompts, whose mean over cases is the run's token accuracy.
    def tok(value: float) -> dict:
        return {"expected": {"nll": 1.0, "exact": value == 1.0, "token_acc": value}}

    zsre = [
        {"case_id": "1", "rewrite": [tok(0.5)], "paraphrase": [tok(1.0), tok(0.0)], "neighborhood": [tok(0.25)]},
        {"case_id": "2", "rewrite": [tok(1.0)], "paraphrase": [tok(1.0)], "neighborhood": [tok(0.75), tok(1.0)]},
    ]
    per_case = [case_flags(c) for c in zsre]
    assert [f["generalization_token_accuracy"] for f in per_case] == [0.5, 1.0]
    assert [f["specificity_token_accuracy"] for f in per_case] == [0.25, 0.875]
    totals = editing_metrics(zsre)
    for metric in ("efficacy", "generalization", "specificity"):
        key = f"{metric}_token_accuracy"
        assert totals[key] == pytest.approx(sum(f[key] for f in per_case) / 2)


# ----------------------------------------------------------------------------- zsRE records


def test_zsre_records_are_built_as_memit_dsets_zsre_builds_them():
    rec = {
        "subject": "Life Electric",
        "src": "The designer for Life Electric was?",
        "rephrase": "What architect did Life Electric design?",
        "answers": ["Daniel Libeskind"],
        "loc": "nq question: most consecutive games with 20+ points - nba history",
        "loc_ans": "126",
    }
    req = zsre_request(rec, "record 0", index=0)
    assert req.neighborhood_prompts == ["nq question: most consecutive games with 20+ points - nba history?"]
    assert req.rewrite_prompt == rec["src"] and req.prompt == "The designer for {} was?"
    assert req.paraphrase_prompts == [rec["rephrase"]]
    assert (req.target_new, req.target_true, req.locality_answer) == ("Daniel Libeskind", None, "126")
    assert zsre_request(rec, "record 0", index=0, loc_suffix="").neighborhood_prompts == [rec["loc"]]
