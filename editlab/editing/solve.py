"""Closed-form weight solves. Pure tensor functions, float64, no model access.

Notation (Linear orientation): W is [d_model, d_ff]; keys K are rows [n, d_ff]; residuals R are
rows [n, d_model]. The MEMIT update minimises
    ‖ΔW Kᵀ − Rᵀ‖² + tr(ΔW P ΔWᵀ),   P = λC + Σ_past K_pKₚᵀ  (the preserved-key moment)
whose minimiser is ΔW = Rᵀ K (P + KᵀK)⁻¹.
"""

from __future__ import annotations

import torch

# Relative residual ‖A X − B‖ / ‖B‖ above which a solve is refused. A backward-stable float64 solve
# leaves at most ~cond(A)·1e-16, so this refuses only cond(A) ≳ 1e12 (λ = 0 with a rank-deficient
# moment, say), where the solution is noise.
SOLVE_TOLERANCE = 1e-4
# Amplification ‖A‖‖X‖ / ‖B‖ (a lower bound of cond(A), up to the Frobenius norms' √d) above which
# the solution's relative error can exceed ~1e-4 in float64: an update made of rounding noise.
MAX_AMPLIFICATION = 1e12


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse NaN/Inf inputs with a message naming where they come from."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise FloatingPointError(f"{what} has {bad} NaN/Inf entries: refusing to solve")


def checked_solve(a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    """X = A⁻¹ B (float64), refused with a clear error when A is singular or so ill-conditioned that
    the solution does not satisfy the system (an update from it would be noise, not an edit)."""
    try:
        x = torch.linalg.solve(a, b)
    except torch.linalg.LinAlgError as err:
        raise FloatingPointError(
            f"{what}: the matrix λC + Σ past KKᵀ + KKᵀ is singular ({err}); raise mom2_weight or check the covariance"
        ) from None
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{what} produced NaN/Inf: the preserved moment is singular or ill-conditioned")
    b_norm = b.norm().clamp_min(1e-300)
    amplification = float(a.norm() * x.norm() / b_norm)
    if amplification > MAX_AMPLIFICATION:
        raise FloatingPointError(
            f"{what}: the matrix λC + Σ past KKᵀ + KKᵀ is ill-conditioned (amplification ‖A‖‖X‖/‖B‖ = "
            f"{amplification:.1e} > {MAX_AMPLIFICATION:.0e}); raise mom2_weight or check the covariance"
        )
    resid = float((a @ x - b).norm() / b_norm)
    if resid > SOLVE_TOLERANCE:
        raise FloatingPointError(
            f"{what}: the system is too ill-conditioned to solve (relative residual {resid:.1e} > "
            f"{SOLVE_TOLERANCE:.0e}); raise mom2_weight or check the covariance"
        )
    return x


def memit_delta(keys: torch.Tensor, resid: torch.Tensor, preserve: torch.Tensor) -> torch.Tensor:
    """ΔW [d_model, d_ff] = Rᵀ K (P + KᵀK)⁻¹.

    keys: [n, d_ff]; resid: [n, d_model]; preserve: [d_ff, d_ff] symmetric PSD (λC + cache).
    """
    check_finite(keys, "the keys K")
    check_finite(resid, "the residuals z − h (target values z)")
    check_finite(preserve, "the preserved moment λC + Σ past KKᵀ")
    k = keys.double()
    a = preserve.double().to(k.device) + k.T @ k  # [d_ff, d_ff] (P may live on the CPU: offload)
    x = checked_solve(a, k.T, "MEMIT solve")  # [d_ff, n] = A⁻¹ Kᵀ (A symmetric)
    delta = resid.double().T @ x.T  # [d_model, d_ff]
    check_finite(delta, "the MEMIT update")
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
    check_finite(keys, "the keys K")
    check_finite(resid, "the residuals z − h (target values z)")
    check_finite(preserve, "the preserved moment λC + Σ past KKᵀ")
    delta = torch.zeros(resid.shape[1], d_ff, dtype=torch.float64, device=keys.device)  # [d_model, d_ff]
    if idx.numel() == 0:
        return delta
    k = keys.double()[:, idx]  # [n, m]
    p = preserve.double()
    at = idx.to(p.device)
    a = p[at][:, at].to(keys.device) + k.T @ k  # [m, m]: P[I, I] sliced where P lives (CPU when offloaded)
    x = checked_solve(a, k.T, "ECE sub-matrix solve")  # [m, n] = A⁻¹ K̂ᵀ (A symmetric)
    delta[:, idx] = resid.double().T @ x.T  # [d_model, m]
    check_finite(delta, "the ECE sub-matrix update")
    return delta


def rome_delta(key: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """ROME's rank-one update ΔW [d_model, d_ff] = r (C⁻¹k)ᵀ / ((C⁻¹k)ᵀ k), so that ΔW k = r.

    The minimiser of tr(ΔW C ΔWᵀ) (the change on the preserved keys, C = E[kkᵀ]) subject to
    (W + ΔW) k = v, with r = v − W k. Invariant to the scale of C, so ROME has no λ.
    key: [d_ff]; resid: [d_model]; cov: [d_ff, d_ff] symmetric positive definite, or None for
    C = I, ΔW = r kᵀ / (kᵀk) (ROME's ``mom2_adjustment: false``: no covariance at all).
    """
    k = key.double()
    u = k if cov is None else torch.linalg.solve(cov.double().to(k.device), k)  # [d_ff] C⁻¹k
    denom = u @ k
    if not torch.isfinite(u).all() or not float(denom) > 0:
        raise FloatingPointError("ROME solve failed: C is singular or k*ᵀC⁻¹k* is not positive")
    delta = torch.outer(resid.double(), u) / denom  # [d_model, d_ff]
    if not torch.isfinite(delta).all():
        raise FloatingPointError("ROME solve produced NaN/Inf")
    return delta


def null_space_projection(cov: torch.Tensor, threshold: float, share: float | None = None) -> torch.Tensor:
    """AlphaEdit's P = U Uᵀ [d_ff, d_ff], U the eigenvectors of C whose eigenvalues are below
    ``threshold``: P k₀ ≈ 0 for preserved keys k₀, which live on C's large eigenvalues. With
    ``share``, U is instead the smallest eigenvalues' eigenvectors whose eigenvalues sum to at most
    ``share``·tr(C) (:func:`null_space_mask`)."""
    evals, evecs = torch.linalg.eigh(cov.double())  # C is symmetric: eigh, ascending
    u = evecs[:, null_space_mask(evals, threshold, share)]  # [d_ff, m]
    return u @ u.T


def null_space_mask(evals: torch.Tensor, threshold: float, share: float | None = None) -> torch.Tensor:
    """Which eigenvalues (ascending, [d]) span the null space: those below ``threshold`` (the
    released rule, absolute), or with ``share`` the smallest ones whose sum stays within ``share``
    of the trace (scale-free: the preserved keys' second moment left in the null space is at most
    ``share``, see :func:`null_space_key_share`). Rounding's tiny negative eigenvalues count as 0."""
    if share is None:
        return evals < threshold
    energy = evals.clamp_min(0.0)  # [d]
    return energy.cumsum(0) <= share * energy.sum()


def null_space_key_share(cov: torch.Tensor, proj: torch.Tensor) -> float:
    """Share of the preserved keys' second moment inside AlphaEdit's null space:
    tr(P C) / tr(C) = E‖P k₀‖² / E‖k₀‖² (P a projector). Near 0, P k₀ ≈ 0 as the method assumes;
    the threshold is absolute, so on a model whose keys are small a large share of them lies in
    the "null" space and the projected update still moves them."""
    c = cov.double()
    return float((proj.double().to(c.device) * c).sum() / c.trace())  # tr(P C), P and C symmetric


def alphaedit_delta(
    keys: torch.Tensor, resid: torch.Tensor, proj: torch.Tensor, cache: torch.Tensor | None, l2: float
) -> torch.Tensor:
    """AlphaEdit's ΔW [d_model, d_ff] = Xᵀ, X solving (P(KᵀK + cache) + l2·I) X = P Kᵀ R.

    keys: [n, d_ff]; resid: [n, d_model]; proj: [d_ff, d_ff] null-space projection P; cache:
    [d_ff, d_ff] Σ past KKᵀ or None. λC is not in the solve: P protects the preserved keys. X lies in
    range(P) (l2·X = P(KᵀR − (KᵀK + cache)X)), so ΔW k₀ = Xᵀ k₀ = 0 whenever P k₀ = 0.
    """
    k = keys.double()
    p = proj.double().to(k.device)
    m = k.T @ k if cache is None else k.T @ k + cache.double().to(k.device)  # [d_ff, d_ff]
    a = p @ m + l2 * torch.eye(p.shape[0], dtype=torch.float64, device=k.device)
    x = torch.linalg.solve(a, p @ k.T @ resid.double())  # [d_ff, d_model]
    delta = x.T
    if not torch.isfinite(delta).all():
        raise FloatingPointError("AlphaEdit solve produced NaN/Inf")
    return delta
