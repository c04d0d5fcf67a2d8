"""MEMIT (Meng et al. 2023), batch and sequential.

Per step: z for every request at the last edited layer L (one padded forward per optimisation
step), then for each edited layer l in order: keys K at l, current outputs H at L,
R = (z − H) / (layers left), ΔW = Rᵀ K (λC + cache + KᵀK)⁻¹ in float64, W_l += ΔW.
Sequential mode keeps cache[l] = Σ K Kᵀ of all earlier steps (MEMIT_seq / AlphaEdit style;
the authors' MEMIT_seq forgot to pass it to the solve).

The step is split into ``compute_targets`` (OPTIMIZATION) and ``spread`` + ``commit`` (SPREAD),
the parts the iterative wrapper (methods/iterative.py, seed 004) repeats; ``apply`` runs them once.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

from editlab.editing.context import ContextTemplates
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods.base import EditContext, KeyValueMethod, restore_on_error
from editlab.editing.methods.stages import Spread
from editlab.editing.solve import memit_delta, preserve_matrix
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import ExtraRow, TargetConfig, TargetResult, optimize_targets
from editlab.models.weights import add_delta
from editlab.types import EditRequest, EditResult


class MEMIT(KeyValueMethod):
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
        super().__init__(layers, mom2_weight, targets, context, covariance)
        self.sequential = sequential

    def compute_targets(
        self, ctx: EditContext, requests: list[EditRequest], extra: list[ExtraRow] | None = None
    ) -> TargetResult:
        """OPTIMIZATION: z at the last edited layer on the current weights (writes nothing). The
        requests are shared over ranks, each share with the extra rows of its own requests."""

        def share(idx: list[int]) -> TargetResult:
            pos = {g: i for i, g in enumerate(idx)}
            mine = [dataclasses.replace(e, owner=pos[e.owner]) for e in extra or [] if e.owner in pos]
            reqs = [requests[g] for g in idx]
            z_layer = self.layers[-1]
            return optimize_targets(
                ctx.view, ctx.tok, reqs, self.templates, z_layer, self.targets, ctx.progress, extra=mine or None
            )

        return ctx.per_index(len(requests), share)

    def spread(self, ctx: EditContext, requests: list[EditRequest], targets: TargetResult) -> Spread:
        """SPREAD: for each edited layer in order, keys, R = (z − h_L)/(layers left), ΔW, W_l += ΔW.
        The step's KKᵀ is returned in ``pending`` for :meth:`commit`."""
        view, tok = ctx.view, ctx.tok
        z_layer = self.layers[-1]
        out = Spread()
        with restore_on_error(view, self.layers):
            for i, layer in enumerate(self.layers):
                keys, cur = ctx.per_request(
                    requests,
                    partial(keys_and_outputs, view, tok, templates=self.templates, key_layer=layer, out_layer=z_layer),
                )  # [n, d_ff], [n, d_model]: rows shared over ranks, gathered
                resid = (targets.z.double() - cur) / (len(self.layers) - i)  # [n, d_model]: spread over layers left
                cache = self.cache_c.get(layer) if self.sequential else None
                delta = memit_delta(keys, resid, preserve_matrix(self.cov[layer], self.mom2_weight, cache))
                add_delta(view.ffn_out(layer), delta)
                out.pending[layer] = keys.T @ keys  # [d_ff, d_ff]
                out.scalars[f"delta_norm/l{layer}"] = float(delta.norm())
        return out

    def commit(self, spread: Spread) -> None:
        """Sequential mode: cache[l] += K Kᵀ once the step is final."""
        if self.sequential:
            self.accumulate(spread.pending)

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        t0 = time.perf_counter()
        tgt = self.compute_targets(ctx, requests)
        t1 = time.perf_counter()
        spread = self.spread(ctx, requests, tgt)
        self.commit(spread)
        t2 = time.perf_counter()
        scalars = dict(spread.scalars)
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
