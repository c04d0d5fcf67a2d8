"""What the bits of a run depend on besides its config: torch's version and its thread count.

The edit path is deterministic for a given torch build and thread count (no atomics, no
alignment-dependent kernels reach the results), but a float reduction split over another number
of threads adds in another order, and another torch version may pick other kernels. Both are
recorded in every run and in its edit state, and a resumed run that differs in either says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def numerics() -> dict:
    """The settings that decide the bits of a run on this machine."""
    # str(): torch.__version__ is a TorchVersion, which the weights_only checkpoint loader refuses.
    return {"torch_version": str(torch.__version__), "threads": torch.get_num_threads()}


def numerics_differences(saved: dict | None, current: dict) -> list[str]:
    """One ``name: saved -> current`` line per setting that differs (all of them if none was saved)."""
    saved = saved or {}
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (None: torch's default, all cores) and return the count in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"option threads={threads} must be >= 1")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextmanager
def threads_for(threads: int | None) -> Iterator[int]:
    """:func:`set_threads` for the block; the count before it is given back after."""
    before = torch.get_num_threads()
    try:
        yield set_threads(threads)
    finally:
        torch.set_num_threads(before)
