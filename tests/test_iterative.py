"""Iterative editing (stop rule, one commit per step) and neighbour-assisted editing (the extra
z-loss term, which neighbours qualify)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from editlab.editing.context_templates import ContextTemplates
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods import iterative as iterative_module
from editlab.editing.methods import memit as memit_module
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.ece import ECE
from editlab.editing.methods.iterative import (
    IterativeEditing,
    NeighborAssist,
    neighbor_rows,
    perplexity,
    should_stop,
    split_by_template,
    target_nll,
)
from editlab.editing.methods.memit import MEMIT
from editlab.editing.methods.nse import NSE
from editlab.editing.methods.stages import Spread, StagedMethod
from editlab.editing.neighbours import neighbour_terms
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import ExtraRow, TargetConfig, descend_offsets, optimize_targets
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.scoring import score_answers
from editlab.models.weights import read_weight
from editlab.types import EditRequest

from helpers import (
    SHARED_DATA,
    TEMPLATES,
    assert_failed_step_restores,
    corpus_file,
    facts,
    louvre_neighbour_for_request_0,
    peaky_model,
    run_cli,
    tiny_args,
)

TARGETS = TargetConfig(steps=15, lr=0.5, kl_factor=0.0, weight_decay=0.0, clamp_norm_factor=2.0)


def make(tmp_path, mom2_weight=0.5):
    model, tok = peaky_model()
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, "tiny", model_fingerprint(model), seed=0, progress=False)
    memit = MEMIT(
        layers=[0, 1],
        mom2_weight=mom2_weight,
        targets=TARGETS,
        context=ContextTemplates(count=0, length=3),
        covariance=CovarianceConfig(corpus=corpus_file(tmp_path), num_samples=20, batch_size=8),
    )
    return ctx, memit


# -- the stop rule ---------------------------------------------------------------------------
class Scripted(StagedMethod):
    """A two-stage method whose targets report a scripted ideal perplexity per iteration."""

    templates = ["{}"]

    def __init__(self, p_ideal: list[float]) -> None:
        self.p_ideal, self.k, self.commits, self.spreads = p_ideal, 0, [], 0

    def edited_layers(self):
        return [0]

    def compute_targets(self, ctx, requests, extra=None):
        nll = torch.full((len(requests),), self.p_ideal[self.k], dtype=torch.float64).log()
        self.k += 1
        return SimpleNamespace(nll=nll)

    def spread(self, ctx, requests, targets):
        self.spreads += 1
        return Spread(scalars={"spread": float(self.spreads)}, pending={0: torch.tensor(float(self.spreads))})

    def commit(self, spread):
        self.commits.append(spread)

    def apply(self, ctx, requests):
        raise AssertionError("the wrapper drives the stages")


@pytest.mark.parametrize(
    ("p_after", "stops_at"),
    [
        ([50.0, 10.0, 2.5, 1.5, 1.2], 3),  # Δp = 48, 8, 0.5: |Δp| ≤ 1 at iteration 3
        ([1.0, 9.0], 1),  # Δp = -1: the rule is |Δp| ≤ ε, so a drop of exactly ε stops
        ([90.0, 80.0, 70.0, 60.0], 4),  # never within ε: max_iterations (4) ends it
    ],
)
def test_stop_rule_on_a_hand_made_perplexity_sequence(monkeypatch, tiny_llama, p_after, stops_at):
    model, tok = tiny_llama
    ctx = EditContext(model, tok, ModelView.of(model), "tiny", "f", progress=False)
    reqs = facts()[:2]
    p_ideal = [2.0] * 5
    # target_nll is called once before the first iteration (p before editing) and once after
    # every spread (p(θ_{k+1}, ĥ_k)).
    seq = iter([30.0, *p_after])
    monkeypatch.setattr(
        iterative_module, "target_nll", lambda *a: torch.full((len(reqs),), next(seq), dtype=torch.float64).log()
    )
    method = Scripted(p_ideal)
    res = IterativeEditing(method, epsilon=1.0, max_iterations=4, track_accuracy=False).apply(ctx, reqs)
    its = res.details["iterations"]
    assert len(its) == stops_at and method.spreads == stops_at
    assert [i["delta_p"] for i in its] == pytest.approx([p - 2.0 for p in p_after[:stops_at]])
    assert res.scalars["iter_stopped"] == float(stops_at < 4 or abs(p_after[3] - 2.0) <= 1)
    assert res.scalars["iter_p_before"] == pytest.approx(30.0)
    # Only the last spread is committed, once.
    assert len(method.commits) == 1 and method.commits[0].scalars["spread"] == stops_at


def test_perplexity_and_stop_rule_formulas():
    nll = torch.tensor([0.0, 1.0, 2.0])
    assert perplexity(nll) == pytest.approx((1 + math.e + math.e**2) / 3)
    assert should_stop(1.0, 1.0) and should_stop(-0.3, 1.0) and not should_stop(-1.01, 1.0)


# -- iterative MEMIT on the tiny model ---------------------------------------------------------
def test_iterative_memit_logs_every_iteration_and_caches_the_step_once(tmp_path, stats_cache):
    ctx, memit = make(tmp_path, mom2_weight=0.01)
    it = IterativeEditing(memit, epsilon=0.0, max_iterations=3)  # ε = 0: runs all 3 iterations
    it.setup(ctx)
    seen = []  # the targets of every iteration
    real = memit.compute_targets
    memit.compute_targets = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
    reqs = facts()
    before = {layer: read_weight(ctx.view.ffn_out(layer)).clone() for layer in memit.layers}
    res = it.apply(ctx, reqs)
    its = res.details["iterations"]
    assert [i["iteration"] for i in its] == [1, 2, 3] and res.scalars["iter_iterations"] == 3
    assert res.scalars["iter_stopped"] == 0.0
    for record in its:
        assert record["delta_p"] == pytest.approx(record["p_after"] - record["p_ideal"])
        assert 0.0 <= record["efficacy_acc"] <= 1.0
    # p after the last iteration is the target perplexity of the edited model, measured now.
    assert res.scalars["iter_p_after"] == pytest.approx(
        perplexity(target_nll(ctx.view, ctx.tok, reqs, memit.templates))
    )
    # Every iteration optimised z on the weights the previous spread left (h_{k+1} is the
    # residual on θ_{k+1}), and every spread moved that residual most of the way to its z.
    _, h_final = keys_and_outputs(ctx.view, ctx.tok, reqs, memit.templates, 0, 1)
    assert len(seen) == 3
    for k, tgt in enumerate(seen):
        h_next = seen[k + 1].h.double() if k < 2 else h_final
        assert not torch.allclose(h_next, tgt.h.double())
        gap_before, gap_after = (tgt.z.double() - tgt.h.double()).norm(dim=1), (tgt.z.double() - h_next).norm(dim=1)
        assert (gap_after < 0.5 * gap_before).all(), (k, gap_before, gap_after)
    for layer in memit.layers:
        assert not torch.equal(read_weight(ctx.view.ffn_out(layer)), before[layer])
        # The cache holds this step's KKᵀ once: the keys on the final weights.
        keys, _ = keys_and_outputs(ctx.view, ctx.tok, reqs, memit.templates, layer, 1)
        torch.testing.assert_close(memit.cache_c[layer], keys.T @ keys, rtol=1e-5, atol=1e-6)


def test_one_iteration_is_memit(tmp_path, stats_cache):
    ctx, memit = make(tmp_path)
    IterativeEditing(memit, max_iterations=1).setup(ctx)
    IterativeEditing(memit, max_iterations=1).apply(ctx, facts())
    ctx2, plain = make(tmp_path)
    plain.setup(ctx2)
    plain.apply(ctx2, facts())
    for layer in memit.layers:
        torch.testing.assert_close(read_weight(ctx.view.ffn_out(layer)), read_weight(ctx2.view.ffn_out(layer)))
        torch.testing.assert_close(memit.cache_c[layer], plain.cache_c[layer])


# -- iterative ECE and NSE (both StagedMethods) ------------------------------------------------
def make_neuron_method(tmp_path, kind: str):
    """A tiny ECE or NSE (every request passed: alpha 0) on the peaky model, z not cached on disk,
    not yet set up."""
    model, tok = peaky_model()
    ctx = EditContext(model, tok, ModelView.of(model), "tiny", model_fingerprint(model), seed=0, progress=False)
    common = dict(
        layers=[0, 1],
        mom2_weight=0.01,
        z_cache=False,
        targets=TARGETS,
        context=ContextTemplates(count=1, length=3),
        covariance=CovarianceConfig(corpus=corpus_file(tmp_path), num_samples=20, batch_size=8),
    )
    if kind == "ece":
        return ctx, ECE(**common)
    return ctx, NSE(alpha=0.0, upper_bound=1e9, **common)


@pytest.mark.parametrize("kind", ["ece", "nse"])
def test_iterative_ece_and_nse_run_every_iteration_and_cache_the_step_once(kind, tmp_path, stats_cache):
    ctx, method = make_neuron_method(tmp_path, kind)
    it = IterativeEditing(method, epsilon=0.0, max_iterations=2)  # ε = 0: both iterations run
    it.setup(ctx)
    commits = []
    real_commit = method.commit
    method.commit = lambda spread: commits.append(spread) or real_commit(spread)
    before = {layer: read_weight(ctx.view.ffn_out(layer)).clone() for layer in method.layers}
    res = it.apply(ctx, facts())
    its = res.details["iterations"]
    assert [i["iteration"] for i in its] == [1, 2] and res.scalars["iter_iterations"] == 2
    for record in its:
        assert record["delta_p"] == pytest.approx(record["p_after"] - record["p_ideal"])
        assert all(f"delta_norm/l{layer}" in record for layer in method.layers)
    assert ("nse_passes" in its[0]) == (kind == "nse") and ("neurons/l0" in its[0])
    # One commit, of the last iteration's spread: the step's keys enter the cache once.
    assert len(commits) == 1
    assert set(method.cache_c) == set(method.layers)
    for layer in method.layers:
        assert torch.equal(method.cache_c[layer], commits[0].pending[layer])
        assert not torch.equal(read_weight(ctx.view.ffn_out(layer)), before[layer])


@pytest.mark.parametrize("kind", ["ece", "nse"])
def test_one_iteration_of_iterative_ece_and_nse_is_the_method_bit_for_bit(kind, tmp_path, stats_cache):
    ctx, method = make_neuron_method(tmp_path, kind)
    wrapper = IterativeEditing(method, max_iterations=1, track_accuracy=False)
    wrapper.setup(ctx)
    wrapped = wrapper.apply(ctx, facts())
    ctx2, plain = make_neuron_method(tmp_path, kind)
    plain.setup(ctx2)
    alone = plain.apply(ctx2, facts())
    for layer in plain.layers:
        assert torch.equal(read_weight(ctx.view.ffn_out(layer)), read_weight(ctx2.view.ffn_out(layer)))
        assert torch.equal(method.cache_c[layer], plain.cache_c[layer])
        assert wrapped.scalars[f"delta_norm/l{layer}"] == alone.scalars[f"delta_norm/l{layer}"]
    assert wrapped.scalars["z_nll"] == alone.scalars["z_nll"]


@pytest.mark.parametrize("kind", ["ece", "nse"])
def test_ece_and_nse_refuse_neighbour_rows(kind, tmp_path, stats_cache):
    ctx, method = make_neuron_method(tmp_path, kind)
    method.setup(ctx)
    extra = [ExtraRow(0, "{} is located in the city of", "The Louvre", "Paris", 1.0)]
    with pytest.raises(ValueError, match="does not take extra"):
        method.compute_targets(ctx, facts(), extra)


def test_failed_step_restores_the_weights(tmp_path, stats_cache, monkeypatch):
    ctx, memit = make(tmp_path)
    it = IterativeEditing(memit, max_iterations=2)
    it.setup(ctx)
    it.cache_c = memit.cache_c  # the shared check reads the sequential cache from the method it gets
    assert_failed_step_restores(ctx, it, memit_module, "memit_delta", monkeypatch)


def test_a_failure_in_a_later_iteration_undoes_the_earlier_ones(tmp_path, stats_cache, monkeypatch):
    ctx, memit = make(tmp_path)
    it = IterativeEditing(memit, epsilon=0.0, max_iterations=3)
    it.setup(ctx)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    real, calls = memit_module.memit_delta, {"n": 0}

    def fail_third(*args):  # iteration 2, first layer
        calls["n"] += 1
        if calls["n"] == 3:
            raise FloatingPointError("injected")
        return real(*args)

    monkeypatch.setattr(memit_module, "memit_delta", fail_third)
    with pytest.raises(FloatingPointError):
        it.apply(ctx, facts())
    assert all(torch.equal(p, before[n]) for n, p in ctx.model.named_parameters())
    assert memit.cache_c == {}


def test_a_method_without_stages_is_refused(tmp_path):
    with pytest.raises(ValueError, match="option method=object has no compute_targets/spread/commit"):
        IterativeEditing(object())


# -- neighbour-assisted editing ----------------------------------------------------------------
def test_split_by_template():
    assert split_by_template("The mother tongue of {} is", "The mother tongue of Léon Blum is") == "Léon Blum"
    assert split_by_template("{}, the", "Elvis Presley, the") == "Elvis Presley"
    assert split_by_template("The mother tongue of {} is", "The native language of Montesquieu is") is None
    assert split_by_template("{} is", " is") is None


def test_neighbour_term_adds_its_weighted_nll_and_changes_the_gradient():
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    cfg = TargetConfig(steps=3, lr=0.5)
    extra = [ExtraRow(0, "{} is located in the city of", "The Louvre", "Paris", 2.0)]
    # One forward (δ = 0): the loss grows by exactly 2 · NLL(Paris | the neighbour prompt),
    # for request 0 only; the target NLL itself is unchanged.
    plain = descend_offsets(view, tok, reqs, TEMPLATES, 1, cfg, 1, progress=False)
    with_nb = descend_offsets(view, tok, reqs, TEMPLATES, 1, cfg, 1, progress=False, terms=neighbour_terms(extra))
    nb_nll = score_answers(view, tok, ["The Louvre is located in the city of"], ["Paris"])["nll"][0]
    torch.testing.assert_close(with_nb.loss - plain.loss, torch.tensor([2 * nb_nll, 0.0, 0.0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_nb.nll, plain.nll)
    torch.testing.assert_close(
        with_nb.records["neighbour_nll"], torch.tensor([2 * nb_nll, 0.0, 0.0]), rtol=1e-4, atol=1e-5
    )
    # Optimising: request 0's z moves differently, the others' do not move at all differently.
    a = optimize_targets(view, tok, reqs, TEMPLATES, 1, cfg, progress=False)
    b = optimize_targets(view, tok, reqs, TEMPLATES, 1, cfg, progress=False, terms=neighbour_terms(extra))
    assert not torch.allclose(a.z[0], b.z[0], atol=1e-4)
    torch.testing.assert_close(a.z[1:], b.z[1:])


@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_averaged_neighbour_row_is_one_more_rewrite_row(weight):
    # As the released compute_z: the neighbour prompt (behind the first random prefix) joins the
    # rewrite rows and the NLL term is their mean (weight: the row's weight in it).
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    cfg = TargetConfig(steps=1, kl_factor=0.0)  # one measuring forward at δ = 0: no KL, no decay
    nb_prompt = "Hello there. {} is located in the city of"  # TEMPLATES[1] around a neighbour
    extra = [ExtraRow(0, nb_prompt, "The Louvre", "Paris", weight, averaged=True)]
    run = descend_offsets(view, tok, reqs, TEMPLATES, 1, cfg, 1, progress=False, terms=neighbour_terms(extra))
    rewrite = [t.format(reqs[0].prompt).format(reqs[0].subject) for t in TEMPLATES]
    nll = score_answers(view, tok, rewrite + [nb_prompt.format("The Louvre")], [reqs[0].target_new] * 2 + ["Paris"])
    r1, r2, nb = nll["nll"].tolist()
    torch.testing.assert_close(run.loss[0], torch.tensor((r1 + r2 + weight * nb) / (2 + weight)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run.nll[0], torch.tensor((r1 + r2) / 2), rtol=1e-4, atol=1e-5)  # the target's alone
    plain = descend_offsets(view, tok, reqs, TEMPLATES, 1, cfg, 1, progress=False)
    torch.testing.assert_close(run.loss[1:], plain.loss[1:])  # the other requests: unchanged


def test_neighbour_prefix_is_the_first_random_context_prefix(tmp_path, stats_cache):
    from editlab.editing.methods.iterative import neighbor_prefix

    templates = ["{}", "First. {}", "Second. {}"]
    assert neighbor_prefix(templates, NeighborAssist()) == "First. {}"
    assert neighbor_prefix(templates, NeighborAssist(prefix=False)) == "{}"
    with pytest.raises(ValueError, match="neighbors.prefix=true needs a random context prefix"):
        neighbor_prefix(["{}"], NeighborAssist())
    ctx, memit = make(tmp_path)  # context count 0: refused before any edit
    with pytest.raises(ValueError, match="neighbors.prefix=true"):
        IterativeEditing(memit, neighbors=NeighborAssist()).setup(ctx)


def test_neighbour_rows_keep_only_greedy_true_neighbours_and_count_the_rest(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    reqs = [
        EditRequest(
            "a",
            "The mother tongue of {} is",
            "Danielle Darrieux",
            "English",
            "French",
            neighborhood_prompts=[
                "The native language of Montesquieu is",  # another template: not a candidate
                "The mother tongue of Léon Blum is",  # candidate, model says French
                "The mother tongue of Jean Gabin is",  # candidate, also French (count = 1: unused)
            ],
        ),
        EditRequest(
            "b",
            "{} was founded by",
            "Microsoft",
            "Steve Jobs",
            "Bill Gates",
            neighborhood_prompts=["Xbox was founded by"],  # candidate, but the model says otherwise
        ),
        EditRequest("c", "{} is in", "Rome", "Paris", "Italy"),  # no neighbourhood prompt
    ]
    greedy_true = {"The mother tongue of Léon Blum is", "The mother tongue of Jean Gabin is"}
    seen = []

    def fake_scores(view, tok, prompts, answers):
        seen.extend(zip(prompts, answers, strict=True))
        return {"exact": torch.tensor([p in greedy_true for p in prompts])}

    monkeypatch.setattr(iterative_module, "score_answers", fake_scores)
    rows, used = neighbor_rows(ModelView.of(model), tok, reqs, NeighborAssist(weight=0.5, averaged=False))
    assert used == [["The mother tongue of Léon Blum is"], [], []]
    assert rows == [ExtraRow(0, "The mother tongue of {} is", "Léon Blum", "French", 0.5, averaged=False)]
    assert ("Xbox was founded by", "Bill Gates") in seen and len(seen) == 3  # only template matches scored
    # As released: behind the given context prefix, one more rewrite row; qualified on the bare prompt.
    seen.clear()
    rows, used = neighbor_rows(ModelView.of(model), tok, reqs, NeighborAssist(), prefix="Once upon a time. {}")
    assert used == [["The mother tongue of Léon Blum is"], [], []]
    assert rows == [ExtraRow(0, "Once upon a time. The mother tongue of {} is", "Léon Blum", "French", 1.0, True)]
    assert ("The mother tongue of Léon Blum is", "French") in seen


def test_neighbour_assisted_step_counts_requests_without_a_neighbour(tmp_path, stats_cache, monkeypatch):
    ctx, memit = make(tmp_path)
    reqs = facts()  # 1 and 2 have a same-template neighbour, 3 has none
    louvre_neighbour_for_request_0(monkeypatch)
    it = IterativeEditing(memit, max_iterations=1, neighbors=NeighborAssist(prefix=False))  # count 0: no prefix
    it.setup(ctx)
    res = it.apply(ctx, reqs)
    assert res.scalars["neighbor_missing"] == 2 and res.scalars["neighbor_rows"] == 1
    assert 0.0 <= res.scalars["neighbor_kept_acc"] <= 1.0
    assert res.per_request["1"]["neighbor_prompts"] == ["The Louvre is located in the city of"]
    assert res.per_request["3"]["neighbor_prompts"] == []


@pytest.mark.slow
def test_iterative_neighbour_assisted_memit_edits_smollm2_on_counterfact():
    # The shared cache: the embedded model's converted copy and memit_smollm2.yaml's covariance.
    from editlab.data.sources import load_requests
    from editlab.models.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, "smollm2-135m-instruct", model_fingerprint(model), seed=0, progress=False)
    reqs = load_requests(str(SHARED_DATA / "multi_counterfact.json.gz"), num_edits=3)
    memit = MEMIT(
        layers=[4, 5, 6, 7, 8],
        mom2_weight=2000,
        targets=TargetConfig(lr=0.5, steps=12),
        context=ContextTemplates(count=1, length=5),
        # The configs' covariance: the session's cache has it when the SmolLM2 baseline tests ran first.
        covariance=CovarianceConfig(corpus=str(SHARED_DATA / "ME-PPL.json.gz"), num_samples=2000),
    )
    it = IterativeEditing(memit, epsilon=1.0, max_iterations=2, neighbors=NeighborAssist())
    it.setup(ctx)
    prompts, new, true = [r.rewrite_prompt for r in reqs], [r.target_new for r in reqs], [r.target_true for r in reqs]
    before = score_answers(view, tok, prompts, new)["nll"] - score_answers(view, tok, prompts, true)["nll"]
    res = it.apply(ctx, reqs)
    after = score_answers(view, tok, prompts, new)["nll"] - score_answers(view, tok, prompts, true)["nll"]
    assert (before > 0).all()
    assert (after < 0).all(), (before, after, res.scalars)
    assert res.scalars["iter_p_after"] < res.scalars["iter_p_before"]
    assert res.scalars["neighbor_rows"] + res.scalars["neighbor_missing"] >= len(reqs)


@pytest.mark.slow  # starts processes
def test_cli_runs_nse_and_neighbour_assisted_iterative_memit_and_records_their_steps(tmp_path):

    # The tiny run's MEMIT options, under the wrapper's `method` (a nested class_path).
    base = tiny_args(tmp_path, str(SHARED_DATA / "multi_counterfact.json.gz"))
    opts = dict(zip(base[::2], base[1::2], strict=True))
    inner = {k.replace("--model.method.", ""): v for k, v in opts.items() if k.startswith("--model.method.")}
    plain = {k: v for k, v in opts.items() if not k.startswith("--model.method")}
    config = tmp_path / "iter.yaml"
    config.write_text(
        "model:\n  method:\n    class_path: editlab.editing.methods.iterative.IterativeEditing\n    init_args:\n"
        "      max_iterations: 2\n      epsilon: 0.0\n      neighbors: {weight: 1.0, count: 1}\n"
        "      method:\n        class_path: editlab.editing.methods.memit.MEMIT\n        init_args:\n"
        f"          layers: {inner['layers']}\n          mom2_weight: {inner['mom2_weight']}\n"
        f"          targets: {{steps: {inner['targets.steps']}}}\n"
        f"          context: {{count: {inner['context.count']}, length: {inner['context.length']}}}\n"
        f"          covariance: {{corpus: {inner['covariance.corpus']},"
        f" num_samples: {inner['covariance.num_samples']}}}\n"
    )
    args = ["--config", str(config), *[x for kv in plain.items() for x in kv]]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for step in steps:
        assert step["iter_iterations"] == 2 and [i["iteration"] for i in step["iterations"]] == [1, 2]
        assert step["neighbor_missing"] + step["neighbor_rows"] >= 2
    cases = [json.loads(line) for line in (tmp_path / "run" / "cases.jsonl").read_text().splitlines()]
    assert all(isinstance(c["edit"]["neighbor_prompts"], list) for c in cases)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    used = any(c["edit"]["neighbor_prompts"] for c in cases)
    assert ("specificity_heldout_accuracy" in summary) == used
    # NSE from the command line, same tiny setting.
    nse_args = [x for kv in plain.items() for x in kv] + [
        "--model.method", "editlab.editing.methods.nse.NSE",
        "--model.method.alpha", "0.0",
        "--model.method.upper_bound", "1e9",
        "--overwrite", "true",
        *[x for k, v in inner.items() for x in (f"--model.method.{k}", v)],
    ]  # fmt: skip
    proc = run_cli(nse_args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [s["nse_passes"] for s in steps] == [2, 2] and all("nse_pass_log" in s for s in steps)
    cases = [json.loads(line) for line in (tmp_path / "run" / "cases.jsonl").read_text().splitlines()]
    assert all(c["edit"]["nse_passes"] == 2 for c in cases)


def test_held_out_specificity_leaves_out_exactly_the_prompts_trained_on():
    from types import SimpleNamespace

    from editlab.evaluation import editing_metrics, held_out_specificity

    def entry(exact: bool, nll: float) -> dict:  # expected answer scored; competitor NLL fixed at 1.0
        return {"expected": {"nll": nll, "exact": exact, "token_acc": float(exact)}, "competitor": {"nll": 1.0}}

    reqs = [
        SimpleNamespace(case_id="a", neighborhood_prompts=["a1", "a2"]),
        SimpleNamespace(case_id="b", neighborhood_prompts=["b1", "b2"]),
    ]
    rewrite = [entry(True, 0.1)]
    cases = [
        {"case_id": "a", "rewrite": rewrite, "paraphrase": [], "neighborhood": [entry(True, 0.5), entry(False, 2.0)]},
        {"case_id": "b", "rewrite": rewrite, "paraphrase": [], "neighborhood": [entry(False, 3.0), entry(True, 0.2)]},
    ]
    assert editing_metrics(cases)["specificity_accuracy"] == 0.5
    # "a2" and "b1" (the two failures) were trained on: every held-out prompt is right.
    held = held_out_specificity(cases, reqs, {"a": ["a2"], "b": ["b1"]})
    assert held["specificity_heldout_accuracy"] == 1.0 and held["specificity_heldout_success"] == 1.0
    # Nothing trained on: the held-out values are the plain ones.
    plain = held_out_specificity(cases, reqs, {})
    assert plain["specificity_heldout_accuracy"] == 0.5
    assert cases[0]["neighborhood"][1]["expected"]["exact"] is False  # the records are not modified


def test_the_memory_profile_is_the_wrapped_methods_with_its_offload_context_and_z_chunks():
    cov = CovarianceConfig(corpus="unused", offload=True)
    memit = MEMIT(
        layers=[0, 1],
        covariance=cov,
        context=ContextTemplates(count=5, length=10),
        targets=TargetConfig(requests_per_forward=4),
    )
    profile = IterativeEditing(memit, max_iterations=2).memory_profile()
    assert profile == memit.memory_profile()
    assert profile.offload and profile.context_templates == 5 and profile.requests_per_forward == 4
