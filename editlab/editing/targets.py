"""Target values z: the residual-stream vector at the last edited layer that makes the model
say target_new, optimised for all requests of a step in one padded forward.

Each request i owns one row δ_i of a [n, d_model] tensor. Adam is applied per row with its own
step counter, which makes the batched optimisation identical to optimising each request alone;
a request leaves the batch once its loss is under ``early_stop_loss``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from editlab.editing.prompts import answer_ids, pad, subject_last_index
from editlab.models.arch import ModelView
from editlab.models.hooks import edit_output
from editlab.types import EditRequest


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
        early_stop_loss: a request whose loss is below this stops optimising.
    """

    lr: float = 0.5
    steps: int = 25
    clamp_norm_factor: float = 0.75
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    early_stop_loss: float = 5e-2

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.steps < 1 or self.clamp_norm_factor <= 0:
            raise ValueError(f"invalid target options: {self}")


@dataclass
class TargetRows:
    """Token rows of one step: rewrite rows (template x request), then one KL row per request."""

    batch_rows: list[list[int]]
    edit_pos: torch.Tensor  # [R] subject-last position where δ is added
    owner: torch.Tensor  # [R] request of each row
    is_kl: torch.Tensor  # [R] bool
    tgt_row: torch.Tensor  # [T] row of each answer token to score
    tgt_pos: torch.Tensor  # [T] position whose logits predict it
    tgt_id: torch.Tensor  # [T] answer token id
    n_requests: int


def target_rows(tok, requests: list[EditRequest], templates: list[str], kl_prompt: str) -> TargetRows:
    rows, edit_pos, owner, is_kl = [], [], [], []
    tgt_row, tgt_pos, tgt_id = [], [], []
    for t in templates:
        for i, req in enumerate(requests):
            ids, idx = subject_last_index(tok, t.format(req.prompt), req.subject)
            ans = answer_ids(tok, req.target_new)
            r = len(rows)
            # The answer is teacher-forced: position len(ids)-1+j predicts ans[j].
            rows.append(ids + ans[:-1])
            edit_pos.append(idx)
            owner.append(i)
            is_kl.append(False)
            for j, a in enumerate(ans):
                tgt_row.append(r)
                tgt_pos.append(len(ids) - 1 + j)
                tgt_id.append(a)
    for i, req in enumerate(requests):
        ids, idx = subject_last_index(tok, kl_prompt, req.subject)
        rows.append(ids)
        edit_pos.append(idx)
        owner.append(i)
        is_kl.append(True)
    as_t = torch.tensor
    return TargetRows(
        rows, as_t(edit_pos), as_t(owner), as_t(is_kl), as_t(tgt_row), as_t(tgt_pos), as_t(tgt_id), len(requests)
    )


@dataclass
class TargetResult:
    z: torch.Tensor  # [n, d_model] float32 target at the z layer
    h: torch.Tensor  # [n, d_model] initial residual at the z layer (bare prompt)
    loss: torch.Tensor  # [n] last loss of each request
    nll: torch.Tensor  # [n] last target NLL of each request
    steps: torch.Tensor  # [n] gradient steps taken by each request


class RowAdam:
    """torch.optim.Adam's update applied row by row, each row with its own step count."""

    def __init__(self, shape: torch.Size, lr: float, device, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        self.t = torch.zeros(shape[0], device=device)

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t[rows] += 1
        t = self.t[rows].unsqueeze(1)  # [a, 1]
        self.m[rows] = b1 * self.m[rows] + (1 - b1) * grad
        self.v[rows] = b2 * self.v[rows] + (1 - b2) * grad * grad
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        denom = self.v[rows].sqrt() / bc2.sqrt() + self.eps
        param[rows] -= (self.lr / bc1) * self.m[rows] / denom


def _row_means(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, torch.ones_like(values))
    return total / count.clamp_min(1)


def optimize_targets(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    cfg: TargetConfig,
    progress: bool = True,
) -> TargetResult:
    device = view.device
    tr = target_rows(tok, requests, templates, cfg.kl_prompt)
    n = tr.n_requests
    full = pad(tr.batch_rows, tok.pad_token_id).to(device)
    edit_pos, owner, is_kl = tr.edit_pos.to(device), tr.owner.to(device), tr.is_kl.to(device)
    tgt_row, tgt_pos, tgt_id = tr.tgt_row.to(device), tr.tgt_pos.to(device), tr.tgt_id.to(device)
    d_model = view.model.config.hidden_size
    delta = torch.zeros(n, d_model, device=device, dtype=torch.float32)
    adam = RowAdam(delta.shape, cfg.lr, device)
    h = torch.zeros(n, d_model, device=device)
    kl_init: torch.Tensor | None = None  # [n, V] log-probs on the KL prompt without δ
    active = torch.ones(n, dtype=torch.bool, device=device)
    last_loss = torch.zeros(n, device=device)
    last_nll = torch.zeros(n, device=device)
    unembed, base = view.unembed(), view.model.base_model
    bar = tqdm(range(cfg.steps), desc=f"z ({n} requests)", disable=not progress, file=sys.stderr, leave=False)
    for it in bar:
        act_req = active.nonzero().squeeze(1)  # [a]
        row_sel = active[owner].nonzero().squeeze(1)  # [r] rows of active requests
        # Local indices of the selected rows, to gather from the sub-batch.
        local = torch.full((len(owner),), -1, device=device, dtype=torch.long)
        local[row_sel] = torch.arange(len(row_sel), device=device)
        width = int(full.lengths[row_sel.cpu()].max())
        ids = full.input_ids[row_sel, :width]
        mask = full.attention_mask[row_sel, :width]
        d = delta.clone().requires_grad_(True)
        sel_pos, sel_owner = edit_pos[row_sel], owner[row_sel]
        first = it == 0

        def add_delta(out: torch.Tensor) -> torch.Tensor:  # out: [r, S, d_model]
            if first:
                bare = (~is_kl[row_sel]) & (torch.arange(len(row_sel), device=device) < n)
                h[sel_owner[bare]] = out[bare, sel_pos[bare]].detach().float()
            ar = torch.arange(out.shape[0], device=device)
            return out.index_put((ar, sel_pos), d[sel_owner].to(out.dtype), accumulate=True)

        with torch.enable_grad(), edit_output(view.layer(layer), f"layer {layer}", add_delta):
            hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # [r, S, d]
            tsel = active[owner[tgt_row]]
            t_rows = local[tgt_row[tsel]]
            logits = unembed(hidden[t_rows, tgt_pos[tsel]]).float()  # [t, V]: only where the loss needs it
            tok_nll = -logits.log_softmax(-1).gather(1, tgt_id[tsel].unsqueeze(1)).squeeze(1)  # [t]
            row_nll = _row_means(tok_nll, t_rows, len(row_sel))  # [r]
            rewrite = ~is_kl[row_sel]
            nll = _row_means(row_nll[rewrite], sel_owner[rewrite], n)  # [n]
            kl_rows = is_kl[row_sel].nonzero().squeeze(1)
            kl_logp = unembed(hidden[kl_rows, full.lengths[row_sel[kl_rows]] - 1]).float().log_softmax(-1)
            if first:
                kl_init = kl_logp.detach()
            # KL(current || initial) on the essence prompt, as the reference computes it.
            kl_init_act = kl_init[act_req] if not first else kl_init
            kl = (kl_logp.exp() * (kl_logp - kl_init_act)).sum(-1)  # [a]
            norm_h = h[act_req].norm(dim=1)
            wd = cfg.weight_decay * d[act_req].norm(dim=1) / norm_h**2
            loss = nll[act_req] + cfg.kl_factor * kl + wd  # [a]
        last_loss[act_req] = loss.detach()
        last_nll[act_req] = nll[act_req].detach()
        bar.set_postfix(active=int(active.sum()), loss=f"{float(loss.detach().mean()):.3f}")
        done = loss.detach() < cfg.early_stop_loss
        if it == cfg.steps - 1:
            break
        keep = act_req[~done]
        if len(keep) == 0:
            active[act_req] = False
            break
        loss[~done].sum().backward()
        adam.step(delta, d.grad[keep], keep)
        with torch.no_grad():
            max_norm = cfg.clamp_norm_factor * h[keep].norm(dim=1, keepdim=True)  # [k, 1]
            norm = delta[keep].norm(dim=1, keepdim=True)
            delta[keep] = torch.where(norm > max_norm, delta[keep] * max_norm / norm, delta[keep])
        active[act_req[done]] = False
    bar.close()
    return TargetResult(z=h + delta, h=h, loss=last_loss, nll=last_nll, steps=adam.t.clone())
