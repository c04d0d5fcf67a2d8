"""MEMIT (Meng et al. 2023), batch and sequential.

Per step: z for every request at the last edited layer L (one padded forward per optimisation
step), then for each edited layer l in order: keys K at l, current outputs H at L,
R = (z − H) / (layers left), ΔW = Rᵀ K (λC + cache + KᵀK)⁻¹ in float64, W_l += ΔW.
Sequential mode keeps cache[l] = Σ K Kᵀ of all earlier steps (MEMIT_seq / AlphaEdit style;
the authors' MEMIT_seq forgot to pass it to the solve).

The step is split into :meth:`MEMIT.compute_targets` (OPTIMIZATION: z), :meth:`MEMIT.spread`
(SPREAD: the weight update given z) and :meth:`MEMIT.commit` (the sequential cache), shared with
AlphaEdit and PMET, which change only one of the parts; the iterative wrapper
(methods/iterative.py, seed 004) repeats the first two. With ``eac`` the targets come from EAC's
two-stage optimisation (editlab.editing.eac). Keys and z are shared over the ranks of a
multi-process run (EditContext.per_request).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from editlab.editing.context_templates import ContextTemplates
from editlab.editing.eac import EACConfig, eac_scalars, eac_targets
from editlab.editing.methods.base import EditContext, KeyValueMethod
from editlab.editing.methods.stages import Spread, StagedMethod, memit_residual, spread_over_layers
from editlab.editing.neighbours import neighbour_terms
from editlab.editing.solve import memit_delta, preserve_matrix
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import ExtraRow, TargetConfig, TargetResult, optimize_targets
from editlab.errors import check_step_sum
from editlab.memory import MemoryProfile
from editlab.types import EditRequest, EditResult


def target_scalars(tgt: TargetResult) -> dict[str, float]:
    return {
        "z_loss": float(tgt.loss.mean()),
        "z_nll": float(tgt.nll.mean()),
        "z_steps": float(tgt.steps.float().mean()),
        **eac_scalars(tgt),
    }


class LayerSpreadMethod(KeyValueMethod, StagedMethod):
    """The MEMIT-family step: :meth:`compute_targets` (z at the last edited layer), then
    :meth:`spread` (spread_over_layers with this method's :meth:`layer_delta`), then :meth:`commit`
    (the sequential cache): the stages of methods/stages.py. MEMIT, AlphaEdit and PMET differ only
    in layer_delta or compute_targets."""

    sequential: bool = True
    eac: EACConfig | None = None

    def memory_profile(self) -> MemoryProfile:
        # C, and the sequential cache Σ KKᵀ when sequential; solve: λC + cache, KᵀK and A.
        return dataclasses.replace(super().memory_profile(), stat_matrices=1 + self.sequential)

    def compute_targets(
        self, ctx: EditContext, requests: list[EditRequest], extra: list[ExtraRow] | None = None
    ) -> TargetResult:
        """OPTIMIZATION: z at the last edited layer on the weights as they are now (writes nothing).
        ``extra``: neighbour rows of the z loss (seed 004). The requests are shared over ranks,
        each share with the extra rows of its own requests."""
        z_layer = self.layers[-1]
        if self.eac is not None and extra:
            raise ValueError(f"{type(self).__name__} with eac does not take extra (neighbour) loss rows")

        def share(idx: list[int]) -> TargetResult:
            reqs = [requests[g] for g in idx]
            if self.eac is not None:
                return eac_targets(
                    ctx.view,
                    ctx.tok,
                    reqs,
                    self.templates,
                    z_layer,
                    self.targets,
                    self.eac,
                    ctx.progress,
                    start=self.eac.start("zero"),  # the authors' MEMIT-EAC: stage 2 from zero
                )
            pos = {g: i for i, g in enumerate(idx)}
            mine = [dataclasses.replace(e, owner=pos[e.owner]) for e in extra or [] if e.owner in pos]
            return optimize_targets(
                ctx.view, ctx.tok, reqs, self.templates, z_layer, self.targets, ctx.progress, neighbour_terms(mine)
            )

        return ctx.per_index(len(requests), share)

    def layer_delta(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """ΔW [d_model, d_ff] of one layer from its keys [n, d_ff] and residuals [n, d_model]."""
        raise NotImplementedError

    def spread(self, ctx: EditContext, requests: list[EditRequest], tgt: TargetResult) -> Spread:
        """SPREAD: write z into the edited layers; the step's KKᵀ waits in ``pending`` for commit."""
        residual = partial(memit_residual, weighting=self.context.key_weighting)
        return spread_over_layers(ctx, requests, self.templates, self.layers, tgt.z, self.layer_delta, residual)

    def commit(self, spread: Spread) -> None:
        """Sequential mode: cache[l] += K Kᵀ once the step is final."""
        if self.sequential:
            self.accumulate(spread.pending)

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        step = self.run_stages(ctx, requests)
        scalars = {
            **step.spread.scalars,
            **target_scalars(step.targets),
            "seconds_z": step.seconds_targets,
            "seconds_solve": step.seconds_spread,
            "seconds_keys": step.seconds_keys,
        }
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
            sequential: accumulate Σ KKᵀ of past steps into the solve (MEMIT_seq). False is
                the seeds' MEMIT (plain apply_memit_to_model, no cache).
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

    @property
    def name(self) -> str:
        """MEMIT, MEMIT_seq (with the sequential cache), MEMIT-EAC (and MEMIT-EAC_seq)."""
        base = "MEMIT-EAC" if self.eac is not None else "MEMIT"
        return f"{base}_seq" if self.sequential else base

    def layer_delta(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        cache = self.cache_c.get(layer) if self.sequential else None
        return memit_delta(keys, resid, preserve_matrix(self.cov[layer], self.mom2_weight, cache))


def check_eac_steps(targets: TargetConfig, eac: EACConfig | None) -> None:
    """With EAC the two stages replace the z steps: their sum must be the configured budget."""
    if eac is not None:
        parts = {"eac.select_steps": eac.select_steps, "eac.retrain_steps": eac.retrain_steps}
        check_step_sum("targets.steps", targets.steps, parts, "when eac is set")
