"""The neighbour rows of neighbour-assisted editing (seed 004) as a plug-in of the z descent.

Each :class:`~editlab.editing.targets.ExtraRow` is one more prompt of its owner's z loss, with the
owner's shift added at the subject's last token of that prompt (methods/iterative.py builds them
from the facts that share the request's relation). A row either adds weight · NLL(answer) to its
owner's loss as a term of its own, or (``averaged``) joins the owner's rewrite rows in the mean
NLL, as the released neighbour-assisted compute_z does.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from editlab.editing.targets import DescentSetup, DescentStep, DescentTerm, ExtraRow, TermLoss, row_means


class NeighbourRows(DescentTerm):
    """The rows' NLL in their owners' loss; records Σ weight · NLL over each request's rows."""

    name = "neighbour_nll"

    def __init__(self, rows: Sequence[ExtraRow]) -> None:
        if not rows:
            raise ValueError("NeighbourRows needs at least one row (neighbour_terms gives none for none)")
        self.rows = list(rows)
        self.weight: torch.Tensor | None = None  # [R] loss weight of each extra row, once bound
        self.mine: torch.Tensor | None = None  # [R] bool, this term's rows
        self.joined: torch.Tensor | None = None  # [R] bool, this term's averaged rows
        self.any_joined = False

    def bind(self, setup: DescentSetup) -> NeighbourRows:
        device = setup.row_weight.device
        bound = NeighbourRows(self.rows)
        bound.weight = setup.row_weight
        bound.mine = torch.zeros(len(setup.row_weight), dtype=torch.bool, device=device)
        bound.mine[setup.own_rows] = True
        bound.joined = torch.zeros(len(setup.row_weight), dtype=torch.bool, device=device)
        bound.joined[setup.own_rows] = torch.tensor([e.averaged for e in self.rows], device=device)
        bound.any_joined = bool(bound.joined.any())
        return bound

    def fit(self, step: DescentStep, nll: torch.Tensor) -> torch.Tensor:
        """Averaged rows join the rewrite rows: the weighted mean NLL of both [n]."""
        if not self.any_joined:
            return nll
        counted = step.rewrite | self.joined[step.row_sel]  # [r] rows in the mean
        w = torch.where(step.rewrite, 1.0, self.weight[step.row_sel]) * counted  # [r] weight in the mean
        n = step.n
        return row_means(step.row_nll * w, step.sel_owner, n) / row_means(w, step.sel_owner, n).clamp_min(1e-30)

    def loss(self, step: DescentStep) -> TermLoss:
        """Σ weight · NLL over each request's separate rows [a]; records it over all its rows."""
        n, sel_owner, row_nll, device = step.n, step.sel_owner, step.row_nll, step.row_nll.device
        weight = self.weight[step.row_sel]  # [r]
        ex = self.mine[step.row_sel]
        ex_nll = torch.zeros(n, device=device).index_add(0, sel_owner[ex], row_nll[ex] * weight[ex])
        sep = ex & ~self.joined[step.row_sel]
        sep_nll = torch.zeros(n, device=device).index_add(0, sel_owner[sep], row_nll[sep] * weight[sep])
        return TermLoss(added=sep_nll[step.act_req], recorded=ex_nll[step.act_req].detach())

    def chunk(self, start: int, stop: int) -> NeighbourRows | None:
        rows = [dataclasses.replace(e, owner=e.owner - start) for e in self.rows if start <= e.owner < stop]
        return NeighbourRows(rows) if rows else None


def neighbour_terms(rows: Sequence[ExtraRow] | None) -> list[DescentTerm]:
    """The descent terms of ``rows``: none for none."""
    return [NeighbourRows(rows)] if rows else []
