"""Iterative and neighbour-assisted model editing (Baghel et al.; seed 004), around any method with
OPTIMIZATION and SPREAD parts (a StagedMethod of methods/stages.py: MEMIT, PMET, ROME, AlphaEdit,
ECE and NSE).

Iterative editing (section 3.1): on one batch, repeat
    OPTIMIZATION on θ_k → ideal states h̄_k (targets), p(θ_k, h̄_k) from their target NLL;
    SPREAD → θ_{k+1};  p(θ_{k+1}, ĥ_k) measured right away with no shift (appendix B.1's
    "update": the authors' code only got it from the next iteration's first step);
    Δp_k = p(θ_{k+1}, ĥ_k) − p(θ_k, h̄_k);
until |Δp_k| ≤ ε (ε = 1) or max_iterations (10). p is the mean over the batch of the target's
perplexity e^{NLL}, the NLL averaged over the method's context-template prompts, as the authors'
compute_z measures it (their stopping rule was disabled in their code; here it runs). The
sequential state (the cache of past keys) is committed once, from the last iteration's spread:
the batch's keys are one edit, not max_iterations edits.

Neighbour-assisted editing (section 3.2): a CounterFact neighbourhood prompt written with the
request's own relation template ("The mother tongue of {} is" → "The mother tongue of Léon Blum
is", subject "Léon Blum") whose greedy answer before the step is the request's target_true
joins the request's z loss with NLL(target_true | neighbour prompt, δ at the neighbour subject's
last token). By default as the released code adds it (memit_recursive_neighbor/compute_z.py):
one more rewrite row, behind the step's first random context prefix, averaged with the rewrite
rows. ``NeighborAssist(averaged=False, prefix=False)`` is the paper's equation instead: a
separate weight · NLL term on the bare neighbour prompt. Requests without such a neighbour are
edited without it and counted. The prompts used are recorded per case: they are also
specificity test prompts, so a study should leave them out of its specificity score (the paper
removed them from evaluation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from editlab.editing.methods.base import EditContext, EditMethod, restore_on_error
from editlab.editing.methods.stages import StagedMethod
from editlab.editing.targets import ExtraRow
from editlab.memory import MemoryProfile
from editlab.models.arch import ModelView
from editlab.models.scoring import score_answers
from editlab.types import EditRequest, EditResult


@dataclass
class NeighborAssist:
    """Neighbour-assisted editing settings.

    Args:
        weight: factor of each neighbour's NLL in the z loss: its weight in the mean over the
            rewrite rows (``averaged``; 1 is the released plain mean) or of its separate term
            (paper: 1, a plain sum).
        count: neighbours per request (paper: 1).
        averaged: True (released code): each neighbour prompt is one more rewrite row of its
            request, its NLL averaged with the rewrite rows'. False: weight · NLL is a separate
            term of the loss (the paper's equation; editlab's earlier default).
        prefix: True (released code): the neighbour prompt carries the first random context
            prefix of the step's templates (it needs context.count >= 1). False: the bare
            neighbour prompt (the paper's NA_ variant; editlab's earlier default).
    """

    weight: float = 1.0
    count: int = 1
    averaged: bool = True
    prefix: bool = True

    def __post_init__(self) -> None:
        if self.weight <= 0 or self.count < 1:
            raise ValueError(f"invalid neighbors option: {self} (weight > 0, count >= 1)")


def split_by_template(template: str, prompt: str) -> str | None:
    """The subject of ``prompt`` if it is ``template`` with "{}" filled in, else None."""
    head, tail = template.split("{}", 1)
    if len(prompt) <= len(head) + len(tail) or not (prompt.startswith(head) and prompt.endswith(tail)):
        return None
    subject = prompt[len(head) : len(prompt) - len(tail)]
    return subject if subject.strip() else None


def neighbor_prefix(templates: list[str], cfg: NeighborAssist) -> str:
    """The context template the neighbour rows are written in: the first random prefix
    (templates[1]; templates[0] is the bare "{}"), or "{}" without ``cfg.prefix``."""
    if not cfg.prefix:
        return "{}"
    if len(templates) < 2:
        raise ValueError(
            "option neighbors.prefix=true needs a random context prefix (the method's context.count >= 1); "
            "set neighbors.prefix false for bare neighbour prompts"
        )
    return templates[1]


def neighbor_rows(
    view: ModelView, tok, requests: list[EditRequest], cfg: NeighborAssist, prefix: str = "{}"
) -> tuple[list[ExtraRow], list[list[str]]]:
    """Extra z-loss rows and, per request, the neighbour prompts used (empty: none qualified).

    Candidates: the request's neighbourhood prompts that are its own template with another
    subject; kept when every target_true token is the greedy prediction on the current model
    (asked on the bare prompt). The rows are written in the context template ``prefix``
    (see :func:`neighbor_prefix`) and join the loss as ``cfg.averaged`` says."""
    cands: list[tuple[int, str, str]] = []  # (request, prompt, subject)
    for i, req in enumerate(requests):
        if req.target_true is None:
            continue
        for prompt in req.neighborhood_prompts:
            subject = split_by_template(req.prompt, prompt)
            if subject is not None:
                cands.append((i, prompt, subject))
    used: list[list[str]] = [[] for _ in requests]
    rows: list[ExtraRow] = []
    if not cands:
        return rows, used
    exact = score_answers(view, tok, [p for _, p, _ in cands], [requests[i].target_true for i, _, _ in cands])["exact"]
    for (i, prompt, subject), ok in zip(cands, exact.tolist(), strict=True):
        if ok and len(used[i]) < cfg.count:
            used[i].append(prompt)
            template = prefix.format(requests[i].prompt)  # "<prefix>. The mother tongue of {} is"
            rows.append(ExtraRow(i, template, subject, requests[i].target_true, cfg.weight, cfg.averaged))
    return rows, used


def target_nll(view: ModelView, tok, requests: list[EditRequest], templates: list[str]) -> torch.Tensor:
    """Target NLL [n] on the current weights with no shift: token-mean NLL of target_new over
    each context-template prompt, averaged per request (the z loss's NLL term at δ = 0)."""
    prompts = [t.format(r.prompt).format(r.subject) for t in templates for r in requests]
    nll = score_answers(view, tok, prompts, [r.target_new for _ in templates for r in requests])["nll"]
    return nll.view(len(templates), len(requests)).mean(0)


def perplexity(nll: torch.Tensor) -> float:
    """p = (1/m) Σ_i e^{NLL_i} (section 3.1)."""
    return float(nll.double().exp().mean())


def should_stop(delta_p: float, epsilon: float) -> bool:
    """The stopping rule |Δp_k| ≤ ε."""
    return abs(delta_p) <= epsilon


class IterativeEditing(EditMethod):
    def __init__(
        self,
        method: StagedMethod,
        epsilon: float = 1.0,
        max_iterations: int = 10,
        neighbors: NeighborAssist | None = None,
        track_accuracy: bool = True,
    ) -> None:
        """
        Args:
            method: the wrapped method, a StagedMethod (compute_targets / spread / commit,
                methods/stages.py): MEMIT, PMET, ROME, AlphaEdit, ECE, NSE.
            epsilon: stop when |Δp_k| ≤ epsilon (paper: 1).
            max_iterations: at most this many OPTIMIZATION + SPREAD rounds per batch (paper: 10);
                1 with ``neighbors`` is one-pass neighbour-assisted editing.
            neighbors: neighbour-assisted editing (None: off).
            track_accuracy: record the batch's efficacy accuracy (target_new greedy on the
                rewrite prompt) after every iteration (one extra forward of n prompts).
        """
        if not isinstance(method, StagedMethod):
            raise ValueError(
                f"option method={type(method).__name__} has no compute_targets/spread/commit parts (it is not a "
                "StagedMethod, see editlab/editing/methods/stages.py); iterative editing cannot drive it"
            )
        if epsilon < 0 or max_iterations < 1:
            raise ValueError(f"options epsilon={epsilon}, max_iterations={max_iterations} need >= 0 and >= 1")
        self.method = method
        self.epsilon = epsilon
        self.max_iterations = max_iterations
        self.neighbors = neighbors
        self.track_accuracy = track_accuracy

    @property
    def layers(self) -> list[int]:
        return self.method.edited_layers()

    def edited_layers(self) -> list[int]:
        return self.method.edited_layers()

    def covariance_statistics(self):
        return self.method.covariance_statistics()

    def z_in_step_parts(self) -> bool:
        return self.method.compute_targets_keeps_parts()  # each pass calls compute_targets

    def setup(self, ctx: EditContext) -> None:
        self.method.setup(ctx)
        if self.neighbors is not None:
            neighbor_prefix(self.method.templates, self.neighbors)  # refuse a missing prefix before editing

    def memory_profile(self) -> MemoryProfile:
        # The wrapped method's, with its offload, context rows and z chunks: each iteration runs it.
        return self.method.memory_profile()

    def state_dict(self) -> dict:
        return self.method.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state)

    def efficacy_accuracy(self, ctx: EditContext, requests: list[EditRequest]) -> float:
        scored = score_answers(
            ctx.view, ctx.tok, [r.rewrite_prompt for r in requests], [r.target_new for r in requests]
        )
        return float(scored["exact"].float().mean())

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        m, view, tok = self.method, ctx.view, ctx.tok
        t0 = time.perf_counter()
        extra: list[ExtraRow] = []
        used: list[list[str]] = [[] for _ in requests]
        if self.neighbors is not None:
            prefix = neighbor_prefix(m.templates, self.neighbors)
            extra, used = neighbor_rows(view, tok, requests, self.neighbors, prefix=prefix)
        p_before = perplexity(target_nll(view, tok, requests, m.templates))
        iterations: list[dict] = []
        last = None
        stopped = False
        with restore_on_error(view, m.edited_layers()):
            for k in range(self.max_iterations):
                tk = time.perf_counter()
                targets = m.compute_targets(ctx, requests, extra or None)
                p_ideal = perplexity(targets.nll)  # p(θ_k, h̄_k)
                last = m.spread(ctx, requests, targets)  # θ_{k+1}
                p_after = perplexity(target_nll(view, tok, requests, m.templates))  # p(θ_{k+1}, ĥ_k)
                record = {
                    "iteration": k + 1,
                    "p_ideal": p_ideal,
                    "p_after": p_after,
                    "delta_p": p_after - p_ideal,
                    "z_nll": float(targets.nll.mean()),
                    "seconds": time.perf_counter() - tk,
                    **last.scalars,
                }
                if self.track_accuracy:
                    record["efficacy_acc"] = self.efficacy_accuracy(ctx, requests)
                iterations.append(record)
                if should_stop(record["delta_p"], self.epsilon):
                    stopped = True
                    break
        m.commit(last)
        final = iterations[-1]
        scalars: dict[str, float] = {
            "iter_iterations": float(len(iterations)),
            "iter_stopped": float(stopped),  # 1: the rule fired; 0: max_iterations reached
            "iter_delta_p": final["delta_p"],
            "iter_p_before": p_before,
            "iter_p_ideal": final["p_ideal"],
            "iter_p_after": final["p_after"],
            "z_nll": final["z_nll"],
            "seconds_iterations": time.perf_counter() - t0,
        }
        scalars.update({k: v for k, v in last.scalars.items()})
        if self.track_accuracy:
            scalars["iter_efficacy_acc_first"] = iterations[0]["efficacy_acc"]
            scalars["iter_efficacy_acc"] = final["efficacy_acc"]
        per_request: dict[str, dict] = {}
        if self.neighbors is not None:
            with_nb = [i for i, u in enumerate(used) if u]
            scalars["neighbor_missing"] = float(len(requests) - len(with_nb))
            scalars["neighbor_rows"] = float(len(extra))
            if extra:  # on the bare neighbour prompts (the specificity prompts), not the prefixed rows
                bare = [(p, requests[i].target_true) for i, prompts in enumerate(used) for p in prompts]
                kept = score_answers(view, tok, [p for p, _ in bare], [a for _, a in bare])["exact"]
                scalars["neighbor_kept_acc"] = float(kept.float().mean())  # still answered target_true
            per_request = {req.case_id: {"neighbor_prompts": used[i]} for i, req in enumerate(requests)}
        return EditResult(scalars=scalars, details={"iterations": iterations}, per_request=per_request)
