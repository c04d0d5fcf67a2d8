"""ECE — Explainable and effiCient Editing (Zhang et al., WWW 2025), sequential batch editing.

Two variants (``z_mode``), named in summary.json by :attr:`ECE.name`:
  "per_request" (default, "ECE") — ECE as released (tianyuzhangterry/ECE WI_main.py / AS_main.py /
      RS_main.py): every request's own z with all targets.steps; no clustering (n_clusters is
      commented out in the authors' hparams);
  "two_step" ("ECE-two-step") — the paper's clustering and two-step z (section 3.2.2).

One step, in order:
  1. keys K_l [n, d_ff] at every edited layer l (FFN activations at the subject's last token,
     averaged over the context templates), on the weights as this step finds them;
  2. attribution (AS / WI / RS, eq. 5–7) per layer, scores summed over the batch, neuron set I_l by
     the threshold rule (eq. 8);
  3. two_step only: each request's own neuron set (same rule on its own scores) over *all* edited
     layers, as (layer, neuron) pairs: the paper clusters a request by "its set of identified
     neurons", which span every edited layer; pairs keep neuron j of layer 4 apart from neuron j of
     layer 8; k-medoids under Jaccard distance (eq. 9) and one anchor per cluster (eq. 10);
  4. z at the last edited layer L on the ORIGINAL weights θ₀ (``rewind``; appendix C.4: "we
     utilize the original model weights during the calculation of z_i"; see
     editlab/editing/rewind.py), from the z cache where present: per request, or two_step's
     shared shift per cluster optimised on its anchor, then per-request refinements (eq. 11–13),
     both phases on θ₀;
  5. for each edited layer in order: keys, CURRENT outputs at L, R = (z − h_L)/(layers left) as
     MEMIT, ΔW zero outside I_l's columns (eq. 14/19) with P = λC + Σ past KKᵀ, W_l += ΔW;
  6. cache_c[l] += K_l K_lᵀ (full d_ff), so this step's keys are preserved by later steps.
The clusters come from the keys of step 1 (the current weights), as the paper's stage order has it.
As a StagedMethod (methods/stages.py): compute_targets is steps 1-4, spread step 5 (the MEMIT-family
loop with the neuron-restricted solve), commit step 6, so IterativeEditing can wrap ECE.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

from editlab.editing.cluster import Clustering, ClusterTargetResult, cluster_sets
from editlab.editing.context_templates import ContextTemplates
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.rewinding import RewindingMethod
from editlab.editing.methods.stages import (
    MethodTargets,
    Spread,
    StagedMethod,
    layer_keys,
    layer_residual,
    layers_keys,
    spread_over_layers,
)
from editlab.editing.neurons import ActivationScore, NeuronAttribution, WeightImportance
from editlab.editing.rewind import (
    rewound_cluster_targets,
)
from editlab.editing.solve import submatrix_delta
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import ExtraRow, TargetConfig, TargetResult
from editlab.errors import check_step_sum
from editlab.models.weights import read_weight
from editlab.types import EditRequest, EditResult

ZMode = Literal["per_request", "two_step"]
INSTANCE_STEPS = 5  # the paper's per-instance phase (section 3.2.2: 20 + 5 of 25)


@dataclass
class NeuronPlan:
    """Stages 1-3 of one step (see :meth:`ECE.locate`); the clustering fields are None per request."""

    first_pass: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer → keys [n, d_ff], outputs at L [n, d]
    selected: dict[int, torch.Tensor]  # layer → the step's neuron indices I_l [m_l]
    sets: list[torch.Tensor] | None  # each request's own (layer, neuron) ids, layer j's neuron k as j·d_ff + k
    clustering: Clustering | None
    cluster_attribution: str | None  # class name of the attribution the sets came from
    seconds_attribution: float
    seconds_cluster: float


@dataclass
class ECETargets(MethodTargets):
    """ECE's OPTIMIZATION (steps 1-4): z at the last edited layer (``result``, a
    ClusterTargetResult with two_step), the neuron plan of :meth:`ECE.locate`, and which rows came
    from the z cache."""

    plan: NeuronPlan
    cached: torch.Tensor | None = None  # bool [n]; None: z not from ECE's own z stage (benchmarks)
    seconds_z: float = 0.0


def two_step_split(steps: int, shared_steps: int | None, instance_steps: int | None) -> tuple[int, int]:
    """(shared, instance) rounds of the two-step z from the options; None fills in the paper's
    split: 5 per-instance rounds and the shared phase gets the rest of targets.steps."""
    instance = INSTANCE_STEPS if instance_steps is None else instance_steps
    shared = steps - instance if shared_steps is None else shared_steps
    if shared < 0 or instance < 0 or shared + instance < 1:
        raise ValueError(f"options shared_steps={shared}, instance_steps={instance} must be >= 0 with a positive sum")
    check_step_sum("targets.steps", steps, {"shared_steps": shared, "instance_steps": instance})
    return shared, instance


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


class ECE(RewindingMethod, StagedMethod):
    def __init__(
        self,
        layers: list[int],
        mom2_weight: float = 15000.0,
        neurons: NeuronAttribution = WeightImportance(threshold=0.8, rule="within"),
        z_mode: ZMode = "per_request",
        rewind: bool = True,
        z_cache: bool | str = True,
        cluster_neurons: NeuronAttribution | None = None,
        clusters: int | None = None,
        shared_steps: int | None = None,
        instance_steps: int | None = None,
        targets: TargetConfig = TargetConfig(),
        context: ContextTemplates = ContextTemplates(),
        covariance: CovarianceConfig = CovarianceConfig(),
    ) -> None:
        """
        Args:
            layers: edited layers, strictly increasing; z is optimised at the last one.
            mom2_weight: λ, the weight of the preserved key moment E[kkᵀ] in the solve.
            neurons: the attribution stage (ActivationScore, WeightImportance, ResidualSensitivity)
                and its threshold p; selects the updated neurons of every layer (eq. 5–8).
                Default: WI, p = 0.8 with the released selection rule ("within").
            z_mode: "per_request", ECE as released (each request's own z with all targets.steps,
                no clustering); "two_step", the paper's clustering and shared + per-instance z.
            rewind: compute z on the original weights θ₀ (appendix C.4; both phases with
                two_step); False: on the current weights.
            z_cache: keep the z computed on θ₀ on disk as well as in memory (key: every z setting,
                and with two_step the split and the request's cluster and anchor): True under the
                cache root, a directory path in that directory (a z bank a study commits, so that
                its z outlive the machine), False in memory only.
            cluster_neurons: two_step only. The attribution whose per-request neuron sets are
                clustered. None: ``neurons`` when it depends on the request; WeightImportance does
                not (every request would get the same set and the clustering nothing to go on), so
                with WI the sets come from ActivationScore with the same threshold and rule.
            clusters: two_step only. Number of clusters k (capped at the batch size); None:
                ceil(sqrt(n / 2)).
            shared_steps: two_step only. Phase-1 forward+update rounds of each cluster's shared
                shift (paper: 20); None: targets.steps − instance_steps.
            instance_steps: two_step only. Phase-2 forwards of the per-request refinement (paper:
                5); None: 5.
            targets: z optimisation settings; with two_step targets.steps must equal
                shared_steps + instance_steps (the per-instance budget the two phases replace).
            context: context-template generation settings.
            covariance: corpus and settings of E[kkᵀ].
        """
        if z_mode not in ("per_request", "two_step"):
            raise ValueError(f"option z_mode={z_mode!r} must be 'per_request' or 'two_step'")
        if z_mode == "per_request":
            two_step_options = {
                "cluster_neurons": cluster_neurons,
                "clusters": clusters,
                "shared_steps": shared_steps,
                "instance_steps": instance_steps,
            }
            for option, value in two_step_options.items():
                if value is not None:
                    raise ValueError(f"option {option}={value!r} is only read with z_mode='two_step'")
            split = (0, targets.steps)  # every round per instance
        else:
            split = two_step_split(targets.steps, shared_steps, instance_steps)
        if clusters is not None and clusters < 1:
            raise ValueError(f"option clusters={clusters} must be >= 1 (or null for automatic)")
        if cluster_neurons is not None and not cluster_neurons.request_dependent:
            raise ValueError(
                f"option cluster_neurons={cluster_neurons!r} does not depend on the request: every request "
                "would get the same neuron set"
            )
        super().__init__(layers, mom2_weight, neurons, rewind, z_cache, targets, context, covariance)
        self.z_mode = z_mode
        self.cluster_neurons = cluster_neurons
        self.clusters = clusters
        self.shared_steps, self.instance_steps = split

    @property
    def name(self) -> str:
        """ECE (as released: per-request z) or ECE-two-step (the paper's clustering variant)."""
        return "ECE" if self.z_mode == "per_request" else "ECE-two-step"

    def clustering_attribution(self) -> NeuronAttribution:
        if self.cluster_neurons is not None:
            return self.cluster_neurons
        if self.neurons.request_dependent:
            return self.neurons
        return ActivationScore(threshold=self.neurons.threshold, rule=self.neurons.rule)

    def locate(self, ctx: EditContext, requests: list[EditRequest]) -> NeuronPlan:
        """Steps 1-3: keys, batch neuron selection per layer, and with two_step the per-request
        sets, clusters and anchors. Reads the model, writes nothing (the benchmark calls it on its own)."""
        view = ctx.view
        n = len(requests)
        two_step = self.z_mode == "two_step"
        t0 = time.perf_counter()
        first_pass: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        selected: dict[int, torch.Tensor] = {}
        own_sets: list[list[torch.Tensor]] = [[] for _ in range(n)]
        cluster_attr = self.clustering_attribution()
        d_ff = 0
        # Nothing is written yet: every layer's keys come from one forward on the current weights.
        all_keys, cur = layers_keys(
            ctx, requests, self.templates, self.layers, self.layers[-1], self.context.key_weighting
        )  # [n, d_ff] per layer, [n, d_model]
        for j, (layer, keys) in enumerate(zip(self.layers, all_keys, strict=True)):
            first_pass[layer] = (keys, cur)
            w_out = read_weight(view.ffn_out(layer))  # [d_model, d_ff]
            d_ff = keys.shape[1]
            selected[layer] = self.neurons.select_batch(keys, w_out)  # [m_l]
            for i, own in enumerate(cluster_attr.select_each(keys, w_out) if two_step else []):
                own_sets[i].append(own + j * d_ff)  # offset: neuron ids of layer j live in [j·d_ff, (j+1)·d_ff)
        t1 = time.perf_counter()
        if not two_step:
            return NeuronPlan(first_pass, selected, None, None, None, t1 - t0, 0.0)
        sets = [torch.cat(parts) for parts in own_sets]
        clu = cluster_sets(sets, self.clusters, ctx.seed, universe=len(self.layers) * d_ff)
        t2 = time.perf_counter()
        return NeuronPlan(first_pass, selected, sets, clu, type(cluster_attr).__name__, t1 - t0, t2 - t1)

    def keys_and_outputs(self, ctx: EditContext, requests: list[EditRequest], layer: int):
        """Keys at ``layer`` [n, d_ff] and outputs of the z layer [n, d_model], shared over ranks."""
        return layer_keys(ctx, requests, self.templates, layer, self.layers[-1], self.context.key_weighting)

    def request_targets(self, ctx: EditContext, requests: list[EditRequest]) -> tuple[TargetResult, torch.Tensor]:
        """Step 4 per request: z on θ₀ (with rewinding) from the z cache where present, shared
        over ranks. Returns the targets and which rows came from the cache (bool [n])."""
        self.check_setup()
        return ctx.per_request(requests, lambda part: self.rewound_rows(ctx, part))

    def compute_targets_keeps_parts(self) -> bool:
        # Two-step z without rewinding runs whole clusters at once, outside the step's parts.
        return super().compute_targets_keeps_parts() and self.z_mode == "per_request"

    def check_fill_z(self) -> None:
        if self.z_mode == "two_step":
            # Its z keys name each request's cluster, made from the neuron sets on the current
            # weights: they depend on the stream, so they cannot be computed ahead on θ₀.
            raise ValueError(
                "ECE-two-step: its z depend on clusters of the edited weights, so they cannot be computed ahead"
            )
        super().check_fill_z()

    def cluster_targets(
        self, ctx: EditContext, requests: list[EditRequest], clu: Clustering
    ) -> tuple[ClusterTargetResult, torch.Tensor]:
        """Step 4 with two_step: both phases on θ₀ (with rewinding), whole clusters shared over
        ranks (a cluster's members need its shift). Returns the targets and which rows came from
        the z cache (bool [n])."""
        self.check_setup()

        def share(idx: list[int]) -> tuple[ClusterTargetResult, torch.Tensor]:
            pos = {g: i for i, g in enumerate(idx)}
            mine = [c for c, members in enumerate(clu.clusters) if members[0] in pos]
            res, cached = rewound_cluster_targets(
                ctx.view,
                ctx.tok,
                [requests[g] for g in idx],
                self.templates,
                self.layers[-1],
                self.targets,
                [[pos[g] for g in clu.clusters[c]] for c in mine],
                [pos[clu.anchors[c]] for c in mine],
                self.shared_steps,
                self.instance_steps,
                self.original,
                self.cache,
                ctx.model_id,
                ctx.fingerprint,
                ctx.progress,
            )
            to_global = torch.tensor(mine, dtype=torch.long, device=res.cluster.device)
            return dataclasses.replace(res, cluster=to_global[res.cluster]), cached  # cluster ids of the whole step

        return ctx.per_index(len(requests), share, groups=clu.clusters)

    def compute_targets(
        self, ctx: EditContext, requests: list[EditRequest], extra: list[ExtraRow] | None = None
    ) -> ECETargets:
        """Steps 1-4: the neuron plan on the current weights, then z (on θ₀ with rewinding)."""
        if extra:
            raise ValueError("ECE does not take extra (neighbour) loss rows: its z is per request on θ₀, cached")
        # 1-3. Keys, batch selection per layer (and with two_step: per-request sets, clusters).
        plan = self.locate(ctx, requests)
        t2 = time.perf_counter()
        # 4. z at the last edited layer, on θ₀ with rewinding.
        if plan.clustering is None:
            tgt, cached = self.request_targets(ctx, requests)
        else:
            tgt, cached = self.cluster_targets(ctx, requests, plan.clustering)
        return ECETargets(tgt, plan, cached, time.perf_counter() - t2)

    def spread(self, ctx: EditContext, requests: list[EditRequest], targets: ECETargets) -> Spread:
        """Step 5: write the neuron-restricted update of every edited layer towards targets.z
        [n, d_model] (eq. 14, 19), residuals against the current model. Each layer's K Kᵀ (full
        d_ff: every neuron's keys are preserved later) waits in ``pending`` for :meth:`commit`."""
        plan = targets.plan

        def residual(ctx, requests, templates, layers, i, z):
            if i == 0:  # nothing has been written yet this step: locate's keys and outputs are current
                keys, cur = plan.first_pass[layers[0]]
            else:
                keys, cur = self.keys_and_outputs(ctx, requests, layers[i])
            return keys, layer_residual(z, cur, len(layers) - i)  # [n, d_ff], [n, d_model]

        def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
            return submatrix_delta(keys, resid, self.preserve(layer), plan.selected[layer])  # [d_model, d_ff]

        out = spread_over_layers(ctx, requests, self.templates, self.layers, targets.z, solve, residual)
        out.scalars.update({f"neurons/l{layer}": float(len(plan.selected[layer])) for layer in self.layers})
        return out

    def commit(self, spread: Spread) -> None:
        """Step 6: the sequential cache, once every layer was written."""
        self.accumulate(spread.pending)

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        step = self.run_stages(ctx, requests)  # 1-4, 5, 6
        targets, spread = step.targets, step.spread
        plan, tgt, cached = targets.plan, targets.result, targets.cached
        selected, clu = plan.selected, plan.clustering
        scalars = spread.scalars
        z_weights = "original" if self.rewind else "current"
        scalars.update(
            {
                "z_rewound": float(self.rewind),
                "z_from_cache": float(cached.sum()),
                "z_loss": _nanmean(tgt.loss),
                "z_nll": _nanmean(tgt.nll),
                "z_steps": float(tgt.steps.float().mean()),
                "seconds_attribution": plan.seconds_attribution,
                "seconds_z": targets.seconds_z,
                "seconds_solve": step.seconds_spread,
                "seconds_keys": step.seconds_keys,
            }
        )
        details: dict = {
            "z_mode": self.z_mode,
            "z_weights": z_weights,
            "selected_neurons": {f"l{layer}": len(selected[layer]) for layer in self.layers},
        }
        per_request = {
            req.case_id: {"z_weights": z_weights, "z_from_cache": bool(cached[i])} for i, req in enumerate(requests)
        }
        if clu is not None:
            assert isinstance(tgt, ClusterTargetResult)
            scalars.update(
                {
                    "clusters": float(len(clu.clusters)),
                    "z_shared_steps": float(tgt.shared_updates.float().mean()),
                    "z_instance_steps": float(tgt.instance_updates.float().mean()),
                    "seconds_cluster": plan.seconds_cluster,
                    "seconds_z_shared": tgt.seconds_shared,
                    "seconds_z_instance": tgt.seconds_instance,
                }
            )
            details.update(
                {
                    "cluster_sizes": [len(c) for c in clu.clusters],
                    "cluster_cost": clu.cost,
                    "cluster_attribution": plan.cluster_attribution,
                }
            )
            anchors = set(clu.anchors)
            for i, req in enumerate(requests):
                per_request[req.case_id].update({"cluster": int(clu.labels[i]), "anchor": i in anchors})
        return EditResult(scalars=scalars, details=details, per_request=per_request)
