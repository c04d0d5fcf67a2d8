"""PMET (Li et al., AAAI 2024): optimise the attention and the FFN outputs of the last edited layer
together, write only FFN weights, towards the FFN target.

As the authors' code (xpq-tech/PMET, edit/pmet/compute_zs.py and pmet_main.py):
- z: two offsets at the subject's last token of the last edited layer L, δ_attn on the attention
  block's output and δ_ffn on the FFN output, trained jointly; the FFN target is
  v_i = m_i + δ_ffn,i with m_i the FFN output at L on the bare prompt before the step.
- spread: for each edited layer l in order, keys K_l (as MEMIT) and R = (v − m_now) / √(layers
  left), m_now the FFN output at L on the bare prompt with the weights the earlier layers left —
  residuals in the FFN output's space, scaled by the square root (MEMIT: the residual stream, 1/n).
  ΔW_l = Rᵀ K (λC [+ cache] + KᵀK)⁻¹ (MEMIT's solve).
Differences, on purpose: δ_ffn is added to the layer output, which at that position is the FFN
output plus terms that do not depend on it (same effect, one hook, shared with MEMIT's loop); the
clamp and weight decay act on the concatenated [δ_ffn, δ_attn] relative to the residual norm
‖h‖ (descend_offsets) where the code bounds each relative to its own module output's norm; the
code's trick of lowering the NLL weight when the target is already the argmax is not reproduced.
The code solves without a sequential cache; ``sequential`` (default on) adds it, as for MEMIT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from editlab.editing.context_templates import ContextTemplates
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.memit import MEMIT, targets_in_parts
from editlab.editing.methods.stages import Spread, spread_over_layers
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import EditSite, ExtraRow, TargetConfig, TargetResult, descend_offsets
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.types import EditRequest


@dataclass
class PMETTargets(TargetResult):
    """TargetResult (z = h + δ_ffn in the residual stream) with the FFN-space target."""

    ffn_target: torch.Tensor  # [n, d_model] v = m + δ_ffn, the FFN output to write at layer L
    attn_shift: torch.Tensor  # [n, d_model] δ_attn (optimised, not written)


def attention_site(view: ModelView, layer: int) -> EditSite:
    """PMET's second edit site: the attention block's output of ``layer`` (δ_attn enters there)."""
    return EditSite(view.attn(layer), f"attention of layer {layer}")


@torch.no_grad()
def ffn_outputs(ctx: EditContext, requests: list[EditRequest], layer: int) -> torch.Tensor:
    """The FFN output [n, d_model] at ``layer``, subject's last token of the bare prompt: the
    out-projection applied to its captured input."""
    keys, _ = keys_and_outputs(ctx.view, ctx.tok, requests, ["{}"], layer, layer)  # [n, d_ff]
    module = ctx.view.ffn_out(layer)
    return module(keys.to(module.weight.dtype)).double()


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
            layers: edited layers, strictly increasing; both offsets are optimised at the last one.
            mom2_weight: λ of the solve (PMET's GPT-J setting: 6000).
            sequential: accumulate Σ KKᵀ of past steps into the solve (PMET_seq); the released
                PMET (apply_pmet_to_model) has no such cache: false.
            targets: settings of the joint attention + FFN optimisation.
            context: context-template generation settings.
            covariance: corpus and settings of E[kkᵀ].
        """
        super().__init__(layers, mom2_weight, sequential, targets, context, covariance)

    @property
    def name(self) -> str:
        return "PMET_seq" if self.sequential else "PMET"

    def compute_targets_keeps_parts(self) -> bool:
        return True  # the whole step's targets as one part (its FFN target needs one more forward over them)

    def compute_targets(
        self, ctx: EditContext, requests: list[EditRequest], extra: list[ExtraRow] | None = None
    ) -> PMETTargets:
        """The step's joint FFN + attention offsets on the weights as they are now, through the
        step's parts as one part (named by the weights), so that a journal keeps them."""
        if extra:
            # The joint attention + FFN offsets are not combined with neighbour rows (untested there).
            raise ValueError("PMET does not take extra (neighbour) loss rows")
        label = f"weights {model_fingerprint(ctx.model)}" if ctx.parts is not None else ""
        return targets_in_parts(
            ctx.parts,
            list(range(len(requests))),
            None,  # one part: the offsets of the step's requests are descended together
            lambda idx: self.joint_offsets(ctx, [requests[i] for i in idx]),
            PMETTargets,
            ctx.view.device,
            label,
        )

    def joint_offsets(self, ctx: EditContext, requests: list[EditRequest]) -> PMETTargets:
        """z and the attention shift of ``requests`` (descended together) and their FFN target."""
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
            sites=[attention_site(view, z_layer)],
        )
        ffn_shift, attn_shift = run.delta[:, :d_model], run.delta[:, d_model:]  # [n, d_model] each
        return PMETTargets(
            z=run.h + ffn_shift,
            h=run.h,
            loss=run.loss,
            nll=run.nll,
            steps=run.updates,
            ffn_target=ffn_outputs(ctx, requests, z_layer) + ffn_shift.double(),
            attn_shift=attn_shift,
        )

    def spread(self, ctx: EditContext, requests: list[EditRequest], tgt: TargetResult) -> Spread:
        if not isinstance(tgt, PMETTargets):
            raise TypeError("PMET.spread needs the PMETTargets of PMET.compute_targets (it writes the FFN target)")

        def residual(ctx, requests, templates, layers, i, v):
            with ctx.stopwatch.timing("keys"):  # the key forward and the FFN output's (MEMIT gets both in one)
                keys, _ = keys_and_outputs(
                    ctx.view, ctx.tok, requests, templates, layers[i], layers[i], weighting=self.context.key_weighting
                )  # [n, d_ff]
                now = ffn_outputs(ctx, requests, layers[-1])  # [n, d_model]
            return keys, (v - now) / math.sqrt(len(layers) - i)

        out = spread_over_layers(ctx, requests, self.templates, self.layers, tgt.ffn_target, self.layer_delta, residual)
        out.scalars["pmet/attn_shift_norm"] = float(tgt.attn_shift.norm(dim=1).mean())
        return out
