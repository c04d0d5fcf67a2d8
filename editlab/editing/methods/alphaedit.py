"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's z and spread with a null-space-projected solve.

P = U Uᵀ from the eigenvectors of C = E[kkᵀ] whose eigenvalues are below ``nullspace_threshold``
(or, with ``nullspace_share``, the smallest ones holding at most that share of tr C; computed once
per layer on the unedited model); each layer's ΔW = Xᵀ with
(P(KᵀK + cache) + L2·I) X = P Kᵀ R, so ΔW k₀ = 0 for every preserved key k₀ (P k₀ = 0). λC is not
in the solve. The sequential cache Σ KKᵀ of earlier steps is always kept (the method is sequential).
"""

from __future__ import annotations

import dataclasses

import torch

from editlab.editing.context_templates import ContextTemplates
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.memit import LayerSpreadMethod
from editlab.editing.methods.stages import Spread
from editlab.editing.solve import alphaedit_delta, null_space_key_share, null_space_projection
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import TargetConfig, TargetResult
from editlab.memory import MemoryProfile
from editlab.types import EditRequest


class AlphaEdit(LayerSpreadMethod):
    def __init__(
        self,
        layers: list[int],
        nullspace_threshold: float = 2e-2,
        l2: float = 10.0,
        targets: TargetConfig = TargetConfig(),
        context: ContextTemplates = ContextTemplates(),
        covariance: CovarianceConfig = CovarianceConfig(),
        nullspace_share: float | None = None,
    ) -> None:
        """
        Args:
            layers: edited layers, strictly increasing; z is optimised at the last one.
            nullspace_threshold: eigenvalues of E[kkᵀ] below this span the null space P
                (AlphaEdit: 2e-2).
            l2: the ridge term L2·I of the solve (AlphaEdit: 10).
            targets: z optimisation settings.
            context: context-template generation settings.
            covariance: corpus and settings of E[kkᵀ].
            nullspace_share: None (the released rule) or a share in (0, 1): the null space is then
                the smallest eigenvalues' eigenvectors whose eigenvalues sum to at most this share
                of tr(E[kkᵀ]), so at most this share of the preserved keys' second moment is left
                where the update may move it, whatever C's scale (editlab's option, in neither the
                paper nor the released code); ``nullspace_threshold`` is then not read.
        """
        if nullspace_threshold <= 0 or l2 <= 0:
            raise ValueError(f"options nullspace_threshold={nullspace_threshold}, l2={l2} must be > 0")
        if nullspace_share is not None and not 0.0 < nullspace_share < 1.0:
            raise ValueError(f"option nullspace_share={nullspace_share} must be in (0, 1), or null for the threshold")
        super().__init__(layers, 0.0, targets, context, covariance)
        self.nullspace_threshold = nullspace_threshold
        self.nullspace_share = nullspace_share
        self.l2 = l2
        self.proj: dict[int, torch.Tensor] = {}
        # Per layer, the share of E[kkᵀ]'s trace in the null space (solve.null_space_key_share):
        # fixed with P at setup, reported with every step.
        self.key_shares: dict[int, float] = {}

    def setup(self, ctx: EditContext) -> None:
        super().setup(ctx)
        self.proj = {
            layer: null_space_projection(self.cov[layer], self.nullspace_threshold, self.nullspace_share)
            for layer in self.layers
        }
        for layer, p in self.proj.items():
            if float(p.trace()) < 0.5:
                rule = (
                    f"option nullspace_threshold={self.nullspace_threshold}: no eigenvalue of E[kkᵀ] at layer {layer} "
                    "is below it"
                    if self.nullspace_share is None
                    else f"option nullspace_share={self.nullspace_share}: the smallest eigenvalue of E[kkᵀ] at layer "
                    f"{layer} alone is a larger share of its trace"
                )
                raise ValueError(f"{rule}, so the null space is empty and no edit could be written")
        self.key_shares = {layer: null_space_key_share(self.cov[layer], p) for layer, p in self.proj.items()}

    def memory_profile(self) -> MemoryProfile:
        # C, P and the cache; solve: M, P M, l2·I and A (offloaded: P's device copy too).
        return dataclasses.replace(
            super().memory_profile(), stat_matrices=2 + self.sequential, solve_matrices=4, solve_matrices_offloaded=5
        )

    def layer_delta(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return alphaedit_delta(keys, resid, self.proj[layer], self.cache_c.get(layer), self.l2)

    def null_space_dims(self) -> dict[int, int]:
        return {layer: round(float(p.trace())) for layer, p in self.proj.items()}

    def spread(self, ctx: EditContext, requests: list[EditRequest], tgt: TargetResult) -> Spread:
        """MEMIT's spread with the projected solve, plus each layer's null-space dimension and the
        share of the preserved keys' second moment inside it: the threshold is absolute, so how
        many directions P keeps, and how null they are, depend on C's scale (corpus, token cap,
        model); the step's scalars (steps.jsonl, metrics.csv) record both."""
        out = super().spread(ctx, requests, tgt)
        out.scalars.update({f"nullspace_dim/l{layer}": float(dim) for layer, dim in self.null_space_dims().items()})
        out.scalars.update({f"nullspace_key_share/l{layer}": share for layer, share in self.key_shares.items()})
        return out
