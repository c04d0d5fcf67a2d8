"""Perplexity of a model on a text corpus (collapse check on ME-PPL-50).

Token-weighted: exp(total NLL / number of predicted tokens) over all texts, not a mean of
per-text perplexities. Each text is tokenised as the tokenizer does by default: when it adds a BOS,
the BOS is context only (never predicted) and the first real token is predicted from it; without a
BOS the first token has no context and is not predicted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from editlab.metrics.base import LocalMetric
from editlab.models.prompts import pad


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """(sum of NLLs, count) of every real token after the first of each right-padded row.

    logits [B, S, V] predict position s + 1 from position s; input_ids, attention_mask [B, S].
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"expected logits [B, S, V], input_ids [B, S], attention_mask [B, S]; got "
            f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}"
        )
    pred = logits[:, :-1].float()  # [B, S-1, V]
    target = input_ids[:, 1:]  # [B, S-1]
    # Right padding: a target is real iff its own mask bit is set (its context then is too).
    real = attention_mask[:, 1:].bool()  # [B, S-1]
    nll = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")  # [B, S-1]
    return float(nll[real].double().sum()), int(real.sum())


@torch.no_grad()
def sequence_nll(
    model, tok, texts: list[str], batch_size: int = 8, max_length: int = 512, chunk_tokens: int = 2048
) -> tuple[float, int]:
    """(sum of token NLLs, number of predicted tokens) of ``model`` over ``texts``, truncated to
    ``max_length`` tokens each (BOS included), in right-padded batches.

    The texts are batched longest first, so a batch pads to texts of about its own length, and the
    vocabulary logits are computed at the predicting positions only (never at padding), at most
    ``chunk_tokens`` positions at a time: a [positions, V] block instead of [B, S, V].
    """
    if isinstance(texts, str):
        raise TypeError("sequence_nll takes a list of texts, not one string")
    if batch_size < 1 or max_length < 2 or chunk_tokens < 1:
        raise ValueError(
            f"need batch_size >= 1, max_length >= 2, chunk_tokens >= 1; got {batch_size}, {max_length}, {chunk_tokens}"
        )
    if model.training:
        raise ValueError("sequence_nll needs model.eval(): dropout would perturb the NLL")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)  # masked out anyway
    device = next(model.parameters()).device
    base, head = model.base_model, model.get_output_embeddings()
    rows = [tok(t)["input_ids"][:max_length] for t in texts]
    order = sorted((i for i, r in enumerate(rows) if r), key=lambda i: -len(rows[i]))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = pad([rows[i] for i in order[start : start + batch_size]], pad_id).to(device)
        hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        # Right padding: a target is real iff its own mask bit is set (its context then is too).
        real = batch.attention_mask[:, 1:].bool()  # [B, S-1]
        states, targets = hidden[:, :-1][real], batch.input_ids[:, 1:][real]  # [n, d], [n]
        for c in range(0, len(targets), chunk_tokens):
            logits = head(states[c : c + chunk_tokens]).float()  # [c, V]
            nll = F.cross_entropy(logits, targets[c : c + chunk_tokens], reduction="none")  # [c]
            total += float(nll.double().sum())
        count += len(targets)
    return total, count


def load_me_ppl(path: str | Path) -> list[str]:
    """Texts of ME-PPL (a JSON list of {"Corpus", "Text"})."""
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list) or not all(isinstance(r, dict) and "Text" in r for r in records):
        raise ValueError(f"{path}: expected a JSON list of {{'Corpus', 'Text'}} records")
    return [str(r["Text"]) for r in records]


class Perplexity(LocalMetric):
    """exp(sum NLL / predicted tokens); states ``sum_nll`` and ``n_tokens`` are sum-reduced."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, sum_nll: float | torch.Tensor, n_tokens: int | torch.Tensor) -> None:
        """Add the output of ``sequence_nll`` or ``token_nll``."""
        sum_nll, n_tokens = float(sum_nll), int(n_tokens)
        if n_tokens < 0 or math.isnan(sum_nll):
            raise ValueError(f"invalid NLL sum {sum_nll} over {n_tokens} tokens")
        self.sum_nll += sum_nll
        self.n_tokens += n_tokens

    def compute(self) -> torch.Tensor:
        if int(self.n_tokens) == 0:
            raise RuntimeError("Perplexity: no token was scored")
        return torch.exp(self.sum_nll / self.n_tokens).float()
