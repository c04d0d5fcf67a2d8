"""editlab locate (causal tracing) on tiny models: restorations against a slow one-state-at-a-time
implementation written here with plain forward hooks and ``inputs_embeds``, hand-checked groups,
windows and suggestions, seeded noise, one-line option errors; the CLI in a subprocess (slow)."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editlab.commands import locate as L
from editlab.models.arch import ModelView
from editlab.models.prompts import answer_ids, subject_last_index
from editlab.types import EditRequest

from helpers import REPO, SHARED_DATA, peaky_model

PROMPT, SUBJECT = "The mother tongue of {} is", "Danielle Darrieux"


def fact_for(view: ModelView, tok, prompt: str = PROMPT, subject: str = SUBJECT) -> L.TraceFact:
    """A fact whose answer is the model's own greedy token: p(answer) is large, so restorations move
    it by amounts far above float rounding."""
    ids, start, end = L.subject_token_range(tok, prompt, subject)
    with torch.no_grad():
        top = view.model(torch.tensor([ids])).logits[0, -1].argmax().item()
    return L.TraceFact("0", prompt, subject, tok.decode([top]), tuple(ids), (start, end), top)


def noise_for(view: ModelView, fact: L.TraceFact, samples: int = 2, scale: float = 1.0, seed: int = 0):
    width = view.model.get_input_embeddings().weight.shape[1]
    start, end = fact.subject_range
    return L.draw_noise(torch.Generator().manual_seed(seed), samples, end - start, width, scale)


def _main(output):
    return output[0] if isinstance(output, tuple) else output


def slow_probability(view: ModelView, fact: L.TraceFact, noise: torch.Tensor, states) -> float:
    """p(answer), averaged over the noise samples, each sample its own batch-1 forward: the clean
    states recorded by a clean forward, the noise added to ``inputs_embeds``, each restored state
    written into the module output by a hook of its own."""
    model = view.model
    ids = torch.tensor([fact.input_ids])  # [1, S]
    modules = {(k, layer): L.state_module(view, k, layer) for k, layer, _ in states}
    clean: dict = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, key=key: clean.__setitem__(key, _main(out).clone()))
        for key, module in modules.items()
    ]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()

    def restore(m, a, out, key):
        hidden = _main(out).clone()
        for k, layer, token in states:
            if (k, layer) == key:
                hidden[0, token] = clean[key][0, token]
        return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

    start, end = fact.subject_range
    probs = []
    for sample in noise:
        handles = [
            module.register_forward_hook(lambda m, a, out, key=key: restore(m, a, out, key))
            for key, module in modules.items()
        ]
        embeds = model.get_input_embeddings()(ids).clone()  # [1, S, d]
        embeds[0, start:end] += sample
        with torch.no_grad():
            logits = model(inputs_embeds=embeds).logits[0, -1]
        for handle in handles:
            handle.remove()
        probs.append(torch.softmax(logits, dim=-1)[fact.answer_id].item())
    return sum(probs) / len(probs)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_restoring_every_state_recovers_the_clean_probability_exactly(model_type):
    model, tok = peaky_model(model_type)
    view = ModelView.of(model)
    fact = fact_for(view, tok)
    noise = noise_for(view, fact, samples=3, scale=2.0)
    positions = range(len(fact.input_ids))
    everything = tuple((k, layer, t) for k in L.KINDS for layer in range(view.n_layers) for t in positions)
    residuals = tuple(("residual", layer, t) for layer in range(view.n_layers) for t in positions)
    p_clean, probs = L.restored_probabilities(
        view, fact.input_ids, fact.subject_range, fact.answer_id, noise, [everything, residuals, ()]
    )
    assert probs[0].item() == p_clean and probs[1].item() == p_clean  # bit for bit
    # The clean row is the model's clean run, and the corruption does change p.
    with torch.no_grad():
        alone = torch.softmax(model(torch.tensor([fact.input_ids])).logits[0, -1], -1)[fact.answer_id].item()
    assert p_clean == pytest.approx(alone, rel=1e-5)
    assert abs(p_clean - probs[2].item()) > 0.01


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_no_restoration_is_the_corrupted_run(model_type):
    model, tok = peaky_model(model_type)
    view = ModelView.of(model)
    fact = fact_for(view, tok)
    noise = noise_for(view, fact, samples=3, scale=2.0)
    _, probs = L.restored_probabilities(view, fact.input_ids, fact.subject_range, fact.answer_id, noise, [()])
    assert probs[0].item() == pytest.approx(slow_probability(view, fact, noise, ()), rel=1e-5)
    # Same noise, other restorations in the batch: the plain corrupted row does not change.
    more = [(("residual", 0, fact.subject_range[0]),), ()]
    _, again = L.restored_probabilities(view, fact.input_ids, fact.subject_range, fact.answer_id, noise, more)
    assert again[1].item() == pytest.approx(probs[0].item(), rel=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_batched_restorations_equal_one_at_a_time(model_type):
    model, tok = peaky_model(model_type)
    view = ModelView.of(model)
    fact = fact_for(view, tok, "{} was born in", "Danielle Darrieux")
    noise = noise_for(view, fact, samples=2, scale=2.0)
    window = 2  # mlp/attn restore two layers at a time: the window path is exercised
    # 7 corrupted rows a forward: restorations of one kind are split over several forwards.
    trace = L.trace_fact(view, fact, noise, L.KINDS, window, batch_size=7)
    assert trace.p_corrupted == pytest.approx(slow_probability(view, fact, noise, ()), rel=1e-5)
    spread = []
    for kind in L.KINDS:
        for layer in range(view.n_layers):
            layers = [layer] if kind == "residual" else L.window_layers(layer, window, view.n_layers)
            for token in range(fact.subject_range[0], len(fact.input_ids)):
                slow = slow_probability(view, fact, noise, tuple((kind, j, token) for j in layers))
                assert trace.scores[kind][layer, token].item() == pytest.approx(slow, rel=1e-5, abs=1e-7)
                spread.append(slow - trace.p_corrupted)
    assert max(spread) - min(spread) > 0.01  # effects far larger than the tolerance


def test_positions_before_the_subject_are_not_traced_and_would_change_nothing():
    model, tok = peaky_model("llama")
    view = ModelView.of(model)
    fact = fact_for(view, tok)
    start = fact.subject_range[0]
    assert start >= 2
    noise = noise_for(view, fact, scale=2.0)
    trace = L.trace_fact(view, fact, noise, ("residual", "mlp"), 2, batch_size=64)
    assert torch.isnan(trace.scores["residual"][:, :start]).all()
    assert not torch.isnan(trace.scores["residual"][:, start:]).any()
    everything_before = tuple((k, layer, t) for k in L.KINDS for layer in range(view.n_layers) for t in range(start))
    assert slow_probability(view, fact, noise, everything_before) == pytest.approx(trace.p_corrupted, rel=1e-5)


@pytest.fixture(scope="module")
def answering():
    """The peaky llama, its tokenizer and known_requests(…, 3) (built once: 300 prompts)."""
    model, tok = peaky_model("llama")
    view = ModelView.of(model)
    return view, tok, known_requests(view, tok, 3)


def test_the_noise_is_seeded(answering):
    view, tok, requests = answering
    cfg = dict(num_facts=2, samples=2, window=2, edit_width=2, noise_subjects=50)
    first = L.locate(view, tok, requests, L.LocateConfig(seed=0, **cfg))
    again = L.locate(view, tok, requests, L.LocateConfig(seed=0, **cfg))
    other = L.locate(view, tok, requests, L.LocateConfig(seed=1, **cfg))
    assert first["effects"] == again["effects"] and first["facts"] == again["facts"]
    assert first["effects"] != other["effects"]
    assert [f["p_clean"] for f in first["facts"]] == [f["p_clean"] for f in other["facts"]]


def test_embedding_std_is_the_spread_of_the_subject_token_embeddings():
    model, tok = peaky_model("llama")
    view = ModelView.of(model)
    ids = tok("Paris", add_special_tokens=False)["input_ids"] + tok("Rome", add_special_tokens=False)["input_ids"]
    assert len(set(ids)) == len(ids) >= 2
    with torch.no_grad():  # the first token's embedding all ones, the others all threes
        model.get_input_embeddings().weight[ids[0]] = 1.0
        model.get_input_embeddings().weight[ids[1:]] = 3.0
    d = model.config.hidden_size
    n1, n3 = d, d * (len(ids) - 1)
    mean = (n1 + 3 * n3) / (n1 + n3)
    expected = math.sqrt((n1 * (1 - mean) ** 2 + n3 * (3 - mean) ** 2) / (n1 + n3 - 1))  # unbiased, as ROME
    assert L.embedding_std(view, tok, ["Paris", "Rome"]) == pytest.approx(expected, rel=1e-6)


def test_window_layers_follow_the_reference():
    # ROME: range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))
    assert L.window_layers(0, 10, 30) == [0, 1, 2, 3, 4]
    assert L.window_layers(15, 10, 30) == list(range(10, 20))
    assert L.window_layers(29, 10, 30) == list(range(24, 30))
    assert L.window_layers(7, 1, 30) == [7]
    assert L.window_layers(7, 3, 30) == [6, 7, 8]


def test_token_groups_by_hand():
    groups = L.token_groups(2, 5, 9)  # subject at tokens 2, 3, 4 of a 9-token prompt
    assert groups == {
        "first subject token": [2],
        "middle subject tokens": [3],
        "last subject token": [4],
        "first subsequent token": [5],
        "further tokens": [6, 7],
        "last token": [8],
    }
    at_end = L.token_groups(0, 1, 1)  # a one-token prompt that is the subject
    assert at_end["middle subject tokens"] == [] and at_end["first subsequent token"] == []
    assert at_end["last subject token"] == at_end["last token"] == [0]


def test_aggregate_by_hand():
    def trace(p_corrupted, grid):  # grid [L=2, S=4]: subject at 0..1, then tokens 2, 3
        fact = L.TraceFact("x", "{} a b", "s", "a", (5, 6, 7, 8), (0, 2), 1)
        return L.FactTrace(fact, 1.0, p_corrupted, {"mlp": torch.tensor(grid, dtype=torch.float64)})

    a = trace(0.1, [[0.1, 0.5, 0.2, 0.3], [0.1, 0.9, 0.4, 0.6]])
    b = trace(0.2, [[0.2, 0.4, 0.2, 0.2], [0.2, 0.2, 0.2, 1.0]])
    out = L.aggregate([a, b], ["mlp"])["mlp"]
    assert out["last subject token"]["mean"] == pytest.approx([(0.4 + 0.2) / 2, (0.8 + 0.0) / 2])
    assert out["last token"]["mean"] == pytest.approx([(0.2 + 0.0) / 2, (0.5 + 0.8) / 2])
    assert out["first subject token"]["mean"] == pytest.approx([0.0, 0.0])
    assert out["middle subject tokens"] == {"mean": None, "rows": 0, "facts": 0}
    assert out["further tokens"]["rows"] == 0 and out["first subsequent token"]["rows"] == 2


def test_suggest_window_by_hand():
    assert L.suggest_window([0.0, 1.0, 5.0, 5.0, 1.0, 0.0], 2) == [2, 3]
    assert L.suggest_window([0.0, 1.0, 5.0, 5.0, 1.0, 0.0], 3) == [1, 2, 3]  # 11 == 11: the first
    assert L.suggest_window([3.0, 0.0, 0.0, 3.0], 1) == [0]
    with pytest.raises(ValueError, match="--edit-width=5"):
        L.suggest_window([1.0] * 4, 5)


def test_subject_range_agrees_with_the_editing_key_position():
    from editlab.data.sources import load_requests
    from editlab.models.tiny import tiny_tokenizer

    for add_bos in (False, True):
        tok = tiny_tokenizer(add_bos=add_bos)
        for req in load_requests(str(SHARED_DATA / "multi_counterfact.json.gz"), num_edits=200):
            ids, start, end = L.subject_token_range(tok, req.prompt, req.subject)
            full, last = subject_last_index(tok, req.prompt, req.subject)
            assert (ids, end - 1) == (full, last)
            assert req.subject in tok.decode(ids[start:end]).strip()
            assert req.subject not in tok.decode(ids[start + 1 : end]) and req.subject not in tok.decode(ids[:start])


def known_requests(view: ModelView, tok, n: int) -> list[EditRequest]:
    """CounterFact requests rewritten so that target_true is the model's greedy answer (the tiny
    model knows no facts), with one unknown request in front. Only prompts whose greedy token
    starts a word can be answered so (about one in ten for the peaky llama)."""
    from editlab.data.sources import load_requests

    out = []
    for req in load_requests(str(SHARED_DATA / "multi_counterfact.json.gz"), num_edits=300):
        fact = fact_for(view, tok, req.prompt, req.subject)
        answer = fact.answer.strip()
        if answer and answer != req.target_new and answer_ids(tok, answer)[0] == fact.answer_id:
            req.target_true = answer
            out.append(req)
            if len(out) > n:
                break
    assert len(out) > n
    wrong = out[n]
    wrong.target_true = "zzzz"  # tokenises to a first token the model does not predict
    assert answer_ids(tok, "zzzz")[0] != fact_for(view, tok, wrong.prompt, wrong.subject).answer_id
    return [wrong, *out[:n]]


def test_select_known_facts_takes_the_first_answered(answering):
    view, tok, requests = answering
    facts, read = L.select_known_facts(view, tok, requests, 2, batch_size=2)
    assert [f.case_id for f in facts] == [r.case_id for r in requests[1:3]] and read == 3
    facts, read = L.select_known_facts(view, tok, requests, 10)
    assert len(facts) == 3 and read == 4


def write_counterfact(path: Path, requests: list[EditRequest]) -> Path:
    with gzip.open(SHARED_DATA / "multi_counterfact.json.gz", "rt") as f:
        records = {str(rec["case_id"]): rec for rec in json.load(f)[:300]}
    out = []
    for req in requests:
        rec = records[req.case_id]
        rec["requested_rewrite"]["target_true"]["str"] = req.target_true
        out.append(rec)
    path.write_text(json.dumps(out))
    return path


@pytest.mark.parametrize(
    "options, message",
    [
        (["--samples", "0"], "option --samples=0 must be >= 1"),
        (["--kinds", "mlp,resid"], "option --kinds=mlp,resid: each must be one of residual,mlp,attn, once"),
        (["--kinds", "residual"], "option --kinds: the suggestion needs mlp among them"),
        (["--noise", "-1"], "option --noise=-1.0 must be a positive number"),
        (["--bogus", "1"], "editlab locate: unrecognized arguments: --bogus 1"),
        (["--num-facts", "x"], "editlab locate: argument --num-facts: invalid int value: 'x'"),
    ],
)
def test_a_bad_option_is_one_error_line(tmp_path, capsys, options, message):
    from editlab.cli import main

    data = str(SHARED_DATA / "multi_counterfact.json.gz")
    with pytest.raises(SystemExit) as exit_info:
        main(["locate", "--data", data, "--out", str(tmp_path), *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [f"editlab: error: {message}"]
    assert not (tmp_path / "locate.json").exists()


def test_zsre_and_an_oversized_window_are_one_error_line(tmp_path, capsys, answering):
    from editlab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["locate", "--data", str(SHARED_DATA / "zsre_mem.json.gz"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "target_true" in err[0]
    view, tok, requests = answering
    with pytest.raises(ValueError, match="--edit-width=4 must be between 1 and the model's 3 layers"):
        L.locate(view, tok, requests, L.LocateConfig(edit_width=4))


@pytest.mark.slow
def test_cli_on_a_tiny_model_writes_the_json_and_the_heatmap(tmp_path, answering):
    view, tok, requests = answering
    view.model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    data = write_counterfact(tmp_path / "facts.json", requests[1:])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["--model", str(tmp_path / "tiny"), "--data", str(data), "--out", str(tmp_path / "out")]
    args += ["--num-facts", "3", "--samples", "2", "--window", "2", "--edit-width", "2", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "editlab.cli", "locate", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "out" / "locate.json")
    result = json.loads((tmp_path / "out" / "locate.json").read_text())
    assert result["n_layers"] == 3 and len(result["facts"]) == 3
    assert result["selection"] == {"criterion": result["selection"]["criterion"], "records_read": 3, "facts": 3}
    for kind in L.KINDS:
        assert len(result["effects"][kind]["last token"]["mean"]) == 3
    curve = result["effects"]["mlp"]["last subject token"]["mean"]
    assert result["suggestion"]["layers"] == L.suggest_window(curve, 2)
    # The last layer's output at the last token decides p: restoring it restores the clean p.
    total = sum(f["p_clean"] - f["p_corrupted"] for f in result["facts"]) / 3
    assert result["effects"]["residual"]["last token"]["mean"][2] == pytest.approx(total, rel=1e-9)
    assert result["mean_p_clean"] - result["mean_p_corrupted"] == pytest.approx(total, rel=1e-9)
    assert (tmp_path / "out" / "locate.png").stat().st_size > 10_000
    assert sum(1 for line in done.stderr.splitlines() if line.startswith("editlab locate: fact ")) == 3
