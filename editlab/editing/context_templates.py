"""Context templates: short model-generated prefixes that keys and targets are averaged over.

Generated with a seeded generator and a plain forward per token (no KV cache): the reference's
cached generation with a mask covering only the current token produced garbage prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from editlab.models.prompts import pad
from editlab.models.sampling import sample_top_k


@dataclass
class ContextTemplates:
    """How the context prefixes are made.

    Args:
        count: number of generated prefixes (MEMIT: 5); 0 uses the bare prompt only.
        length: tokens per generated prefix (MEMIT: 10).
        top_k: sampling from the k most likely tokens.
        starters: first words of the prefixes, cycled.
        key_weighting: how a request's key averages its templates. "per_type" (MEMIT's
            compute_ks, copied by AlphaEdit, NSE, ECE): the mean of the bare prompt and of the
            prefixes' mean, so "{}" weighs 1/2 and each prefix 1/(2·count). "flat": the plain
            mean over all count + 1 templates (ROME's compute_u; editlab's earlier default).
            z's NLL is a flat mean over the templates either way, as in every compute_z.
    """

    count: int = 5
    length: int = 10
    top_k: int = 5
    starters: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    key_weighting: Literal["per_type", "flat"] = "per_type"

    def __post_init__(self) -> None:
        if self.count < 0 or self.length < 1 or self.top_k < 1 or not self.starters:
            raise ValueError(f"invalid context templates option: {self}")
        if self.key_weighting not in ("per_type", "flat"):
            raise ValueError(f"option context.key_weighting={self.key_weighting!r} must be 'per_type' or 'flat'")


@torch.no_grad()
def sample_continuations(model, tok, starts: list[str], length: int, top_k: int, seed: int) -> list[str]:
    """Top-k sampled continuations of each start text, deterministic under ``seed``."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = [tok(s)["input_ids"] for s in starts]
    for _ in range(length):
        batch = pad(rows, tok.pad_token_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        last = logits[torch.arange(len(rows), device=device), batch.lengths - 1].float().cpu()  # [B, V]
        nxt = sample_top_k(last, top_k, gen)  # [B]
        rows = [r + [int(t)] for r, t in zip(rows, nxt, strict=True)]
    return [tok.decode(r, skip_special_tokens=True) for r in rows]


def make_context_templates(model, tok, cfg: ContextTemplates, seed: int) -> list[str]:
    """["{}"] followed by ``cfg.count`` prefixes of the form "<generated text>. {}"."""
    if cfg.count == 0:
        return ["{}"]
    starts = [cfg.starters[i % len(cfg.starters)] for i in range(cfg.count)]
    texts = sample_continuations(model, tok, starts, cfg.length, cfg.top_k, seed)
    # Braces in generated text would be read as format fields.
    return ["{}"] + [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]
