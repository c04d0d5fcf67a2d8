"""Functional core of the editing metrics: teacher-forced answer scoring.

For each (prompt, answer) pair: the mean token NLL of the answer after the prompt, and whether
every answer token is the greedy prediction. Logits are computed only at the answer positions.
"""

from __future__ import annotations

import torch

from editlab.editing.prompts import answer_ids, pad
from editlab.models.arch import ModelView


def answer_rows(tok, prompts: list[str], answers: list[str]):
    rows, t_row, t_pos, t_id = [], [], [], []
    for r, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ids = tok(prompt)["input_ids"]
        ans = answer_ids(tok, answer)
        rows.append(ids + ans[:-1])
        for j, a in enumerate(ans):
            t_row.append(r)
            t_pos.append(len(ids) - 1 + j)
            t_id.append(a)
    return rows, torch.tensor(t_row), torch.tensor(t_pos), torch.tensor(t_id)


def token_nll_and_hits(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, V], target [T] -> (NLL [T], argmax == target [T])."""
    logp = logits.float().log_softmax(-1)
    return -logp.gather(1, target.unsqueeze(1)).squeeze(1), logits.argmax(-1) == target


def reduce_rows(tok_nll: torch.Tensor, tok_hit: torch.Tensor, t_row: torch.Tensor, n_rows: int):
    """Per-row mean NLL [N], all-tokens-correct [N] and fraction of correct tokens [N]."""
    count = torch.zeros(n_rows).index_add(0, t_row, torch.ones_like(tok_nll))
    nll = torch.zeros(n_rows).index_add(0, t_row, tok_nll) / count
    hits = torch.zeros(n_rows).index_add(0, t_row, tok_hit.float())
    return nll, hits == count, hits / count


@torch.no_grad()
def score_answers(
    view: ModelView, tok, prompts: list[str], answers: list[str], batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """{"nll": [N] mean token NLL, "exact": [N] bool all tokens greedy, "token_acc": [N]}."""
    if not prompts:
        empty = torch.zeros(0)
        return {"nll": empty, "exact": empty.bool(), "token_acc": empty}
    rows, t_row, t_pos, t_id = answer_rows(tok, prompts, answers)
    base, unembed, device = view.model.base_model, view.unembed(), view.device
    all_nll, all_hit = torch.zeros(len(t_row)), torch.zeros(len(t_row), dtype=torch.bool)
    for start in range(0, len(rows), batch_size):
        stop = min(start + batch_size, len(rows))
        batch = pad(rows[start:stop], tok.pad_token_id).to(device)
        hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        sel = ((t_row >= start) & (t_row < stop)).nonzero().squeeze(1)
        logits = unembed(hidden[(t_row[sel] - start).to(device), t_pos[sel].to(device)])  # [t, V]
        nll, hit = token_nll_and_hits(logits, t_id[sel].to(device))
        all_nll[sel], all_hit[sel] = nll.cpu(), hit.cpu()
    nll, exact, token_acc = reduce_rows(all_nll, all_hit, t_row, len(rows))
    return {"nll": nll, "exact": exact, "token_acc": token_acc}
