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

from editlab.editing.prompts import PaddedBatch, answer_ids, pad, subject_last_index
from editlab.models.arch import ModelView
from editlab.models.cache import select_cache_rows
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
        prefix_cache: compute the tokens before each row's subject once per step and reuse their
            keys/values in every optimisation step (δ enters at the subject's last token, so in a
            causal model nothing before it depends on δ). False runs the whole row every step,
            as the reference does; both give the same z.
    """

    lr: float = 0.5
    steps: int = 25
    clamp_norm_factor: float = 0.75
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    early_stop_loss: float = 5e-2
    prefix_cache: bool = True

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


class FullForward:
    """Every optimisation step runs each row from its first token (the reference's way)."""

    def __init__(self, view: ModelView, tr: TargetRows, full: PaddedBatch, edit_pos: torch.Tensor, pad_id: int):
        self.base, self.full = view.model.base_model, full
        self.zero = torch.zeros(len(tr.batch_rows), dtype=torch.long, device=full.input_ids.device)

    def offset(self, row_sel: torch.Tensor) -> torch.Tensor:
        return self.zero[row_sel]

    def __call__(self, row_sel: torch.Tensor) -> torch.Tensor:
        width = int(self.full.lengths[row_sel].max())
        ids = self.full.input_ids[row_sel, :width]
        mask = self.full.attention_mask[row_sel, :width]
        return self.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


class PrefixCachedForward:
    """Tokens before each row's edit position are run once (no grad) into a KV cache; every
    optimisation step runs only the rest of the rows on top of the cached rows it needs."""

    def __init__(self, view: ModelView, tr: TargetRows, full: PaddedBatch, edit_pos: torch.Tensor, pad_id: int):
        device = full.input_ids.device
        self.base = view.model.base_model
        self.prefix_len = edit_pos.clone()  # [R]
        prefixes = [row[:p] for row, p in zip(tr.batch_rows, edit_pos.tolist())]
        suffixes = [row[p:] for row, p in zip(tr.batch_rows, edit_pos.tolist())]
        self.suffix = pad(suffixes, pad_id).to(device)
        self.suffix.lengths = self.suffix.lengths.to(device)
        self.cache = None
        self.prefix_mask = torch.zeros(len(prefixes), 0, dtype=torch.long, device=device)
        if max(len(p) for p in prefixes) > 0:
            pre = pad([p or [pad_id] for p in prefixes], pad_id).to(device)
            self.prefix_mask = pre.attention_mask.clone()
            run_mask = pre.attention_mask.clone()
            # A row with no prefix gets one dummy token to attend to, so its cached states are
            # finite; the real mask hides that token from the row's suffix.
            empty = torch.tensor([len(p) == 0 for p in prefixes], device=device)
            self.prefix_mask[empty, 0] = 0
            with torch.no_grad():
                out = self.base(input_ids=pre.input_ids, attention_mask=run_mask, use_cache=True)
            self.cache = out.past_key_values

    def offset(self, row_sel: torch.Tensor) -> torch.Tensor:
        return self.prefix_len[row_sel]

    def __call__(self, row_sel: torch.Tensor) -> torch.Tensor:
        width = int(self.suffix.lengths[row_sel].max())
        ids = self.suffix.input_ids[row_sel, :width]
        mask = torch.cat([self.prefix_mask[row_sel], self.suffix.attention_mask[row_sel, :width]], dim=1)
        positions = self.prefix_len[row_sel, None] + torch.arange(width, device=ids.device)  # [r, S]
        cache = select_cache_rows(self.cache, row_sel) if self.cache is not None else None
        return self.base(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=cache is not None).last_hidden_state


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
    full.lengths = full.lengths.to(device)
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
    unembed = view.unembed()
    rows_forward = (PrefixCachedForward if cfg.prefix_cache else FullForward)(view, tr, full, edit_pos, tok.pad_token_id)
    bar = tqdm(range(cfg.steps), desc=f"z ({n} requests)", disable=not progress, file=sys.stderr, leave=False)
    for it in bar:
        act_req = active.nonzero().squeeze(1)  # [a]
        row_sel = active[owner].nonzero().squeeze(1)  # [r] rows of active requests
        # Local indices of the selected rows, to gather from the sub-batch.
        local = torch.full((len(owner),), -1, device=device, dtype=torch.long)
        local[row_sel] = torch.arange(len(row_sel), device=device)
        d = delta.clone().requires_grad_(True)
        sel_owner = owner[row_sel]
        offset = rows_forward.offset(row_sel)  # [r] absolute position of each row's first computed token
        sel_pos = edit_pos[row_sel] - offset
        first = it == 0

        def add_delta(out: torch.Tensor) -> torch.Tensor:  # out: [r, S, d_model]
            if first:
                bare = (~is_kl[row_sel]) & (torch.arange(len(row_sel), device=device) < n)
                h[sel_owner[bare]] = out[bare, sel_pos[bare]].detach().float()
            ar = torch.arange(out.shape[0], device=device)
            return out.index_put((ar, sel_pos), d[sel_owner].to(out.dtype), accumulate=True)

        with torch.enable_grad(), edit_output(view.layer(layer), f"layer {layer}", add_delta):
            hidden = rows_forward(row_sel)  # [r, S, d]
            tsel = active[owner[tgt_row]]
            t_rows = local[tgt_row[tsel]]
            t_pos = tgt_pos[tsel] - offset[t_rows]
            logits = unembed(hidden[t_rows, t_pos]).float()  # [t, V]: only where the loss needs it
            tok_nll = -logits.log_softmax(-1).gather(1, tgt_id[tsel].unsqueeze(1)).squeeze(1)  # [t]
            row_nll = _row_means(tok_nll, t_rows, len(row_sel))  # [r]
            rewrite = ~is_kl[row_sel]
            nll = _row_means(row_nll[rewrite], sel_owner[rewrite], n)  # [n]
            kl_rows = is_kl[row_sel].nonzero().squeeze(1)
            kl_last = full.lengths[row_sel[kl_rows]] - 1 - offset[kl_rows]
            kl_logp = unembed(hidden[kl_rows, kl_last]).float().log_softmax(-1)
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
