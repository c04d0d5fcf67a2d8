"""Metrics: teacher-forced answer scores, per-case success/accuracy, fluency, consistency,
seeded generation and perplexity, on hand-built tensors and tiny random models."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch

from editlab.metrics import (
    Consistency,
    Fluency,
    Perplexity,
    PromptAccuracy,
    PromptSuccess,
    TokenAccuracy,
    answer_rows,
    consistency_reference,
    fluency,
    generate_ids,
    generate_text,
    harmonic_mean,
    load_consistency_reference,
    load_me_ppl,
    ngram_entropy,
    score_answers,
    sequence_nll,
    tfidf_similarity,
    token_nll,
    word_tokens,
)
from editlab.metrics.generation import case_fluency, left_pad
from editlab.models.arch import ModelView
from editlab.models.prompts import answer_ids
from editlab.models.tiny import tiny_model, tiny_tokenizer

from helpers import SHARED_DATA, answer_scores


@pytest.fixture(scope="module")
def bos_llama():
    return tiny_model("llama", add_bos=True)


# ----------------------------------------------------------------------------- answer scores


def test_answer_scores_on_hand_built_logits_with_a_multi_token_answer():
    # Logits are log-probabilities, so log_softmax returns them unchanged.
    probs = torch.tensor(
        [
            [0.5, 0.25, 0.125, 0.125],  # row 0, token 0: target 0 (the argmax)
            [0.1, 0.6, 0.2, 0.1],  # row 0, token 1: target 2 (not the argmax)
            [0.25, 0.25, 0.4, 0.1],  # row 1, only token: target 2 (the argmax)
        ]
    )
    nll, exact, acc = answer_scores(probs.log(), torch.tensor([0, 2, 2]), torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(nll, torch.tensor([(math.log(2) + math.log(5)) / 2, -math.log(0.4)]))
    assert exact.tolist() == [False, True]
    torch.testing.assert_close(acc, torch.tensor([0.5, 1.0]))


def test_answer_scores_rejects_a_pair_without_tokens():
    with pytest.raises(ValueError, match=r"pairs \[1\] have no answer token"):
        answer_scores(torch.zeros(2, 4), torch.tensor([0, 1]), torch.tensor([0, 0]), 2)


def test_answer_rows_places_targets_after_the_bos():
    tok = tiny_tokenizer(add_bos=True)
    prompts, answers = ["The Eiffel Tower is in", "Rome is the capital of"], ["Paris France", "Italy"]
    rows, t_row, t_pos, t_id = answer_rows(tok, prompts, answers)
    for r, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        prompt_ids, ans = tok(prompt)["input_ids"], answer_ids(tok, answer)
        assert prompt_ids[0] == tok.bos_token_id and tok.bos_token_id not in ans
        mine = t_row == r
        # The first answer token is predicted from the prompt's last token; BOS included in the count.
        assert t_pos[mine].tolist() == list(range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(ans)))
        assert t_id[mine].tolist() == ans
        # Teacher forcing: the row holds the answer tokens right after each predicting position.
        assert rows[r] == prompt_ids + ans[:-1]
    assert len(answer_ids(tok, "Paris France")) > 1  # a multi-token answer is exercised


@pytest.mark.parametrize("add_bos", [False, True])
def test_score_answers_matches_a_slow_per_prompt_computation(add_bos, bos_llama, tiny_llama):
    model, tok = bos_llama if add_bos else tiny_llama
    prompts = ["The Eiffel Tower is in", "Rome", "She plays the piano and"]
    answers = ["Paris France", "Italy", "the guitar in a band"]
    got = score_answers(ModelView.of(model), tok, prompts, answers, batch_size=2)  # two batches, padded
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ctx = tok(prompt)["input_ids"]
        ans = tok(" " + answer, add_special_tokens=False)["input_ids"]
        assert (ctx[0] == tok.bos_token_id) == add_bos
        logits = model(torch.tensor([ctx + ans])).logits[0]  # [S, V]
        logp = logits.log_softmax(-1)
        nll = [-float(logp[len(ctx) - 1 + j, a]) for j, a in enumerate(ans)]
        hits = [int(logits[len(ctx) - 1 + j].argmax()) == a for j, a in enumerate(ans)]
        assert float(got["nll"][i]) == pytest.approx(sum(nll) / len(nll), abs=1e-5)
        assert bool(got["exact"][i]) == all(hits)
        assert float(got["token_acc"][i]) == pytest.approx(sum(hits) / len(hits))


# ----------------------------------------------------------------------------- per-case metrics


def test_prompt_success_averages_per_case_then_over_cases():
    m = PromptSuccess()
    # Case 7: one prompt, a success. Case 3: three prompts, no success (a tie is a failure).
    m.update(torch.tensor([1.0, 2.0, 5.0, 3.0]), torch.tensor([2.0, 1.0, 4.0, 3.0]), torch.tensor([7, 3, 3, 3]))
    assert float(m.compute()) == pytest.approx(0.5)  # pooled over prompts it would be 0.25


def test_case_metrics_are_sum_reducible_across_processes():
    nll_e, nll_c = torch.tensor([1.0, 2.0, 0.5, 3.0, 0.1]), torch.tensor([2.0, 1.0, 4.0, 3.0, 0.2])
    case = torch.tensor([0, 0, 1, 2, 2])
    whole = PromptSuccess()
    whole.update(nll_e, nll_c, case)
    # Two "ranks", each holding whole cases, merged the way DDP's sum reduction does.
    rank0, rank1 = PromptSuccess(), PromptSuccess()
    rank0.update(nll_e[:2], nll_c[:2], case[:2])
    rank1.update(nll_e[2:], nll_c[2:], case[2:])
    rank0.merge_state(rank1)
    assert float(whole.compute()) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert float(rank0.compute()) == pytest.approx(float(whole.compute()))
    for metric in (PromptSuccess(), PromptAccuracy(), TokenAccuracy(), Fluency(), Perplexity()):
        assert metric._reductions and all(f.__name__ == "dim_zero_sum" for f in metric._reductions.values())


def test_prompt_accuracy_and_token_accuracy():
    acc = PromptAccuracy()
    acc.update(torch.tensor([True, False, True]), torch.tensor([0, 0, 1]))
    assert float(acc.compute()) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(TypeError, match="bool"):
        acc.update(torch.tensor([1.0]), torch.tensor([0]))
    tacc = TokenAccuracy()
    tacc.update(torch.tensor([0.5, 1.0, 0.0]), torch.tensor([4, 4, 9]))
    tacc.update(torch.tensor([1 / 3]), torch.tensor([4]))  # label 4 again: a new case
    assert float(tacc.compute()) == pytest.approx((0.75 + 0.0 + 1 / 3) / 3)


def test_case_metric_without_cases_fails_loudly():
    with pytest.raises(RuntimeError, match="no case was scored"):
        PromptSuccess().compute()


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([])


# ----------------------------------------------------------------------------- fluency


def test_word_tokens_split_punctuation():
    assert word_tokens("Paris, France.") == ["Paris", ",", "France", "."]
    assert word_tokens("Paris PARIS", lowercase=True) == ["paris", "paris"]


def test_ngram_entropy_and_fluency_known_values():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams ab, ba, ab
    assert ngram_entropy("a b a b", 2) == pytest.approx(h2)
    assert ngram_entropy("a b a b", 3) == pytest.approx(1.0)  # aba, bab
    assert ngram_entropy(["w", "x", "y", "z"], 2) == pytest.approx(math.log2(3))
    assert ngram_entropy("a b", 3) == 0.0
    assert fluency("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert fluency("the the the the the") == 0.0  # a degenerate repetition has no entropy


def test_fluency_metric_averages_per_case():
    m = Fluency()
    m.update(["a b a b", "w x y z"], case_index=[0, 1])
    m.update(["the the the"])
    expected = [fluency("a b a b"), fluency("w x y z"), 0.0]
    assert float(m.compute()) == pytest.approx(sum(expected) / 3, rel=1e-6)
    with pytest.raises(TypeError):
        m.update("one string")
    # Per-case means computed once (kept per case by the evaluation) add the same cases.
    texts, owner = ["a b a b", "a b c d", "w x y z"], [0, 0, 1]
    by_text, by_means = Fluency(), Fluency()
    by_text.update(texts, owner)
    by_means.update_case_means(case_fluency(texts, owner))
    assert float(by_means.compute()) == float(by_text.compute())
    # Cases added after a compute count: the wrapped update drops the cached value.
    by_means.update_case_means(torch.tensor([0.0], dtype=torch.float64))
    assert float(by_means.compute()) == pytest.approx(float(by_text.compute()) * 2 / 3)
    with pytest.raises(TypeError):
        by_means.update(texts, case_means=case_fluency(texts, owner))
    assert float(by_text.compute()) == pytest.approx(
        ((fluency("a b a b") + fluency("a b c d")) / 2 + fluency("w x y z")) / 2
    )


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_greedy_generation_matches_hf_generate_on_each_prompt_alone(model_type):
    model, tok = tiny_model(model_type)
    prompts = ["The Eiffel Tower is located in", "Rome", "She plays the piano and he plays"]
    rows = [tok(p)["input_ids"] for p in prompts]
    ids, mask = left_pad(rows, tok.pad_token_id)  # prompts of different lengths: real left padding
    gen = torch.Generator().manual_seed(0)
    new = generate_ids(model, ids, mask, 12, 1, gen, [tok.eos_token_id], tok.pad_token_id)  # [3, n]
    texts = generate_text(model, tok, prompts, max_new_tokens=12, top_k=1)
    for i, row in enumerate(rows):
        ref = model.generate(
            torch.tensor([row]),
            attention_mask=torch.ones(1, len(row), dtype=torch.long),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[0, len(row) :].tolist()
        assert len(ref) > 0 and new[i, : len(ref)].tolist() == ref
        assert texts[i] == tok.decode(row + [t for t in ref if t != tok.eos_token_id], skip_special_tokens=True)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny_llama):
    model, tok = tiny_llama
    prompts = ["The Eiffel Tower is located in", "Rome", "Water boils at"]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_text(model, tok, prompts, max_new_tokens=10, top_k=5, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == generate_text(model, tok, prompts, max_new_tokens=10, top_k=5, seed=0)
    assert a != generate_text(model, tok, prompts, max_new_tokens=10, top_k=5, seed=1)
    assert all(t.startswith(p) for t, p in zip(a, prompts, strict=True))


def test_generation_stops_at_eos_and_pads_after_it():
    class Scripted(torch.nn.Module):
        """Row 0 says EOS (1) at once; row 1 says 5, then EOS; the step is the cache length."""

        def forward(self, input_ids, attention_mask, position_ids, cache, use_cache):
            step = 0 if cache is None else cache
            logits = torch.zeros(2, input_ids.shape[1], 8)
            logits[0, -1, 1] = 10.0
            logits[1, -1, 5 if step == 0 else 1] = 10.0
            assert attention_mask.shape[1] == 3 + step  # the full mask, growing each step
            return types.SimpleNamespace(logits=logits, cache=step + 1)

    ids, mask = left_pad([[3, 4, 4], [4]], pad_id=0)
    new = generate_ids(Scripted(), ids, mask, 10, 1, torch.Generator().manual_seed(0), [1], 0)
    assert new.tolist() == [[1, 0], [5, 1]]


def test_generation_refuses_a_model_in_training_mode(tiny_llama):
    model, tok = tiny_llama
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            generate_text(model, tok, ["Rome"], max_new_tokens=2)
    finally:
        model.eval()


# ----------------------------------------------------------------------------- consistency


def _write_reference(path, files=("idf.npy", "tfidf_vocab.json", "attribute_snippets.json")):
    if "idf.npy" in files:
        np.save(path / "idf.npy", np.array([1.0, 2.0, 1.0, 3.0]))
    if "tfidf_vocab.json" in files:
        (path / "tfidf_vocab.json").write_text(json.dumps({"paris": 0, "france": 1, "rome": 2, "italy": 3}))
    if "attribute_snippets.json" in files:
        snippets = [
            {"relation_id": "P17", "target_id": "Q142", "samples": [{"name": "Lyon", "text": "Paris, France."}]},
            {"relation_id": "P17", "target_id": "Q38", "samples": [{"name": "Milan", "text": "Rome"}]},
            {"relation_id": "P17", "target_id": "Q38", "samples": [{"name": "Turin", "text": "Italy"}]},
        ]
        (path / "attribute_snippets.json").write_text(json.dumps(snippets))


def test_tfidf_similarity_known_cosines(tmp_path):
    _write_reference(tmp_path)
    ref = load_consistency_reference(tmp_path)
    assert ref is not None
    assert ref.consistency(["Paris", "FRANCE!"], "P17", "Q142") == pytest.approx(1.0)
    assert ref.consistency(["Rome and Italy"], "P17", "Q142") == pytest.approx(0.0)
    # a = [1, 2, 0, 0] / sqrt(5), b = [1, 0, 1, 0] / sqrt(2) (idf-weighted counts).
    assert tfidf_similarity("paris france", "paris rome", ref.vocab, ref.idf) == pytest.approx(1 / math.sqrt(10))
    # Snippets of a (relation, target) are joined across records: "Rome Italy".
    assert ref.consistency(["Rome Italy"], "P17", "Q38") == pytest.approx(1.0)
    with pytest.raises(KeyError, match="Q99"):
        ref.consistency(["Paris"], "P17", "Q99")
    m = Consistency(ref)
    m.update([["Paris France"], ["Paris"]], ["P17", "P17"], ["Q142", "Q38"])
    assert float(m.compute()) == pytest.approx(0.5)


def test_missing_consistency_reference_is_absent_with_a_reason(tmp_path):
    _write_reference(tmp_path, files=("tfidf_vocab.json",))
    ref, reason = consistency_reference(tmp_path)
    assert ref is None and load_consistency_reference(tmp_path) is None
    assert "idf.npy" in reason and "attribute_snippets.json" in reason and "tfidf_vocab.json" not in reason
    ref, reason = consistency_reference(None)
    assert ref is None and "not computed" in reason
    with pytest.raises(ValueError):
        Consistency(None)


# ----------------------------------------------------------------------------- perplexity


def test_token_nll_on_a_fixed_distribution():
    probs = torch.tensor([0.7, 0.1, 0.1, 0.1])
    logits = probs.log().expand(2, 4, 4).clone()  # [B, S, V], same distribution everywhere
    ids = torch.tensor([[3, 0, 0, 1], [2, 0, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # row 1 is right-padded after 2 tokens
    total, count = token_nll(logits, ids, mask)
    # Predicted: row 0 tokens 0, 0, 1; row 1 token 0 (the pad targets are ignored).
    assert count == 4
    assert total == pytest.approx(-3 * math.log(0.7) - math.log(0.1))
    m = Perplexity()
    m.update(total, count)
    assert float(m.compute()) == pytest.approx(math.exp(total / count), rel=1e-6)


@pytest.mark.parametrize("add_bos", [False, True])
def test_sequence_nll_matches_a_per_sentence_loss_loop(add_bos, bos_llama, tiny_llama):
    model, tok = bos_llama if add_bos else tiny_llama
    texts = ["The Eiffel Tower is located in the city of Paris.", "Rome is", "She plays the piano.", "Water"]
    total, count = sequence_nll(model, tok, texts, batch_size=3)  # a padded batch, then a short one
    ref_sum, ref_n = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        n = ids.shape[1] - 1  # every token but the first is predicted (the first is BOS when added)
        if n > 0:
            ref_sum += float(model(ids, labels=ids).loss) * n
            ref_n += n
    assert (tok("Water")["input_ids"][0] == tok.bos_token_id) == add_bos
    assert count == ref_n
    assert total / count == pytest.approx(ref_sum / ref_n, abs=1e-5)
    short_sum, short_n = sequence_nll(model, tok, texts, max_length=3)
    assert short_n == sum(min(len(tok(t)["input_ids"]), 3) - 1 for t in texts)


def test_load_me_ppl(tmp_path):
    path = SHARED_DATA / "ME-PPL_50.json"
    if path.exists():
        texts = load_me_ppl(path)
        assert len(texts) == 50 and all(isinstance(t, str) and t for t in texts)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Text": "not a list"}))
    with pytest.raises(ValueError, match="JSON list"):
        load_me_ppl(bad)
