"""Settings and result of the z optimisation (MEMIT's compute_z)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class TargetConfig:
    """z optimisation settings (MEMIT's compute_z).

    Args:
        lr: Adam learning rate (v_lr).
        steps: maximum gradient steps (v_num_grad_steps).
        clamp_norm_factor: ‖δ‖ is kept below this times ‖h‖.
        weight_decay: weight of ‖δ‖/‖h‖² in the loss (v_weight_decay).
        kl_factor: weight of the KL term on "{subject} is a" that keeps the subject's meaning.
        kl_prompt: the essence prompt of the KL term.
        kl_position: the token of the KL prompt whose next-token distribution the KL term
            compares. "subject": the subject's last token, where δ is added (every released
            compute_z: ``lookup_idxs`` of the KL rows). "last": the prompt's last token ("a" of
            "{} is a"), editlab's earlier default.
        early_stop_loss: a request whose loss is below this stops optimising.
        prefix_cache: compute the tokens before each row's subject once per step and reuse their
            keys/values in every optimisation step (δ enters at the subject's last token, so in a
            causal model nothing before it depends on δ). False runs the whole row every step,
            as the reference does; both give the same z.
        lower_cache: compute the residual stream entering the z layer once per step and start
            every optimisation forward there (δ enters at the z layer's output, so the layers
            below it do not depend on δ). False runs them every step, as the reference does; both
            give the same z up to float rounding.
        requests_per_forward: optimise the z of at most this many requests per forward (a step's
            requests in consecutive chunks). A request's z depends only on its own rows (its loss,
            per-row Adam and early stop are its own), so chunks give the same z up to float
            rounding (other batch shapes and padding), and the activations kept for the backward
            pass shrink with the chunk: about 13 GiB for 100 SmolLM2 requests in one forward.
            None: every request of the step in one forward (the reference runs one at a time).
    """

    lr: float = 0.5
    steps: int = 25
    clamp_norm_factor: float = 0.75
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    kl_position: Literal["subject", "last"] = "subject"
    early_stop_loss: float = 5e-2
    prefix_cache: bool = True
    lower_cache: bool = True
    requests_per_forward: int | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.steps < 1 or self.clamp_norm_factor <= 0:
            raise ValueError(f"invalid target options: {self}")
        if self.requests_per_forward is not None and self.requests_per_forward < 1:
            raise ValueError(
                f"option targets.requests_per_forward={self.requests_per_forward}: use a positive count or null"
            )


@dataclass
class TargetResult:
    z: torch.Tensor  # [n, d_model] float32 target at the z layer
    h: torch.Tensor  # [n, d_model] initial residual at the z layer (bare prompt)
    loss: torch.Tensor  # [n] last loss of each request
    nll: torch.Tensor  # [n] last target NLL of each request
    steps: torch.Tensor  # [n] gradient steps taken by each request
