"""Closed-form weight solves. Pure tensor functions, float64, no model access.

Notation (Linear orientation): W is [d_model, d_ff]; keys K are rows [n, d_ff]; residuals R are
rows [n, d_model]. The MEMIT update minimises
    ‖ΔW Kᵀ − Rᵀ‖² + tr(ΔW P ΔWᵀ),   P = λC + Σ_past K_pKₚᵀ  (the preserved-key moment)
whose minimiser is ΔW = Rᵀ K (P + KᵀK)⁻¹.
"""

from __future__ import annotations

import torch


def memit_delta(keys: torch.Tensor, resid: torch.Tensor, preserve: torch.Tensor) -> torch.Tensor:
    """ΔW [d_model, d_ff] = Rᵀ K (P + KᵀK)⁻¹.

    keys: [n, d_ff]; resid: [n, d_model]; preserve: [d_ff, d_ff] symmetric PSD (λC + cache).
    """
    k = keys.double()
    a = preserve.double() + k.T @ k  # [d_ff, d_ff]
    x = torch.linalg.solve(a, k.T)  # [d_ff, n] = A⁻¹ Kᵀ (A symmetric)
    delta = resid.double().T @ x.T  # [d_model, d_ff]
    if not torch.isfinite(delta).all():
        raise FloatingPointError("MEMIT solve produced NaN/Inf: the preserved moment is singular or ill-conditioned")
    return delta


def preserve_matrix(cov: torch.Tensor, lam: float, cache: torch.Tensor | None) -> torch.Tensor:
    """λC + Σ past KKᵀ in float64 — the sequential (MEMIT_seq) regulariser."""
    out = lam * cov.double()
    return out if cache is None else out + cache.double()
