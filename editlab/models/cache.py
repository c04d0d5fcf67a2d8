"""Row selection on a transformers KV cache without touching the original.

transformers 5's DynamicCache holds one layer object per decoder layer whose ``batch_select_indices``
and ``update`` rebind new tensors instead of writing in place; a shallow copy of the cache and its
layers is therefore an independent cache that shares the (read-only) prefix tensors.
"""

from __future__ import annotations

import copy

import torch


def select_cache_rows(cache, rows: torch.Tensor):
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "batch_select_indices") for layer in layers):
        raise TypeError(f"unsupported KV cache type {type(cache).__name__}: editlab needs transformers>=5 DynamicCache")
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in layers]
    for layer in out.layers:
        layer.batch_select_indices(rows)
    return out
