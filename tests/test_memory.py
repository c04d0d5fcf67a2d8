"""The memory estimate and offloaded statistics."""

import dataclasses

import torch

from editlab.memory import GiB, estimate_memory

from helpers import facts, snapshot
from helpers import make_memit as make


def test_estimate_counts_statistics_where_they_live():
    kw = dict(
        n_params=1000, param_bytes=2, d_ff=128, d_model=32, n_layers=4, edited_layers=3,
        stat_matrices_per_layer=2, rows_per_step=10, tokens_per_row=5,
    )  # fmt: skip
    on_device = estimate_memory(offload=False, **kw)
    offloaded = estimate_memory(offload=True, **kw)
    assert on_device.statistics == 2 * 3 * 8 * 128 * 128
    assert on_device.weights == 2000
    assert on_device.device_total - offloaded.device_total == on_device.statistics
    assert offloaded.cpu_total == on_device.statistics and on_device.cpu_total == 0
    assert "on the CPU" in offloaded.describe() and "GiB" in offloaded.describe()
    none = estimate_memory(offload=False, **{**kw, "stat_matrices_per_layer": 0})
    assert none.statistics == none.solve == 0


def test_llama3_8b_statistics_are_the_figure_the_docs_give():
    est = estimate_memory(
        n_params=8_030_261_248, param_bytes=2, d_ff=14336, d_model=4096, n_layers=32, edited_layers=5,
        stat_matrices_per_layer=2, offload=True, rows_per_step=6 * 30, tokens_per_row=30,
    )  # fmt: skip
    assert abs(est.statistics / GiB - 10 * 14336**2 * 8 / GiB) < 1e-9  # ten 1.53 GiB matrices
    assert 14.9 < est.weights / GiB < 15.0


class _OnAnAccelerator:
    """A model view that reports the meta device: the statistics of a run whose model lives on an
    accelerator land on view.device unless offloaded (its other attributes are the real view's)."""

    device = torch.device("meta")

    def __init__(self, view):
        self._view = view

    def __getattr__(self, name):
        return getattr(self._view, name)


def test_offloaded_statistics_give_the_same_edit(tmp_path, stats_cache, monkeypatch):
    # On a CPU-only machine both runs would put the statistics on the CPU whatever the flag says.
    # The offloaded run's statistics therefore come from a view that reports another device
    # (read from the disk cache the first run filled, so no forward runs there): only the offload
    # branch brings them to the CPU, where its edit must equal the first run's.
    from editlab.editing import stats

    real = stats.second_moments
    offloads = []

    def as_if_on_an_accelerator(view, *args, **kw):
        offloads.append(args[4].offload)  # the CovarianceConfig the method passes down
        return real(_OnAnAccelerator(view), *args, **kw)

    results = []
    for offload in (False, True):
        ctx, method = make(tmp_path)
        method.covariance = dataclasses.replace(method.covariance, offload=offload)
        if offload:
            monkeypatch.setattr(stats, "second_moments", as_if_on_an_accelerator)
        method.setup(ctx)
        assert all(c.device.type == "cpu" for c in method.cov.values())
        assert method.memory_profile().offload == offload
        method.apply(ctx, facts()[:2])
        method.apply(ctx, facts()[2:])
        results.append((snapshot(ctx.model), {k: v.clone() for k, v in method.cache_c.items()}))
    (w0, c0), (w1, c1) = results
    for name in w0:
        torch.testing.assert_close(w0[name], w1[name])
    for layer in c0:
        torch.testing.assert_close(c0[layer], c1[layer])
    assert offloads == [True]
    assert all(c.device.type == "cpu" for c in c1.values())  # the cache accumulated beside C
