"""EAC — Editing Anchor Compression (seed 003), as a stage of the z optimisation (ROME, MEMIT)
and of fine-tuning (FT, the paper's appendix E).

Stage 1 runs the usual optimisation for ``select_steps`` updates and records ∂L/∂δ before every
update. The weighted-gradient saliency of each dimension is |mean_t(∂L/∂δ) ⊙ δ₁| (eq. 1; the
gradient averaged over the recorded steps, the vector δ₁ the stage ends with). The anchors are the
dimensions whose score reaches γ = the ``percentile``-th percentile of the request's scores
(eq. 2; the paper's Table 2 gives P80–P95). Stage 2 trains only the anchors and adds the scored
L1 term λ Σ_j |δ_j| / (score_j + ε) (eq. 4–6) to the loss. It starts where the authors' code
starts it (``EACConfig.retrain_from``): their ROME from m ⊙ δ₁ (eq. 3: the other dimensions set
to zero), their MEMIT from zero (stage 1 only chooses the anchors; δ₁ is dropped).

The L2 half of the elastic net (μ in eq. 4): the paper's μ (0.5 for GPT2-XL, 1e-3 for Llama3-8B,
appendix C.5) are exactly the reference's v_weight_decay for those models, and the authors' code
(famoustourist/EAC, rome/compute_v.py) has no other L2 term than that weight decay
μ·‖δ‖/‖h‖², already in the z loss. So for ROME/MEMIT μ is ``targets.weight_decay`` and ``l2``
(an extra μ‖δ‖²) stays 0: μ = 0.5 on ‖δ‖² itself drove δ to a tenth of its stage-1 norm on SmolLM2
and undid the edit. FT's loss has no norm term, so there ``l2`` is the L2 half.

The vector the saliency weighs and the L1 term penalises is the shift δ that is optimised
(z = h + δ), as in the authors' code; α uses |score|, since the mask is defined on |score|. The
authors' ROME code matches stage 1 and the anchors (mean gradient times the final δ₁, top 20%,
stage 2 from δ₁ on the anchors); it computes the weighted L1 term but never adds it to the loss:
it is added here, as the paper states. Their MEMIT code (top 5%, 15 stage-2 steps from zero)
adds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from editlab.editing.targets import (
    DescentSetup,
    DescentStep,
    DescentTerm,
    EditSite,
    TargetConfig,
    TargetResult,
    TermLoss,
    descend_offsets,
)
from editlab.models.arch import ModelView
from editlab.types import EditRequest


@dataclass
class EACConfig:
    """EAC settings.

    Args:
        select_steps: stage-1 updates whose gradients are recorded (paper: 10 for ROME on GPT2-XL).
        retrain_steps: stage-2 forwards on the anchors; the last one only measures, as in
            optimize_targets (paper: 10; the authors' MEMIT code 15). For FT: stage-2 updates.
        percentile: γ is this percentile of the scores (paper's Table 2: 80 keeps the top 20%).
            0 keeps every dimension (the elastic net alone, the paper's FT variant in appendix E).
        l1: λ, weight of the scored L1 term (paper's C.5: 5e-7).
        l2: weight of an extra squared L2 term μ‖δ‖²; 0 for ROME/MEMIT, whose μ is
            targets.weight_decay (see the module docstring); FT's L2 half.
        eps: ε in the L1 weights α = 1 / (score + ε) (the authors' code: 1e-6).
        retrain_from: where stage 2 starts. "stage1": m ⊙ δ₁ (eq. 3; the authors' ROME code).
            "zero": from zero on the anchors (the authors' MEMIT code: stage 1 only picks them).
            None: the authors' choice for the method (ROME and FT "stage1", MEMIT "zero").
    """

    select_steps: int = 10
    retrain_steps: int = 10
    percentile: float = 80.0
    l1: float = 5e-7
    l2: float = 0.0
    eps: float = 1e-6
    retrain_from: Literal["stage1", "zero"] | None = None

    def __post_init__(self) -> None:
        if self.select_steps < 1 or self.retrain_steps < 1:
            raise ValueError(f"options select_steps, retrain_steps must be >= 1: {self}")
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"option percentile={self.percentile} must be in [0, 100]")
        if self.l1 < 0 or self.l2 < 0 or self.eps <= 0:
            raise ValueError(f"options l1, l2 must be >= 0 and eps > 0: {self}")
        if self.retrain_from not in (None, "stage1", "zero"):
            raise ValueError(f"option eac.retrain_from={self.retrain_from!r} must be 'stage1', 'zero' or null")

    @property
    def total_steps(self) -> int:
        return self.select_steps + self.retrain_steps

    def start(self, authors: Literal["stage1", "zero"]) -> Literal["stage1", "zero"]:
        """Stage 2's start: ``retrain_from``, or ``authors`` (the method's released choice) if unset."""
        return self.retrain_from or authors


def saliency(mean_grad: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Weighted-gradient saliency |ḡ ⊙ v| (eq. 1), elementwise, any shape."""
    return (mean_grad * vector).abs()


def anchor_mask(score: torch.Tensor, percentile: float) -> torch.Tensor:
    """m = 1(score ≥ γ) per row (eq. 2), γ = the row's ``percentile``-th percentile.

    score: [n, d] (non-negative). γ is the (⌊p·d/100⌋ + 1)-th smallest score of the row (capped at
    d), so with distinct scores exactly d − ⌊p·d/100⌋ dimensions are kept (at least one). kthvalue,
    not torch.quantile: the latter refuses inputs past 16M entries (an FT weight matrix).
    """
    d = score.shape[-1]
    k = min(int(percentile * d // 100) + 1, d)
    gamma = score.float().kthvalue(k, dim=-1, keepdim=True).values  # [n, 1]
    return score >= gamma.to(score.dtype)


def scored_elastic_net(shift: torch.Tensor, score: torch.Tensor, l1: float, l2: float, eps: float) -> torch.Tensor:
    """λ Σ_j |x_j| / (score_j + ε) + μ Σ_j x_j² over the last dimension (eq. 4–5): [n]."""
    alpha = 1.0 / (score + eps)
    return l1 * (alpha * shift.abs()).sum(-1) + l2 * shift.pow(2).sum(-1)


class GradientMean:
    """Running mean of the gradients each row received (rows stop receiving at early stop)."""

    def __init__(self, shape: tuple[int, ...], device) -> None:
        self.total = torch.zeros(shape, device=device)
        self.count = torch.zeros(shape[0], device=device)

    def record(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        self.total[rows] += grad.to(self.total.dtype)
        self.count[rows] += 1

    def mean(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.total.dim() - 1)
        return self.total / self.count.clamp_min(1).view(shape)


class RecordGradients(DescentTerm):
    """Stage 1's plug-in: ∂loss/∂δ of the updated requests, before every update, into ``grads``
    (rows ``offset`` on: a chunk's requests are renumbered from 0)."""

    def __init__(self, grads: GradientMean, offset: int = 0) -> None:
        self.grads, self.offset = grads, offset

    def gradient(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        self.grads.record(rows + self.offset, grad.detach().clone())
        return grad

    def chunk(self, start: int, stop: int) -> RecordGradients:
        return RecordGradients(self.grads, self.offset + start)


class AnchorMask(DescentTerm):
    """Stage 2's plug-in: only the anchors, ``mask`` [n, width] bool, are trained. Entries outside
    it get no gradient, so Adam's moments and step stay exactly 0 there; the base must be zero
    outside it, so the whole shift stays inside the mask (the clamp only rescales)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def bind(self, setup: DescentSetup) -> AnchorMask:
        mask = self.mask.to(device=setup.base.device, dtype=torch.bool)
        if mask.shape != setup.base.shape:
            n, width = setup.base.shape
            raise ValueError(f"mask must be [{n}, {width}], got {tuple(mask.shape)}")
        if bool((setup.base[~mask] != 0).any()):
            raise ValueError("descend_offsets: base must be zero outside the mask")
        return AnchorMask(mask)

    def gradient(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask[rows]

    def chunk(self, start: int, stop: int) -> AnchorMask:
        return AnchorMask(self.mask[start:stop])


class ScoredElasticNet(DescentTerm):
    """Stage 2's loss term: :func:`scored_elastic_net` of each active request's whole shift
    base + δ under its scores ``score`` [n, width]."""

    def __init__(self, score: torch.Tensor, l1: float, l2: float, eps: float) -> None:
        self.score, self.l1, self.l2, self.eps = score, l1, l2, eps

    def loss(self, step: DescentStep) -> TermLoss:
        shift = (step.base + step.d)[step.act_req]  # [a, width]
        return TermLoss(scored_elastic_net(shift, self.score[step.act_req], self.l1, self.l2, self.eps))

    def chunk(self, start: int, stop: int) -> ScoredElasticNet:
        return ScoredElasticNet(self.score[start:stop], self.l1, self.l2, self.eps)


@dataclass
class EACTargetResult(TargetResult):
    """TargetResult of the two-stage optimisation."""

    score: torch.Tensor  # [n, d_model] saliency of each dimension
    mask: torch.Tensor  # [n, d_model] bool, the anchors
    stage1_shift: torch.Tensor  # [n, d_model] δ₁
    select_updates: torch.Tensor  # [n]
    retrain_updates: torch.Tensor  # [n]


def eac_targets(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    cfg: TargetConfig,
    eac: EACConfig,
    progress: bool = True,
    start: Literal["stage1", "zero"] = "stage1",
    norm_ref: EditSite | tuple[torch.nn.Module, str] | None = None,
) -> EACTargetResult:
    """z_i = h_i + m_i ⊙ (s + Δ)_i with s = δ₁ (``start`` "stage1") or 0 ("zero"), both stages
    through :func:`descend_offsets` (MEMIT's loss, clamp and early stop; ``cfg.steps`` is not
    read, the stages' step counts are). ``norm_ref``: see descend_offsets (ROME's FFN output)."""
    if start not in ("stage1", "zero"):
        raise ValueError(f"eac_targets: start={start!r} must be 'stage1' or 'zero'")
    n, d_model = len(requests), view.model.config.hidden_size
    grads = GradientMean((n, d_model), view.device)
    stage1 = descend_offsets(
        view,
        tok,
        requests,
        templates,
        layer,
        cfg,
        eac.select_steps,
        update_last=True,  # every stage-1 forward yields a recorded gradient and an update
        progress=progress,
        desc="z EAC select",
        terms=[RecordGradients(grads)],
        norm_ref=norm_ref,
    )
    score = saliency(grads.mean(), stage1.delta)  # [n, d_model]
    mask = anchor_mask(score, eac.percentile)  # [n, d_model]
    # eq. 3 sets the non-anchor dimensions to zero; the authors' MEMIT starts every one at zero.
    base = stage1.delta * mask if start == "stage1" else torch.zeros_like(stage1.delta)  # [n, d_model]

    stage2 = descend_offsets(
        view,
        tok,
        requests,
        templates,
        layer,
        cfg,
        eac.retrain_steps,
        base=base,
        progress=progress,
        desc="z EAC retrain",
        terms=[AnchorMask(mask), ScoredElasticNet(score, eac.l1, eac.l2, eac.eps)],
        norm_ref=norm_ref,
    )
    return EACTargetResult(
        z=stage1.h + base + stage2.delta,
        h=stage1.h,
        loss=stage2.loss,
        nll=stage2.nll,
        steps=stage1.updates + stage2.updates,
        score=score,
        mask=mask,
        stage1_shift=stage1.delta,
        select_updates=stage1.updates,
        retrain_updates=stage2.updates,
    )


def eac_scalars(tgt: TargetResult) -> dict[str, float]:
    """Step scalars of an EAC target result (nothing for a plain one)."""
    if not isinstance(tgt, EACTargetResult):
        return {}
    shift = tgt.z - tgt.h
    return {
        "eac/anchor_fraction": float(tgt.mask.float().mean()),
        "eac/shift_norm": float(shift.norm(dim=1).mean()),
        "eac/stage1_shift_norm": float(tgt.stage1_shift.norm(dim=1).mean()),
    }
