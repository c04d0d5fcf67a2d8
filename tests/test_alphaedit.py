"""AlphaEdit reports the dimension of each layer's null space, and the share of the preserved keys'
second moment inside it, in every step's scalars: its threshold is absolute, so both depend on the
scale of C (corpus, token cap, model)."""

import pytest
import torch

from editlab.editing.context_templates import ContextTemplates
from editlab.editing.methods.alphaedit import AlphaEdit
from editlab.editing.methods.base import EditContext
from editlab.editing.stats import CovarianceConfig, second_moments, statistics_cache
from editlab.editing.targets import TargetConfig
from editlab.keyed_cache import cache_root
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint

from helpers import facts, peaky_model, small_corpus


def test_every_step_reports_the_null_space_dimension_of_each_layer(tmp_path, stats_cache):
    model, tok = peaky_model()
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, "tiny", model_fingerprint(model), seed=0, progress=False)
    cov_cfg = CovarianceConfig(corpus=str(small_corpus(tmp_path)), num_samples=20, batch_size=8)
    cov = second_moments(
        view, tok, "tiny", ctx.fingerprint, [0, 1], cov_cfg, statistics_cache(cache_root()), progress=False
    )
    # A threshold between two eigenvalues of layer 0's C: a known number of them lie below it.
    evals = {layer: torch.linalg.eigvalsh(cov[layer].double()) for layer in (0, 1)}
    threshold = float(evals[0][40:42].mean())
    method = AlphaEdit(
        layers=[0, 1],
        nullspace_threshold=threshold,
        l2=1e-3,
        targets=TargetConfig(steps=3),
        context=ContextTemplates(count=0),
        covariance=cov_cfg,
    )
    method.setup(ctx)
    by_hand = {layer: int((evals[layer] < threshold).sum()) for layer in (0, 1)}
    assert by_hand[0] == 41
    for _ in range(2):  # the projector is fixed at setup: the same dimension every step
        result = method.apply(ctx, facts())
        assert result.scalars["nullspace_dim/l0"] == 41.0
        assert result.scalars["nullspace_dim/l1"] == float(by_hand[1])
        # The share of tr(C) on the 41 smallest eigenvalues of layer 0, summed by hand.
        share = float(evals[0][:41].sum() / evals[0].sum())
        assert result.scalars["nullspace_key_share/l0"] == pytest.approx(share, rel=1e-9)
        assert 0.0 < share < 1.0


def test_the_share_rule_takes_the_smallest_eigenvalues_within_the_share_of_the_trace():
    # eigenvalues 10, 1, 0.1, 0.01 (trace 11.11): 0.01 and 0.01 + 0.1 = 0.11 are within 1% of it
    # (0.1111), 0.01 + 0.1 + 1 is not; the released absolute rule at 2e-2 takes only 0.01.
    from editlab.editing.solve import null_space_key_share, null_space_mask, null_space_projection

    evals = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    assert null_space_mask(evals, 2e-2).tolist() == [True, False, False, False]
    assert null_space_mask(evals, 2e-2, share=0.01).tolist() == [True, True, False, False]
    assert null_space_mask(evals, 2e-2, share=0.0005).tolist() == [False, False, False, False]
    assert null_space_mask(torch.tensor([-1e-18, 0.5, 0.5]), 1.0, share=0.1).tolist() == [True, False, False]
    rot, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    cov = rot @ torch.diag(evals.flip(0)) @ rot.T  # the same eigenvalues in another basis
    p = null_space_projection(cov, 2e-2, share=0.01)
    assert float(p.trace()) == pytest.approx(2.0)
    assert null_space_key_share(cov, p) == pytest.approx(0.11 / 11.11, rel=1e-9)


def test_alphaedit_with_a_share_keeps_at_most_that_share_of_the_keys_in_its_null_space(tmp_path, stats_cache):
    model, tok = peaky_model()
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, "tiny", model_fingerprint(model), seed=0, progress=False)
    cov_cfg = CovarianceConfig(corpus=str(small_corpus(tmp_path)), num_samples=20, batch_size=8)
    common = dict(layers=[0, 1], l2=1e-3, targets=TargetConfig(steps=3), context=ContextTemplates(count=0))
    method = AlphaEdit(nullspace_share=0.05, covariance=cov_cfg, **common)
    method.setup(ctx)
    result = method.apply(ctx, facts())
    for layer in (0, 1):
        evals = torch.linalg.eigvalsh(method.cov[layer].double()).clamp_min(0)
        dim = int(result.scalars[f"nullspace_dim/l{layer}"])
        assert 0 < dim < len(evals)
        assert result.scalars[f"nullspace_key_share/l{layer}"] <= 0.05 + 1e-12
        assert float(evals[: dim + 1].sum() / evals.sum()) > 0.05  # one eigenvalue more would pass it
    with pytest.raises(ValueError, match=r"option nullspace_share=1.5 must be in \(0, 1\)"):
        AlphaEdit(nullspace_share=1.5, covariance=cov_cfg, **common)
    tiny = AlphaEdit(nullspace_share=1e-300, covariance=cov_cfg, **common)
    with pytest.raises(ValueError, match="option nullspace_share=1e-300: the smallest eigenvalue"):
        tiny.setup(ctx)
