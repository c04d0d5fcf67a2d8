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
import hashlib
import json
from collections.abc import Callable
from functools import partial

import torch

from editlab.distributed import assemble_rows
from editlab.editing.context_templates import ContextTemplates
from editlab.editing.eac import EACConfig, EACTargetResult, eac_scalars, eac_targets
from editlab.editing.methods.base import EditContext, KeyValueMethod
from editlab.editing.methods.stages import Spread, StagedMethod, memit_residual, spread_over_layers
from editlab.editing.neighbours import neighbour_terms
from editlab.editing.solve import memit_delta, preserve_matrix
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import ExtraRow, TargetConfig, TargetResult, optimize_targets
from editlab.errors import check_step_sum
from editlab.memory import MemoryProfile
from editlab.models.fingerprint import model_fingerprint
from editlab.types import EditRequest, EditResult, Parts, through_parts


def target_scalars(tgt: TargetResult) -> dict[str, float]:
    return {
        "z_loss": float(tgt.loss.mean()),
        "z_nll": float(tgt.nll.mean()),
        "z_steps": float(tgt.steps.float().mean()),
        **eac_scalars(tgt),
    }


def targets_in_parts(
    parts: Parts | None,
    idx: list[int],
    size: int | None,
    compute: Callable[[list[int]], TargetResult],
    kind: type[TargetResult],
    device: torch.device,
    label: str = "",
) -> TargetResult:
    """``compute(idx)``, the z of the step's requests ``idx``, through the step's ``parts``: chunk by
    chunk (``size`` requests, ``targets.requests_per_forward``; None: one chunk), each kept as it is
    done and taken from ``parts`` when an interrupted sitting had finished it. The chunks are the
    forwards descend_offsets makes anyway and each request's z depends on its own rows only (EAC's
    saliency and anchors are per row too), so the result is the one of ``compute(idx)``, bit for bit.
    ``kind``: the result's dataclass, rebuilt from the kept fields; ``label``: what else the z
    depend on (the weights, the extra rows), in each part's name."""
    if parts is None:
        return compute(idx)
    size = size or len(idx)
    bounds = [(start, min(start + size, len(idx))) for start in range(0, len(idx), size)]
    chunks = []
    for start, stop in bounds:
        sub = idx[start:stop]
        name = f"z of requests {sub[0]}-{sub[-1]}, {label}"
        kept = through_parts(parts, name, lambda sub=sub: tensors_of(compute(sub)))
        chunks.append(kind(**{field: value.to(device) for field, value in kept.items()}))
    return assemble_rows(chunks, [list(range(start, stop)) for start, stop in bounds], len(idx))


def extra_digest(extra: list[ExtraRow] | None) -> str:
    """A short digest of the extra (neighbour) rows of a z computation, "none" without any."""
    if not extra:
        return "none"
    blob = json.dumps([dataclasses.asdict(e) for e in extra], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tensors_of(result: TargetResult) -> dict[str, torch.Tensor]:
    """The fields of a targets dataclass, on the CPU (what a parts file keeps)."""
    return {f.name: getattr(result, f.name).detach().cpu() for f in dataclasses.fields(result)}


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

        kind = EACTargetResult if self.eac is not None else TargetResult
        size = self.targets.requests_per_forward
        # The iterative wrapper asks for z again on the weights its spread left: the parts' names
        # carry the weights and the extra rows, so each call finds only its own.
        label = f"weights {model_fingerprint(ctx.model)}, extra rows {extra_digest(extra)}" if ctx.parts else ""

        def through(idx: list[int]) -> TargetResult:
            return targets_in_parts(ctx.parts, idx, size, share, kind, ctx.view.device, label)

        return ctx.per_index(len(requests), through)

    def compute_targets_keeps_parts(self) -> bool:
        return True  # through targets_in_parts

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
