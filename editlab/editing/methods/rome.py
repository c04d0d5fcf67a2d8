"""ROME (Meng et al. 2022): one layer, a rank-one closed-form update per fact.

Per request, in order (a step's requests are applied one at a time, as the reference does, each
on the weights the previous one left): z at the edited layer l (the residual after layer l at the
subject's last token, which is the FFN output plus a constant there), the key k* averaged over
the context templates, r = z − h (h: the current output of layer l on the bare prompt), and
ΔW = r (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀk*), which makes W' k* = W k* + r exactly (solve.rome_delta);
C = I with ``mom2_adjustment`` false (ROME's Llama3-8B setting), and then no covariance is made.

As rome/compute_v.py, z's clamp radius and weight decay are relative to the norm of the output
ROME edits, the FFN output at the bare prompt's subject token (``norm_of`` "ffn_output";
"residual" is MEMIT's rule, editlab's earlier ROME). Difference from the reference, on purpose:
k* and r use the same averaged key (ROME's code takes r from the bare prompt's key).
With ``eac``, z comes from EAC's two-stage optimisation (ROME-EAC), stage 2 started from δ₁ as
the authors' ROME code does.
"""

from __future__ import annotations

import time
from typing import Literal

from editlab.editing.context_templates import ContextTemplates, make_context_templates
from editlab.editing.eac import EACConfig, EACTargetResult, eac_targets
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods.base import EditContext, KeyValueMethod, restore_on_error
from editlab.editing.methods.memit import check_eac_steps, target_scalars, targets_in_parts
from editlab.editing.methods.stages import Spread, StagedMethod
from editlab.editing.neighbours import neighbour_terms
from editlab.editing.solve import rome_delta
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import ExtraRow, TargetConfig, TargetResult, optimize_targets
from editlab.models.fingerprint import model_fingerprint
from editlab.models.weights import add_delta, read_weight
from editlab.types import EditRequest, EditResult


class ROME(KeyValueMethod, StagedMethod):
    def __init__(
        self,
        layer: int,
        targets: TargetConfig = TargetConfig(lr=0.5, steps=20, clamp_norm_factor=4.0),
        context: ContextTemplates = ContextTemplates(count=20, length=10, key_weighting="flat"),
        covariance: CovarianceConfig = CovarianceConfig(),
        eac: EACConfig | None = None,
        norm_of: Literal["ffn_output", "residual"] = "ffn_output",
        mom2_adjustment: bool = True,
    ) -> None:
        """
        Args:
            layer: the edited layer (GPT2-XL: 17, GPT-J: 5, Llama3-8B: 5).
            targets: z optimisation settings (ROME: lr 0.5, 20 steps, clamp 4).
            context: context templates keys and z are averaged over (ROME: 20 prefixes; its
                compute_u takes the flat mean of the key over "{}" and the prefixes, hence
                key_weighting "flat").
            covariance: corpus and settings of C = E[kkᵀ] (ROME has no λ: its update is
                invariant to the scale of C).
            eac: EAC's anchor compression of z (ROME-EAC); targets.steps must then equal
                eac.select_steps + eac.retrain_steps. None: plain ROME.
            norm_of: the vector whose norm scales z's clamp radius (targets.clamp_norm_factor ·
                ‖·‖) and weight decay (‖δ‖/‖·‖²): "ffn_output", the FFN output ROME edits, at the
                bare prompt's subject token (rome/compute_v.py); "residual", the layer's output
                there (MEMIT's rule; editlab's earlier ROME).
            mom2_adjustment: solve with C = E[kkᵀ] (ROME's default); False takes C = I, ΔW =
                r k*ᵀ / (k*ᵀk*), and computes no covariance (ROME's Llama3-8B hparams).
        """
        check_eac_steps(targets, eac)
        if norm_of not in ("ffn_output", "residual"):
            raise ValueError(f"option norm_of={norm_of!r} must be 'ffn_output' or 'residual'")
        super().__init__([layer], 0.0, targets, context, covariance)
        self.layer = layer
        self.eac = eac
        self.norm_of = norm_of
        self.mom2_adjustment = mom2_adjustment

    @property
    def name(self) -> str:
        return "ROME-EAC" if self.eac is not None else "ROME"

    def covariance_statistics(self):
        return super().covariance_statistics() if self.mom2_adjustment else None

    def setup(self, ctx: EditContext) -> None:
        """Templates, and C only when the solve uses it (mom2_adjustment)."""
        if self.mom2_adjustment:
            super().setup(ctx)
            return
        ctx.view.check_layers(self.layers)
        self.templates = make_context_templates(ctx.model, ctx.tok, self.context, ctx.seed)

    def norm_ref(self, ctx: EditContext):
        """descend_offsets' ``norm_ref`` for ``norm_of``: the FFN out-projection (its output is the
        FFN's; GPT-2's dropout after it is off in eval), or None for the residual."""
        if self.norm_of == "residual":
            return None
        return (ctx.view.ffn_out(self.layer), ctx.view.ffn_out_name(self.layer))

    def compute_targets(
        self, ctx: EditContext, requests: list[EditRequest], extra: list[ExtraRow] | None = None
    ) -> TargetResult:
        """z of each request at the edited layer on the current weights (writes nothing);
        ``extra``: neighbour rows of the z loss (seed 004)."""
        if self.eac is not None and extra:
            raise ValueError("ROME with eac does not take extra (neighbour) loss rows")
        ref = self.norm_ref(ctx)
        if self.eac is not None:
            return eac_targets(
                ctx.view,
                ctx.tok,
                requests,
                self.templates,
                self.layer,
                self.targets,
                self.eac,
                ctx.progress,
                start=self.eac.start("stage1"),  # the authors' ROME: stage 2 from m ⊙ δ₁
                norm_ref=ref,
            )
        return optimize_targets(
            ctx.view,
            ctx.tok,
            requests,
            self.templates,
            self.layer,
            self.targets,
            ctx.progress,
            terms=neighbour_terms(extra),
            norm_ref=ref,
        )

    def z_in_step_parts(self) -> bool:
        return True  # apply takes each request's z through request_targets (compute_targets does not)

    def request_targets(self, ctx: EditContext, index: int, request: EditRequest) -> TargetResult:
        """z of the step's request ``index`` on the weights as they are now, through the step's
        parts when it has them (named by the request and the weights: the requests before it in
        the step have changed them), so a step killed part-way, or a run replaying a journal,
        takes the z it had finished instead of optimising them again."""
        if ctx.parts is None:
            return self.compute_targets(ctx, [request])
        kind = EACTargetResult if self.eac is not None else TargetResult
        label = f"request {index} of the step, weights {model_fingerprint(ctx.model)}"
        return targets_in_parts(
            ctx.parts, [0], None, lambda _: self.compute_targets(ctx, [request]), kind, ctx.view.device, label
        )

    def spread(self, ctx: EditContext, requests: list[EditRequest], tgt: TargetResult) -> Spread:
        """One rank-one update per request, in order, each on the weights the previous left."""
        view = ctx.view
        before = read_weight(view.ffn_out(self.layer)).detach().double().clone()
        weighting = self.context.key_weighting
        with restore_on_error(view, [self.layer]):
            for i, req in enumerate(requests):
                with ctx.stopwatch.timing("keys"):
                    key, cur = keys_and_outputs(
                        view, ctx.tok, [req], self.templates, self.layer, self.layer, weighting=weighting
                    )  # [1, d_ff], [1, d]
                cov = self.cov[self.layer] if self.mom2_adjustment else None  # None: C = I
                delta = rome_delta(key[0], tgt.z[i].double() - cur[0], cov)  # [d_model, d_ff]
                add_delta(view.ffn_out(self.layer), delta)
        change = read_weight(view.ffn_out(self.layer)).detach().double() - before
        return Spread(scalars={f"delta_norm/l{self.layer}": float(change.norm())})  # no sequential state

    def commit(self, spread: Spread) -> None:
        """ROME keeps no state across steps (its update uses C alone)."""

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        """Each request's z is optimised on the weights the previous request left (the reference's
        order), so the step is a loop of compute_targets + spread over single requests."""
        t_z = t_solve = 0.0
        keys_before = ctx.stopwatch.read("keys")
        results: list[TargetResult] = []
        before = read_weight(ctx.view.ffn_out(self.layer)).detach().double().clone()
        with restore_on_error(ctx.view, [self.layer]):
            for i, req in enumerate(requests):
                t0 = time.perf_counter()
                tgt = self.request_targets(ctx, i, req)
                t1 = time.perf_counter()
                self.spread(ctx, [req], tgt)
                t_z, t_solve = t_z + t1 - t0, t_solve + time.perf_counter() - t1
                results.append(tgt)
        t_keys = ctx.stopwatch.read("keys") - keys_before  # the spreads' key forwards, out of t_solve
        change = read_weight(ctx.view.ffn_out(self.layer)).detach().double() - before
        per_request = [target_scalars(r) for r in results]
        scalars = {name: sum(s[name] for s in per_request) / len(per_request) for name in per_request[0]}
        scalars.update(
            {
                f"delta_norm/l{self.layer}": float(change.norm()),
                "seconds_z": t_z,
                "seconds_keys": t_keys,
                "seconds_solve": t_solve - t_keys,
            }
        )
        return EditResult(scalars=scalars)
