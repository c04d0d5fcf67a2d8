"""ECE knowledge clustering (eq. 9–10): requests grouped by their neuron sets under Jaccard distance.

Eq. 9 asks for k-means under the Jaccard distance. k-means' centre is a mean, which has no meaning
for sets (the mean of indicator vectors is not a set, and its Jaccard distance is undefined); the
centre that minimises the in-cluster sum of Jaccard distances *within the data* is the medoid. So
this is k-medoids (alternating Voronoi iteration): assign every request to its nearest medoid,
make each cluster's member with the least total distance to the other members its new medoid,
repeat until the medoids stop moving. That member is exactly the paper's anchor (eq. 10), so the
final medoids are the anchors.

Pure functions on lists of index tensors and [n, n] distance matrices; deterministic under a
torch.Generator seed (k-means++ seeding).

ECE's two-step z over the clusters (:func:`optimize_cluster_targets`, eq. 11–13) runs the z
descent of editing/targets twice: once for the clusters' shared shifts (on their anchors' loss),
then for every request on top of its cluster's shift (the descent's ``base``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from editlab.editing.keys import keys_and_outputs
from editlab.editing.targets import OffsetDescent, TargetConfig, TargetResult, descend_offsets
from editlab.models.arch import ModelView
from editlab.types import EditRequest


def jaccard_distances(sets: list[torch.Tensor], universe: int | None = None) -> torch.Tensor:
    """[n, n] float64 Jaccard distances 1 − |A∩B| / |A∪B| between index sets (two empty sets: 0).

    sets: n LongTensors of indices in [0, universe); universe defaults to the largest index + 1.
    """
    if not sets:
        return torch.zeros(0, 0, dtype=torch.float64)
    device = sets[0].device
    if universe is None:
        universe = 1 + max((int(s.max()) for s in sets if s.numel()), default=0)
    member = torch.zeros(len(sets), universe, dtype=torch.float64, device=device)  # [n, U]
    for i, s in enumerate(sets):
        member[i, s.to(device)] = 1.0
    inter = member @ member.T  # [n, n]
    size = member.sum(1)  # [n]
    union = size[:, None] + size[None, :] - inter
    dist = torch.where(union > 0, 1.0 - inter / union.clamp_min(1.0), torch.zeros_like(union))
    dist.fill_diagonal_(0.0)
    return dist


def default_k(n: int) -> int:
    """Automatic number of clusters: ceil(sqrt(n / 2)), the usual rule of thumb for k-means
    (n = 100 → 8, n = 30 → 4, n ≤ 2 → 1). ECE's saving grows with n / k (see ECE.apply)."""
    if n < 1:
        raise ValueError(f"cannot cluster {n} requests")
    return max(1, math.ceil(math.sqrt(n / 2)))


def anchor_of(dist: torch.Tensor, members: list[int]) -> int:
    """The member with the least total distance to the cluster's members (eq. 10); ties → the
    lowest index."""
    if not members:
        raise ValueError("an empty cluster has no anchor")
    members = sorted(members)
    idx = torch.tensor(members, device=dist.device)
    total = dist[idx][:, idx].sum(1)  # [m]
    # argmin returns the first minimum; members are ascending, so ties go to the lowest index.
    # Sums of float distances can differ in the last bits for equal true sums: compare with a tolerance.
    best = total.min()
    tie = (total - best).abs() <= 1e-12 * max(1.0, float(best))
    return members[int(tie.nonzero()[0])]


def kmeanspp_seeds(dist: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k distinct initial medoids: the first uniformly, each next one with probability ∝ D², D the
    distance to the nearest medoid so far (k-means++); uniformly among the rest when every D is 0."""
    n = dist.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    d = dist.detach().double().cpu()
    seeds = [int(torch.randint(n, (1,), generator=generator))]
    nearest = d[seeds[0]].clone()  # [n]
    for _ in range(k - 1):
        weight = nearest**2
        weight[seeds] = 0.0
        if weight.sum() <= 0:  # all remaining points coincide with a medoid
            weight = torch.ones(n, dtype=torch.float64)
            weight[seeds] = 0.0
        nxt = int(torch.multinomial(weight, 1, generator=generator))
        seeds.append(nxt)
        nearest = torch.minimum(nearest, d[nxt])
    return seeds


@dataclass
class Clustering:
    clusters: list[list[int]]  # members of each cluster, ascending; clusters ordered by first member
    anchors: list[int]  # anchor (medoid) of each cluster
    labels: torch.Tensor  # [n] cluster of each request
    cost: float  # eq. 9: Σ over clusters of the members' distances to their anchor


def kmedoids(dist: torch.Tensor, k: int, generator: torch.Generator, max_iter: int = 100) -> Clustering:
    """k-medoids under a precomputed distance matrix [n, n] (see the module docstring).

    Medoids are pinned to their own cluster, so as long as they are distinct no cluster is ever
    empty; a cluster that nevertheless ends up empty is dropped (so len(clusters) ≤ k).
    """
    n = dist.shape[0]
    if dist.shape != (n, n):
        raise ValueError(f"distance matrix must be square, got {tuple(dist.shape)}")
    d = dist.detach().double().cpu()
    medoids = kmeanspp_seeds(d, min(k, n), generator)
    for _ in range(max_iter):
        labels = d[:, medoids].argmin(1)  # [n]: nearest medoid, ties → first cluster
        labels[torch.tensor(medoids)] = torch.arange(len(medoids))
        members = [sorted(torch.nonzero(labels == c).squeeze(1).tolist()) for c in range(len(medoids))]
        members = [m for m in members if m]
        new = [anchor_of(d, m) for m in members]
        if sorted(new) == sorted(medoids):
            break
        medoids = new
    labels = d[:, medoids].argmin(1)
    labels[torch.tensor(medoids)] = torch.arange(len(medoids))
    clusters = [sorted(torch.nonzero(labels == c).squeeze(1).tolist()) for c in range(len(medoids))]
    clusters = sorted((m for m in clusters if m), key=lambda m: m[0])
    anchors = [anchor_of(d, m) for m in clusters]
    out_labels = torch.empty(n, dtype=torch.long)
    for c, m in enumerate(clusters):
        out_labels[m] = c
    cost = float(sum(d[a, m].sum() for a, m in zip(anchors, clusters, strict=True)))
    return Clustering(clusters, anchors, out_labels, cost)


def cluster_sets(sets: list[torch.Tensor], k: int | None, seed: int, universe: int | None = None) -> Clustering:
    """Cluster requests by their neuron sets: Jaccard distances, k-medoids, anchors.

    k: number of clusters (capped at n); None uses :func:`default_k`.
    """
    n = len(sets)
    if k is not None and k < 1:
        raise ValueError(f"option clusters={k} must be >= 1 (or null for automatic)")
    k = min(default_k(n) if k is None else k, n)
    gen = torch.Generator().manual_seed(seed)
    return kmedoids(jaccard_distances(sets, universe), k, gen)


@dataclass
class ClusterTargetResult(TargetResult):
    """TargetResult of the two-step optimisation, with who shared what."""

    shared: torch.Tensor  # [n, d_model] Uz_u of each request's cluster
    cluster: torch.Tensor  # [n] cluster index of each request
    is_anchor: torch.Tensor  # [n] bool
    shared_updates: torch.Tensor  # [n] phase-1 updates of the request's cluster
    instance_updates: torch.Tensor  # [n] phase-2 updates of the request's own δ_i
    seconds_shared: float
    seconds_instance: float


def check_clusters(n: int, clusters: list[list[int]], anchors: list[int]) -> None:
    """Clusters must partition range(n), each with its anchor among its members."""
    flat = sorted(i for c in clusters for i in c)
    if flat != list(range(n)):
        raise ValueError(f"clusters must partition the {n} requests exactly, got {clusters}")
    if len(anchors) != len(clusters) or any(a not in c for a, c in zip(anchors, clusters, strict=True)):
        raise ValueError(f"anchors {anchors} must name one member of each cluster {clusters}")


def cluster_labels(n: int, clusters: list[list[int]]) -> torch.Tensor:
    """[n] long on the CPU: each request's cluster, as its position in ``clusters``."""
    cluster = torch.empty(n, dtype=torch.long)
    for c, members in enumerate(clusters):
        cluster[members] = c
    return cluster


def optimize_cluster_targets(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    cfg: TargetConfig,
    clusters: list[list[int]],
    anchors: list[int],
    shared_steps: int = 20,
    instance_steps: int = 5,
    progress: bool = True,
) -> ClusterTargetResult:
    """ECE's two-step z: z_i = h_i + Uz_u + δ_i (eq. 13) for request i in cluster u.

    Phase 1 (eq. 11): one shift Uz_u per cluster, optimised on the cluster's anchor's loss only,
    for ``shared_steps`` forward+update rounds — one padded forward over the anchors' rows, all
    clusters batched. Phase 2 (eq. 12): every request's own δ_i on top of its cluster's Uz_u for
    ``instance_steps`` forwards, all requests batched, the last forward only measuring (as in
    optimize_targets). So 20 + 5 runs 25 forwards and 24 updates per request, as per-instance
    optimisation with 25 steps does; phase 1's forwards cover only the anchors' rows.

    Loss, clamp (of the whole shift Uz_u + δ_i to clamp_norm_factor·‖h_i‖) and early stop are
    MEMIT's (see :func:`descend_offsets`); ``cfg.steps`` is not read. With shared_steps = 0 this is
    optimize_targets with steps = instance_steps. With instance_steps = 0 every member gets
    z_i = h_i + Uz_u (no projection: the clamp is part of an update step) and, not having been
    measured at its final z, loss and nll NaN (anchors keep their last phase-1 values).
    """
    n = len(requests)
    check_clusters(n, clusters, anchors)
    if shared_steps < 0 or instance_steps < 0 or shared_steps + instance_steps < 1:
        raise ValueError(
            f"options shared_steps={shared_steps}, instance_steps={instance_steps} must be >= 0 with a positive sum"
        )
    device = view.device
    d_model = view.model.config.hidden_size
    k = len(clusters)
    cluster = cluster_labels(n, clusters).to(device)
    anchor_idx = torch.tensor(anchors, dtype=torch.long, device=device)
    is_anchor = torch.zeros(n, dtype=torch.bool, device=device)
    is_anchor[anchor_idx] = True
    t0 = time.perf_counter()
    uz = torch.zeros(k, d_model, device=device)  # [k, d_model] Uz_u
    phase1: OffsetDescent | None = None
    if shared_steps > 0:
        phase1 = descend_offsets(
            view,
            tok,
            [requests[a] for a in anchors],
            templates,
            layer,
            cfg,
            shared_steps,
            update_last=instance_steps > 0,
            progress=progress,
            desc=f"z shared ({k} clusters)",
        )
        uz = phase1.delta
    shared = uz[cluster]  # [n, d_model]
    shared_updates = phase1.updates[cluster] if phase1 is not None else torch.zeros(n, device=device)
    t1 = time.perf_counter()
    if instance_steps > 0:
        phase2 = descend_offsets(
            view,
            tok,
            requests,
            templates,
            layer,
            cfg,
            instance_steps,
            base=shared,
            progress=progress,
            desc="z instance",
        )
        h, delta, loss, nll, inst_updates = phase2.h, phase2.delta, phase2.loss, phase2.nll, phase2.updates
    else:
        assert phase1 is not None
        _, h64 = keys_and_outputs(view, tok, requests, ["{}"], layer, layer)  # [n, d_model] bare-prompt residual
        h = h64.float()
        delta = torch.zeros(n, d_model, device=device)
        loss = torch.full((n,), float("nan"), device=device)
        nll = torch.full((n,), float("nan"), device=device)
        loss[anchor_idx], nll[anchor_idx] = phase1.loss, phase1.nll
        inst_updates = torch.zeros(n, device=device)
    t2 = time.perf_counter()
    return ClusterTargetResult(
        z=h + shared + delta,
        h=h,
        loss=loss,
        nll=nll,
        steps=shared_updates + inst_updates,
        shared=shared,
        cluster=cluster,
        is_anchor=is_anchor,
        shared_updates=shared_updates,
        instance_updates=inst_updates,
        seconds_shared=t1 - t0,
        seconds_instance=t2 - t1,
    )
