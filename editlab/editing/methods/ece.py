"""ECE — Explainable and effiCient Editing (Zhang et al., WWW 2025), sequential batch editing.

One step, in order:
  1. keys K_l [n, d_ff] at every edited layer l (FFN activations at the subject's last token,
     averaged over the context templates), on the weights as this step finds them;
  2. attribution (AS / WI / RS, eq. 5–7) per layer, scores summed over the batch, neuron set I_l by
     the threshold rule (eq. 8);
  3. each request's own neuron set (same rule on its own scores) over *all* edited layers, as
     (layer, neuron) pairs: the paper clusters a request by "its set of identified neurons", which
     span every edited layer; pairs keep neuron j of layer 4 apart from neuron j of layer 8;
  4. k-medoids under Jaccard distance (eq. 9) and one anchor per cluster (eq. 10);
  5. two-step z at the last edited layer L (eq. 11–13): a shared shift per cluster optimised on
     its anchor, then per-request refinements;
  6. for each edited layer in order: keys, current outputs at L, R = (z − h_L)/(layers left) as
     MEMIT, ΔW zero outside I_l's columns (eq. 14/19) with P = λC + Σ past KKᵀ, W_l += ΔW;
  7. cache_c[l] += K_l K_lᵀ (full d_ff), so this step's keys are preserved by later steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial

import torch

from editlab.editing.cluster import Clustering, cluster_sets
from editlab.editing.context import ContextTemplates
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods.base import EditContext, KeyValueMethod, restore_on_error
from editlab.editing.neurons import ActivationScore, NeuronAttribution, WeightImportance
from editlab.editing.solve import preserve_matrix, submatrix_delta
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import ClusterTargetResult, TargetConfig, optimize_cluster_targets
from editlab.models.weights import add_delta, read_weight
from editlab.types import EditRequest, EditResult


@dataclass
class NeuronPlan:
    """Stages 1-4 of one step (see :meth:`ECE.locate`)."""

    first_pass: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer → keys [n, d_ff], outputs at L [n, d]
    selected: dict[int, torch.Tensor]  # layer → the step's neuron indices I_l [m_l]
    sets: list[torch.Tensor]  # each request's own (layer, neuron) ids, layer j's neuron k as j·d_ff + k
    clustering: Clustering
    cluster_attribution: str  # class name of the attribution the sets came from
    seconds_attribution: float
    seconds_cluster: float


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


class ECE(KeyValueMethod):
    def __init__(
        self,
        layers: list[int],
        mom2_weight: float = 15000.0,
        neurons: NeuronAttribution = WeightImportance(threshold=0.8),
        cluster_neurons: NeuronAttribution | None = None,
        clusters: int | None = None,
        shared_steps: int = 20,
        instance_steps: int = 5,
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
            cluster_neurons: the attribution whose per-request neuron sets are clustered. None:
                ``neurons`` when it depends on the request; WeightImportance does not (every request
                would get the same set and the clustering nothing to go on), so with WI the sets
                come from ActivationScore with the same threshold.
            clusters: number of clusters k (capped at the batch size); None: ceil(sqrt(n / 2)).
            shared_steps: phase-1 forward+update rounds of each cluster's shared shift (paper: 20).
            instance_steps: phase-2 forwards of the per-request refinement (paper: 5).
            targets: z optimisation settings; targets.steps must equal shared_steps + instance_steps
                (the per-instance budget the two phases replace).
            context: context-template generation settings.
            covariance: corpus and settings of E[kkᵀ].
        """
        if clusters is not None and clusters < 1:
            raise ValueError(f"option clusters={clusters} must be >= 1 (or null for automatic)")
        if shared_steps < 0 or instance_steps < 0 or shared_steps + instance_steps < 1:
            raise ValueError(
                f"options shared_steps={shared_steps}, instance_steps={instance_steps} must be >= 0 with a positive sum"
            )
        if targets.steps != shared_steps + instance_steps:
            raise ValueError(
                f"option targets.steps={targets.steps} must equal shared_steps + instance_steps "
                f"({shared_steps} + {instance_steps})"
            )
        if cluster_neurons is not None and not cluster_neurons.request_dependent:
            raise ValueError(
                f"option cluster_neurons={cluster_neurons!r} does not depend on the request: every request "
                "would get the same neuron set"
            )
        super().__init__(layers, mom2_weight, targets, context, covariance)
        self.neurons = neurons
        self.cluster_neurons = cluster_neurons
        self.clusters = clusters
        self.shared_steps = shared_steps
        self.instance_steps = instance_steps

    def clustering_attribution(self) -> NeuronAttribution:
        if self.cluster_neurons is not None:
            return self.cluster_neurons
        if self.neurons.request_dependent:
            return self.neurons
        return ActivationScore(threshold=self.neurons.threshold)

    def locate(self, ctx: EditContext, requests: list[EditRequest]) -> NeuronPlan:
        """Steps 1-4: keys, batch neuron selection per layer, per-request sets, clusters and anchors.
        Reads the model, writes nothing (the benchmark calls it on its own)."""
        view = ctx.view
        n = len(requests)
        t0 = time.perf_counter()
        first_pass: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        selected: dict[int, torch.Tensor] = {}
        own_sets: list[list[torch.Tensor]] = [[] for _ in range(n)]
        cluster_attr = self.clustering_attribution()
        d_ff = 0
        for j, layer in enumerate(self.layers):
            keys, cur = self.keys_and_outputs(ctx, requests, layer)  # [n, d_ff], [n, d_model]
            first_pass[layer] = (keys, cur)
            w_out = read_weight(view.ffn_out(layer))  # [d_model, d_ff]
            d_ff = keys.shape[1]
            selected[layer] = self.neurons.select_batch(keys, w_out)  # [m_l]
            for i, own in enumerate(cluster_attr.select_each(keys, w_out)):
                own_sets[i].append(own + j * d_ff)  # offset: neuron ids of layer j live in [j·d_ff, (j+1)·d_ff)
        sets = [torch.cat(parts) for parts in own_sets]
        t1 = time.perf_counter()
        clu = cluster_sets(sets, self.clusters, ctx.seed, universe=len(self.layers) * d_ff)
        t2 = time.perf_counter()
        return NeuronPlan(first_pass, selected, sets, clu, type(cluster_attr).__name__, t1 - t0, t2 - t1)

    def keys_and_outputs(self, ctx: EditContext, requests: list[EditRequest], layer: int):
        """Keys at ``layer`` [n, d_ff] and outputs of the z layer [n, d_model], shared over ranks."""
        return ctx.per_request(
            requests,
            partial(
                keys_and_outputs,
                ctx.view,
                ctx.tok,
                templates=self.templates,
                key_layer=layer,
                out_layer=self.layers[-1],
                weighting=self.context.key_weighting,
            ),
        )

    def cluster_targets(self, ctx: EditContext, requests: list[EditRequest], clu: Clustering) -> ClusterTargetResult:
        """Step 5 with whole clusters shared over ranks (a cluster's members need its shift)."""

        def share(idx: list[int]) -> ClusterTargetResult:
            pos = {g: i for i, g in enumerate(idx)}
            mine = [c for c, members in enumerate(clu.clusters) if members[0] in pos]
            res = optimize_cluster_targets(
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
                ctx.progress,
            )
            to_global = torch.tensor(mine, dtype=torch.long, device=res.cluster.device)
            return dataclasses.replace(res, cluster=to_global[res.cluster])  # cluster ids of the whole step

        return ctx.per_index(len(requests), share, groups=clu.clusters)

    def spread(
        self, ctx: EditContext, requests: list[EditRequest], z: torch.Tensor, plan: NeuronPlan
    ) -> tuple[dict[str, float], dict[int, torch.Tensor]]:
        """Step 6: write the neuron-restricted update of every edited layer towards targets z
        [n, d_model] (eq. 14, 19). Returns per-layer scalars and each layer's K Kᵀ for the
        sequential cache; the caller accumulates it once the whole step succeeded."""
        view = ctx.view
        scalars: dict[str, float] = {}
        new_kk: dict[int, torch.Tensor] = {}
        with restore_on_error(view, self.layers):
            for i, layer in enumerate(self.layers):
                if i == 0:
                    keys, cur = plan.first_pass[layer]  # nothing has been written yet this step: same values
                else:
                    keys, cur = self.keys_and_outputs(ctx, requests, layer)
                resid = (z.double() - cur) / (len(self.layers) - i)  # [n, d_model]: spread over layers left
                preserve = preserve_matrix(self.cov[layer], self.mom2_weight, self.cache_c.get(layer))
                delta = submatrix_delta(keys, resid, preserve, plan.selected[layer])  # [d_model, d_ff]
                add_delta(view.ffn_out(layer), delta)
                new_kk[layer] = keys.T @ keys  # [d_ff, d_ff], full: every neuron's keys are preserved later
                scalars[f"delta_norm/l{layer}"] = float(delta.norm())
        return scalars, new_kk

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        # 1-4. Keys, batch selection per layer, per-request sets as (layer, neuron) pairs, clusters.
        plan = self.locate(ctx, requests)
        selected, clu = plan.selected, plan.clustering
        t2 = time.perf_counter()
        # 5. Two-step z at the last edited layer.
        tgt = self.cluster_targets(ctx, requests, clu)
        t3 = time.perf_counter()
        # 6. Neuron-restricted spread over the edited layers.
        scalars, new_kk = self.spread(ctx, requests, tgt.z, plan)
        # 7. Sequential cache (only once every layer was written).
        self.accumulate(new_kk)
        t4 = time.perf_counter()
        for layer in self.layers:
            scalars[f"neurons/l{layer}"] = float(len(selected[layer]))
        scalars.update(
            {
                "clusters": float(len(clu.clusters)),
                "z_loss": _nanmean(tgt.loss),
                "z_nll": _nanmean(tgt.nll),
                "z_steps": float(tgt.steps.mean()),
                "z_shared_steps": float(tgt.shared_updates.mean()),
                "z_instance_steps": float(tgt.instance_updates.mean()),
                "seconds_attribution": plan.seconds_attribution,
                "seconds_cluster": plan.seconds_cluster,
                "seconds_z_shared": tgt.seconds_shared,
                "seconds_z_instance": tgt.seconds_instance,
                "seconds_z": t3 - t2,
                "seconds_solve": t4 - t3,
            }
        )
        details = {
            "cluster_sizes": [len(c) for c in clu.clusters],
            "cluster_cost": clu.cost,
            "cluster_attribution": plan.cluster_attribution,
            "selected_neurons": {f"l{layer}": len(selected[layer]) for layer in self.layers},
        }
        anchors = set(clu.anchors)
        per_request = {
            req.case_id: {"cluster": int(clu.labels[i]), "anchor": i in anchors} for i, req in enumerate(requests)
        }
        return EditResult(scalars=scalars, details=details, per_request=per_request)
