"""Work sharing across the ranks of a multi-process run (Lightning + torch.distributed).

Every rank holds a full model replica and sees the same edit batches. Per-request work (keys, z)
is split across ranks, each rank computes its share, and the results are gathered so every rank
holds every request's rows in request order; the solve then runs on identical inputs on every rank,
which therefore writes the same ΔW. Corpus statistics are summed over a sharded corpus.

``Ranks()`` (world 1) is the single-process case: every call is then a plain local computation,
so methods are written once for both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes (torch.distributed must be initialised
    when world > 1: Lightning's strategy does it before the edit stream starts)."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"invalid rank {self.rank} of world {self.world}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def contiguous_share(self, n: int) -> list[int]:
        """Indices of this rank's share of range(n): contiguous chunks, sizes differing by ≤ 1."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return list(range(start, start + base + (self.rank < extra)))

    def group_share(self, groups: list[list[int]]) -> list[int]:
        """Indices of this rank's share when whole groups (e.g. ECE's clusters) must stay on one
        rank: largest group first to the least-loaded rank (ties: lowest rank), deterministic."""
        load = [0] * self.world
        mine: list[int] = []
        for g in sorted(range(len(groups)), key=lambda g: (-len(groups[g]), g)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            load[r] += len(groups[g])
            if r == self.rank:
                mine.extend(groups[g])
        return sorted(mine)

    def all_gather_object(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place on a copy); float64 sums of a sharded corpus."""
        if self.world == 1:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _to(obj, device):
    """Tensors of a result (tensor, tuple or dataclass of tensors) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(x, device) for x in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _to(getattr(obj, f.name), device) for f in dataclasses.fields(obj)})
    return obj


def assemble_rows(parts: list, indices: list[list[int]], n: int):
    """Rows of every rank's part put back in request order. Tensors whose first dimension is the
    rank's row count are scattered to their indices; anything else (timings, counts) is taken
    from the first rank that computed something (ranks report their own)."""
    first = next(i for i, idx in enumerate(indices) if idx)
    ref = parts[first]
    if isinstance(ref, torch.Tensor):
        out = ref.new_empty((n, *ref.shape[1:]))
        for part, idx in zip(parts, indices, strict=True):
            if idx:
                out[torch.tensor(idx, device=out.device)] = part
        return out
    if isinstance(ref, tuple):
        return tuple(
            assemble_rows([p[j] if p is not None else None for p in parts], indices, n) for j in range(len(ref))
        )
    if dataclasses.is_dataclass(ref):
        fields = {}
        for f in dataclasses.fields(ref):
            value = getattr(ref, f.name)
            per_row = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == len(indices[first])
            fields[f.name] = (
                assemble_rows([getattr(p, f.name) if p is not None else None for p in parts], indices, n)
                if per_row
                else value
            )
        return dataclasses.replace(ref, **fields)
    return ref


def map_rows(ranks: Ranks, n: int, fn: Callable[[list[int]], T], device, groups: list[list[int]] | None = None) -> T:
    """Run ``fn`` on this rank's share of range(n) and gather the rows of every rank.

    ``fn(indices)`` returns a tensor, tuple or dataclass whose per-row tensors have
    ``len(indices)`` rows, in the order of ``indices``. ``groups`` keeps each group on one rank.
    With one rank this is ``fn(list(range(n)))``; with more, the gathered rows land on ``device``.
    """
    if ranks.world == 1:
        return fn(list(range(n)))
    mine = ranks.group_share(groups) if groups is not None else ranks.contiguous_share(n)
    part = fn(mine) if mine else None
    gathered = ranks.all_gather_object((mine, _to(part, "cpu") if part is not None else None))
    indices = [idx for idx, _ in gathered]
    parts = [p for _, p in gathered]
    return _to(assemble_rows(parts, indices, n), device)
