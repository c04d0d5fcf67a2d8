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
of the descending sort (which is the minimiser for non-negative scores): rule "reach". The released
code (jianghoucheng/NSE nse_main.py, from ECE's authors' group, in its batch selection and in the
commented-out per-request selection of its clustering block) keeps instead the largest top set
whose cumulative score stays ≤ p · total: rule "within", one neuron fewer unless a prefix sums to
p · total exactly. With p = 1 both keep every neuron, zero-score ones included (the released prefix
test cumsum ≤ total holds everywhere in exact arithmetic; in its float32 a rounding may drop a few
of the smallest). For a batch the scores are summed over its requests and selected once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch

SelectionRule = Literal["reach", "within"]


def select_neurons(scores: torch.Tensor, p: float, rule: SelectionRule = "reach") -> torch.Tensor:
    """Indices (ascending, LongTensor [m]) of the top neurons by score.

    rule "reach": the smallest top set whose score mass reaches p·total (paper, eq. 8);
    "within": the largest top set whose mass stays within p·total (the released code's
    ``sorted[: where(cumsum <= p * total)[-1] + 1]``), at least the top neuron (where the released
    code would index an empty set).
    scores: [d_ff], non-negative. p = 1.0 keeps every neuron, including zero-score ones (so that
    ECE with p = 1 is the full MEMIT-style solve). Ties in the sort keep the lower index first.
    """
    if rule not in ("reach", "within"):
        raise ValueError(f"option rule={rule!r} must be 'reach' or 'within'")
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
    if rule == "reach":
        # First position whose cumulative mass reaches p·total; the set is everything up to it.
        m = int(torch.searchsorted(mass, p * total, side="left")) + 1
    else:
        # Every position whose cumulative mass is still ≤ p·total (mass is non-decreasing).
        m = max(int(torch.searchsorted(mass, p * total, side="right")), 1)
    return order[: min(m, q.numel())].sort().values


class NeuronAttribution(ABC):
    """An attribution stage: per-request neuron scores and the threshold p of eq. 8.

    Subclasses are chosen in YAML by class_path (``editlab.editing.neurons.ActivationScore``, …).
    """

    # False when the score ignores the request (WI): per-request sets are then all identical.
    request_dependent: bool = True

    def __init__(self, threshold: float = 0.8, rule: SelectionRule = "reach") -> None:
        """
        Args:
            threshold: p of eq. 8, the fraction of the total score the selected neurons must reach
                (paper: 0.8); 1.0 keeps every neuron.
            rule: "reach", the smallest top set reaching p·total (paper, eq. 8); "within", the
                largest top set staying within p·total (the released code: one neuron fewer).
        """
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"option threshold={threshold} must be in (0, 1]")
        if rule not in ("reach", "within"):
            raise ValueError(f"option rule={rule!r} must be 'reach' or 'within'")
        self.threshold = threshold
        self.rule = rule

    @abstractmethod
    def scores(self, keys: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """keys: [n, d_ff] activations at the subject's last token; w_out: [d_model, d_ff].
        Returns non-negative scores [n, d_ff] in float64."""

    def select_batch(self, keys: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """The step's neuron set (eq. 8 on the scores summed over the batch), LongTensor [m]."""
        return select_neurons(self.scores(keys, w_out).sum(0), self.threshold, self.rule)

    def select_each(self, keys: torch.Tensor, w_out: torch.Tensor) -> list[torch.Tensor]:
        """Each request's own neuron set (same p), for clustering."""
        return [select_neurons(row, self.threshold, self.rule) for row in self.scores(keys, w_out)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold}, rule={self.rule!r})"


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
    """WI_j = ‖W_out[:, j]‖₁ (eq. 6, authors' reading), the same for every request. Read in the
    [d_model, d_ff] orientation for every architecture; the released code sums over the other axis
    of GPT-2's transposed Conv1D weight (a bug, not followed)."""

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
