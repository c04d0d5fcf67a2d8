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
