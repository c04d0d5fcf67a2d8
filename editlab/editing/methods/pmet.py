"""PMET (Li et al., AAAI 2024): optimise the attention and the FFN parts of the last edited layer
together, write only the FFN part.

z optimisation adds two offsets at the subject's last token of the last edited layer L: δ_attn to
the attention block's output and δ_ffn to the layer's output (after the FFN, the FFN output's
place on the residual stream), trained jointly with MEMIT's loss (descend_offsets' extra site; the
clamp and weight decay act on the concatenated [δ_ffn, δ_attn]). The FFN weights are then written
with MEMIT's spread towards z_ffn = h + δ_ffn alone: the attention offset soaks up what the FFN
need not encode, and is discarded (PMET edits no attention weight).
"""

from __future__ import annotations

import torch

from editlab.editing.context import ContextTemplates
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.memit import MEMIT
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import TargetConfig, TargetResult, descend_offsets
from editlab.types import EditRequest


class PMET(MEMIT):
    def __init__(
        self,
        layers: list[int],
        mom2_weight: float = 15000.0,
        sequential: bool = True,
        targets: TargetConfig = TargetConfig(),
        context: ContextTemplates = ContextTemplates(),
        covariance: CovarianceConfig = CovarianceConfig(),
    ) -> None:
        """
        Args:
            layers: edited layers, strictly increasing; both targets are optimised at the last one.
            mom2_weight: λ of the solve, as MEMIT's.
            sequential: accumulate Σ KKᵀ of past steps into the solve.
            targets: settings of the joint attention + FFN optimisation.
            context: context-template generation settings.
            covariance: corpus and settings of E[kkᵀ].
        """
        super().__init__(layers, mom2_weight, sequential, targets, context, covariance)
        self.last_attn_shift: torch.Tensor | None = None  # [n, d_model] δ_attn of the last step

    def compute_targets(self, ctx: EditContext, requests: list[EditRequest]) -> TargetResult:
        """The FFN target z_ffn = h + δ_ffn of a joint (δ_ffn, δ_attn) optimisation."""
        view, z_layer = ctx.view, self.layers[-1]
        d_model = view.model.config.hidden_size
        run = descend_offsets(
            view,
            ctx.tok,
            requests,
            self.templates,
            z_layer,
            self.targets,
            self.targets.steps,
            progress=ctx.progress,
            desc="z PMET",
            extra_sites=[(view.attn(z_layer), f"attention of layer {z_layer}")],
        )
        self.last_attn_shift = run.delta[:, d_model:]
        return TargetResult(z=run.h + run.delta[:, :d_model], h=run.h, loss=run.loss, nll=run.nll, steps=run.updates)
