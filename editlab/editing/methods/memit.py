"""MEMIT (Meng et al. 2023), batch and sequential.

Per step: z for every request at the last edited layer L (one padded forward per optimisation
step), then for each edited layer l in order: keys K at l, current outputs H at L,
R = (z − H) / (layers left), ΔW = Rᵀ K (λC + cache + KᵀK)⁻¹ in float64, W_l += ΔW.
Sequential mode keeps cache[l] = Σ K Kᵀ of all earlier steps (MEMIT_seq / AlphaEdit style;
the authors' MEMIT_seq forgot to pass it to the solve).

The step is split into :meth:`MEMIT.compute_targets` (z) and :meth:`MEMIT.spread` (the weight
update given z), shared with AlphaEdit and PMET, which change only one of the two; with ``eac``
the targets come from EAC's two-stage optimisation (editlab.editing.eac).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from editlab.editing.context import ContextTemplates
from editlab.editing.eac import EACConfig, eac_scalars, eac_targets
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods.base import EditContext, KeyValueMethod, restore_on_error
from editlab.editing.solve import memit_delta, preserve_matrix
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import TargetConfig, TargetResult, optimize_targets
from editlab.models.weights import add_delta
from editlab.types import EditRequest, EditResult

LayerSolve = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, K [n, d_ff], R [n, d]) → ΔW
# (ctx, requests, templates, layers, i, z) → keys K [n, d_ff] at layers[i] and residuals R [n, d_model]
ResidualRule = Callable[
    [EditContext, list[EditRequest], list[str], list[int], int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def memit_residual(
    ctx: EditContext, requests: list[EditRequest], templates: list[str], layers: list[int], i: int, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT: keys at layers[i], R = (z − H) / (layers left), H the current output of the last layer."""
    keys, cur = keys_and_outputs(ctx.view, ctx.tok, requests, templates, layers[i], layers[-1])  # [n, d_ff], [n, d]
    return keys, (z.double() - cur) / (len(layers) - i)


def spread_over_layers(
    ctx: EditContext,
    requests: list[EditRequest],
    templates: list[str],
    layers: list[int],
    z: torch.Tensor,
    solve: LayerSolve,
    residual: ResidualRule = memit_residual,
) -> tuple[dict[str, float], dict[int, torch.Tensor]]:
    """MEMIT's spread: for each layer l in order, its keys K_l and residuals R (``residual``, MEMIT's
    rule by default, measured on the weights the earlier layers left), W_l += solve(l, K_l, R).
    Returns per-layer scalars and K_lᵀK_l. Layers already written are put back if a later one fails."""
    view = ctx.view
    scalars: dict[str, float] = {}
    new_kk: dict[int, torch.Tensor] = {}
    with restore_on_error(view, layers):
        for i, layer in enumerate(layers):
            keys, resid = residual(ctx, requests, templates, layers, i, z)  # [n, d_ff], [n, d_model]
            delta = solve(layer, keys, resid)
            add_delta(view.ffn_out(layer), delta)
            new_kk[layer] = keys.T @ keys  # [d_ff, d_ff]
            scalars[f"delta_norm/l{layer}"] = float(delta.norm())
    return scalars, new_kk


def target_scalars(tgt: TargetResult) -> dict[str, float]:
    return {
        "z_loss": float(tgt.loss.mean()),
        "z_nll": float(tgt.nll.mean()),
        "z_steps": float(tgt.steps.float().mean()),
        **eac_scalars(tgt),
    }


class LayerSpreadMethod(KeyValueMethod):
    """The MEMIT-family step: :meth:`compute_targets` (z at the last edited layer), then
    :meth:`spread` (spread_over_layers with this method's :meth:`layer_delta`), then the
    sequential cache. MEMIT, AlphaEdit and PMET differ only in layer_delta or compute_targets."""

    sequential: bool = True
    eac: EACConfig | None = None

    def compute_targets(self, ctx: EditContext, requests: list[EditRequest]) -> TargetResult:
        """z at the last edited layer for every request, on the weights as they are now."""
        z_layer = self.layers[-1]
        if self.eac is not None:
            return eac_targets(
                ctx.view, ctx.tok, requests, self.templates, z_layer, self.targets, self.eac, ctx.progress
            )
        return optimize_targets(ctx.view, ctx.tok, requests, self.templates, z_layer, self.targets, ctx.progress)

    def layer_delta(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """ΔW [d_model, d_ff] of one layer from its keys [n, d_ff] and residuals [n, d_model]."""
        raise NotImplementedError

    def spread(self, ctx: EditContext, requests: list[EditRequest], tgt: TargetResult) -> dict[str, float]:
        """Write z into the edited layers; the sequential cache grows only once all are written."""
        scalars, new_kk = spread_over_layers(ctx, requests, self.templates, self.layers, tgt.z, self.layer_delta)
        if self.sequential:
            self.accumulate(new_kk)
        return scalars

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        t0 = time.perf_counter()
        tgt = self.compute_targets(ctx, requests)
        t1 = time.perf_counter()
        scalars = self.spread(ctx, requests, tgt)
        t2 = time.perf_counter()
        scalars.update({**target_scalars(tgt), "seconds_z": t1 - t0, "seconds_solve": t2 - t1})
        return EditResult(scalars=scalars)


class MEMIT(LayerSpreadMethod):
    def __init__(
        self,
        layers: list[int],
        mom2_weight: float = 15000.0,
        sequential: bool = True,
        targets: TargetConfig = TargetConfig(),
        context: ContextTemplates = ContextTemplates(),
        covariance: CovarianceConfig = CovarianceConfig(),
        eac: EACConfig | None = None,
    ) -> None:
        """
        Args:
            layers: edited layers, strictly increasing; z is optimised at the last one.
            mom2_weight: λ, the weight of the preserved key moment E[kkᵀ] in the solve.
            sequential: accumulate Σ KKᵀ of past steps into the solve (sequential editing).
            targets: z optimisation settings.
            context: context-template generation settings.
            covariance: corpus and settings of E[kkᵀ].
            eac: EAC's anchor compression of z (MEMIT-EAC); targets.steps must then equal
                eac.select_steps + eac.retrain_steps. None: plain z.
        """
        check_eac_steps(targets, eac)
        super().__init__(layers, mom2_weight, targets, context, covariance)
        self.sequential = sequential
        self.eac = eac

    def layer_delta(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        cache = self.cache_c.get(layer) if self.sequential else None
        return memit_delta(keys, resid, preserve_matrix(self.cov[layer], self.mom2_weight, cache))


def check_eac_steps(targets: TargetConfig, eac: EACConfig | None) -> None:
    """With EAC the two stages replace the z steps: their sum must be the configured budget."""
    if eac is not None and targets.steps != eac.total_steps:
        raise ValueError(
            f"option targets.steps={targets.steps} must equal eac.select_steps + eac.retrain_steps "
            f"({eac.select_steps} + {eac.retrain_steps}) when eac is set"
        )
