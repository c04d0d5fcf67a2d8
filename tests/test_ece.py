"""ECE: attribution formulas, threshold selection (the paper's rule and the released one),
Jaccard k-medoids and anchors, the sub-matrix solve, the two-step z, z on the original weights with
its cache, the two variants (as released: per-request z; two-step: clusters), their configs, and
the method on a tiny model (it writes only the selected columns)."""

import dataclasses
import math

import pytest
import torch
import yaml

from editlab.editing import rewind as rewind_module
from editlab.editing.cluster import (
    anchor_of,
    cluster_sets,
    default_k,
    jaccard_distances,
    kmedoids,
    optimize_cluster_targets,
)
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods import ece as ece_module
from editlab.editing.methods.ece import ECE
from editlab.editing.methods.memit import MEMIT
from editlab.editing.neurons import ActivationScore, ResidualSensitivity, WeightImportance, select_neurons
from editlab.editing.solve import memit_delta, submatrix_delta
from editlab.editing.targets import TargetConfig, optimize_targets
from editlab.models.arch import ModelView
from editlab.models.weights import is_transposed, read_weight
from editlab.types import EditRequest

from helpers import ECE_TARGETS as TARGETS
from helpers import REPO, TEMPLATES, assert_failed_step_restores, facts, peaky_model
from helpers import make_ece as make

# --- selection and attribution -----------------------------------------------------------------


def test_threshold_selection_on_known_scores():
    q = torch.tensor([1.0, 5.0, 2.0, 2.0, 0.0])  # total 10
    assert select_neurons(q, 0.5).tolist() == [1]  # 5 ≥ 5
    assert select_neurons(q, 0.51).tolist() == [1, 2]  # tie 2/2: the lower index first
    assert select_neurons(q, 0.7).tolist() == [1, 2]  # 7 ≥ 7
    assert select_neurons(q, 0.71).tolist() == [1, 2, 3]
    assert select_neurons(q, 0.99).tolist() == [0, 1, 2, 3]  # the zero-score neuron is never needed
    assert select_neurons(q, 1.0).tolist() == [0, 1, 2, 3, 4]  # p = 1 keeps every neuron
    with pytest.raises(ValueError, match="threshold=0"):
        select_neurons(q, 0.0)
    with pytest.raises(ValueError, match="score 0"):
        select_neurons(torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        select_neurons(torch.tensor([1.0, -1.0]), 0.5)


def released_selection(scores: torch.Tensor, p: float) -> list[int]:
    """The released code's selection, written out (jianghoucheng/NSE nse_main.py): the top of the
    descending sort up to the last position whose cumsum is ≤ p · sum."""
    sorted_scores, order = torch.sort(scores, descending=True, stable=True)
    last = torch.where(torch.cumsum(sorted_scores, dim=0) <= p * scores.sum())[0][-1]
    return sorted(order[: last + 1].tolist())


def test_released_selection_rule_on_known_scores():
    q = torch.tensor([1.0, 5.0, 2.0, 2.0, 0.0, 0.0])  # total 10, a zero-score tail of two neurons
    within = {p: select_neurons(q, p, "within").tolist() for p in (0.5, 0.69, 0.7, 0.71, 0.9, 0.99, 1.0)}
    assert within == {
        0.5: [1],  # 5 ≤ 5
        0.69: [1],  # 7 > 6.9: one neuron fewer than the paper's rule
        0.7: [1, 2],  # 7 ≤ 7: equal to the paper's rule at an exact prefix sum
        0.71: [1, 2],
        0.9: [1, 2, 3],
        0.99: [1, 2, 3],  # 10 > 9.9
        1.0: [0, 1, 2, 3, 4, 5],  # p = 1: every neuron, the zero-score tail included
    }
    assert select_neurons(q, 0.69).tolist() == [1, 2] and select_neurons(q, 0.99).tolist() == [0, 1, 2, 3]
    for p, got in within.items():
        assert got == released_selection(q, p), p  # exact binary sums: no rounding anywhere
    # At p = 1 the released prefix test cumsum ≤ total holds up to the last position, zeros included;
    # the paper's rule (first position reaching the total) would stop at the last non-zero neuron.
    assert released_selection(q, 1.0) == list(range(6))
    assert select_neurons(q, 1.0, "reach").tolist() == list(range(6))  # editlab: p = 1 keeps all, either rule
    # Below the top score the released code would index an empty set; "within" keeps the top neuron.
    assert select_neurons(q, 0.4, "within").tolist() == [1]
    with pytest.raises(ValueError, match="option rule='most'"):
        select_neurons(q, 0.5, "most")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="option rule='most'"):
        WeightImportance(rule="most")  # type: ignore[arg-type]


def test_released_selection_rule_matches_the_released_code_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        q = torch.rand(512, generator=gen, dtype=torch.float64) ** 3  # skewed, no ties
        for p in (0.3, 0.8, 0.95):
            ours = select_neurons(q, p, "within").tolist()
            assert ours == released_selection(q, p)
            assert len(select_neurons(q, p, "reach")) == len(ours) + 1  # no prefix sums to p·total exactly


def test_attribution_formulas_on_hand_made_tensors():
    keys = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, -3.0]])  # [n=2, d_ff=3]
    w_out = torch.tensor([[1.0, -1.0, 2.0], [3.0, 0.0, 0.0]])  # [d_model=2, d_ff=3]
    torch.testing.assert_close(ActivationScore().scores(keys, w_out), keys.abs().double())
    wi = torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64)  # column L1 norms
    torch.testing.assert_close(WeightImportance().scores(keys, w_out), wi.expand(2, 3))
    col = torch.tensor([math.sqrt(10.0), 1.0, 2.0], dtype=torch.float64)  # column L2 norms
    rs = ResidualSensitivity().scores(keys, w_out)
    torch.testing.assert_close(rs, keys.abs().double() * col)
    # RS is the norm of the neuron's write into the residual stream, a_j W_out[:, j].
    torch.testing.assert_close(rs[1, 2], (keys[1, 2] * w_out[:, 2]).norm().double())
    # The batch selection sums the scores over the requests: AS totals [1.5, 2, 3], 0.45 · 6.5 ≤ 3.
    assert ActivationScore(threshold=0.45).select_batch(keys, w_out).tolist() == [2]
    assert [s.tolist() for s in ActivationScore(threshold=0.45).select_each(keys, w_out)] == [[1], [2]]
    with pytest.raises(ValueError, match="threshold=1.5"):
        ActivationScore(threshold=1.5)


# --- clustering --------------------------------------------------------------------------------


def test_jaccard_distances():
    sets = [torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([5]), torch.tensor([], dtype=torch.long)]
    d = jaccard_distances(sets, universe=6)
    assert d[0, 1] == pytest.approx(2 / 3) and d[0, 2] == 1.0 and d[2, 3] == 1.0
    assert torch.equal(d, d.T) and (d.diagonal() == 0).all()
    assert jaccard_distances([torch.tensor([], dtype=torch.long)] * 2)[0, 1] == 0.0  # two empty sets


def two_groups() -> tuple[list[torch.Tensor], list[int]]:
    # Group A draws from neurons 0..9, group B from 100..109: every A-B distance is 1.
    a = [torch.tensor(s) for s in ([0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [0, 2, 3, 4, 9], [2, 3, 4, 5, 6])]
    b = [torch.tensor(s) for s in ([100, 101, 102], [101, 102, 103], [100, 102, 103, 104])]
    order = [0, 4, 1, 5, 2, 6, 3]  # interleave the groups
    sets = a + b
    return [sets[i] for i in order], [0 if i < 4 else 1 for i in order]


@pytest.mark.parametrize("seed", range(5))
def test_two_disjoint_groups_give_two_clusters(seed):
    sets, group = two_groups()
    clu = cluster_sets(sets, 2, seed)
    expected = sorted([[i for i, g in enumerate(group) if g == 0], [i for i, g in enumerate(group) if g == 1]])
    assert sorted(clu.clusters) == expected
    assert all(a in c for a, c in zip(clu.anchors, clu.clusters, strict=True))
    # The automatic k for 7 requests is ceil(sqrt(3.5)) = 2: the same answer.
    assert default_k(7) == 2 and sorted(cluster_sets(sets, None, seed).clusters) == expected


def test_clustering_is_deterministic_and_never_returns_empty_clusters():
    gen_sets = torch.Generator().manual_seed(0)
    sets = [torch.randperm(40, generator=gen_sets)[:12] for _ in range(15)]
    first, again = cluster_sets(sets, 4, seed=3), cluster_sets(sets, 4, seed=3)
    assert first.clusters == again.clusters and first.anchors == again.anchors
    assert len(first.clusters) == 4 and all(first.clusters)
    # k above n is capped; identical sets (all distances 0) still give k non-empty clusters.
    assert len(cluster_sets(sets[:3], 10, seed=0).clusters) == 3
    same = cluster_sets([torch.tensor([1, 2])] * 5, 2, seed=0)
    assert len(same.clusters) == 2 and sorted(i for c in same.clusters for i in c) == list(range(5))
    with pytest.raises(ValueError, match="option clusters=0"):
        cluster_sets(sets, 0, seed=0)


def test_anchor_is_the_member_with_least_total_distance():
    d = torch.tensor(
        [
            [0.0, 0.9, 0.2, 0.8],
            [0.9, 0.0, 0.3, 0.5],
            [0.2, 0.3, 0.0, 0.6],
            [0.8, 0.5, 0.6, 0.0],
        ],
        dtype=torch.float64,
    )
    # Totals: 1.9, 1.7, 1.1, 1.9 → member 2.
    assert anchor_of(d, [0, 1, 2, 3]) == 2
    # Within {0, 1, 3}: totals 1.7, 1.4, 1.3 → member 3.
    assert anchor_of(d, [3, 0, 1]) == 3
    # A tie between 0 and 3 within {0, 3} goes to the lowest index.
    assert anchor_of(d, [3, 0]) == 0
    # k-medoids with k = 1 makes the anchor the medoid of everything.
    assert kmedoids(d, 1, torch.Generator().manual_seed(0)).anchors == [2]


# --- the sub-matrix solve ----------------------------------------------------------------------


def test_submatrix_solve_equals_the_full_solve_restricted_to_the_neurons():
    gen = torch.Generator().manual_seed(0)
    n, d_ff, d_model = 4, 10, 6
    idx = torch.tensor([1, 4, 5, 8])
    rest = torch.tensor([i for i in range(d_ff) if i not in idx.tolist()])
    keys = torch.randn(n, d_ff, generator=gen, dtype=torch.float64)
    keys[:, rest] = 0.0  # the other neurons' keys are zero
    resid = torch.randn(n, d_model, generator=gen, dtype=torch.float64)
    a = torch.randn(d_ff, d_ff, generator=gen, dtype=torch.float64)
    p = a @ a.T + torch.eye(d_ff, dtype=torch.float64)
    p[idx[:, None], rest[None, :]] = 0.0  # P block-diagonal between I and not-I
    p[rest[:, None], idx[None, :]] = 0.0
    full = memit_delta(keys, resid, p)
    sub = submatrix_delta(keys, resid, p, idx)
    torch.testing.assert_close(sub, full, rtol=1e-10, atol=1e-12)
    assert (sub[:, rest] == 0).all()
    # In general (dense keys and P) the sub-solve is zero outside I; with every neuron it is MEMIT.
    dense = torch.randn(n, d_ff, generator=gen, dtype=torch.float64)
    assert (submatrix_delta(dense, resid, a @ a.T + torch.eye(d_ff), idx)[:, rest] == 0).all()
    torch.testing.assert_close(submatrix_delta(dense, resid, p, torch.arange(d_ff)), memit_delta(dense, resid, p))
    with pytest.raises(ValueError, match="distinct"):
        submatrix_delta(dense, resid, p, torch.tensor([1, 1]))


# --- two-step z --------------------------------------------------------------------------------


def test_without_instance_steps_cluster_members_share_one_shift():
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    cfg = TargetConfig(lr=0.2, early_stop_loss=0.0)  # loss ≥ 0: no early stop
    res = optimize_cluster_targets(
        view, tok, reqs, TEMPLATES, 1, cfg, [[0, 2], [1]], [2, 1], shared_steps=6, instance_steps=0, progress=False
    )
    shift = res.z - res.h
    torch.testing.assert_close(shift[0], shift[2])  # the members of cluster 0 share Uz_0
    assert not torch.allclose(shift[0], shift[1])
    assert res.cluster.tolist() == [0, 1, 0] and res.is_anchor.tolist() == [False, True, True]
    # Phase 1 is MEMIT's optimisation on the anchors alone: with every request its own anchor and
    # no phase 2, z is optimize_targets' z.
    alone = optimize_cluster_targets(
        view, tok, reqs, TEMPLATES, 1, cfg, [[0], [1], [2]], [0, 1, 2], shared_steps=6, instance_steps=0, progress=False
    )
    ref = optimize_targets(
        view, tok, reqs, TEMPLATES, 1, TargetConfig(lr=0.2, steps=6, early_stop_loss=0.0), progress=False
    )
    torch.testing.assert_close(alone.z, ref.z, rtol=1e-5, atol=1e-5)
    assert torch.equal(alone.steps, ref.steps) and torch.isnan(res.loss[0]) and not torch.isnan(res.loss[1:]).any()


def test_without_shared_steps_it_is_per_instance_optimisation():
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    cfg = TargetConfig(lr=0.2, steps=99)  # cfg.steps is not read by the two-step optimisation
    res = optimize_cluster_targets(
        view, tok, reqs, TEMPLATES, 1, cfg, [[0, 1, 2]], [1], shared_steps=0, instance_steps=5, progress=False
    )
    ref = optimize_targets(view, tok, reqs, TEMPLATES, 1, TargetConfig(lr=0.2, steps=5), progress=False)
    # Same forwards, same arithmetic (a zero shared shift adds exact zeros): bit-identical.
    for name in ("z", "h", "loss", "nll", "steps"):
        assert torch.equal(getattr(res, name), getattr(ref, name)), name
    assert (res.shared == 0).all() and (res.shared_updates == 0).all()


def test_two_steps_refine_the_shared_shift_and_clamp_the_total():
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    cfg = TargetConfig(lr=0.5, clamp_norm_factor=0.5, kl_factor=0.0, weight_decay=0.0, early_stop_loss=0.0)
    res = optimize_cluster_targets(
        view, tok, reqs, TEMPLATES, 1, cfg, [[0, 1, 2]], [0], shared_steps=8, instance_steps=4, progress=False
    )
    assert (res.shared_updates == 8).all() and (res.instance_updates == 3).all()
    assert torch.equal(res.steps, res.shared_updates + res.instance_updates)
    assert ((res.z - res.h).norm(dim=1) <= 0.5 * res.h.norm(dim=1) + 1e-4).all()
    start = optimize_targets(view, tok, reqs, TEMPLATES, 1, TargetConfig(steps=1), progress=False)
    assert (res.nll < start.nll).all()
    with pytest.raises(ValueError, match="partition"):
        optimize_cluster_targets(view, tok, reqs, TEMPLATES, 1, cfg, [[0, 1]], [0], progress=False)
    with pytest.raises(ValueError, match="anchors"):
        optimize_cluster_targets(view, tok, reqs, TEMPLATES, 1, cfg, [[0, 1, 2]], [5], progress=False)


# --- the method --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # nn.Linear and Conv1D (transposed) out-projections
def test_ece_writes_only_the_selected_columns_of_its_layers(tmp_path, stats_cache, model_type):
    ctx, method = make(tmp_path, model_type, neurons=ResidualSensitivity(threshold=0.5), clusters=2)
    reqs = facts()
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    selected = {}
    for layer in method.layers:
        keys, _ = keys_and_outputs(ctx.view, ctx.tok, reqs, method.templates, layer, 1)
        selected[layer] = set(method.neurons.select_batch(keys, read_weight(ctx.view.ffn_out(layer))).tolist())
    result = method.apply(ctx, reqs)
    edited = {ctx.view.ffn_out_name(layer) + ".weight": layer for layer in method.layers}
    for name, p in ctx.model.named_parameters():
        if name not in edited:
            assert torch.equal(p, before[name]), name
            continue
        layer = edited[name]
        module = ctx.view.ffn_out(layer)
        diff = read_weight(module) - (before[name].T if is_transposed(module) else before[name])  # [d_model, d_ff]
        changed = set(torch.nonzero(diff.abs().sum(0)).squeeze(1).tolist())  # columns = neurons
        d_ff = diff.shape[1]
        assert changed and changed <= selected[layer] and len(selected[layer]) < d_ff, (layer, changed)
        assert result.scalars[f"neurons/l{layer}"] == len(selected[layer])
    assert method.name == "ECE-two-step"
    assert result.scalars["clusters"] == 2 and sorted(result.details["cluster_sizes"]) == [1, 2]
    assert result.details["cluster_attribution"] == "ResidualSensitivity"
    assert result.details["z_mode"] == "two_step" and result.details["z_weights"] == "original"
    assert result.scalars["z_rewound"] == 1.0 and result.scalars["z_from_cache"] == 0
    assert set(result.per_request) == {r.case_id for r in reqs}
    assert sum(v["anchor"] for v in result.per_request.values()) == 2
    assert {v["cluster"] for v in result.per_request.values()} == {0, 1}
    assert all(v["z_weights"] == "original" and not v["z_from_cache"] for v in result.per_request.values())
    # The full KKᵀ (every neuron) entered the sequential cache; it survives a state round trip.
    assert set(method.cache_c) == {0, 1} and all(c.abs().sum() > 0 for c in method.cache_c.values())
    fresh = ECE(layers=[0, 1])
    fresh.load_state_dict(method.state_dict())
    assert fresh.templates == method.templates and torch.equal(fresh.cache_c[1], method.cache_c[1].cpu())


def test_ece_with_every_neuron_and_no_sharing_is_sequential_memit(tmp_path, stats_cache):
    # p = 1 keeps every neuron and shared_steps = 0 is per-instance z: on the unedited model the
    # update is MEMIT_seq's.
    ctx, ece = make(tmp_path, neurons=WeightImportance(threshold=1.0), shared_steps=0, instance_steps=6)
    ece.apply(ctx, facts())
    edited = {layer: read_weight(ctx.view.ffn_out(layer)).clone() for layer in ece.layers}
    ctx2, _ = make(tmp_path)
    memit = MEMIT(layers=[0, 1], mom2_weight=0.01, targets=ece.targets, context=ece.context, covariance=ece.covariance)
    memit.setup(ctx2)
    memit.apply(ctx2, facts())
    for layer in ece.layers:
        torch.testing.assert_close(edited[layer], read_weight(ctx2.view.ffn_out(layer)), rtol=1e-5, atol=1e-6)


def test_default_ece_is_as_released_per_request_z_with_every_step(tmp_path, stats_cache, monkeypatch):
    default = ECE(layers=[0, 1])
    assert (default.z_mode, default.rewind, default.name) == ("per_request", True, "ECE")
    assert (default.neurons.threshold, default.neurons.rule) == (0.8, "within")
    # Nothing clusters: the clustering is never called and the step records no cluster.
    monkeypatch.setattr(ece_module, "cluster_sets", lambda *a, **k: pytest.fail("per-request ECE clustered"))
    ctx, ece = make(tmp_path, z_mode="per_request", neurons=WeightImportance(threshold=1.0, rule="within"))
    reqs = facts()
    z, cached = ece.request_targets(ctx, reqs)
    # z is MEMIT's optimize_targets with all targets.steps, each request on its own.
    fresh, tok = peaky_model()
    ref = optimize_targets(ModelView.of(fresh), tok, reqs, ece.templates, 1, TARGETS, progress=False)
    torch.testing.assert_close(z.z, ref.z, rtol=1e-5, atol=1e-6)
    assert torch.equal(z.steps, ref.steps) and not cached.any()
    result = ece.apply(ctx, reqs)
    assert "clusters" not in result.scalars and "cluster_sizes" not in result.details
    assert result.details["z_mode"] == "per_request" and result.scalars["z_steps"] == float(ref.steps.float().mean())
    assert all(set(v) == {"z_weights", "z_from_cache"} for v in result.per_request.values())
    assert result.scalars["z_from_cache"] == 3  # the step's z came from the cache request_targets filled
    # With p = 1 the first step is MEMIT_seq's (z on θ₀ is z on the unedited model).
    ctx2, _ = make(tmp_path, z_mode="per_request")
    memit = MEMIT(layers=[0, 1], mom2_weight=0.01, targets=TARGETS, context=ece.context, covariance=ece.covariance)
    memit.setup(ctx2)
    memit.apply(ctx2, reqs)
    for layer in ece.layers:
        torch.testing.assert_close(
            read_weight(ctx.view.ffn_out(layer)), read_weight(ctx2.view.ffn_out(layer)), rtol=1e-5, atol=1e-6
        )


NEW = [
    EditRequest("9", "{} was founded by", "Toyota", "Apple", "Kiichiro"),
    EditRequest("8", "{} plays", "Messi", "chess", "football"),
]


@pytest.mark.parametrize("z_mode", ["per_request", "two_step"])
def test_rewound_z_equals_z_on_the_unedited_model_after_an_edit(tmp_path, stats_cache, z_mode):
    ctx, ece = make(tmp_path, z_mode=z_mode, z_cache=False)
    ece.apply(ctx, facts())  # the edited layers change
    edited = {layer: read_weight(ctx.view.ffn_out(layer)).clone() for layer in ece.layers}
    clu = None
    if z_mode == "per_request":
        got, cached = ece.request_targets(ctx, NEW)
    else:
        clu = ece.locate(ctx, NEW).clustering
        got, cached = ece.cluster_targets(ctx, NEW, clu)
    assert not cached.any()
    for layer in ece.layers:  # the swap put the edited matrices back
        assert torch.equal(read_weight(ctx.view.ffn_out(layer)), edited[layer])

    def z_on(view, tok):
        if clu is None:
            return optimize_targets(view, tok, NEW, ece.templates, 1, ece.targets, progress=False)
        return optimize_cluster_targets(
            view, tok, NEW, ece.templates, 1, ece.targets, clu.clusters, clu.anchors, 8, 4, progress=False
        )

    fresh, tok = peaky_model()
    on_theta0 = z_on(ModelView.of(fresh), tok)
    torch.testing.assert_close(got.z, on_theta0.z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.h, on_theta0.h, rtol=1e-5, atol=1e-6)
    # ... and differs from z on the edited weights (the edit moved these requests' residuals).
    on_current = z_on(ctx.view, ctx.tok)
    assert not torch.allclose(on_current.z, on_theta0.z, atol=1e-3)
    # rewind: false is z on the current weights.
    ctx_now, now = make(tmp_path, z_mode=z_mode, rewind=False)
    assert now.original is None and now.name == ece.name
    now.apply(ctx_now, facts())
    got_now = now.request_targets(ctx_now, NEW)[0] if clu is None else now.cluster_targets(ctx_now, NEW, clu)[0]
    torch.testing.assert_close(got_now.z, on_current.z, rtol=1e-5, atol=1e-6)
    assert now.apply(ctx_now, NEW).per_request["9"]["z_weights"] == "current"


@pytest.mark.parametrize("z_mode", ["per_request", "two_step"])
def test_z_cache_serves_a_new_run_and_keys_the_cluster(tmp_path, stats_cache, monkeypatch, z_mode):
    ctx, ece = make(tmp_path, z_mode=z_mode, clusters=2) if z_mode == "two_step" else make(tmp_path, z_mode=z_mode)
    first = ece.apply(ctx, facts())
    assert first.scalars["z_from_cache"] == 0
    # A new run with the same settings (fresh unedited model) is served from disk without optimising.
    calls = []
    for name in ("optimize_targets", "optimize_cluster_targets"):
        real = getattr(rewind_module, name)
        monkeypatch.setattr(rewind_module, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    ctx_new, again = (
        make(tmp_path, z_mode=z_mode, clusters=2) if z_mode == "two_step" else make(tmp_path, z_mode=z_mode)
    )
    second = again.apply(ctx_new, facts())
    assert second.scalars["z_from_cache"] == 3 and calls == []
    assert all(v["z_from_cache"] for v in second.per_request.values())
    for layer in ece.layers:
        torch.testing.assert_close(read_weight(ctx.view.ffn_out(layer)), read_weight(ctx_new.view.ffn_out(layer)))
    if z_mode == "two_step":
        # Another clustering of the same requests: a changed cluster is recomputed; one that
        # kept its members (and so its anchor) is still served.
        ctx3, three = make(tmp_path, z_mode=z_mode, clusters=3)
        third = three.apply(ctx3, facts())

        def groups(res):
            labels = {cid: v["cluster"] for cid, v in res.per_request.items()}
            return [sorted(c for c, lab in labels.items() if lab == k) for k in set(labels.values())]

        kept = [g for g in groups(third) if g in groups(first)]
        assert third.scalars["z_from_cache"] == sum(map(len, kept)) < 3 and calls
        assert all(third.per_request[c]["z_from_cache"] == any(c in g for g in kept) for c in third.per_request)


def test_ece_failed_step_restores_the_weights(tmp_path, stats_cache, monkeypatch):
    ctx, method = make(tmp_path, shared_steps=2, instance_steps=1)
    assert_failed_step_restores(ctx, method, ece_module, "submatrix_delta", monkeypatch)


def test_bad_options_are_named():
    two = {"z_mode": "two_step"}
    with pytest.raises(ValueError, match=r"option targets.steps=25 must equal shared_steps \+ instance_steps"):
        ECE(layers=[0], shared_steps=15, instance_steps=5, **two)
    with pytest.raises(ValueError, match="option clusters=0"):
        ECE(layers=[0], clusters=0, **two)
    with pytest.raises(ValueError, match="option cluster_neurons=WeightImportance"):
        ECE(layers=[0], cluster_neurons=WeightImportance(), **two)
    with pytest.raises(ValueError, match="option z_mode='paper'"):
        ECE(layers=[0], z_mode="paper")  # type: ignore[arg-type]
    for option in (
        {"clusters": 4},
        {"shared_steps": 20},
        {"instance_steps": 5},
        {"cluster_neurons": ActivationScore()},
    ):
        with pytest.raises(ValueError, match=rf"option {next(iter(option))}=.* is only read with z_mode='two_step'"):
            ECE(layers=[0], **option)
    # WI has no per-request sets: clustering falls back to AS with the same threshold and rule.
    attr = ECE(layers=[0], **two).clustering_attribution()
    assert type(attr).__name__ == "ActivationScore" and (attr.threshold, attr.rule) == (0.8, "within")
    # The paper's split fills in: 5 per-instance rounds, the rest shared.
    paper = ECE(layers=[0], **two)
    assert (paper.shared_steps, paper.instance_steps, paper.name) == (20, 5, "ECE-two-step")
    gpt2xl = ECE(layers=[0], targets=TargetConfig(steps=20), **two)
    assert (gpt2xl.shared_steps, gpt2xl.instance_steps) == (15, 5)


def ece_of(config):
    """The ECE a config builds (its option checks run; no model is loaded)."""
    from jsonargparse import ArgumentParser

    from editlab.editing.methods.base import EditMethod

    spec = yaml.safe_load(config.read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(EditMethod, "method")
    return parser.instantiate(parser.parse_object({"method": spec["model"]["method"]})).method


RELEASED_THRESHOLD = {"gptj": 1.0, "llama3_8b": 1.0, "gpt2xl": 0.8, "smollm2": 1.0}  # smollm2: the Llama3 WI value


@pytest.mark.parametrize("model", sorted(RELEASED_THRESHOLD))
def test_ece_configs_are_as_released_and_two_step_configs_cluster(model):
    released = ece_of(REPO / "configs" / f"ece_{model}.yaml")
    assert isinstance(released, ECE) and released.name == "ECE"
    assert (released.z_mode, released.rewind, released.z_cache) == ("per_request", True, True)
    assert type(released.neurons) is WeightImportance
    assert (released.neurons.threshold, released.neurons.rule) == (RELEASED_THRESHOLD[model], "within")
    two = ece_of(REPO / "configs" / f"ece_twostep_{model}.yaml")
    assert two.name == "ECE-two-step" and two.rewind and (two.neurons.threshold, two.neurons.rule) == (0.8, "reach")
    assert two.instance_steps == 5 and two.shared_steps + 5 == two.targets.steps == released.targets.steps
    assert two.layers == released.layers and two.mom2_weight == released.mom2_weight
    assert dataclasses.asdict(two.targets) == dataclasses.asdict(released.targets)


def test_every_ece_config_has_its_two_step_twin():
    names = {p.stem for p in (REPO / "configs").glob("ece_*.yaml")}
    assert names == {f"ece_{m}" for m in RELEASED_THRESHOLD} | {f"ece_twostep_{m}" for m in RELEASED_THRESHOLD}
