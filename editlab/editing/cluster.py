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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
