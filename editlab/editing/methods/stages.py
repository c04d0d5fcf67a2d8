"""The two stages of a locate-and-edit method, as the iterative wrapper (seed 004) drives them.

Seed 004 splits MEMIT, PMET and ROME (and AlphaEdit) into OPTIMIZATION — find the ideal state
(z) that makes the model say target_new, on the current weights, writing nothing — and SPREAD —
write the edited weights so the model reaches it. A method that exposes these parts plugs into
:class:`editlab.editing.methods.iterative.IterativeEditing`:

    compute_targets(ctx, requests, extra=None) -> targets
        OPTIMIZATION on the current weights; writes nothing. ``targets.nll`` [n] is the target's
        NLL at the ideal state (the last measured loss term, mean over ``self.templates``
        prompts), i.e. −ln p(θ_k, h̄_k). ``extra`` (list of targets.ExtraRow, neighbour-assisted
        editing) adds rows to the z loss; a method that cannot must raise when it is given.
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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Spread:
    """What one SPREAD wrote: per-step scalars, and the sequential state to commit (MEMIT family:
    layer → this step's KKᵀ [d_ff, d_ff])."""

    scalars: dict[str, float] = field(default_factory=dict)
    pending: dict[int, torch.Tensor] = field(default_factory=dict)


STAGE_METHODS = ("compute_targets", "spread", "commit")


def has_stages(method) -> bool:
    return all(callable(getattr(method, name, None)) for name in STAGE_METHODS)
