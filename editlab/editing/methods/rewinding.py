"""The weights-rewinding state ECE and NSE share: θ₀'s edited matrices and the z cache.

Both compute z on the ORIGINAL weights θ₀ (``rewind``; see editlab/editing/rewind.py) and keep it
per request in a z cache, in memory and, with ``z_cache``, on disk under the cache root (True) or
in a directory of its own (a path: a z bank that a study commits, so that its z outlive the machine).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from editlab.editing.methods.base import EditContext, KeyValueMethod
from editlab.editing.methods.memit import targets_in_parts
from editlab.editing.neurons import NeuronAttribution
from editlab.editing.rewind import OriginalWeights, TargetCache, rewound_target_rows, z_bank_files, z_cache_files
from editlab.editing.targets import TargetResult
from editlab.keyed_cache import KeyedCache
from editlab.memory import MemoryProfile
from editlab.models.fingerprint import model_fingerprint
from editlab.types import EditRequest


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

    def rewound_rows(self, ctx: EditContext, requests: list[EditRequest]) -> tuple[TargetResult, torch.Tensor]:
        """z of ``requests`` at the last edited layer, on θ₀ with rewinding (on the current weights
        without), from the z cache where present: the targets (rows in request order) and which
        rows came from the cache (bool [n]). Without rewinding nothing is cached, and the z go
        through the step's parts instead (chunk by chunk, named by the weights), as MEMIT's."""
        self.check_setup()

        def rows(part: list[EditRequest]) -> tuple[TargetResult, torch.Tensor]:
            return rewound_target_rows(
                ctx.view,
                ctx.tok,
                part,
                self.templates,
                self.layers[-1],
                self.targets,
                self.original,
                self.cache,
                ctx.model_id,
                ctx.fingerprint,
                ctx.progress,
            )

        if self.original is not None or ctx.parts is None:
            return rows(requests)
        label = f"weights {model_fingerprint(ctx.model)}"
        res = targets_in_parts(
            ctx.parts,
            list(range(len(requests))),
            self.targets.requests_per_forward,
            lambda idx: rows([requests[i] for i in idx])[0],
            TargetResult,
            ctx.view.device,
            label,
        )
        return res, torch.zeros(len(requests), dtype=torch.bool, device=ctx.view.device)

    def compute_targets_keeps_parts(self) -> bool:
        return not self.rewind  # z on θ₀ lives in the z cache; on the current weights, in the parts

    def check_fill_z(self) -> None:
        """Refuse ``fill_z`` where z cannot be computed ahead: without rewinding (z on the current
        weights depends on the stream) or without a disk cache to put it in."""
        if not self.rewind or self.z_cache is False:
            raise ValueError(
                f"{self.name}: z can be computed ahead only on θ₀ into a disk cache (rewind true, z_cache true or a "
                f"directory; here rewind {self.rewind}, z_cache {self.z_cache})"
            )

    def fill_z(self, ctx: EditContext, requests: list[EditRequest]) -> int:
        """Put the z on θ₀ of ``requests`` in the z cache ahead of a run (``editlab zbank``): the
        z a step of this method takes, keyed as the step keys them; how many were there already."""
        self.check_fill_z()
        return int(self.rewound_rows(ctx, requests)[1].sum())


def z_files(option: bool | str, cache_root: Path) -> KeyedCache | None:
    """Where the z files of option ``z_cache`` live: under the cache root (True), in the directory
    it names (a string), nowhere (False: in memory only)."""
    if isinstance(option, str):
        if not option.strip():
            raise ValueError("option z_cache: an empty directory name (true, false or a directory)")
        return z_bank_files(Path(option))
    return z_cache_files(cache_root) if option else None
