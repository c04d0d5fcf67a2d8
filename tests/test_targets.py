"""Batched z optimisation equals per-request optimisation; the loss goes down."""

import pytest
import torch

from editlab.editing.keys import keys_and_outputs
from editlab.editing.targets import TargetConfig, optimize_targets
from editlab.models.arch import ModelView
from editlab.models.tiny import tiny_config, tiny_tokenizer

from conftest import facts


def peaky_model(model_type: str = "llama"):
    # A larger init makes the tiny random model's predictions depend on the edited residual.
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(model_type, len(tok))
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False), tok


TEMPLATES = ["{}", "Hello there. {}"]


def test_batched_targets_equal_one_at_a_time():
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    cfg = TargetConfig(steps=8, lr=0.2)
    together = optimize_targets(view, tok, reqs, TEMPLATES, 1, cfg, progress=False)
    for i, req in enumerate(reqs):
        alone = optimize_targets(view, tok, [req], TEMPLATES, 1, cfg, progress=False)
        torch.testing.assert_close(together.z[i], alone.z[0], rtol=1e-4, atol=1e-4)
        assert together.steps[i] == alone.steps[0]


def test_loss_decreases_and_delta_is_clamped():
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    start = optimize_targets(view, tok, reqs, TEMPLATES, 1, TargetConfig(steps=1), progress=False)
    cfg = TargetConfig(steps=20, clamp_norm_factor=0.5, kl_factor=0.0, weight_decay=0.0)
    end = optimize_targets(view, tok, reqs, TEMPLATES, 1, cfg, progress=False)
    assert (end.nll < start.nll).all()
    assert ((end.z - end.h).norm(dim=1) <= 0.5 * end.h.norm(dim=1) + 1e-4).all()


def test_initial_residual_is_the_bare_prompt_output():
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    res = optimize_targets(view, tok, reqs, TEMPLATES, 1, TargetConfig(steps=1), progress=False)
    _, h = keys_and_outputs(view, tok, reqs, TEMPLATES, 0, 1)
    torch.testing.assert_close(res.h.double(), h, rtol=1e-5, atol=1e-5)


def test_early_stop_removes_converged_requests():
    model, tok = peaky_model()
    view = ModelView.of(model)
    # An absurdly high early-stop bound: every request leaves after its first forward.
    res = optimize_targets(
        view, tok, facts(), TEMPLATES, 1, TargetConfig(steps=10, early_stop_loss=1e9), progress=False
    )
    assert (res.steps == 0).all() and torch.equal(res.z, res.h)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj", "gpt_neox", "qwen2"])
def test_prefix_cache_gives_the_same_targets_as_full_forwards(model_type):
    model, tok = peaky_model(model_type)
    view = ModelView.of(model)
    reqs = facts()  # "Microsoft" is the first token of its prompt: a row with an empty prefix
    cfg = TargetConfig(steps=6, lr=0.2)
    fast = optimize_targets(view, tok, reqs, TEMPLATES, 1, cfg, progress=False)
    slow = optimize_targets(
        view, tok, reqs, TEMPLATES, 1, TargetConfig(steps=6, lr=0.2, prefix_cache=False), progress=False
    )
    torch.testing.assert_close(fast.h, slow.h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.z, slow.z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj", "gpt_neox", "qwen2"])
def test_lower_cache_gives_the_same_targets_and_skips_the_layers_below(model_type, prefix_cache):
    model, tok = peaky_model(model_type)
    view = ModelView.of(model)
    reqs = facts()
    z_layer = len(view.layers()) - 1  # every layer but the last is below the z layer
    calls = []
    below = view.layer(0)
    sub = next(m for m in below.children() if sum(1 for _ in m.parameters()) > 0)  # runs only inside layer 0
    handle = sub.register_forward_hook(lambda *a: calls.append(1))
    try:
        cached = optimize_targets(
            view,
            tok,
            reqs,
            TEMPLATES,
            z_layer,
            TargetConfig(steps=6, lr=0.2, prefix_cache=prefix_cache),
            progress=False,
        )
        n_cached = len(calls)
        calls.clear()
        plain = optimize_targets(
            view,
            tok,
            reqs,
            TEMPLATES,
            z_layer,
            TargetConfig(steps=6, lr=0.2, prefix_cache=prefix_cache, lower_cache=False),
            progress=False,
        )
        n_plain = len(calls)
    finally:
        handle.remove()
    torch.testing.assert_close(cached.h, plain.h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.z, plain.z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached.loss, plain.loss, rtol=1e-4, atol=1e-4)
    assert int(cached.steps.max()) >= 2  # several optimisation forwards ran
    # Layer 0 ran once for the cache (and once for the prefix), not once per optimisation step.
    assert n_cached == 1 + prefix_cache and n_plain == n_cached - 1 + 6
    assert all("forward" not in m.__dict__ for m in view.layers())  # the skip is undone
