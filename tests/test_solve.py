"""The MEMIT solve against least squares, and the preservation property of λC."""

import torch

from editlab.editing.solve import memit_delta, preserve_matrix


def test_memit_delta_matches_lstsq():
    g = torch.Generator().manual_seed(0)
    d_ff, d_model, n = 12, 5, 4
    keys = torch.randn(n, d_ff, generator=g, dtype=torch.float64)
    resid = torch.randn(n, d_model, generator=g, dtype=torch.float64)
    a = torch.randn(d_ff, 30, generator=g, dtype=torch.float64)
    preserve = a @ a.T / 30  # PSD, full rank
    delta = memit_delta(keys, resid, preserve)
    # min ‖ΔW Kᵀ − Rᵀ‖² + ‖ΔW L‖² with L Lᵀ = P, as one stacked least-squares problem:
    # [K; Lᵀ] ΔWᵀ ≈ [R; 0].
    chol = torch.linalg.cholesky(preserve)
    lhs = torch.cat([keys, chol.T], 0)  # [n + d_ff, d_ff]
    rhs = torch.cat([resid, torch.zeros(d_ff, d_model, dtype=torch.float64)], 0)
    expected = torch.linalg.lstsq(lhs, rhs).solution.T  # [d_model, d_ff]
    torch.testing.assert_close(delta, expected, rtol=1e-8, atol=1e-10)


def test_large_lambda_preserves_a_strongly_covered_direction():
    g = torch.Generator().manual_seed(1)
    d_ff, d_model, n = 10, 4, 3
    u = torch.zeros(d_ff, dtype=torch.float64)
    u[0] = 1.0
    # C has a huge variance along u and a small one elsewhere.
    cov = torch.eye(d_ff, dtype=torch.float64) * 1e-3 + 100.0 * torch.outer(u, u)
    keys = torch.randn(n, d_ff, generator=g, dtype=torch.float64)
    resid = torch.randn(n, d_model, generator=g, dtype=torch.float64)
    for lam, bound in ((1e4, 1e-3), (1e6, 1e-5)):
        delta = memit_delta(keys, resid, preserve_matrix(cov, lam, None))
        change_on_u = (delta @ u).norm() / resid.norm()
        other = (delta @ torch.randn(d_ff, generator=g, dtype=torch.float64)).norm() / resid.norm()
        assert change_on_u < bound, (lam, change_on_u)
        assert change_on_u < other / 100  # the update goes elsewhere, not nowhere


def test_sequential_cache_enters_the_solve():
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(3, 8, generator=g, dtype=torch.float64)
    resid = torch.randn(3, 4, generator=g, dtype=torch.float64)
    cov = torch.eye(8, dtype=torch.float64)
    past = torch.randn(5, 8, generator=g, dtype=torch.float64)
    with_cache = memit_delta(keys, resid, preserve_matrix(cov, 1.0, past.T @ past))
    without = memit_delta(keys, resid, preserve_matrix(cov, 1.0, None))
    assert not torch.allclose(with_cache, without)
    # A larger preserved moment on the past keys means smaller changes of their outputs.
    assert (with_cache @ past.T).norm() < (without @ past.T).norm()


def test_singular_solve_fails_loudly():
    keys = torch.zeros(2, 4, dtype=torch.float64)
    resid = torch.ones(2, 3, dtype=torch.float64)
    try:
        memit_delta(keys, resid, torch.zeros(4, 4, dtype=torch.float64))
    except (FloatingPointError, RuntimeError) as err:  # torch raises on exactly singular input
        assert "singular" in str(err).lower() or "nan" in str(err).lower()
    else:
        raise AssertionError("a singular system must not produce a silent update")
