"""Top-k sampling of the next token: the one sampler of the generated metrics (metrics/generation.py)
and of the context templates (editing/context_templates.py)."""

from __future__ import annotations

import torch


def sample_top_k(logits: torch.Tensor, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> [B] ids drawn from the softmax over the k largest logits (k=1: greedy).

    Drawn in float32 on the CPU with ``generator`` (a CPU generator), so the draw is the same on
    every device."""
    values, indices = logits.float().cpu().topk(top_k, dim=-1)  # [B, k]
    choice = torch.multinomial(values.softmax(-1), 1, generator=generator)  # [B, 1]
    return indices.gather(1, choice).squeeze(1)  # [B]
