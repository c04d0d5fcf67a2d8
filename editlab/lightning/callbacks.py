"""Observers of the edit stream (Lightning callbacks: non-essential, order-independent)."""

from __future__ import annotations

import lightning as L
import torch

from editlab.models.weights import read_weight


def norm_report(w: torch.Tensor, w0: torch.Tensor) -> dict[str, float]:
    """L1 / Frobenius norms of W_t and of W_t − W_0, both relative to W_0's (float64)."""
    w, w0 = w.double(), w0.double()
    diff = w - w0
    l1_0, fro_0 = float(w0.abs().sum()), float(w0.norm())
    return {
        "l1": float(w.abs().sum()),
        "fro": float(w.norm()),
        # growth of the matrix itself (the EAC paper's "+317%" is rel_l1_growth)
        "rel_l1_growth": float(w.abs().sum()) / l1_0 - 1.0,
        "rel_fro_growth": float(w.norm()) / fro_0 - 1.0,
        # size of the accumulated change
        "rel_l1_delta": float(diff.abs().sum()) / l1_0,
        "rel_fro_delta": float(diff.norm()) / fro_0,
    }


class WeightNormTracker(L.Callback):
    """Per edited layer, per step: norms of W_t and of W_t − W_0 relative to W_0."""

    def __init__(self) -> None:
        self.initial: dict[int, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        view = pl_module.view
        # A copy on CPU: W_0 must not follow the in-place edits.
        self.initial = {
            layer: read_weight(view.ffn_out(layer)).detach().to("cpu", copy=True)
            for layer in pl_module.method.edited_layers()
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        values: dict[str, float] = {}
        for layer, w0 in self.initial.items():
            w = read_weight(pl_module.view.ffn_out(layer)).detach().cpu()
            for name, value in norm_report(w, w0).items():
                values[f"weight_norm/l{layer}/{name}"] = value
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=len(batch))
        pl_module.record_step(values)
