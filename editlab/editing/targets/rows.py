"""Token rows of the z loss: the rewrite rows (context template × request, the answer
teacher-forced), one KL row per request (the essence prompt), then the extra rows of the loss's
plug-ins (neighbour rows), each with the position where its request's shift enters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editlab.models.prompts import answer_ids, subject_last_index
from editlab.models.scoring import AnswerRows
from editlab.types import EditRequest


@dataclass
class ExtraRow:
    """One more prompt in a request's z loss (neighbour-assisted editing, seed 004), with the
    request's δ added at the subject's last token of this prompt. ``averaged`` False:
    ``weight`` · NLL(answer | template.format(subject)) is added to that request's loss as a
    term of its own. True: the row is one more rewrite row of the request, its NLL averaged
    with the rewrite rows' (weight: its weight in that mean, each rewrite row weighing 1), as
    the released neighbour-assisted compute_z does.

    Args:
        owner: index, in the step's request list, of the request whose δ and loss the row joins.
        template: the prompt with "{}" where ``subject`` goes (no context prefix).
        subject: the subject of this prompt (where δ is added).
        answer: the answer whose NLL is minimised (a neighbour's target_true).
        weight: factor of the row's mean token NLL in the loss.
        averaged: join the owner's rewrite rows (see above) instead of a separate term.
    """

    owner: int
    template: str
    subject: str
    answer: str
    weight: float = 1.0
    averaged: bool = False


@dataclass
class TargetRows:
    """Token rows of one step: rewrite rows (template x request), then one KL row per request,
    then the extra rows (if any)."""

    batch_rows: list[list[int]]
    edit_pos: torch.Tensor  # [R] subject-last position where δ is added
    owner: torch.Tensor  # [R] request of each row
    is_kl: torch.Tensor  # [R] bool
    tgt_row: torch.Tensor  # [T] row of each answer token to score
    tgt_pos: torch.Tensor  # [T] position whose logits predict it
    tgt_id: torch.Tensor  # [T] answer token id
    n_requests: int
    is_extra: torch.Tensor | None = None  # [R] bool, extra rows
    row_weight: torch.Tensor | None = None  # [R] loss weight of each extra row (0 elsewhere)


def target_rows(
    tok, requests: list[EditRequest], templates: list[str], kl_prompt: str, extra: list[ExtraRow] | None = None
) -> TargetRows:
    built = AnswerRows()  # the answers are teacher-forced as in the metrics' rows
    edit_pos, owner, is_kl = [], [], []
    for t in templates:
        for i, req in enumerate(requests):
            ids, idx = subject_last_index(tok, t.format(req.prompt), req.subject)
            built.add(ids, answer_ids(tok, req.target_new))
            edit_pos.append(idx)
            owner.append(i)
            is_kl.append(False)
    for i, req in enumerate(requests):
        ids, idx = subject_last_index(tok, kl_prompt, req.subject)
        built.add(ids)  # no answer: the KL term reads its next-token distribution
        edit_pos.append(idx)
        owner.append(i)
        is_kl.append(True)
    n_base = len(built.rows)
    weight = [0.0] * n_base
    for row in extra or []:
        if not 0 <= row.owner < len(requests):
            raise ValueError(f"extra row {row} names request {row.owner}, outside the step's {len(requests)}")
        ids, idx = subject_last_index(tok, row.template, row.subject)
        built.add(ids, answer_ids(tok, row.answer))
        edit_pos.append(idx)
        owner.append(row.owner)
        is_kl.append(False)
        weight.append(float(row.weight))
    as_t = torch.tensor
    is_extra = torch.arange(len(built.rows)) >= n_base
    return TargetRows(
        built.rows,
        as_t(edit_pos),
        as_t(owner),
        as_t(is_kl),
        as_t(built.t_row),
        as_t(built.t_pos),
        as_t(built.t_id),
        len(requests),
        is_extra,
        as_t(weight, dtype=torch.float32),
    )


def kl_token_index(position: str, lengths: torch.Tensor, edit_pos: torch.Tensor) -> torch.Tensor:
    """Index [r] of the token whose distribution the KL term reads in each KL row, counted from
    the row's first token: the subject's last token (``edit_pos``) or the row's last token."""
    if position == "subject":
        return edit_pos
    if position == "last":
        return lengths - 1
    raise ValueError(f"option targets.kl_position={position!r} must be 'subject' or 'last'")
