"""Architecture registry, hooks, orientation-safe weights, context templates."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from editlab.editing.context_templates import sample_continuations
from editlab.models.arch import ARCHITECTURES, ModelView, arch_spec
from editlab.models.hooks import HookNeverFired, capture_inputs, capture_output, edit_output
from editlab.models.tiny import tiny_model
from editlab.models.trace import trace
from editlab.models.weights import add_delta, read_weight

from helpers import ARCHS


def test_every_registry_entry_is_a_transformers_model_type_tested_on_a_tiny_model():
    from transformers import CONFIG_MAPPING

    from editlab.models.tiny import tiny_config

    assert set(ARCHITECTURES) <= set(CONFIG_MAPPING.keys())  # keyed by transformers' own model_type names
    for model_type in ARCHITECTURES:
        assert tiny_config(model_type, 64).model_type == model_type
    # Every entry is exercised by the tests parametrized over ARCHS (a new entry needs its tiny tests).
    assert set(ARCHS) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", ARCHS)
def test_every_registry_entry_resolves_on_a_tiny_model(model_type):
    model, tok = tiny_model(model_type)
    view = ModelView.of(model)
    assert view.n_layers == 3
    w = read_weight(view.ffn_out(1))
    d_model = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    assert w.shape[0] == d_model and w.shape[1] > d_model  # [d_model, d_ff]
    assert view.unembed().weight.shape[0] == len(tok)
    view.final_norm()
    # Keys captured at the out-projection have d_ff features; the forward stops after layer 1.
    enc = tok(["The Eiffel Tower is in", "Paris"], return_tensors="pt", padding=True)
    keys, outs = trace(view, enc["input_ids"], enc["attention_mask"], key_layers=[0, 1], output_layers=[1])
    assert keys[1].shape[-1] == w.shape[1] and outs[1].shape[-1] == d_model
    assert outs[1].shape[0] == 2  # a batch, not row 0 of a batch (the tuple/tensor trap)


def test_unknown_model_type_names_it():
    with pytest.raises(ValueError, match="unknown model_type 'bert'"):
        arch_spec("bert")


def test_hook_that_never_fires_raises(tiny_llama):
    model, tok = tiny_llama
    view = ModelView.of(model)
    with pytest.raises(HookNeverFired):
        with capture_output(view.layer(0), "layer0"):
            pass  # no forward


def test_decoder_layer_output_is_the_whole_batch(tiny_llama):
    # transformers 5 returns a tensor from decoder layers; output[0] would be batch row 0.
    model, tok = tiny_llama
    view = ModelView.of(model)
    enc = tok(["a b c", "d e f", "g h i"], return_tensors="pt", padding=True)
    with capture_output(view.layer(1), "l1") as got:
        model(**enc)
    assert got["l1"].shape[0] == 3 and got["l1"].dim() == 3


def test_edit_output_changes_the_forward(tiny_llama):
    model, tok = tiny_llama
    view = ModelView.of(model)
    enc = tok(["The Eiffel Tower"], return_tensors="pt")
    base = model(**enc).logits
    with edit_output(view.layer(1), "l1", lambda h: h + 1.0):
        edited = model(**enc).logits
    assert not torch.allclose(base, edited)
    assert torch.allclose(model(**enc).logits, base)  # the hook is gone after the block


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_capture_inputs_are_ffn_keys(model_type):
    model, tok = tiny_model(model_type)
    view = ModelView.of(model)
    enc = tok(["The Eiffel Tower"], return_tensors="pt")
    with capture_inputs({"k": view.ffn_out(0)}) as got, capture_output(view.ffn_out(0), "o") as out:
        model(**enc)
    w = read_weight(view.ffn_out(0))  # [d_model, d_ff]
    bias = view.ffn_out(0).bias
    expected = got["k"] @ w.T + (bias if bias is not None else 0)
    torch.testing.assert_close(out["o"], expected, rtol=1e-5, atol=1e-5)


def test_conv1d_and_linear_updates_are_the_same_function():
    g = torch.Generator().manual_seed(0)
    d_ff, d_model = 6, 6  # square on purpose: orientation must not be guessed from the shape
    w = torch.randn(d_model, d_ff, generator=g)
    delta = torch.randn(d_model, d_ff, generator=g)
    lin = torch.nn.Linear(d_ff, d_model, bias=False)
    conv = Conv1D(d_model, d_ff)
    with torch.no_grad():
        lin.weight.copy_(w)
        conv.weight.copy_(w.T)
        conv.bias.zero_()
    x = torch.randn(4, d_ff, generator=g)
    torch.testing.assert_close(lin(x), conv(x))
    add_delta(lin, delta)
    add_delta(conv, delta)
    torch.testing.assert_close(lin(x), conv(x))
    torch.testing.assert_close(lin(x), x @ (w + delta).T)


def test_add_delta_refuses_nan_and_wrong_shape():
    lin = torch.nn.Linear(3, 2)
    before = lin.weight.clone()
    with pytest.raises(FloatingPointError):
        add_delta(lin, torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError):
        add_delta(lin, torch.zeros(3, 2))
    assert torch.equal(lin.weight, before)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_context_prefixes_match_uncached_greedy_generation(model_type):
    # With top_k=1 the sampler is greedy: it must equal transformers' own greedy generation
    # (the reference's cached generation with a one-token mask produced garbage).
    model, tok = tiny_model(model_type)
    starts = ["The", "Because the"]
    ours = sample_continuations(model, tok, starts, length=6, top_k=1, seed=0)
    for start, text in zip(starts, ours, strict=True):
        enc = tok(start, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert text == tok.decode(out[0], skip_special_tokens=True)


def test_sampled_prefixes_are_seeded(tiny_llama):
    model, tok = tiny_llama
    a = sample_continuations(model, tok, ["The", "I"], 5, 5, seed=3)
    b = sample_continuations(model, tok, ["The", "I"], 5, 5, seed=3)
    c = sample_continuations(model, tok, ["The", "I"], 5, 5, seed=4)
    assert a == b and a != c
