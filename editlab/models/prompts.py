"""Token-level assembly of edit prompts: subject positions, answers, padded batches.

Answers are tokenised on their own as ``" " + answer`` without special tokens and appended to the
prompt's ids, so the answer tokens are identical in every context (re-tokenising the joined text,
as the reference code does, can merge across the boundary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def answer_ids(tok, answer: str) -> list[int]:
    ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} is empty after tokenisation")
    return ids


def subject_last_index(tok, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``template.format(subject)`` and the index of the subject's last token."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt template {template!r} must contain '{{}}' exactly once")
    prefix = template[: template.index("{}")]
    full_ids = tok(template.format(subject))["input_ids"]
    upto = tok(prefix + subject)["input_ids"]
    index = len(upto) - 1
    if index < 0 or index >= len(full_ids):
        raise ValueError(f"subject {subject!r} has no token in {template!r}")
    return full_ids, index


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, S], right-padded
    attention_mask: torch.Tensor  # [B, S]
    lengths: torch.Tensor  # [B]

    def to(self, device) -> "PaddedBatch":
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths.to(device))


def pad(rows: list[list[int]], pad_id: int) -> PaddedBatch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return PaddedBatch(ids, mask, torch.tensor([len(r) for r in rows]))


def check_context_length(model_config, n_tokens: int, what: str) -> None:
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit is not None and n_tokens > limit:
        raise ValueError(f"{what} is {n_tokens} tokens, longer than the model's context ({limit})")
