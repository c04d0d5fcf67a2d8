"""The stages of a MEMIT-family step, as the iterative wrapper (seed 004) drives them, and the one
SPREAD loop they share.

Seed 004 splits a locate-and-edit method into OPTIMIZATION — find the ideal state (z) that makes
the model say target_new, writing nothing — and SPREAD — write the edited weights so the model
reaches it. A :class:`StagedMethod` exposes these parts and plugs into
:class:`editlab.editing.methods.iterative.IterativeEditing`:

    compute_targets(ctx, requests, extra=None) -> targets
        OPTIMIZATION; writes nothing. ``targets.z`` [n, d_model] is the ideal state and
        ``targets.nll`` [n] the target's NLL there (the last measured loss term, mean over
        ``self.templates`` prompts), i.e. −ln p(θ_k, h̄_k). ``extra`` (list of targets.ExtraRow,
        neighbour-assisted editing) adds rows to the z loss; a method that cannot must raise when
        it is given.
    spread(ctx, requests, targets) -> Spread
        SPREAD: writes the weights (putting them back if it fails half-way) and returns per-step
        scalars; it must not touch the sequential state (cache of past keys), which it returns
        in ``Spread.pending`` instead.
    commit(spread)
        Applies ``spread.pending`` once the step is final (the wrapper commits only its last
        iteration's spread, so one step's keys enter the cache once).
    templates: list[str]
        the context templates the targets' NLL is averaged over.

``apply`` of such a method is compute_targets + spread + commit.

The MEMIT-family SPREAD (:func:`spread_over_layers`) walks the edited layers in order: the keys K_l
and residuals R at layer l (a :data:`ResidualRule`; MEMIT's by default) measured on the weights
the earlier layers left, ΔW_l = solve(l, K_l, R) (a :data:`LayerSolve`: MEMIT's full solve, ECE's
and NSE's neuron-restricted one, AlphaEdit's null-space projected one), W_l += ΔW_l.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from editlab.editing.keys import KeyWeighting, keys_at_layers
from editlab.editing.methods.base import EditContext, EditMethod, restore_on_error
from editlab.models.arch import ModelView
from editlab.models.weights import add_delta
from editlab.types import EditRequest

if TYPE_CHECKING:
    from editlab.editing.targets import TargetResult


@dataclass
class Spread:
    """What one SPREAD wrote: per-step scalars, and the sequential state to commit (MEMIT family:
    layer → this step's KKᵀ [d_ff, d_ff])."""

    scalars: dict[str, float] = field(default_factory=dict)
    pending: dict[int, torch.Tensor] = field(default_factory=dict)


class Targets(Protocol):
    """What OPTIMIZATION hands SPREAD (targets.TargetResult, or a method's own record around it)."""

    @property
    def z(self) -> torch.Tensor:
        """The ideal states [n, d_model] at the last edited layer."""

    @property
    def nll(self) -> torch.Tensor:
        """The target's NLL [n] there, mean over the method's templates: −ln p(θ_k, h̄_k)."""


@dataclass
class MethodTargets:
    """A method's own targets record around the TargetResult of its z stage (``result``): its z
    and nll are the result's. Subclasses add what their spread needs."""

    result: TargetResult

    @property
    def z(self) -> torch.Tensor:
        return self.result.z  # [n, d_model]

    @property
    def nll(self) -> torch.Tensor:
        return self.result.nll  # [n]


class StagedMethod(EditMethod):
    """A method with OPTIMIZATION and SPREAD stages (see the module docstring): MEMIT, MEMIT_seq,
    MEMIT-EAC, AlphaEdit, PMET, ROME, ECE and NSE."""

    templates: list[str]

    @abstractmethod
    def compute_targets(self, ctx: EditContext, requests: list[EditRequest], extra: list | None = None) -> Targets:
        """OPTIMIZATION (writes nothing); ``extra``: neighbour rows of the z loss, or refused."""

    def compute_targets_keeps_parts(self) -> bool:
        """Whether compute_targets itself takes its z through the step's parts (the iterative
        wrapper calls it directly). Default: no."""
        return False

    def z_in_step_parts(self) -> bool:
        return self.compute_targets_keeps_parts()

    @abstractmethod
    def spread(self, ctx: EditContext, requests: list[EditRequest], targets: Targets) -> Spread:
        """SPREAD: write the weights towards ``targets``; the sequential state waits in ``pending``."""

    @abstractmethod
    def commit(self, spread: Spread) -> None:
        """Apply ``spread.pending`` once the step is final."""

    def run_stages(self, ctx: EditContext, requests: list[EditRequest]) -> StagedStep:
        """One plain step, in order: compute_targets, spread, commit, each timed; the key forwards
        inside the spread (``ctx.stopwatch``'s "keys") apart from the rest of it."""
        t0 = time.perf_counter()
        targets = self.compute_targets(ctx, requests)
        t1 = time.perf_counter()
        keys_before = ctx.stopwatch.read("keys")
        spread = self.spread(ctx, requests, targets)
        self.commit(spread)
        seconds_keys = ctx.stopwatch.read("keys") - keys_before
        return StagedStep(targets, spread, t1 - t0, time.perf_counter() - t1 - seconds_keys, seconds_keys)


@dataclass
class StagedStep:
    """A step run by :meth:`StagedMethod.run_stages`: its targets, its spread, and the seconds of
    compute_targets, of spread + commit less their key forwards, and of those key forwards."""

    targets: Targets
    spread: Spread
    seconds_targets: float
    seconds_spread: float  # the solves, writes and checks of the spread: its key forwards not included
    seconds_keys: float = 0.0


LayerSolve = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, K [n, d_ff], R [n, d]) → ΔW
# (ctx, requests, templates, layers, i, z) → keys K [n, d_ff] at layers[i] and residuals R [n, d_model]
ResidualRule = Callable[
    [EditContext, list[EditRequest], list[str], list[int], int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def layer_keys(
    ctx: EditContext,
    requests: list[EditRequest],
    templates: list[str],
    key_layer: int,
    out_layer: int,
    weighting: KeyWeighting = "per_type",
    share: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at ``key_layer`` [n, d_ff] (templates combined by ``weighting``) and outputs of
    ``out_layer`` [n, d_model]. ``share``: rows shared over ranks and gathered; False: this rank
    computes every row (NSE, which runs whole on every rank)."""
    keys, outs = layers_keys(ctx, requests, templates, [key_layer], out_layer, weighting, share)
    return keys[0], outs


def layers_keys(
    ctx: EditContext,
    requests: list[EditRequest],
    templates: list[str],
    key_layers: list[int],
    out_layer: int,
    weighting: KeyWeighting = "per_type",
    share: bool = True,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """:func:`layer_keys` of several layers on the same weights in one forward per chunk: keys
    [n, d_ff] per layer of ``key_layers``, in order, and outputs of ``out_layer`` [n, d_model]."""
    keys_fn = partial(
        keys_at_layers,
        ctx.view,
        ctx.tok,
        templates=templates,
        key_layers=key_layers,
        out_layer=out_layer,
        weighting=weighting,
    )
    with ctx.stopwatch.timing("keys"):
        return ctx.per_request(requests, keys_fn) if share else keys_fn(requests)


def layer_residual(z: torch.Tensor, cur: torch.Tensor, layers_left: int) -> torch.Tensor:
    """MEMIT's residual R = (z − H) / (layers left) [n, d_model], float64: each remaining layer
    writes its share of what is still missing."""
    return (z.double() - cur) / layers_left


def memit_residual(
    ctx: EditContext,
    requests: list[EditRequest],
    templates: list[str],
    layers: list[int],
    i: int,
    z: torch.Tensor,
    weighting: KeyWeighting = "per_type",
    share: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT: keys at layers[i] (templates combined by ``weighting``; ``share`` as
    :func:`layer_keys`), R = (z − H) / (layers left), H the current output of the last layer."""
    keys, cur = layer_keys(ctx, requests, templates, layers[i], layers[-1], weighting, share)  # [n, d_ff], [n, d]
    return keys, layer_residual(z, cur, len(layers) - i)


def write_layers(
    view: ModelView,
    layers: list[int],
    residual_at: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    solve: LayerSolve,
) -> dict[int, tuple[torch.Tensor, float]]:
    """The spread loop: for each edited layer l = layers[i] in order, its keys K_l [n, d_ff] and
    residuals R [n, d_model] (``residual_at(i)``, measured on the weights the earlier layers left),
    W_l += solve(l, K_l, R). Returns layer → (K_l, ‖ΔW_l‖). Puts nothing back on failure: see
    :func:`spread_over_layers`."""
    written: dict[int, tuple[torch.Tensor, float]] = {}
    for i, layer in enumerate(layers):
        keys, resid = residual_at(i)  # [n, d_ff], [n, d_model]
        delta = solve(layer, keys, resid)  # [d_model, d_ff]
        add_delta(view.ffn_out(layer), delta)
        written[layer] = (keys, float(delta.norm()))
    return written


def spread_over_layers(
    ctx: EditContext,
    requests: list[EditRequest],
    templates: list[str],
    layers: list[int],
    z: torch.Tensor,
    solve: LayerSolve,
    residual: ResidualRule = memit_residual,
) -> Spread:
    """The MEMIT-family SPREAD: :func:`write_layers` with ``residual`` towards ``z``, the layers
    already written put back if a later one fails. Returns per-layer scalars and, pending for the
    sequential cache, K_lᵀK_l."""
    out = Spread()
    with restore_on_error(ctx.view, layers):
        written = write_layers(ctx.view, layers, lambda i: residual(ctx, requests, templates, layers, i, z), solve)
        for layer, (keys, delta_norm) in written.items():
            out.pending[layer] = keys.T @ keys  # [d_ff, d_ff]
            out.scalars[f"delta_norm/l{layer}"] = delta_norm
    return out
