"""FT-L: fine-tune one FFN out-projection on the edit prompts (the ROME paper's baseline), and
FT with EAC's anchors and scored elastic net on the weight change (the EAC paper's appendix E).

Loss: mean over the step's requests of the teacher-forced mean token NLL of target_new after the
rewrite prompt (the reference scored every target token at the prompt's last position, which is
right only for one-token targets). Adam on the layer's weight; after every update the change is
clipped to |W − W₀| ≤ norm_constraint elementwise (FT-L's L∞ constraint) when one is set; a step
stops early once the loss is below ``early_stop_loss``.

With ``eac``: ``select_steps`` updates recording ∂L/∂W, the saliency |mean grad ⊙ ΔW₁| of every
weight entry, anchors = entries reaching the ``percentile``-th percentile, then ``retrain_steps``
updates from W₀ + m ⊙ ΔW₁ on the anchors only with λ Σ α|ΔW| + μ‖ΔW‖² added to the loss.
"""

from __future__ import annotations

import time

import torch

from editlab.editing.eac import EACConfig, GradientMean, anchor_mask, saliency, scored_elastic_net
from editlab.editing.methods.base import EditContext, EditMethod, restore_on_error
from editlab.errors import check_step_sum
from editlab.models.prompts import pad
from editlab.models.scoring import answer_rows, token_nll_and_hits
from editlab.types import EditRequest, EditResult


def edit_loss(view, tok, requests: list[EditRequest]) -> torch.Tensor:
    """Mean over requests of the mean token NLL of target_new after the rewrite prompt (scalar)."""
    rows, t_row, t_pos, t_id = answer_rows(tok, [r.rewrite_prompt for r in requests], [r.target_new for r in requests])
    device = view.device
    batch = pad(rows, tok.pad_token_id).to(device)
    hidden = view.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = view.unembed()(hidden.last_hidden_state[t_row.to(device), t_pos.to(device)])  # [T, V]
    nll, _ = token_nll_and_hits(logits, t_id.to(device))  # [T]
    t_row = t_row.to(device)
    count = torch.zeros(len(rows), device=device).index_add(0, t_row, torch.ones_like(nll))
    per_request = torch.zeros(len(rows), device=device).index_add(0, t_row, nll) / count
    return per_request.mean()


class FT(EditMethod):
    def __init__(
        self,
        layer: int,
        lr: float = 5e-4,
        steps: int = 25,
        norm_constraint: float | None = 5e-4,
        weight_decay: float = 0.0,
        early_stop_loss: float = 1e-2,
        eac: EACConfig | None = None,
    ) -> None:
        """
        Args:
            layer: the layer whose FFN out-projection is fine-tuned.
            lr: Adam learning rate.
            steps: updates per edit step (with eac: must equal eac.select_steps + eac.retrain_steps).
            norm_constraint: ε of the L∞ constraint |W − W₀| ≤ ε (FT-L); None: unconstrained FT.
            weight_decay: Adam's weight decay.
            early_stop_loss: stop the step once the loss is below this.
            eac: EAC's anchors and scored elastic net on ΔW (appendix E); None: plain FT.
        """
        if lr <= 0 or steps < 1 or weight_decay < 0:
            raise ValueError(f"options lr={lr}, steps={steps}, weight_decay={weight_decay}: need lr > 0, steps >= 1")
        if norm_constraint is not None and norm_constraint <= 0:
            raise ValueError(f"option norm_constraint={norm_constraint} must be > 0 (or null for none)")
        if eac is not None:
            parts = {"eac.select_steps": eac.select_steps, "eac.retrain_steps": eac.retrain_steps}
            check_step_sum("steps", steps, parts, "when eac is set")
        self.layer = layer
        self.layers = [layer]
        self.lr, self.steps, self.norm_constraint = lr, steps, norm_constraint
        self.weight_decay, self.early_stop_loss, self.eac = weight_decay, early_stop_loss, eac

    def setup(self, ctx: EditContext) -> None:
        ctx.view.check_layers(self.layers, option="layer")

    def descend(
        self,
        ctx: EditContext,
        requests: list[EditRequest],
        weight: torch.nn.Parameter,
        master: torch.Tensor,
        w0: torch.Tensor,
        steps: int,
        mask: torch.Tensor | None = None,
        score: torch.Tensor | None = None,
        grads: GradientMean | None = None,
    ) -> tuple[float, int]:
        """``steps`` Adam updates of ``master`` (storage orientation: everything here is
        elementwise; ``w0`` in master's dtype), each written into the model's ``weight``; returns
        the last loss and the updates made. ``master`` is ``weight`` itself in float32, else its
        float32 copy (:func:`float32_master`)."""
        opt = torch.optim.Adam([master], lr=self.lr, weight_decay=self.weight_decay)
        loss_value, done = float("nan"), 0
        for _ in range(steps):
            opt.zero_grad()
            weight.grad = None
            loss = edit_loss(ctx.view, ctx.tok, requests)
            loss_value = float(loss.detach())
            if loss_value < self.early_stop_loss:
                break
            if score is not None:
                assert self.eac is not None
                change = (master - w0).flatten()[None]  # [1, numel]
                loss = loss + scored_elastic_net(change, score, self.eac.l1, self.eac.l2, self.eac.eps).sum()
            loss.backward()
            if master is not weight:  # the NLL's gradient reached the model's weight: move it to master
                master.grad = weight.grad.float() if master.grad is None else master.grad + weight.grad.float()
            if grads is not None:
                grads.record(
                    torch.zeros(1, dtype=torch.long, device=weight.device), master.grad.detach().flatten()[None]
                )
            opt.step()
            with torch.no_grad():
                if mask is not None:  # Adam's weight decay would move non-anchors: pin them
                    master.copy_(torch.where(mask, master, w0))
                if self.norm_constraint is not None:
                    master.copy_(torch.clamp(master, w0 - self.norm_constraint, w0 + self.norm_constraint))
                if master is not weight:
                    weight.copy_(master)  # the model runs in its dtype: one rounding per update
            done += 1
        return loss_value, done

    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        view = ctx.view
        weight = view.ffn_out(self.layer).weight
        w0 = weight.detach().clone()
        master = float32_master(weight)
        w0_master = w0 if master is weight else w0.float()
        t0 = time.perf_counter()
        scalars: dict[str, float] = {}
        with restore_on_error(view, [self.layer]):
            weight.requires_grad_(True)
            master.requires_grad_(True)
            try:
                if self.eac is None:
                    loss, updates = self.descend(ctx, requests, weight, master, w0_master, self.steps)
                else:
                    grads = GradientMean((1, weight.numel()), weight.device)
                    _, first = self.descend(
                        ctx, requests, weight, master, w0_master, self.eac.select_steps, grads=grads
                    )
                    with torch.no_grad():
                        score = saliency(grads.mean(), (master - w0_master).flatten()[None])  # [1, numel]
                        flat_mask = anchor_mask(score, self.eac.percentile)  # [1, numel]
                        mask = flat_mask.view_as(weight)
                        # eq. 3: non-anchors back to W₀ (retrain_from "zero": every entry; FT-EAC
                        # has no released code, so "stage1", the paper's eq. 3, is the default).
                        stage1 = self.eac.start("stage1") == "stage1"
                        master.copy_(torch.where(mask, master, w0_master) if stage1 else w0_master)
                        if master is not weight:
                            weight.copy_(master)
                    loss, second = self.descend(
                        ctx, requests, weight, master, w0_master, self.eac.retrain_steps, mask=mask, score=score
                    )
                    updates = first + second
                    scalars["eac/anchor_fraction"] = float(flat_mask.float().mean())
            finally:
                weight.requires_grad_(False)
                weight.grad = None
        change = (weight.detach() - w0).double()
        scalars.update(
            {
                "ft_loss": loss,
                "ft_updates": float(updates),
                f"delta_norm/l{self.layer}": float(change.norm()),
                "seconds_solve": time.perf_counter() - t0,
            }
        )
        return EditResult(scalars=scalars)


def float32_master(weight: torch.nn.Parameter) -> torch.Tensor:
    """What Adam trains: the weight itself when it is float32 or float64; a float32 copy of a
    bfloat16 / float16 weight. In half precision Adam's state underflows (float16: eps = 1e-8 and
    grad² below ~6e-8 are 0, so m / (√v + eps) is inf or NaN) and an update below half a unit in
    the last place of an entry is lost; the copy accumulates them and each update is rounded into
    the model once."""
    if weight.dtype in (torch.float32, torch.float64):
        return weight
    return weight.detach().float()
