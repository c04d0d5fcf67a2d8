"""Generation-based answer scores (*_generated_exact / *_generated_prefix): the normalisation and
matching on hand-checkable strings, greedy continuations against a one-prompt-at-a-time loop, and
the metrics on a model whose greedy output is scripted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from editlab.evaluation import EvaluationConfig, Evaluator, generated_metric_names, generated_metrics
from editlab.metrics.generated import greedy_continuations, match_answer, normalize_answer
from editlab.models.arch import ModelView
from editlab.models.tiny import tiny_model
from editlab.types import EditRequest


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("  Paris.  ", "paris"),
        ("The Eiffel Tower", "eiffel tower"),  # the article goes
        ("An apple a day", "apple day"),
        ("Theatre", "theatre"),  # "the" only as a word
        ("U.S.A.", "usa"),  # punctuation removed, not replaced (SQuAD)
        ("Eiffel-Tower!", "eiffeltower"),
        ("Washington,  D.C.", "washington dc"),
        ("Zürich", "zürich"),  # lowercase is Unicode-aware; non-ASCII letters stay
        ("\tNew\nYork ", "new york"),
        ("the", ""),
    ],
)
def test_normalize_answer_is_squads(text, normalised):
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize(
    ("continuation", "target", "stopped", "exact", "prefix"),
    [
        (" Paris", "Paris", True, True, True),  # stopped at EOS right after the answer
        (" Paris", "Paris", False, False, True),  # cut by the budget: no clause boundary yet
        (" Paris.", "Paris", False, True, True),  # "." at the end of the text is a boundary
        (" Paris, France", "Paris", False, True, True),
        (" Paris. It is", "Paris", False, True, True),
        (" Paris and Rome", "Paris", False, False, True),
        (" Paris France is", "Paris", False, False, True),
        (" Parisian food", "Paris", True, False, False),  # not at a word boundary
        (" the Paris of", "Paris", False, False, True),  # the article is dropped
        (" Rome, Paris", "Paris", True, False, False),
        (" Washington, D.C. is", "Washington, D.C.", False, True, True),  # cut after "D.C.", not at ","
        (" Washington, DC", "Washington, D.C.", True, True, True),
        (" 3.5 million", "3.5", False, False, True),  # "." inside a number is no boundary
        ("", "Paris", True, False, False),
    ],
)
def test_match_answer_on_hand_checked_continuations(continuation, target, stopped, exact, prefix):
    assert match_answer(continuation, target, stopped) == (exact, prefix)
    assert not exact or prefix  # exact implies prefix


def test_match_answer_refuses_a_target_that_normalises_to_nothing():
    with pytest.raises(ValueError, match="empty after normalisation"):
        match_answer(" the", "The", True)


def slow_greedy(model, tok, prompt: str, budget: int) -> str:
    """One prompt alone, the full sequence re-run for every token, argmax of the last logits."""
    ids = tok(prompt)["input_ids"]
    start = len(ids)
    for _ in range(budget):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        ids.append(nxt)
    return tok.decode(ids[start:], skip_special_tokens=True).lstrip().split("\n")[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_greedy_continuations_equal_a_one_prompt_loop(arch):
    model, tok = tiny_model(arch)
    prompts = ["The Eiffel Tower is in", "Rome", "She plays the piano and", "Water boils at one hundred"]
    budgets = [4, 2, 5, 1]
    got = greedy_continuations(model, tok, prompts, budgets, batch_size=3)  # sorted, padded, two batches
    assert [text for text, _ in got] == [slow_greedy(model, tok, p, b) for p, b in zip(prompts, budgets, strict=True)]


class ScriptedHead(nn.Module):
    """An output head whose argmax at decoding step t is ``script[t]`` for every row: the greedy
    continuation of any prompt is then the script, whatever the body computes."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden [B, d] -> logits [B, V]
        logits = torch.zeros(hidden.shape[0], self.vocab)
        logits[:, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits


def scripted_model(text: str):
    model, tok = tiny_model("llama")
    script = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    model.set_output_embeddings(ScriptedHead(script, len(tok)))
    return model, tok


def request(case_id: str, target_new: str, paraphrases: list[str], target_true: str | None = "Rome") -> EditRequest:
    return EditRequest(case_id, "{} is in", "The Eiffel Tower", target_new, target_true, paraphrases)


@pytest.mark.parametrize(
    ("said", "expected"),
    [
        # the script, then EOS: a text that stopped on its own
        (" Paris", {"exact": 1.0, "prefix": 1.0}),
        (" Paris, France", {"exact": 1.0, "prefix": 1.0}),
        (" Paris and Rome", {"exact": 0.0, "prefix": 1.0}),
        (" Rome", {"exact": 0.0, "prefix": 0.0}),
        ("\n\nParis, France", {"exact": 1.0, "prefix": 1.0}),  # answered on a later line (zsRE questions)
        (" Paris\nFrance", {"exact": 1.0, "prefix": 1.0}),  # the line break ends the answer: stopped
        (" The\nParis", {"exact": 0.0, "prefix": 0.0}),  # ... and only the first line counts
    ],
)
def test_generated_metrics_of_a_scripted_model(said, expected):
    model, tok = scripted_model(said)
    # One case with target Paris (rewrite + 2 paraphrases: all say the script) and one zsRE-like
    # case (no target_true) whose target, Rome, is never the script's first word unless said is Rome.
    reqs = [request("0", "Paris", ["Where is it? In", "It stands in"]), request("1", "Berlin", ["In"], None)]
    out = generated_metrics(ModelView.of(model), tok, reqs, margin=8, batch_size=8)  # one batch: the head counts steps
    # Per case then over cases: case 0 scores `expected`, case 1 (Berlin) never matches.
    for metric in ("efficacy", "generalization"):
        for kind in ("exact", "prefix"):
            assert out[f"{metric}_generated_{kind}"] == pytest.approx(expected[kind] / 2), (metric, kind)
    assert set(out) == generated_metric_names() | {"generated_setting"}


def test_generated_metrics_budget_is_the_answer_length_plus_the_margin():
    """A script longer than answer + margin is cut by the budget: no boundary, so not exact."""
    model, tok = scripted_model(" Paris and Rome and Berlin,")
    reqs = [request("0", "Paris", [])]
    n_answer = len(tok(" Paris", add_special_tokens=False)["input_ids"])
    n_and = len(tok(" and", add_special_tokens=False)["input_ids"])
    out = generated_metrics(ModelView.of(model), tok, reqs, margin=n_and, batch_size=8)
    assert out["efficacy_generated_prefix"] == 1.0 and out["efficacy_generated_exact"] == 0.0
    assert model.get_output_embeddings().calls == n_answer + n_and  # exactly the budget, then stopped
    assert "generalization_generated_exact" not in out  # no paraphrase prompt: no value, not a 0


def test_the_evaluator_reports_them_with_the_quality_metrics_and_can_turn_them_off(tiny_llama):
    model, tok = tiny_llama
    reqs = [request("0", "Paris", ["Where is it? In"])]
    view = ModelView.of(model)
    on = Evaluator(EvaluationConfig(fluency=False), view, tok, progress=False)
    _, metrics = on.evaluate(reqs, quality=True)
    assert generated_metric_names() <= set(metrics) and generated_metric_names() <= on.quality_keys
    _, without_quality = on.evaluate(reqs, quality=False)
    assert not generated_metric_names() & set(without_quality)
    off = Evaluator(EvaluationConfig(fluency=False, generated=False), view, tok, progress=False)
    assert not generated_metric_names() & set(off.evaluate(reqs, quality=True)[1])
    with pytest.raises(ValueError, match="generated_margin"):
        EvaluationConfig(generated_margin=-1)
