"""The weights-rewinding state ECE and NSE share: θ₀'s edited matrices and the z cache.

Both compute z on the ORIGINAL weights θ₀ (``rewind``; see editlab/editing/rewind.py) and keep it
per request in a z cache, in memory and, with ``z_cache``, on disk under the cache root (True) or
in a directory of its own (a path: a z bank that a study commits, so that its z outlive the machine).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from editlab.editing.methods.base import EditContext, KeyValueMethod
from editlab.editing.neurons import NeuronAttribution
from editlab.editing.rewind import OriginalWeights, TargetCache, z_bank_files, z_cache_files
from editlab.keyed_cache import KeyedCache
from editlab.memory import MemoryProfile


class RewindingMethod(KeyValueMethod):
    """A KeyValueMethod with neuron attribution whose z is computed on θ₀ (``rewind``) and cached."""

    def __init__(
        self,
        layers: list[int],
        mom2_weight: float,
        neurons: NeuronAttribution,
        rewind: bool,
        z_cache: bool | str,
        targets,
        context,
        covariance,
    ) -> None:
        super().__init__(layers, mom2_weight, targets, context, covariance)
        self.neurons = neurons
        self.rewind = rewind
        self.z_cache = z_cache
        self.original: OriginalWeights | None = None
        self.cache = TargetCache(None)  # in memory; setup gives it its files under the cache root

    def setup(self, ctx: EditContext) -> None:
        super().setup(ctx)
        # W_0 of the edited matrices, taken before the first edit (ctx.fingerprint is θ₀'s too).
        self.original = OriginalWeights(ctx.view, self.layers) if self.rewind else None
        self.cache = TargetCache(z_files(self.z_cache, ctx.cache_root))

    def memory_profile(self) -> MemoryProfile:
        # C and the cache; solve: λC + cache, P[I, I], KᵀK and A (offloaded: P stays on the CPU);
        # with rewind, θ₀'s matrices and the current ones set aside while z runs on θ₀.
        return dataclasses.replace(
            super().memory_profile(), solve_matrices=4, solve_matrices_offloaded=3, rewind=self.rewind
        )

    def check_setup(self) -> None:
        """Refuse a step before setup: with rewinding, θ₀ must have been taken from the unedited model."""
        if self.rewind and self.original is None:
            raise RuntimeError(
                f"{type(self).__name__}.setup must run on the unedited model before the first step (rewind: true)"
            )


def z_files(option: bool | str, cache_root: Path) -> KeyedCache | None:
    """Where the z files of option ``z_cache`` live: under the cache root (True), in the directory
    it names (a string), nowhere (False: in memory only)."""
    if isinstance(option, str):
        if not option.strip():
            raise ValueError("option z_cache: an empty directory name (true, false or a directory)")
        return z_bank_files(Path(option))
    return z_cache_files(cache_root) if option else None
