"""The KV cache a forward returns, and row selection on it without touching the original.

transformers 5.24 renamed the forward keyword and the output field ``past_key_values`` to ``cache``
(the old names warn on every run and go away in 5.40), so editlab passes ``cache=`` and reads
``output.cache`` (:func:`returned_cache`).

transformers 5's DynamicCache holds one layer object per decoder layer whose ``batch_select_indices``
and ``update`` rebind new tensors instead of writing in place; a shallow copy of the cache and its
layers is therefore an independent cache that shares the (read-only) prefix tensors. A forward given
the copy grows the copy, never the original (tests/test_cache_api.py checks both).
"""

from __future__ import annotations

import copy

import torch


def returned_cache(output):
    """``output.cache`` of a forward run with ``use_cache=True``; fails loudly where the transformers
    installed predates the ``cache`` name (< 5.24), whose forwards would silently drop ``cache=``."""
    cache = getattr(output, "cache", None)
    if cache is None:
        raise RuntimeError(
            f"the forward returned no `cache` ({type(output).__name__}): editlab needs transformers>=5.24, "
            "whose forwards take `cache=` and return `.cache` in place of `past_key_values`"
        )
    return cache


def select_cache_rows(cache, rows: torch.Tensor):
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "batch_select_indices") for layer in layers):
        raise TypeError(f"unsupported KV cache type {type(cache).__name__}: editlab needs transformers>=5 DynamicCache")
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in layers]
    for layer in out.layers:
        layer.batch_select_indices(rows)
    return out
