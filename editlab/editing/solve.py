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
    a = preserve.double().to(k.device) + k.T @ k  # [d_ff, d_ff] (P may live on the CPU: offload)
    x = torch.linalg.solve(a, k.T)  # [d_ff, n] = A⁻¹ Kᵀ (A symmetric)
    delta = resid.double().T @ x.T  # [d_model, d_ff]
    if not torch.isfinite(delta).all():
        raise FloatingPointError("MEMIT solve produced NaN/Inf: the preserved moment is singular or ill-conditioned")
    return delta


def preserve_matrix(cov: torch.Tensor, lam: float, cache: torch.Tensor | None) -> torch.Tensor:
    """λC + Σ past KKᵀ in float64 — the sequential (MEMIT_seq) regulariser, on cov's device."""
    out = lam * cov.double()
    return out if cache is None else out + cache.double().to(out.device)


def submatrix_delta(keys: torch.Tensor, resid: torch.Tensor, preserve: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """ECE's neuron-restricted update (eq. 14, 19): ΔW [d_model, d_ff], zero outside columns idx.

    Minimising ‖ΔW Kᵀ − Rᵀ‖² + tr(ΔW P ΔWᵀ) over ΔW whose only non-zero columns are I = idx gives
        ΔW[:, I] = Rᵀ K[:, I] (P[I, I] + K[:, I]ᵀ K[:, I])⁻¹
    (the sub-block P[I, I], not a Schur complement: the other columns are held at zero, not free).
    keys: [n, d_ff]; resid: [n, d_model]; preserve: [d_ff, d_ff] = λC + Σ past KKᵀ (full d_ff);
    idx: [m] distinct neuron indices. With idx = all neurons this is :func:`memit_delta`.
    """
    d_ff = keys.shape[1]
    idx = idx.to(device=keys.device, dtype=torch.long)
    if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d_ff)):
        raise ValueError(f"neuron indices must be a 1-D tensor of values in [0, {d_ff})")
    if idx.unique().numel() != idx.numel():
        raise ValueError("neuron indices must be distinct")
    delta = torch.zeros(resid.shape[1], d_ff, dtype=torch.float64, device=keys.device)  # [d_model, d_ff]
    if idx.numel() == 0:
        return delta
    k = keys.double()[:, idx]  # [n, m]
    p = preserve.double()
    at = idx.to(p.device)
    a = p[at][:, at].to(keys.device) + k.T @ k  # [m, m]: P[I, I] sliced where P lives (CPU when offloaded)
    x = torch.linalg.solve(a, k.T)  # [m, n] = A⁻¹ K̂ᵀ (A symmetric)
    delta[:, idx] = resid.double().T @ x.T  # [d_model, m]
    if not torch.isfinite(delta).all():
        raise FloatingPointError("ECE sub-matrix solve produced NaN/Inf: P[I, I] is singular or ill-conditioned")
    return delta
