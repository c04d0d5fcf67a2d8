"""NSE — Neuron-level Sequential Editing (Jiang et al., ACL 2025; seed 002).

One step, in order:
  1. z_i at the last edited layer L on the ORIGINAL weights θ₀ (weights rewinding, see
     editlab/editing/rewind.py), from the z cache where present;
  2. for m = 0 .. max_iterations − 1 (the authors' loop, jianghoucheng/NSE nse_main.py):
       r_i = ‖z_i − h_i^L‖ on the CURRENT model for every request of the step (the norm, as
       the code; the paper writes its square);
       the pass set is {i : alpha < r_i < upper_bound}; stop when it is empty or m is the last
       index (so at most max_iterations − 1 passes, and a request with r_i ≥ upper_bound is
       never written);
       one MEMIT-style pass over the edited layers with the pass set: keys K_l and current
       outputs at L, R = (z − h_L) / (layers left), neurons I_l by the activation score
       |k| summed over the pass set with threshold p, ΔW zero outside I_l's columns with
       P = λC + Σ past KKᵀ (solve.submatrix_delta, as ECE), W_l += ΔW;
  3. cache_c[l] += K_l K_lᵀ with the keys of every request of the step on the final weights
     (the authors' code; with one pass these are the keys the pass used, since a layer's key
     does not depend on its own or later layers).
The paper's "w/o weights rewinding" ablation is ``rewind: false`` (z on the current weights).
As a StagedMethod (methods/stages.py): compute_targets is step 1, spread step 2 (each pass the
MEMIT-family loop with the neuron-restricted solve) and step 3's keys, commit step 3's cache, so
IterativeEditing can wrap NSE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from editlab.editing.context_templates import ContextTemplates
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods.base import EditContext, restore_on_error
from editlab.editing.methods.rewinding import RewindingMethod
from editlab.editing.methods.stages import (
    MethodTargets,
    Spread,
    StagedMethod,
    layers_keys,
    memit_residual,
    write_layers,
)
from editlab.editing.neurons import ActivationScore, NeuronAttribution
from editlab.editing.solve import submatrix_delta
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import ExtraRow, TargetConfig, TargetResult
from editlab.models.weights import read_weight
from editlab.types import EditRequest, EditResult


def pass_mask(residual: torch.Tensor, alpha: float, upper_bound: float) -> torch.Tensor:
    """Requests of the next pass: alpha < r < upper_bound (bool [n]); r ≤ alpha counts as edited,
    r ≥ upper_bound as hopeless (both strict, as the authors' code)."""
    return (residual > alpha) & (residual < upper_bound)


@dataclass
class NSETargets(MethodTargets):
    """NSE's OPTIMIZATION (step 1): z on θ₀ (with rewinding) and how many rows came from the z cache."""

    from_cache: int


@dataclass
class NSESpread(Spread):
    """NSE's SPREAD (step 2): ``scalars`` are ``summary`` (passes, residuals) then ``per_layer``
    (neurons of the first pass, the step's ‖ΔW‖); ``pending`` the step's KKᵀ (step 3's keys)."""

    checks: list[torch.Tensor] = field(default_factory=list)  # residuals [n] at each check
    passes: list[dict] = field(default_factory=list)  # one_pass's record of each pass
    times_edited: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [n]
    summary: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, float] = field(default_factory=dict)


class NSE(RewindingMethod, StagedMethod):
    def __init__(
        self,
        layers: list[int],
        mom2_weight: float = 15000.0,
        neurons: NeuronAttribution = ActivationScore(threshold=0.8),
        alpha: float = 15.0,
        upper_bound: float = 100.0,
        max_iterations: int = 3,
        rewind: bool = True,
        z_cache: bool | str = True,
        targets: TargetConfig = TargetConfig(),
        context: ContextTemplates = ContextTemplates(),
        covariance: CovarianceConfig = CovarianceConfig(),
    ) -> None:
        """
        Args:
            layers: edited layers, strictly increasing; z is optimised at the last one.
            mom2_weight: λ, the weight of the preserved key moment E[kkᵀ] in the solve.
            neurons: the neuron selection; the paper's is ActivationScore (|k|) with threshold p
                (1.0 keeps every neuron: the full MEMIT solve).
            alpha: a request whose residual ‖z − h_L‖ is at most alpha counts as edited.
            upper_bound: a request whose residual is at least this is never written.
            max_iterations: residual checks per step (authors' meaning): at most
                max_iterations − 1 passes.
            rewind: compute z on the original weights θ₀ (weights rewinding); False is the
                paper's ablation (z on the current weights).
            z_cache: keep the z computed on θ₀ on disk as well as in memory (key: every z setting):
                True under the cache root, a directory path in that directory (a z bank a study
                commits, so that its z outlive the machine), False in memory only.
            targets: z optimisation settings.
            context: context-template generation settings.
            covariance: corpus and settings of E[kkᵀ].
        """
        if alpha < 0 or upper_bound <= alpha:
            raise ValueError(f"options alpha={alpha}, upper_bound={upper_bound} need 0 <= alpha < upper_bound")
        if max_iterations < 2:
            raise ValueError(
                f"option max_iterations={max_iterations} must be >= 2: the last residual check never edits, "
                "so 1 would write nothing"
            )
        super().__init__(layers, mom2_weight, neurons, rewind, z_cache, targets, context, covariance)
        self.alpha = alpha
        self.upper_bound = upper_bound
        self.max_iterations = max_iterations

    @property
    def name(self) -> str:
        """NSE, or NSE-no-rewind (z on the current weights: the seed's ablation)."""
        return "NSE" if self.rewind else "NSE-no-rewind"

    def targets_for(self, ctx: EditContext, requests: list[EditRequest]) -> tuple[TargetResult, int]:
        """z of ``requests`` (on θ₀ with rewinding) and how many came from the z cache."""
        res, cached = self.rewound_rows(ctx, requests)
        return res, int(cached.sum())

    def residuals(self, ctx: EditContext, requests: list[EditRequest], z: torch.Tensor) -> torch.Tensor:
        """‖z_i − h_i^L‖ on the current model, bare prompt, [n] float64."""
        z_layer = self.layers[-1]
        _, cur = keys_and_outputs(ctx.view, ctx.tok, requests, ["{}"], z_layer, z_layer)  # [n, d_model]
        return (z.double() - cur).norm(dim=1)

    def one_pass(self, ctx: EditContext, requests: list[EditRequest], z: torch.Tensor) -> dict:
        """One multi-layer neuron-level pass writing ``requests`` towards ``z`` [n, d_model]: the
        MEMIT-family loop (stages.write_layers; keys not shared over ranks) with each layer's
        neurons selected on the pass's keys and the layer's weights before it is written."""
        view = ctx.view
        neurons: dict[str, int] = {}

        def solve(layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
            selected = self.neurons.select_batch(keys, read_weight(view.ffn_out(layer)))  # [m]
            neurons[f"l{layer}"] = len(selected)
            return submatrix_delta(keys, resid, self.preserve(layer), selected)  # [d_model, d_ff]

        def residual_at(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return memit_residual(ctx, requests, self.templates, self.layers, i, z, self.context.key_weighting, False)

        written = write_layers(view, self.layers, residual_at, solve)
        delta_norm = {f"l{layer}": norm for layer, (_, norm) in written.items()}
        return {"requests": len(requests), "neurons": neurons, "delta_norm": delta_norm}

    def compute_targets(
        self, ctx: EditContext, requests: list[EditRequest], extra: list[ExtraRow] | None = None
    ) -> NSETargets:
        """Step 1: z on θ₀ with rewinding (from the z cache where present); writes nothing."""
        if extra:
            raise ValueError("NSE does not take extra (neighbour) loss rows: its z is per request on θ₀, cached")
        return NSETargets(*self.targets_for(ctx, requests))

    def spread(self, ctx: EditContext, requests: list[EditRequest], targets: NSETargets) -> NSESpread:
        """Step 2, and step 3's keys: passes while requests remain between alpha and upper_bound,
        then the KKᵀ of every request on the final weights, pending for :meth:`commit`."""
        view = ctx.view
        n = len(requests)
        z = targets.z.double()  # [n, d_model]
        out = NSESpread(times_edited=torch.zeros(n, dtype=torch.long))
        before = {layer: read_weight(view.ffn_out(layer)).detach().clone() for layer in self.layers}
        with restore_on_error(view, self.layers):
            for m in range(self.max_iterations):
                r = self.residuals(ctx, requests, z)
                out.checks.append(r.cpu())
                mask = pass_mask(r, self.alpha, self.upper_bound).cpu()
                if not mask.any() or m == self.max_iterations - 1:
                    break
                idx = mask.nonzero().squeeze(1)
                out.passes.append(self.one_pass(ctx, [requests[i] for i in idx.tolist()], z[idx.to(z.device)]))
                out.times_edited[idx] += 1
            # Every layer's keys on the final weights: one forward serves them all.
            final_keys, _ = layers_keys(
                ctx, requests, self.templates, self.layers, self.layers[-1], self.context.key_weighting, share=False
            )
            for layer, keys in zip(self.layers, final_keys, strict=True):
                out.pending[layer] = keys.T @ keys  # [d_ff, d_ff]
        last = out.checks[-1]
        out.summary = {
            "nse_passes": float(len(out.passes)),
            "nse_unedited": float((out.times_edited == 0).sum()),  # never written this step
            "nse_above_upper_bound": float((last >= self.upper_bound).sum()),
            "nse_unconverged": float(pass_mask(last, self.alpha, self.upper_bound).sum()),
            "nse_residual_first": float(out.checks[0].mean()),
            "nse_residual_last": float(last.mean()),
        }
        for layer in self.layers:
            if out.passes:
                out.per_layer[f"neurons/l{layer}"] = float(out.passes[0]["neurons"][f"l{layer}"])
            out.per_layer[f"delta_norm/l{layer}"] = float((read_weight(view.ffn_out(layer)) - before[layer]).norm())
        out.scalars = {**out.summary, **out.per_layer}
        return out

    def commit(self, spread: Spread) -> None:
        """Step 3: cache_c[l] += K_l K_lᵀ once the step is final."""
        self.accumulate(spread.pending)

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        step = self.run_stages(ctx, requests)
        targets, spread = step.targets, step.spread
        tgt, checks = targets.result, spread.checks
        scalars: dict[str, float] = {
            **spread.summary,
            "z_from_cache": float(targets.from_cache),
            "z_loss": float(tgt.loss.mean()),
            "z_nll": float(tgt.nll.mean()),
            "z_steps": float(tgt.steps.mean()),
            "seconds_z": step.seconds_targets,
            "seconds_solve": step.seconds_spread,
            "seconds_keys": step.seconds_keys,
            **spread.per_layer,
        }
        details = {"nse_pass_log": spread.passes, "nse_residual_means": [float(c.mean()) for c in checks]}
        per_request = {
            req.case_id: {"nse_passes": int(spread.times_edited[i]), "nse_residuals": [float(c[i]) for c in checks]}
            for i, req in enumerate(requests)
        }
        return EditResult(scalars=scalars, details=details, per_request=per_request)
