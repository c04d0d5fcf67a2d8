"""NSE: the z cache key, weights rewinding, the residual filter, neuron-level passes, and NSE with
every neuron and no filtering is sequential MEMIT."""

import dataclasses

import pytest
import torch

from editlab.editing import rewind as rewind_module
from editlab.editing.context_templates import ContextTemplates
from editlab.editing.methods import nse as nse_module
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.memit import MEMIT
from editlab.editing.methods.nse import NSE, pass_mask
from editlab.editing.neurons import ActivationScore
from editlab.editing.rewind import TargetCache, key_digest, z_cache_files, z_cache_key
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import ExtraRow, TargetConfig, optimize_targets
from editlab.keyed_cache import StaleCacheError, cache_root
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.weights import read_weight
from editlab.types import EditRequest

from helpers import SHARED_DATA, assert_failed_step_restores, corpus_file, facts, peaky_model

TARGETS = TargetConfig(steps=12, lr=0.5, kl_factor=0.0, weight_decay=0.0, clamp_norm_factor=2.0)


def make(tmp_path, cls=NSE, **kw):
    model, tok = peaky_model()
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, "tiny", model_fingerprint(model), seed=0, progress=False)
    method = cls(
        layers=[0, 1],
        mom2_weight=kw.pop("mom2_weight", 0.01),
        targets=TARGETS,
        context=ContextTemplates(count=1, length=3),
        covariance=CovarianceConfig(corpus=corpus_file(tmp_path), num_samples=20, batch_size=8),
        **kw,
    )
    method.setup(ctx)
    return ctx, method


NO_FILTER = dict(alpha=0.0, upper_bound=float("inf"), max_iterations=2)  # one pass with every request


# -- z cache key -----------------------------------------------------------------------------
def _changed(value):
    if value is None:  # an optional count (requests_per_forward)
        return 7
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    return value + " x"


def test_cache_key_changes_when_any_z_setting_changes():
    model, tok = peaky_model()
    view = ModelView.of(model)
    req = facts()[0]
    cfg = TargetConfig()
    args = dict(model_id="m", fingerprint="f0", view=view, layer=1, templates=["{}", "A. {}"], cfg=cfg, request=req)
    base = key_digest(z_cache_key(**args))
    variants = {
        f"targets.{f.name}": {"cfg": dataclasses.replace(cfg, **{f.name: _changed(getattr(cfg, f.name))})}
        for f in dataclasses.fields(TargetConfig)
    }
    variants.update(
        {
            "model_id": {"model_id": "other"},
            "fingerprint": {"fingerprint": "f1"},
            "layer": {"layer": 0},
            "templates": {"templates": ["{}", "B. {}"]},
            "prompt": {"request": dataclasses.replace(req, prompt="{} is found in")},
            "subject": {"request": dataclasses.replace(req, subject="The Louvre")},
            "target_new": {"request": dataclasses.replace(req, target_new="Berlin")},
            "extra": {"extra": [ExtraRow(0, "{} is in", "Rome", "Italy")]},
        }
    )
    assert len(variants) == len(dataclasses.fields(TargetConfig)) + 8
    # The same neighbour row averaged with the rewrite rows gives another z than as a term of its own.
    row = ExtraRow(0, "{} is in", "Rome", "Italy")
    alone = key_digest(z_cache_key(**{**args, "extra": [row]}))
    assert key_digest(z_cache_key(**{**args, "extra": [dataclasses.replace(row, averaged=True)]})) != alone
    for name, change in variants.items():
        assert key_digest(z_cache_key(**{**args, **change})) != base, name
    # What z does not depend on leaves the key alone (the case id, the true answer, eval prompts).
    same = dataclasses.replace(req, case_id="99", target_true="Lyon", paraphrase_prompts=[])
    assert key_digest(z_cache_key(**{**args, "request": same})) == base
    # The model dtype is part of the key.
    model.to(torch.float64)
    assert key_digest(z_cache_key(**args)) != base


def test_a_stored_z_under_another_key_is_an_error(stats_cache):
    model, tok = peaky_model()
    view = ModelView.of(model)
    key = z_cache_key("m", "f", view, 1, ["{}"], TargetConfig(), facts()[0])
    files = z_cache_files(cache_root())
    TargetCache(files).put(key, {"z": torch.ones(3)})
    assert torch.equal(TargetCache(files).get(key)["z"], torch.ones(3))  # a fresh cache reads the disk
    path = files.path(key)
    blob = torch.load(path, weights_only=True)
    blob["key"] = {**key, "targets": {**key["targets"], "lr": 0.1}}
    torch.save(blob, path)
    with pytest.raises(StaleCacheError, match="delete it"):
        TargetCache(files).get(key)


def test_z_on_theta0_in_chunks_is_cached_chunk_by_chunk_and_equals_one_run(stats_cache, monkeypatch):
    # With requests_per_forward each chunk's z goes to the cache as it is done: killed in the
    # second chunk, the first chunk's z is kept and the second attempt computes only the rest,
    # ending with the z of the uninterrupted chunked run (the chunks optimize_targets makes).
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()  # 3 requests: chunks of 2 and 1
    cfg = dataclasses.replace(TARGETS, requests_per_forward=2)
    whole = optimize_targets(view, tok, reqs, ["{}"], 1, cfg, progress=False)
    original = rewind_module.OriginalWeights(view, [0, 1])
    args = (view, tok, reqs, ["{}"], 1, cfg, original)
    done: list[int] = []
    real = rewind_module.optimize_targets

    def dies_in_the_second_chunk(view, tok, part, *rest, **kw):
        if done:
            raise KeyboardInterrupt
        done.append(len(part))
        return real(view, tok, part, *rest, **kw)

    monkeypatch.setattr(rewind_module, "optimize_targets", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        rewind_module.rewound_target_rows(*args, TargetCache(z_cache_files(cache_root())), "m", "f", False)
    assert done == [2]
    sizes: list[int] = []
    monkeypatch.setattr(
        rewind_module,
        "optimize_targets",
        lambda v, t, part, *r, **k: sizes.append(len(part)) or real(v, t, part, *r, **k),
    )
    res, cached = rewind_module.rewound_target_rows(*args, TargetCache(z_cache_files(cache_root())), "m", "f", False)
    assert sizes == [1] and cached.tolist() == [True, True, False]
    for field in ("z", "h", "loss", "nll", "steps"):
        assert torch.equal(getattr(res, field), getattr(whole, field)), field


# -- residual filter -------------------------------------------------------------------------
def test_pass_mask_on_hand_made_residuals():
    r = torch.tensor([0.0, 2.0, 2.5, 10.0, 99.9, 100.0, 250.0])
    assert pass_mask(r, alpha=2.0, upper_bound=100.0).tolist() == [False, False, True, True, True, False, False]


def test_passes_follow_the_residuals(tmp_path, stats_cache):
    # alpha tiny: the residual left after the first pass (λ > 0 never closes it) makes a second
    # pass; max_iterations 3 allows exactly two.
    ctx, nse = make(tmp_path, alpha=1e-9, upper_bound=1e9, max_iterations=3)
    res = nse.apply(ctx, facts())
    assert res.scalars["nse_passes"] == 2 and res.scalars["nse_unedited"] == 0
    assert [p["requests"] for p in res.details["nse_pass_log"]] == [3, 3]
    means = res.details["nse_residual_means"]
    assert len(means) == 3 and means[2] < means[1] < means[0]
    assert all(v["nse_passes"] == 2 and len(v["nse_residuals"]) == 3 for v in res.per_request.values())


def test_requests_above_the_upper_bound_are_never_written(tmp_path, stats_cache):
    ctx, nse = make(tmp_path, alpha=0.0, upper_bound=1e-6)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    res = nse.apply(ctx, facts())
    assert res.scalars["nse_passes"] == 0
    assert res.scalars["nse_unedited"] == 3 and res.scalars["nse_above_upper_bound"] == 3
    assert all(torch.equal(p, before[n]) for n, p in ctx.model.named_parameters())
    # Their keys still enter the sequential cache (the authors' code: every request of the step).
    assert set(nse.cache_c) == {0, 1}


# -- rewinding -------------------------------------------------------------------------------
def test_rewound_z_equals_z_on_the_unedited_model_after_edits(tmp_path, stats_cache):
    ctx, nse = make(tmp_path, z_cache=False, **NO_FILTER)
    nse.apply(ctx, facts()[:2])
    new = [EditRequest("9", "{} was founded by", "Toyota", "Apple", "Kiichiro")]
    edited = {layer: read_weight(ctx.view.ffn_out(layer)).clone() for layer in nse.layers}
    rewound, from_cache = nse.targets_for(ctx, new)
    assert from_cache == 0
    # The swap put the edited matrices back.
    for layer in nse.layers:
        assert torch.equal(read_weight(ctx.view.ffn_out(layer)), edited[layer])
    fresh, tok = peaky_model()
    on_theta0 = optimize_targets(ModelView.of(fresh), tok, new, nse.templates, 1, TARGETS, progress=False)
    torch.testing.assert_close(rewound.z, on_theta0.z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rewound.h, on_theta0.h, rtol=1e-5, atol=1e-6)
    # ... and differs from z on the edited model (the edit moved this request's residual).
    on_current = optimize_targets(ctx.view, tok, new, nse.templates, 1, TARGETS, progress=False)
    assert not torch.allclose(on_current.h, on_theta0.h, atol=1e-4)


def test_z_cache_serves_the_same_settings_and_recomputes_changed_ones(tmp_path, stats_cache, monkeypatch):
    ctx, nse = make(tmp_path, **NO_FILTER)
    first = nse.apply(ctx, facts())
    assert first.scalars["z_from_cache"] == 0
    z_first, _ = nse.targets_for(ctx, facts())  # from memory now
    # A new run (fresh unedited model, same settings) is served from disk without optimising.
    ctx_new, again = make(tmp_path, **NO_FILTER)
    calls = []
    real = rewind_module.optimize_targets
    monkeypatch.setattr(rewind_module, "optimize_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    z_disk, n_cached = again.targets_for(ctx_new, facts())
    assert n_cached == 3 and torch.equal(z_disk.z, z_first.z) and calls == []
    # A changed z setting is recomputed.
    other = NSE(
        layers=[0, 1], targets=dataclasses.replace(TARGETS, lr=0.3), context=nse.context, covariance=nse.covariance
    )
    other.setup(ctx_new)
    assert other.targets_for(ctx_new, facts())[1] == 0 and calls == [1]


# -- the update ------------------------------------------------------------------------------
def test_nse_with_every_neuron_and_no_filtering_is_sequential_memit(tmp_path, stats_cache):
    # Step 1: z on θ₀ is MEMIT's z; p = 1 keeps every neuron (the sub-matrix solve is the full
    # one); one pass over every request; the cache holds the same KKᵀ (a layer's keys do not
    # depend on its own or later layers, so keys on the final weights are the pass's keys).
    # Step 2 only matches without rewinding: MEMIT computes z on the edited weights.
    for rewind in (True, False):
        ctx, nse = make(tmp_path, neurons=ActivationScore(threshold=1.0), rewind=rewind, z_cache=False, **NO_FILTER)
        ctx2, memit = make(tmp_path, cls=MEMIT)
        for step, reqs in enumerate([facts()[:2], facts()[2:]]):
            nse.apply(ctx, reqs)
            memit.apply(ctx2, reqs)
            same = all(
                torch.allclose(
                    read_weight(ctx.view.ffn_out(layer)), read_weight(ctx2.view.ffn_out(layer)), rtol=1e-5, atol=1e-6
                )
                for layer in nse.layers
            )
            assert same == (step == 0 or not rewind), (rewind, step)
            for layer in nse.layers if same else []:
                torch.testing.assert_close(nse.cache_c[layer], memit.cache_c[layer], rtol=1e-5, atol=1e-6)


def test_nse_writes_only_selected_neurons_and_moves_the_residual(tmp_path, stats_cache):
    ctx, nse = make(tmp_path, neurons=ActivationScore(threshold=0.5), **NO_FILTER)
    before = {layer: read_weight(ctx.view.ffn_out(layer)).clone() for layer in nse.layers}
    res = nse.apply(ctx, facts())
    for layer in nse.layers:
        changed = (read_weight(ctx.view.ffn_out(layer)) - before[layer]).abs().sum(0).nonzero().numel()
        d_ff = before[layer].shape[1]
        assert 0 < changed <= res.scalars[f"neurons/l{layer}"] < d_ff
    assert res.scalars["nse_residual_last"] < 0.5 * res.scalars["nse_residual_first"]
    assert res.scalars["nse_passes"] == 1 and res.scalars["nse_unedited"] == 0


def test_nse_failed_step_restores_the_weights(tmp_path, stats_cache, monkeypatch):
    ctx, nse = make(tmp_path, **NO_FILTER)
    assert_failed_step_restores(ctx, nse, nse_module, "submatrix_delta", monkeypatch)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="option max_iterations=1"):
        NSE(layers=[0], max_iterations=1)
    with pytest.raises(ValueError, match="alpha=5.0, upper_bound=2.0"):
        NSE(layers=[0], alpha=5.0, upper_bound=2.0)


@pytest.mark.slow
def test_nse_edits_smollm2_on_counterfact():
    # The shared cache: the embedded model's converted copy and memit_smollm2.yaml's covariance.
    from editlab.data.sources import load_requests
    from editlab.models.load import load_model_and_tokenizer
    from editlab.models.scoring import score_answers

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, "smollm2-135m-instruct", model_fingerprint(model), seed=0, progress=False)
    reqs = load_requests(str(SHARED_DATA / "multi_counterfact.json.gz"), num_edits=3)
    nse = NSE(
        layers=[4, 5, 6, 7, 8],
        mom2_weight=2000,
        alpha=15.0,  # configs/nse_smollm2.yaml
        upper_bound=150.0,
        z_cache=False,  # nothing written into the shared cache
        targets=TargetConfig(lr=0.5, steps=12),
        context=ContextTemplates(count=1, length=5),
        # The configs' covariance: the session's cache has it when the SmolLM2 baseline tests ran first.
        covariance=CovarianceConfig(corpus=str(SHARED_DATA / "ME-PPL.json.gz"), num_samples=2000),
    )
    nse.setup(ctx)
    prompts, new, true = [r.rewrite_prompt for r in reqs], [r.target_new for r in reqs], [r.target_true for r in reqs]
    before = score_answers(view, tok, prompts, new)["nll"] - score_answers(view, tok, prompts, true)["nll"]
    res = nse.apply(ctx, reqs)
    after = score_answers(view, tok, prompts, new)["nll"] - score_answers(view, tok, prompts, true)["nll"]
    assert (before > 0).all()  # the model believed the true facts
    assert (after < 0).all(), (before, after, res.scalars)  # target_new now beats target_true everywhere
    assert res.scalars["nse_passes"] >= 1
