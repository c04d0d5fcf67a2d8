"""Keys weight the context types as compute_ks does: "{}" 1/2, each of the c prefixes 1/(2c);
the flat mean is an option (ROME's default). Checked against keys computed one template at a time
and combined by hand."""

import pytest
import torch

from editlab.editing.context_templates import ContextTemplates
from editlab.editing.keys import keys_and_outputs, keys_at_layers, template_weights
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.memit import MEMIT
from editlab.editing.methods.rome import ROME
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import TargetConfig
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.hooks import capture_inputs

from helpers import facts, small_corpus

# The bare prompt and five prefixes of different lengths: the subject sits at six different positions.
TEMPLATES = [
    "{}",
    "Rome. {}",
    "Water boils. {}",
    "She plays the piano. {}",
    "Toyota. {}",
    "The city of Paris is old. {}",
]


def subject_last(tok, template: str, prompt: str, subject: str) -> int:
    """Index of the subject's last token, counted by tokenising the text up to the subject's end."""
    text = template.format(prompt)
    return len(tok(text[: text.index("{}")] + subject)["input_ids"]) - 1


def key_alone(view, tok, template: str, req, layer: int) -> torch.Tensor:
    """The key of one prompt, from a forward of that prompt alone (no batching, no padding)."""
    text = template.format(req.prompt).format(req.subject)
    enc = tok(text, return_tensors="pt")
    with capture_inputs({"k": view.ffn_out(layer)}) as got:
        view.model(**enc)
    return got["k"][0, subject_last(tok, template, req.prompt, req.subject)].double()  # [d_ff]


def test_template_weights_are_a_half_and_tenths():
    assert template_weights(6, "per_type").tolist() == [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert template_weights(6, "flat").tolist() == [1 / 6] * 6
    assert template_weights(1, "per_type").tolist() == [1.0]
    with pytest.raises(ValueError, match="key_weighting='mean'"):
        template_weights(3, "mean")
    with pytest.raises(ValueError, match="option context.key_weighting='mean'"):
        ContextTemplates(key_weighting="mean")


def test_forced_activations_weigh_the_bare_prompt_half_and_each_prefix_a_tenth(tiny_llama):
    model, tok = tiny_llama
    view = ModelView.of(model)
    req = facts()[0]

    def position_as_key(module, args):  # every key entry at position s becomes s + 1
        x = args[0]  # [B, S, d_ff]
        pos = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return (pos.expand_as(x).clone(), *args[1:])

    handle = view.ffn_out(0).register_forward_pre_hook(position_as_key)
    try:
        per_type, _ = keys_and_outputs(view, tok, [req], TEMPLATES, 0, 0)
        flat, _ = keys_and_outputs(view, tok, [req], TEMPLATES, 0, 0, weighting="flat")
    finally:
        handle.remove()
    p = [subject_last(tok, t, req.prompt, req.subject) + 1 for t in TEMPLATES]  # each template's key value
    assert len(set(p)) == 6  # six distinct values: a wrong weight shows
    by_hand = 0.5 * p[0] + 0.1 * sum(p[1:])
    assert torch.allclose(per_type[0], torch.full_like(per_type[0], by_hand), rtol=0, atol=1e-12)
    assert torch.allclose(flat[0], torch.full_like(flat[0], sum(p) / 6), rtol=0, atol=1e-12)
    assert abs(by_hand - sum(p) / 6) > 0.5


@pytest.mark.parametrize("batch_size", [64, 4])  # 4: chunks mix templates and requests
def test_keys_combine_single_prompt_keys_by_context_type(tiny_llama, batch_size):
    model, tok = tiny_llama
    view = ModelView.of(model)
    reqs = facts()
    keys, _ = keys_and_outputs(view, tok, reqs, TEMPLATES, 1, 1, batch_size=batch_size)
    flat, _ = keys_and_outputs(view, tok, reqs, TEMPLATES, 1, 1, batch_size=batch_size, weighting="flat")
    for i, req in enumerate(reqs):
        alone = [key_alone(view, tok, t, req, 1) for t in TEMPLATES]  # 6 x [d_ff]
        by_hand = alone[0] / 2 + sum(alone[1:]) / 10
        torch.testing.assert_close(keys[i], by_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(flat[i], sum(alone) / 6, rtol=1e-5, atol=1e-6)
        assert float((by_hand - sum(alone) / 6).norm()) > 1e-3 * float(by_hand.norm())


@pytest.mark.parametrize("batch_size", [64, 4])
def test_keys_of_several_layers_in_one_forward_are_each_layers_keys_bit_for_bit(tiny_llama, batch_size):
    # One forward per chunk for every key layer (NSE's final keys, ECE's neuron plan) gives the
    # bits of one keys_and_outputs call per layer, and each matches single-prompt keys by hand.
    model, tok = tiny_llama
    view = ModelView.of(model)
    reqs = facts()
    layers = [0, 1]
    together, out = keys_at_layers(view, tok, reqs, TEMPLATES, layers, 1, batch_size=batch_size)
    assert len(together) == len(layers)
    for layer, keys in zip(layers, together, strict=True):
        alone, out_alone = keys_and_outputs(view, tok, reqs, TEMPLATES, layer, 1, batch_size=batch_size)
        assert torch.equal(keys, alone) and torch.equal(out, out_alone)
        by_hand = (key_alone(view, tok, TEMPLATES[0], reqs[0], layer) / 2) + sum(
            key_alone(view, tok, t, reqs[0], layer) for t in TEMPLATES[1:]
        ) / 10
        torch.testing.assert_close(keys[0], by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.equal(together[0], together[1])


def test_methods_default_to_their_reference_weighting():
    corpus = CovarianceConfig()
    assert MEMIT(layers=[0], covariance=corpus).context.key_weighting == "per_type"  # compute_ks
    assert ROME(layer=0, covariance=corpus).context.key_weighting == "flat"  # compute_u: a flat mean


@pytest.mark.parametrize("weighting", ["per_type", "flat"])
def test_memit_solves_and_caches_the_configured_keys(tmp_path, stats_cache, tiny_llama, weighting):
    model, tok = tiny_llama
    model = type(model)(model.config).eval().requires_grad_(False)  # a copy to edit
    model.load_state_dict(tiny_llama[0].state_dict())
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, "tiny", model_fingerprint(model), seed=0, progress=False)
    method = MEMIT(
        layers=[0, 1],
        mom2_weight=0.01,
        targets=TargetConfig(steps=3),
        context=ContextTemplates(count=3, length=3, key_weighting=weighting),
        covariance=CovarianceConfig(corpus=str(small_corpus(tmp_path)), num_samples=20, batch_size=8),
    )
    method.setup(ctx)
    reqs = facts()
    # Layer 0 is written first, so its keys are those of the unedited model.
    k0 = {w: keys_and_outputs(view, tok, reqs, method.templates, 0, 1, weighting=w)[0] for w in ("per_type", "flat")}
    method.apply(ctx, reqs)
    cached = method.cache_c[0].cpu()
    torch.testing.assert_close(cached, (k0[weighting].T @ k0[weighting]).cpu(), rtol=1e-6, atol=1e-9)
    other = "flat" if weighting == "per_type" else "per_type"
    assert float((cached - (k0[other].T @ k0[other]).cpu()).norm()) > 1e-4 * float(cached.norm())
