"""MEMIT (Meng et al. 2023), batch and sequential.

Per step: z for every request at the last edited layer L (one padded forward per optimisation
step), then for each edited layer l in order: keys K at l, current outputs H at L,
R = (z − H) / (layers left), ΔW = Rᵀ K (λC + cache + KᵀK)⁻¹ in float64, W_l += ΔW.
Sequential mode keeps cache[l] = Σ K Kᵀ of all earlier steps (MEMIT_seq / AlphaEdit style;
the authors' MEMIT_seq forgot to pass it to the solve).
"""

from __future__ import annotations

import time

import torch

from editlab.editing.context import ContextTemplates, make_context_templates
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods.base import EditContext, EditMethod, restore_on_error
from editlab.editing.solve import memit_delta, preserve_matrix
from editlab.editing.stats import CovarianceConfig, second_moments
from editlab.editing.targets import TargetConfig, optimize_targets
from editlab.models.weights import add_delta
from editlab.types import EditRequest, EditResult


class MEMIT(EditMethod):
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
            layers: edited layers, strictly increasing; z is optimised at the last one.
            mom2_weight: λ, the weight of the preserved key moment E[kkᵀ] in the solve.
            sequential: accumulate Σ KKᵀ of past steps into the solve (sequential editing).
            targets: z optimisation settings.
            context: context-template generation settings.
            covariance: corpus and settings of E[kkᵀ].
        """
        if mom2_weight < 0:
            raise ValueError(f"option mom2_weight={mom2_weight} must be >= 0")
        self.layers = list(layers)
        self.mom2_weight = mom2_weight
        self.sequential = sequential
        self.targets = targets
        self.context = context
        self.covariance = covariance
        self.cov: dict[int, torch.Tensor] = {}
        self.cache_c: dict[int, torch.Tensor] = {}
        self.templates: list[str] = []

    def setup(self, ctx: EditContext) -> None:
        ctx.view.check_layers(self.layers)
        self.templates = make_context_templates(ctx.model, ctx.tok, self.context, ctx.seed)
        self.cov = second_moments(
            ctx.view, ctx.tok, ctx.model_id, ctx.fingerprint, self.layers, self.covariance, ctx.progress
        )

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        view, tok = ctx.view, ctx.tok
        z_layer = self.layers[-1]
        t0 = time.perf_counter()
        tgt = optimize_targets(view, tok, requests, self.templates, z_layer, self.targets, ctx.progress)
        t1 = time.perf_counter()
        scalars: dict[str, float] = {}
        new_kk: dict[int, torch.Tensor] = {}
        with restore_on_error(view, self.layers):
            for i, layer in enumerate(self.layers):
                keys, cur = keys_and_outputs(view, tok, requests, self.templates, layer, z_layer)  # [n, d_ff], [n, d]
                resid = (tgt.z.double() - cur) / (len(self.layers) - i)  # [n, d_model]: spread over layers left
                cache = self.cache_c.get(layer) if self.sequential else None
                delta = memit_delta(keys, resid, preserve_matrix(self.cov[layer], self.mom2_weight, cache))
                add_delta(view.ffn_out(layer), delta)
                new_kk[layer] = keys.T @ keys  # [d_ff, d_ff]
                scalars[f"delta_norm/l{layer}"] = float(delta.norm())
        if self.sequential:
            for layer, kk in new_kk.items():
                self.cache_c[layer] = self.cache_c.get(layer, torch.zeros_like(kk)) + kk
        t2 = time.perf_counter()
        scalars.update(
            {
                "z_loss": float(tgt.loss.mean()),
                "z_nll": float(tgt.nll.mean()),
                "z_steps": float(tgt.steps.mean()),
                "seconds_z": t1 - t0,
                "seconds_solve": t2 - t1,
            }
        )
        return EditResult(scalars=scalars)

    def state_dict(self) -> dict:
        return {"cache_c": {str(k): v.cpu() for k, v in self.cache_c.items()}, "templates": list(self.templates)}

    def load_state_dict(self, state: dict) -> None:
        self.cache_c = {int(k): v for k, v in state["cache_c"].items()}
        self.templates = list(state["templates"])
