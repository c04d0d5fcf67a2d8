"""Teacher-forced answer scoring: the functional core shared by the metrics and the methods.

For each (prompt, answer) pair: the mean token NLL of the answer after the prompt, and whether
every answer token is the greedy prediction. Logits are computed only at the answer positions.

Each pair is the row ``prompt ids + answer ids[:-1]`` with its answer tokens read at the row's last
``len(answer)`` positions. Causal attention makes the logits at a position depend on the tokens up
to it only, so a row equal to another, or a prefix of a longer one, is read inside that longer row
instead of being run again: a single-token answer's row is the bare prompt, which target_new and
target_true share, and CounterFact repeats neighbourhood prompts across cases (its first 2,000
cases with SmolLM2's tokenizer: 52,000 pairs, 22,503 rows run). The rows run are sorted by length
before batching, so a batch is padded to rows of about its own length, not to the longest
paraphrase of a case (255,701 positions run instead of 1,300,000; benchmarks/eval_throughput.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from editlab.models.arch import ModelView
from editlab.models.prompts import answer_ids, pad


@dataclass
class AnswerRows:
    """Token rows with teacher-forced answers, built row by row: the row ``prompt + answer[:-1]``,
    whose position len(prompt) - 1 + j predicts answer token j, and, per answer token, its row,
    that position and its id. The one builder of the metrics' answer rows (:func:`answer_rows`)
    and of the z loss's rows (editing/targets/rows.py)."""

    rows: list[list[int]] = field(default_factory=list)
    t_row: list[int] = field(default_factory=list)  # [T] row of each answer token
    t_pos: list[int] = field(default_factory=list)  # [T] position whose logits predict it
    t_id: list[int] = field(default_factory=list)  # [T] its id

    def add(self, prompt: list[int], answer: list[int] | None = None) -> int:
        """Appends the row of ``answer`` after ``prompt`` (None: the prompt alone, a row read
        elsewhere than at answer tokens); returns its index."""
        r = len(self.rows)
        if answer is None:
            self.rows.append(prompt)
            return r
        self.rows.append(prompt + answer[:-1])
        for j, a in enumerate(answer):
            self.t_row.append(r)
            self.t_pos.append(len(prompt) - 1 + j)
            self.t_id.append(a)
        return r


def answer_rows(tok, prompts: list[str], answers: list[str]):
    """Teacher-forced rows ``prompt + answer[:-1]`` and, per answer token, its row [T], the position
    that predicts it [T] and its id [T]. Each distinct prompt is tokenised once."""
    prompt_ids: dict[str, list[int]] = {}
    built = AnswerRows()
    for prompt, answer in zip(prompts, answers, strict=True):
        if prompt not in prompt_ids:
            prompt_ids[prompt] = tok(prompt)["input_ids"]
        ids = prompt_ids[prompt]
        if not ids:
            raise ValueError(f"prompt {prompt!r} has no token: no position predicts the answer {answer!r}")
        built.add(ids, answer_ids(tok, answer))
    return built.rows, torch.tensor(built.t_row), torch.tensor(built.t_pos), torch.tensor(built.t_id)


def shared_rows(rows: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The rows to run and where each row is read: (hosts, host index of each row).

    A host is a distinct row that is not a prefix of another row; every row is a prefix of (or
    equal to) its host, so its positions hold the same logits there. Hosts are ordered longest
    first (ties by content), ready to batch. In lexicographic order the rows that start with a row
    r follow r directly, so r is a prefix of some row iff it is a prefix of the next one, whose
    host then hosts r too.
    """
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    host_of_sorted: list[int] = [0] * len(rows)  # index into `found`
    found: list[list[int]] = []
    for k in range(len(order) - 1, -1, -1):
        row = rows[order[k]]
        if k + 1 < len(order) and rows[order[k + 1]][: len(row)] == row:
            host_of_sorted[k] = host_of_sorted[k + 1]
        else:
            host_of_sorted[k] = len(found)
            found.append(row)
    by_length = sorted(range(len(found)), key=lambda h: (-len(found[h]), found[h]))
    rank = {h: i for i, h in enumerate(by_length)}
    host_of = [0] * len(rows)
    for k, i in enumerate(order):
        host_of[i] = rank[host_of_sorted[k]]
    return [found[h] for h in by_length], host_of


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
    """{"nll": [N] mean token NLL, "exact": [N] bool all tokens greedy, "token_acc": [N]}.

    ``batch_size`` rows per forward, after sharing (see the module docstring); a position read by
    several answer tokens is unembedded once.
    """
    if not prompts:
        empty = torch.zeros(0)
        return {"nll": empty, "exact": empty.bool(), "token_acc": empty}
    rows, t_row, t_pos, t_id = answer_rows(tok, prompts, answers)
    hosts, host_of = shared_rows(rows)
    t_host = torch.tensor(host_of)[t_row]  # [T] host row holding each answer token
    # Distinct (host, position) pairs in host order: each batch's positions are one slice of them.
    width = max(len(h) for h in hosts)
    places, t_place = torch.unique(t_host * width + t_pos, return_inverse=True)  # [P], [T]
    p_host, p_pos = places // width, places % width  # [P], [P]
    base, unembed, device = view.model.base_model, view.unembed(), view.device
    all_nll, all_hit = torch.zeros(len(t_row)), torch.zeros(len(t_row), dtype=torch.bool)
    for start in range(0, len(hosts), batch_size):
        stop = min(start + batch_size, len(hosts))
        batch = pad(hosts[start:stop], tok.pad_token_id).to(device)
        hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        first, last = torch.searchsorted(p_host, torch.tensor([start, stop])).tolist()
        logits = unembed(hidden[(p_host[first:last] - start).to(device), p_pos[first:last].to(device)])  # [p, V]
        logp, best = logits.float().log_softmax(-1), logits.argmax(-1)  # [p, V], [p]
        sel = ((t_place >= first) & (t_place < last)).nonzero().squeeze(1)  # answer tokens read here
        local, target = (t_place[sel] - first).to(device), t_id[sel].to(device)
        all_nll[sel] = -logp[local, target].cpu()
        all_hit[sel] = (best[local] == target).cpu()
    nll, exact, token_acc = reduce_rows(all_nll, all_hit, t_row, len(rows))
    return {"nll": nll, "exact": exact, "token_acc": token_acc}
