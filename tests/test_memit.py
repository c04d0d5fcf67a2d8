"""MEMIT on a tiny model: it edits only its layers, moves the prediction, accumulates the
sequential cache, and a failed step leaves the weights untouched."""

import pytest
import torch

from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods import memit as memit_module
from editlab.editing.methods.memit import MEMIT
from editlab.editing.targets import optimize_targets
from editlab.models.scoring import score_answers

from helpers import assert_failed_step_restores, facts, snapshot
from helpers import make_memit as make


def test_memit_edits_only_its_layers_and_moves_the_prediction(tmp_path, stats_cache):
    ctx, method = make(tmp_path)
    reqs = facts()
    before = snapshot(ctx.model)
    prompts = [r.rewrite_prompt for r in reqs]
    nll_before = score_answers(ctx.view, ctx.tok, prompts, [r.target_new for r in reqs])["nll"]
    z = optimize_targets(ctx.view, ctx.tok, reqs, method.templates, 1, method.targets, progress=False).z
    _, h_before = keys_and_outputs(ctx.view, ctx.tok, reqs, method.templates, 0, 1)
    result = method.apply(ctx, reqs)
    _, h_after = keys_and_outputs(ctx.view, ctx.tok, reqs, method.templates, 0, 1)
    changed = {n for n, p in ctx.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {ctx.view.ffn_out_name(0) + ".weight", ctx.view.ffn_out_name(1) + ".weight"}
    nll_after = score_answers(ctx.view, ctx.tok, prompts, [r.target_new for r in reqs])["nll"]
    # The edited layers moved the residual at the z layer most of the way to z (MEMIT's
    # objective; a small λ lets it get close), and the target became more likely overall.
    gap_before = (z.double() - h_before).norm(dim=1)
    gap_after = (z.double() - h_after).norm(dim=1)
    assert (gap_after < 0.5 * gap_before).all(), (gap_before, gap_after)
    assert nll_after.sum() < nll_before.sum()
    assert result.scalars["z_steps"] > 0
    # The sequential cache now holds Σ KKᵀ of this step.
    assert set(method.cache_c) == {0, 1} and all(c.abs().sum() > 0 for c in method.cache_c.values())


def test_non_sequential_keeps_no_cache(tmp_path, stats_cache):
    ctx, method = make(tmp_path, sequential=False)
    method.apply(ctx, facts()[:1])
    assert method.cache_c == {}


def test_failed_step_restores_the_weights(tmp_path, stats_cache, monkeypatch):
    ctx, method = make(tmp_path)
    assert_failed_step_restores(ctx, method, memit_module, "memit_delta", monkeypatch)


def test_bad_layers_are_rejected(tmp_path, stats_cache):
    ctx, _ = make(tmp_path)
    with pytest.raises(ValueError, match=r"option layers=\[1, 7\]"):
        MEMIT(layers=[1, 7]).setup(ctx)
    with pytest.raises(ValueError, match="strictly increasing"):
        MEMIT(layers=[1, 0]).setup(ctx)
