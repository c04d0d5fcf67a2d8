"""transformers' ``cache`` API (5.24+): editlab's prefix cache and sampling raise no deprecation of
``past_key_values``, and the prefix cache keeps its length across the z optimisation's forwards."""

from __future__ import annotations

import logging
import types
import warnings
from contextlib import contextmanager

import pytest
import torch
import transformers

from editlab.editing.targets import PrefixCachedForward, TargetConfig, optimize_targets
from editlab.metrics.generation import generate_token_rows
from editlab.models.arch import ModelView
from editlab.models.kv_cache import returned_cache
from editlab.models.prompts import pad

from helpers import ARCHS, facts, peaky_model


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def deprecations_fail():
    """FutureWarning and DeprecationWarning raise; transformers' logged warnings are collected.

    transformers reports the old cache names two ways: ``deprecate_kwarg`` warns (FutureWarning) on
    a ``past_key_values=`` keyword, and ``output.past_key_values`` logs through
    ``logger.warning_once``, whose lru_cache would hide the message once any earlier test (or
    transformers itself) logged it; the cache is cleared so every use in the block is seen."""
    logging.Logger.warning_once.cache_clear()
    logger = logging.getLogger("transformers")  # propagate=False: pytest's caplog never sees it
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    handler = _Records()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            yield handler.messages
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(level)


def test_the_detector_catches_the_old_names(tiny_llama):
    model, _ = tiny_llama
    ids = torch.tensor([[3, 4, 5]])
    with deprecations_fail(), pytest.raises(FutureWarning, match="past_key_values"):
        model(input_ids=ids, past_key_values=None, use_cache=True)
    with deprecations_fail() as logged:
        model(input_ids=ids, use_cache=True).past_key_values  # noqa: B018 (the access is the point)
    assert any("past_key_values" in m for m in logged), logged


@pytest.mark.parametrize("model_type", ARCHS)
def test_prefix_cache_and_sampling_raise_no_deprecation(model_type):
    model, tok = peaky_model(model_type)
    view = ModelView.of(model)
    with deprecations_fail() as logged:
        for lower_cache in (True, False):
            cfg = TargetConfig(steps=3, lr=0.2, prefix_cache=True, lower_cache=lower_cache)
            res = optimize_targets(view, tok, facts(), ["{}", "Hello there. {}"], 1, cfg, progress=False)
            assert int(res.steps.max()) >= 1  # the cached forwards ran with gradients
        rows = generate_token_rows(model, tok, ["The Eiffel Tower is", "Rome"], 4, top_k=3, stop_at_eos=False)
        assert [len(new) for _, new in rows] == [4, 4]  # four cached sampling steps
    assert not [m for m in logged if "deprecat" in m.lower() or "past_key_values" in m], logged


@pytest.mark.parametrize("model_type", ARCHS)
def test_prefix_cache_does_not_grow_across_forwards(model_type):
    """The z optimisation passes (rows of) one prefix cache to every step's forward; the forward
    grows the cache it is given, which must be a copy: the prefix cache keeps its length and its
    tensors, and the same rows give the same states, equal to an uncached forward's."""
    model, tok = peaky_model(model_type)
    view = ModelView.of(model)
    rows = [tok(t)["input_ids"] for t in ["The Eiffel Tower is in", "Rome is old", "Water boils at noon."]]
    edit_pos = torch.tensor([3, 0, 2])  # row 1 has no prefix (a dummy token in the cache)
    full = pad(rows, tok.pad_token_id)
    fwd = PrefixCachedForward(view, types.SimpleNamespace(batch_rows=rows), full, edit_pos, tok.pad_token_id)
    prefix_len = fwd.cache.get_seq_length()
    assert prefix_len == 3
    before = [(layer.keys.clone(), layer.values.clone()) for layer in fwd.cache.layers]
    every, some = torch.arange(3), torch.tensor([2, 0])
    first = fwd(every)
    for _ in range(3):
        fwd(some)
    again = fwd(every)
    assert fwd.cache.get_seq_length() == prefix_len
    for layer, (k, v) in zip(fwd.cache.layers, before, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with torch.no_grad():
        plain = view.model.base_model(
            input_ids=full.input_ids, attention_mask=full.attention_mask, use_cache=False
        ).last_hidden_state
    for i, (row, p) in enumerate(zip(rows, edit_pos.tolist(), strict=True)):
        torch.testing.assert_close(first[i, : len(row) - p], plain[i, p : len(row)], rtol=1e-4, atol=1e-4)


def test_a_forward_without_cache_fails_loudly():
    with pytest.raises(RuntimeError, match="transformers>=5.24"):
        returned_cache(types.SimpleNamespace(past_key_values=object()))
