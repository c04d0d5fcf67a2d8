"""An edit step's finished parts (editlab.lightning.parts, through EditContext.parts): the MEMIT
family's z kept chunk by chunk (targets.requests_per_forward). With or without parts, and taken
from a file an interrupted attempt left, z is bit for bit the same, for MEMIT, MEMIT-EAC and
neighbour rows; another set of weights never finds the parts. The killed-and-resumed run through
the CLI is in tests/test_resume.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import editlab.editing.methods.memit as memit_module
from editlab.editing.context_templates import ContextTemplates
from editlab.editing.eac import EACConfig
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.memit import MEMIT
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import ExtraRow, TargetConfig
from editlab.lightning.parts import RunParts
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint

from helpers import corpus_file, facts, peaky_model


class Killed(Exception):
    pass


STEP = {"step": 1, "weights": "w", "requests": "r"}
EXTRA = [ExtraRow(2, "{} is located in the city of", "The Louvre", "Paris", 1.0)]  # owned by the third request


def setup(tmp_path, eac: EACConfig | None = None):
    model, tok = peaky_model()
    ctx = EditContext(model, tok, ModelView.of(model), "tiny", model_fingerprint(model), seed=0, progress=False)
    method = MEMIT(
        layers=[0, 1],
        mom2_weight=0.01,
        targets=TargetConfig(steps=6, lr=0.3, requests_per_forward=2),  # 3 requests: chunks of 2 and 1
        context=ContextTemplates(count=1, length=3),
        covariance=CovarianceConfig(corpus=corpus_file(tmp_path), num_samples=20, batch_size=8),
        eac=eac,
    )
    method.setup(ctx)
    return ctx, method


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name


@pytest.mark.parametrize(
    ("eac", "extra"),
    [(None, None), (None, EXTRA), (EACConfig(select_steps=3, retrain_steps=3, percentile=80.0), None)],
    ids=["memit", "neighbour rows", "memit-eac"],
)
def test_z_through_parts_equals_z_without_and_after_a_kill_in_the_second_chunk(
    tmp_path, stats_cache, monkeypatch, eac, extra
):
    ctx, method = setup(tmp_path, eac)
    plain = method.compute_targets(ctx, facts(), extra)
    path = tmp_path / "step_parts.pt"
    ctx.parts = RunParts(path, STEP)
    assert_same(method.compute_targets(ctx, facts(), extra), plain)
    assert len(ctx.parts.parts) == 2 and ctx.parts.reused == []

    # An attempt killed in the second chunk keeps the first; the next attempt computes only the second.
    path.unlink()
    target = "eac_targets" if eac else "optimize_targets"
    real = getattr(memit_module, target)
    calls: list[int] = []
    dying = [True]

    def dies_in_the_second_chunk(view, tok, reqs, *args, **kwargs):
        calls.append(len(reqs))
        if dying[0] and len(calls) == 2:
            raise Killed
        return real(view, tok, reqs, *args, **kwargs)

    monkeypatch.setattr(memit_module, target, dies_in_the_second_chunk)
    ctx.parts = RunParts(path, STEP)
    with pytest.raises(Killed):
        method.compute_targets(ctx, facts(), extra)
    calls.clear()
    dying[0] = False
    ctx.parts = RunParts(path, STEP)
    assert_same(method.compute_targets(ctx, facts(), extra), plain)
    assert calls == [1] and len(ctx.parts.reused) == 1  # the second chunk, one request

    # On other weights (the iterative wrapper's second pass, another step) the parts are not found.
    with torch.no_grad():
        ctx.view.ffn_out(1).weight.mul_(1.01)
    calls.clear()
    ctx.parts = RunParts(path, STEP)
    method.compute_targets(ctx, facts(), extra)
    assert calls == [2, 1] and ctx.parts.reused == []
