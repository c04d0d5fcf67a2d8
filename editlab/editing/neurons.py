"""ECE stage 1 (Zhang et al. 2025, eq. 5–8): neuron attribution and threshold selection.

A "neuron" is one of the d_ff inputs of an edited layer's FFN out-projection W_out (Linear
orientation [d_model, d_ff]); its activation a_j at the subject's last token is the key entry k_j
(averaged over the context templates, as ``keys_and_outputs`` computes it).

Three attribution scores, each [n, d_ff] for n requests:
  AS_j = |a_j|                    activation score (eq. 5)
  WI_j = ‖W_out[:, j]‖₁           weight importance (eq. 6 as the authors' code reads it: the L1 norm
                                   of neuron j's output-weight column; it does not depend on the request)
  RS_j = |a_j| · ‖W_out[:, j]‖₂   residual sensitivity (eq. 7): a_j W_out[:, j] is the vector neuron j
                                   writes into the residual stream; its norm is the size of that
                                   contribution. This follows the paper; the authors' RS code mixes indices.

Selection (eq. 8): the smallest set I with Σ_{j∈I} Q_j ≥ p · Σ_j Q_j, taken greedily from the top
of the descending sort (which is the minimiser for non-negative scores). For a batch the scores
are summed over its requests and selected once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def select_neurons(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Indices (ascending, LongTensor [m]) of the smallest set whose score mass reaches p·total.

    scores: [d_ff], non-negative. p = 1.0 keeps every neuron, including zero-score ones (so that
    ECE with p = 1 is the full MEMIT-style solve). Ties in the sort keep the lower index first.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [d_ff], got shape {tuple(scores.shape)}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"option threshold={p} must be in (0, 1]")
    q = scores.detach().double()
    if not torch.isfinite(q).all() or (q < 0).any():
        raise ValueError("neuron scores must be finite and non-negative")
    if p == 1.0:
        return torch.arange(q.numel(), device=q.device)
    order = torch.sort(q, descending=True, stable=True).indices  # [d_ff]
    mass = q[order].cumsum(0)  # [d_ff]
    total = mass[-1]  # the cumulative sum's own total, so p·total is reached within rounding
    if total <= 0:
        raise ValueError("every neuron has score 0: nothing to select (are the keys all zero?)")
    # First position whose cumulative mass reaches p·total; the set is everything up to it.
    m = int(torch.searchsorted(mass, p * total, side="left")) + 1
    return order[: min(m, q.numel())].sort().values


class NeuronAttribution(ABC):
    """An attribution stage: per-request neuron scores and the threshold p of eq. 8.

    Subclasses are chosen in YAML by class_path (``editlab.editing.neurons.ActivationScore``, …).
    """

    # False when the score ignores the request (WI): per-request sets are then all identical.
    request_dependent: bool = True

    def __init__(self, threshold: float = 0.8) -> None:
        """
        Args:
            threshold: p of eq. 8, the fraction of the total score the selected neurons must reach
                (paper: 0.8); 1.0 keeps every neuron.
        """
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"option threshold={threshold} must be in (0, 1]")
        self.threshold = threshold

    @abstractmethod
    def scores(self, keys: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """keys: [n, d_ff] activations at the subject's last token; w_out: [d_model, d_ff].
        Returns non-negative scores [n, d_ff] in float64."""

    def select_batch(self, keys: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """The step's neuron set (eq. 8 on the scores summed over the batch), LongTensor [m]."""
        return select_neurons(self.scores(keys, w_out).sum(0), self.threshold)

    def select_each(self, keys: torch.Tensor, w_out: torch.Tensor) -> list[torch.Tensor]:
        """Each request's own neuron set (same p), for clustering."""
        return [select_neurons(row, self.threshold) for row in self.scores(keys, w_out)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold})"


def _check(keys: torch.Tensor, w_out: torch.Tensor) -> None:
    if keys.dim() != 2 or w_out.dim() != 2 or keys.shape[1] != w_out.shape[1]:
        raise ValueError(
            f"keys [n, d_ff] and w_out [d_model, d_ff] disagree: {tuple(keys.shape)} vs {tuple(w_out.shape)}"
        )


class ActivationScore(NeuronAttribution):
    """AS_j = |a_j| (eq. 5)."""

    def scores(self, keys: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        _check(keys, w_out)
        return keys.double().abs()  # [n, d_ff]


class WeightImportance(NeuronAttribution):
    """WI_j = ‖W_out[:, j]‖₁ (eq. 6, authors' reading), the same for every request."""

    request_dependent = False

    def scores(self, keys: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        _check(keys, w_out)
        wi = w_out.detach().to(device=keys.device, dtype=torch.float64).abs().sum(0)  # [d_ff]
        return wi.expand(keys.shape[0], -1)  # [n, d_ff]


class ResidualSensitivity(NeuronAttribution):
    """RS_j = ‖a_j W_out[:, j]‖₂ = |a_j| · ‖W_out[:, j]‖₂ (eq. 7): the size of neuron j's write
    into the residual stream (a_j W_out[:, j] is a vector; the paper's scalar is its norm)."""

    def scores(self, keys: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        _check(keys, w_out)
        col_norm = w_out.detach().to(device=keys.device, dtype=torch.float64).norm(dim=0)  # [d_ff]
        return keys.double().abs() * col_norm  # [n, d_ff]
