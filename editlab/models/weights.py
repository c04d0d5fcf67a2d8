"""Orientation-safe access to the edited FFN out-projection.

All editing math uses the Linear convention: W is [d_out=d_model, d_in=d_ff] and y = W k.
GPT-2's Conv1D stores the transpose ([d_ff, d_model], y = k W). The orientation is decided by the
module's type, never by the weight's shape (a square matrix would be ambiguous).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def is_transposed(module: nn.Module) -> bool:
    if isinstance(module, Conv1D):
        return True
    if isinstance(module, nn.Linear):
        return False
    raise TypeError(f"cannot edit a {type(module).__name__}: expected nn.Linear or transformers Conv1D")


def read_weight(module: nn.Module) -> torch.Tensor:
    """W in Linear orientation, [d_model, d_ff] (a view, not a copy)."""
    return module.weight.T if is_transposed(module) else module.weight


@torch.no_grad()
def add_delta(module: nn.Module, delta: torch.Tensor) -> None:
    """W += delta, with delta [d_model, d_ff] in Linear orientation, in the weight's dtype."""
    weight = module.weight
    update = delta.T if is_transposed(module) else delta
    if update.shape != weight.shape:
        raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    if not torch.isfinite(update).all():
        raise FloatingPointError("refusing to apply a weight delta with NaN/Inf entries")
    weight.add_(update.to(device=weight.device, dtype=weight.dtype))


@torch.no_grad()
def set_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Overwrite W with ``value`` given in Linear orientation."""
    target = value.T if is_transposed(module) else value
    module.weight.copy_(target.to(device=module.weight.device, dtype=module.weight.dtype))
