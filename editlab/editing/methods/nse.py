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
"""

from __future__ import annotations

import time

import torch

from editlab.editing.context import ContextTemplates
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods.base import EditContext, KeyValueMethod, restore_on_error
from editlab.editing.neurons import ActivationScore, NeuronAttribution
from editlab.editing.rewind import OriginalWeights, TargetCache, rewound_target_rows, z_cache_files
from editlab.editing.solve import preserve_matrix, submatrix_delta
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import TargetConfig, TargetResult
from editlab.models.weights import add_delta, read_weight
from editlab.types import EditRequest, EditResult


def pass_mask(residual: torch.Tensor, alpha: float, upper_bound: float) -> torch.Tensor:
    """Requests of the next pass: alpha < r < upper_bound (bool [n]); r ≤ alpha counts as edited,
    r ≥ upper_bound as hopeless (both strict, as the authors' code)."""
    return (residual > alpha) & (residual < upper_bound)


class NSE(KeyValueMethod):
    def __init__(
        self,
        layers: list[int],
        mom2_weight: float = 15000.0,
        neurons: NeuronAttribution = ActivationScore(threshold=0.8),
        alpha: float = 15.0,
        upper_bound: float = 100.0,
        max_iterations: int = 3,
        rewind: bool = True,
        z_cache: bool = True,
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
            z_cache: keep the z computed on θ₀ on disk as well as in memory (key: every z setting).
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
        super().__init__(layers, mom2_weight, targets, context, covariance)
        self.neurons = neurons
        self.alpha = alpha
        self.upper_bound = upper_bound
        self.max_iterations = max_iterations
        self.rewind = rewind
        self.z_cache = z_cache
        self.original: OriginalWeights | None = None
        self.cache = TargetCache(None)  # in memory; setup gives it its files under the cache root

    @property
    def name(self) -> str:
        """NSE, or NSE-no-rewind (z on the current weights: the seed's ablation)."""
        return "NSE" if self.rewind else "NSE-no-rewind"

    def setup(self, ctx: EditContext) -> None:
        super().setup(ctx)
        # W_0 of the edited matrices, taken before the first edit (ctx.fingerprint is θ₀'s too).
        self.original = OriginalWeights(ctx.view, self.layers) if self.rewind else None
        self.cache = TargetCache(z_cache_files(ctx.cache_root) if self.z_cache else None)

    def targets_for(self, ctx: EditContext, requests: list[EditRequest]) -> tuple[TargetResult, int]:
        """z of ``requests`` (on θ₀ with rewinding) and how many came from the z cache."""
        if self.rewind and self.original is None:
            raise RuntimeError("NSE.setup must run on the unedited model before the first step")
        res, cached = rewound_target_rows(
            ctx.view,
            ctx.tok,
            requests,
            self.templates,
            self.layers[-1],
            self.targets,
            self.original,
            self.cache,
            ctx.model_id,
            ctx.fingerprint,
            ctx.progress,
        )
        return res, int(cached.sum())

    def residuals(self, ctx: EditContext, requests: list[EditRequest], z: torch.Tensor) -> torch.Tensor:
        """‖z_i − h_i^L‖ on the current model, bare prompt, [n] float64."""
        z_layer = self.layers[-1]
        _, cur = keys_and_outputs(ctx.view, ctx.tok, requests, ["{}"], z_layer, z_layer)  # [n, d_model]
        return (z.double() - cur).norm(dim=1)

    def one_pass(self, ctx: EditContext, requests: list[EditRequest], z: torch.Tensor) -> dict:
        """One multi-layer neuron-level pass writing ``requests`` towards ``z`` [n, d_model]."""
        view, tok = ctx.view, ctx.tok
        z_layer = self.layers[-1]
        record: dict = {"requests": len(requests), "neurons": {}, "delta_norm": {}}
        for i, layer in enumerate(self.layers):
            keys, cur = keys_and_outputs(
                view, tok, requests, self.templates, layer, z_layer, weighting=self.context.key_weighting
            )  # [n, d_ff], [n, d]
            resid = (z.double() - cur) / (len(self.layers) - i)  # [n, d_model]: spread over layers left
            selected = self.neurons.select_batch(keys, read_weight(view.ffn_out(layer)))  # [m]
            cache = self.cache_c.get(layer)
            cache = cache.to(self.cov[layer].device) if cache is not None else None  # CPU after a reload
            preserve = preserve_matrix(self.cov[layer], self.mom2_weight, cache)
            delta = submatrix_delta(keys, resid, preserve, selected)  # [d_model, d_ff]
            add_delta(view.ffn_out(layer), delta)
            record["neurons"][f"l{layer}"] = len(selected)
            record["delta_norm"][f"l{layer}"] = float(delta.norm())
        return record

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        view, tok = ctx.view, ctx.tok
        n = len(requests)
        t0 = time.perf_counter()
        tgt, from_cache = self.targets_for(ctx, requests)
        z = tgt.z.double()  # [n, d_model]
        t1 = time.perf_counter()
        checks: list[torch.Tensor] = []  # residuals [n] at each check
        passes: list[dict] = []
        times_edited = torch.zeros(n, dtype=torch.long)
        new_kk: dict[int, torch.Tensor] = {}
        before = {layer: read_weight(view.ffn_out(layer)).detach().clone() for layer in self.layers}
        with restore_on_error(view, self.layers):
            for m in range(self.max_iterations):
                r = self.residuals(ctx, requests, z)
                checks.append(r.cpu())
                mask = pass_mask(r, self.alpha, self.upper_bound).cpu()
                if not mask.any() or m == self.max_iterations - 1:
                    break
                idx = mask.nonzero().squeeze(1)
                passes.append(self.one_pass(ctx, [requests[i] for i in idx.tolist()], z[idx.to(z.device)]))
                times_edited[idx] += 1
            for layer in self.layers:
                keys, _ = keys_and_outputs(
                    view, tok, requests, self.templates, layer, self.layers[-1], weighting=self.context.key_weighting
                )
                new_kk[layer] = keys.T @ keys  # [d_ff, d_ff]
        self.accumulate(new_kk)
        t2 = time.perf_counter()
        last = checks[-1]
        scalars: dict[str, float] = {
            "nse_passes": float(len(passes)),
            "nse_unedited": float((times_edited == 0).sum()),  # never written this step
            "nse_above_upper_bound": float((last >= self.upper_bound).sum()),
            "nse_unconverged": float(pass_mask(last, self.alpha, self.upper_bound).sum()),
            "nse_residual_first": float(checks[0].mean()),
            "nse_residual_last": float(last.mean()),
            "z_from_cache": float(from_cache),
            "z_loss": float(tgt.loss.mean()),
            "z_nll": float(tgt.nll.mean()),
            "z_steps": float(tgt.steps.mean()),
            "seconds_z": t1 - t0,
            "seconds_solve": t2 - t1,
        }
        for layer in self.layers:
            if passes:
                scalars[f"neurons/l{layer}"] = float(passes[0]["neurons"][f"l{layer}"])
            scalars[f"delta_norm/l{layer}"] = float((read_weight(view.ffn_out(layer)) - before[layer]).norm())
        details = {"nse_pass_log": passes, "nse_residual_means": [float(c.mean()) for c in checks]}
        per_request = {
            req.case_id: {"nse_passes": int(times_edited[i]), "nse_residuals": [float(c[i]) for c in checks]}
            for i, req in enumerate(requests)
        }
        return EditResult(scalars=scalars, details=details, per_request=per_request)
