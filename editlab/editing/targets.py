"""Target values z: the residual-stream vector at the last edited layer that makes the model
say target_new, optimised for all requests of a step in one padded forward.

Each request i owns one row δ_i of a [n, d_model] tensor. Adam is applied per row with its own
step counter, which makes the batched optimisation identical to optimising each request alone;
a request leaves the batch once its loss is under ``early_stop_loss``.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from editlab.models.arch import ModelView
from editlab.models.cache import returned_cache, select_cache_rows
from editlab.models.hooks import StopForward, capture_inputs, edit_output
from editlab.models.prompts import PaddedBatch, answer_ids, pad, subject_last_index
from editlab.models.scoring import AnswerRows
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
class ExtraRow:
    """One more prompt in a request's z loss (neighbour-assisted editing, seed 004), with the
    request's δ added at the subject's last token of this prompt. ``averaged`` False:
    ``weight`` · NLL(answer | template.format(subject)) is added to that request's loss as a
    term of its own. True: the row is one more rewrite row of the request, its NLL averaged
    with the rewrite rows' (weight: its weight in that mean, each rewrite row weighing 1), as
    the released neighbour-assisted compute_z does.

    Args:
        owner: index, in the step's request list, of the request whose δ and loss the row joins.
        template: the prompt with "{}" where ``subject`` goes (no context prefix).
        subject: the subject of this prompt (where δ is added).
        answer: the answer whose NLL is minimised (a neighbour's target_true).
        weight: factor of the row's mean token NLL in the loss.
        averaged: join the owner's rewrite rows (see above) instead of a separate term.
    """

    owner: int
    template: str
    subject: str
    answer: str
    weight: float = 1.0
    averaged: bool = False


@dataclass
class TargetRows:
    """Token rows of one step: rewrite rows (template x request), then one KL row per request,
    then the extra rows (if any)."""

    batch_rows: list[list[int]]
    edit_pos: torch.Tensor  # [R] subject-last position where δ is added
    owner: torch.Tensor  # [R] request of each row
    is_kl: torch.Tensor  # [R] bool
    tgt_row: torch.Tensor  # [T] row of each answer token to score
    tgt_pos: torch.Tensor  # [T] position whose logits predict it
    tgt_id: torch.Tensor  # [T] answer token id
    n_requests: int
    is_extra: torch.Tensor | None = None  # [R] bool, extra rows
    row_weight: torch.Tensor | None = None  # [R] loss weight of each extra row (0 elsewhere)


def target_rows(
    tok, requests: list[EditRequest], templates: list[str], kl_prompt: str, extra: list[ExtraRow] | None = None
) -> TargetRows:
    built = AnswerRows()  # the answers are teacher-forced as in the metrics' rows
    edit_pos, owner, is_kl = [], [], []
    for t in templates:
        for i, req in enumerate(requests):
            ids, idx = subject_last_index(tok, t.format(req.prompt), req.subject)
            built.add(ids, answer_ids(tok, req.target_new))
            edit_pos.append(idx)
            owner.append(i)
            is_kl.append(False)
    for i, req in enumerate(requests):
        ids, idx = subject_last_index(tok, kl_prompt, req.subject)
        built.add(ids)  # no answer: the KL term reads its next-token distribution
        edit_pos.append(idx)
        owner.append(i)
        is_kl.append(True)
    n_base = len(built.rows)
    weight = [0.0] * n_base
    for row in extra or []:
        if not 0 <= row.owner < len(requests):
            raise ValueError(f"extra row {row} names request {row.owner}, outside the step's {len(requests)}")
        ids, idx = subject_last_index(tok, row.template, row.subject)
        built.add(ids, answer_ids(tok, row.answer))
        edit_pos.append(idx)
        owner.append(row.owner)
        is_kl.append(False)
        weight.append(float(row.weight))
    as_t = torch.tensor
    is_extra = torch.arange(len(built.rows)) >= n_base
    return TargetRows(
        built.rows,
        as_t(edit_pos),
        as_t(owner),
        as_t(is_kl),
        as_t(built.t_row),
        as_t(built.t_pos),
        as_t(built.t_id),
        len(requests),
        is_extra,
        as_t(weight, dtype=torch.float32),
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
        prefixes = [row[:p] for row, p in zip(tr.batch_rows, edit_pos.tolist(), strict=True)]
        suffixes = [row[p:] for row, p in zip(tr.batch_rows, edit_pos.tolist(), strict=True)]
        self.suffix = pad(suffixes, pad_id).to(device)
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
            self.cache = returned_cache(out)

    def offset(self, row_sel: torch.Tensor) -> torch.Tensor:
        return self.prefix_len[row_sel]

    def __call__(self, row_sel: torch.Tensor) -> torch.Tensor:
        width = int(self.suffix.lengths[row_sel].max())
        ids = self.suffix.input_ids[row_sel, :width]
        mask = torch.cat([self.prefix_mask[row_sel], self.suffix.attention_mask[row_sel, :width]], dim=1)
        positions = self.prefix_len[row_sel, None] + torch.arange(width, device=ids.device)  # [r, S]
        cache = select_cache_rows(self.cache, row_sel) if self.cache is not None else None
        return self.base(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state


class LowerLayersCached:
    """Wraps a rows forward (FullForward / PrefixCachedForward): the residual entering the z layer
    is computed once, for every row, by a forward stopped there; each call then skips the layers
    below the z layer (their forward returns its input unchanged) and feeds the cached residual of
    the selected rows to the z layer. Nothing below the z layer depends on δ, which enters at the
    z layer's output (or inside it, PMET's extra sites), so the result is the same."""

    def __init__(self, inner, view: ModelView, layer: int, n_rows: int, device) -> None:
        self.inner, self.layer = inner, view.layer(layer)
        self.below = [view.layer(i) for i in range(layer)]
        self.tuple_out: list[int | None] = []  # per layer below: None (tensor output) or tuple length
        records = [self._record_structure(m) for m in self.below]
        try:
            with torch.no_grad(), capture_inputs({"z layer": self.layer}, stop_after="z layer") as got:
                self.inner(torch.arange(n_rows, device=device))
        except StopForward:
            pass
        finally:
            for handle in records:
                handle.remove()
        self.residual = got["z layer"]  # [R, S, d_model] the z layer's input, every row

    def _record_structure(self, module: torch.nn.Module):
        index = len(self.tuple_out)
        self.tuple_out.append(None)

        def hook(mod, args, output):
            if isinstance(output, tuple):
                # (hidden states, attention weights) for GPT-J: a skipped layer gives None for the
                # rest, which the model reads only with output_attentions (editlab never asks).
                self.tuple_out[index] = len(output)
            elif not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"lower_cache: layer {index} returns {type(output).__name__}; set targets.lower_cache false"
                )

        return module.register_forward_hook(hook)

    def offset(self, row_sel: torch.Tensor) -> torch.Tensor:
        return self.inner.offset(row_sel)

    def __call__(self, row_sel: torch.Tensor) -> torch.Tensor:
        def skip(length: int | None):
            def forward(hidden_states, *args, **kwargs):
                return hidden_states if length is None else (hidden_states,) + (None,) * (length - 1)

            return forward

        def feed(mod, args, kwargs):
            first = args[0] if args else kwargs["hidden_states"]
            cached = self.residual[row_sel, : first.shape[1]].to(first.dtype)  # [r, S, d_model]
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        # An instance attribute shadows the class's forward; one set by someone else (accelerate's
        # device hooks) is put back afterwards.
        saved = [module.__dict__.get("forward") for module in self.below]
        handle = self.layer.register_forward_pre_hook(feed, with_kwargs=True)
        try:
            for module, length in zip(self.below, self.tuple_out, strict=True):
                module.forward = skip(length)
            return self.inner(row_sel)
        finally:
            handle.remove()
            for module, old in zip(self.below, saved, strict=True):
                if old is None:
                    del module.forward
                else:
                    module.forward = old


def _row_means(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, torch.ones_like(values))
    return total / count.clamp_min(1)


def kl_token_index(position: str, lengths: torch.Tensor, edit_pos: torch.Tensor) -> torch.Tensor:
    """Index [r] of the token whose distribution the KL term reads in each KL row, counted from
    the row's first token: the subject's last token (``edit_pos``) or the row's last token."""
    if position == "subject":
        return edit_pos
    if position == "last":
        return lengths - 1
    raise ValueError(f"option targets.kl_position={position!r} must be 'subject' or 'last'")


def optimize_targets(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    cfg: TargetConfig,
    progress: bool = True,
    extra: list[ExtraRow] | None = None,
    norm_ref: tuple[torch.nn.Module, str] | None = None,
) -> TargetResult:
    """MEMIT's z for every request of a step, batched: z_i = h_i + δ_i after at most
    ``cfg.steps`` forwards (the last one only measures, as in the reference). ``extra`` rows add
    their weighted NLL to their owner's loss (see :class:`ExtraRow`); ``nll`` stays the target's.
    ``norm_ref``: see :func:`descend_offsets`."""
    run = descend_offsets(
        view, tok, requests, templates, layer, cfg, cfg.steps, progress=progress, extra=extra, norm_ref=norm_ref
    )
    return TargetResult(z=run.h + run.delta, h=run.h, loss=run.loss, nll=run.nll, steps=run.updates)


@dataclass
class OffsetDescent:
    """What :func:`descend_offsets` returns (rows in the order of its requests)."""

    delta: torch.Tensor  # [n, width] the optimised offset, on top of ``base`` (width = d_model without extra sites)
    h: torch.Tensor  # [n, d_model] initial residual at the z layer (bare prompt)
    loss: torch.Tensor  # [n] last measured loss
    nll: torch.Tensor  # [n] last measured target NLL
    updates: torch.Tensor  # [n] gradient updates applied to each row
    extra_nll: torch.Tensor | None = None  # [n] weighted NLL of the extra rows in the last loss


def descend_offsets(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    cfg: TargetConfig,
    steps: int,
    base: torch.Tensor | None = None,
    update_last: bool = False,
    progress: bool = True,
    desc: str = "z",
    extra: list[ExtraRow] | None = None,
    extra_sites: Sequence[tuple[torch.nn.Module, str]] = (),
    mask: torch.Tensor | None = None,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    record_grad: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    norm_ref: tuple[torch.nn.Module, str] | None = None,
) -> OffsetDescent:
    """``optimize_targets``' loop generalised to a fixed offset ``base`` [n, width] under the
    optimised rows: the residual at the subject's last token becomes h + base + δ.

    Same loss (NLL over the context templates + kl_factor·KL on the essence prompt + weight decay
    on the whole shift ‖base + δ‖/‖h‖²), same per-row Adam, same early stop; the clamp projects the
    whole shift base + δ into the ball of radius clamp_norm_factor·‖h‖. ``steps`` forwards are run
    (``cfg.steps`` is not read); each is followed by an update except, when ``update_last`` is False,
    the last one, which only measures (optimize_targets' rule). With base = 0 and update_last False
    this computes exactly what ``optimize_targets`` computes with ``cfg.steps = steps``.

    The KL reference is the unshifted distribution: with a non-zero base it comes from one extra
    no-grad forward of the KL rows (the first optimisation forward already carries the base).

    ``extra`` rows (:class:`ExtraRow`) carry their owner's shift at their own subject and add
    weight · NLL(answer) to their owner's loss; ``nll`` stays the target's NLL alone.

    Optional extensions (all off by default, which is the behaviour described above):
    - ``extra_sites``: (module, name) pairs inside the z layer whose main output also receives an
      offset at the subject's last token (PMET: the attention output). The optimised vector then
      has (1 + len(extra_sites))·d_model columns: the first d_model go to the layer output, slice
      j + 1 to site j. Weight decay and clamp act on the whole concatenated shift. A non-zero base
      is refused with extra sites (h is read at the layer output, which the sites' base would move).
    - ``mask``: [n, width] bool, the only entries of δ that are trained (EAC's anchors); the base
      must be zero outside it, so the whole shift stays inside the mask (the clamp only rescales).
    - ``extra_loss(act_req, shift)``: a term [a] added to the loss of the active requests, given
      their whole shift base + δ [a, width] (EAC's scored elastic net).
    - ``record_grad(rows, grad)``: called before every update with the updated requests' indices
      [k] and ∂loss/∂δ of their rows [k, width] (EAC's stage 1 records them).
    - ``norm_ref``: (module, name) inside the z layer whose output at the bare prompt's subject
      token, read in the first forward, replaces h as the norm of the clamp radius and the weight
      decay (ROME: the FFN output it edits, rome/compute_v.py). δ enters at the layer's output,
      after the module, so that output does not depend on δ. None: h, the layer's output.
    """
    if steps < 1:
        raise ValueError(f"descend_offsets needs steps >= 1, got {steps}")
    chunk = cfg.requests_per_forward
    if chunk is not None and len(requests) > chunk:
        return _descend_in_chunks(
            view, tok, requests, templates, layer, cfg, steps, base, update_last, progress, desc, extra,
            extra_sites, mask, extra_loss, record_grad, norm_ref,
        )  # fmt: skip
    device = view.device
    tr = target_rows(tok, requests, templates, cfg.kl_prompt, extra)
    n = tr.n_requests
    is_extra, row_weight = tr.is_extra.to(device), tr.row_weight.to(device)
    has_extra = bool(is_extra.any())
    last_extra = torch.zeros(n, device=device) if has_extra else None
    full = pad(tr.batch_rows, tok.pad_token_id).to(device)
    edit_pos, owner, is_kl = tr.edit_pos.to(device), tr.owner.to(device), tr.is_kl.to(device)
    tgt_row, tgt_pos, tgt_id = tr.tgt_row.to(device), tr.tgt_pos.to(device), tr.tgt_id.to(device)
    d_model = view.model.config.hidden_size
    width = d_model * (1 + len(extra_sites))  # layer-output offset, then one per extra site
    base = torch.zeros(n, width, device=device) if base is None else base.to(device=device, dtype=torch.float32)
    if base.shape != (n, width):
        raise ValueError(f"base must be [{n}, {width}], got {tuple(base.shape)}")
    if extra_sites and bool((base != 0).any()):
        raise ValueError("descend_offsets: a non-zero base is not supported together with extra_sites")
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.bool)
        if mask.shape != (n, width):
            raise ValueError(f"mask must be [{n}, {width}], got {tuple(mask.shape)}")
        if bool((base[~mask] != 0).any()):
            raise ValueError("descend_offsets: base must be zero outside the mask")
    delta = torch.zeros(n, width, device=device, dtype=torch.float32)
    adam = RowAdam(delta.shape, cfg.lr, device)
    h = torch.zeros(n, d_model, device=device)
    h_ref = torch.zeros(n, d_model, device=device) if norm_ref is not None else h  # norm of clamp and decay
    joined = torch.zeros(len(tr.batch_rows), dtype=torch.bool, device=device)  # [R] extra rows averaged in
    if extra:
        joined[len(tr.batch_rows) - len(extra) :] = torch.tensor([e.averaged for e in extra], device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    last_loss = torch.zeros(n, device=device)
    last_nll = torch.zeros(n, device=device)
    unembed = view.unembed()
    forward_class = PrefixCachedForward if cfg.prefix_cache else FullForward
    rows_forward = forward_class(view, tr, full, edit_pos, tok.pad_token_id)
    if cfg.lower_cache and layer > 0:
        rows_forward = LowerLayersCached(rows_forward, view, layer, len(tr.batch_rows), device)
    kl_init: torch.Tensor | None = None  # [n, V] log-probs on the KL prompt without any shift
    if bool((base != 0).any()):
        kl_all = is_kl.nonzero().squeeze(1)  # [n] one KL row per request, in request order
        with torch.no_grad():
            hid = rows_forward(kl_all)
        at = kl_token_index(cfg.kl_position, full.lengths[kl_all], edit_pos[kl_all]) - rows_forward.offset(kl_all)
        kl_init = unembed(hid[torch.arange(n, device=device), at]).float().log_softmax(-1)
    bar = tqdm(range(steps), desc=f"{desc} ({n} rows)", disable=not progress, file=sys.stderr, leave=False)
    for it in bar:
        act_req = active.nonzero().squeeze(1)  # [a]
        row_sel = active[owner].nonzero().squeeze(1)  # [r] rows of active requests
        local = torch.full((len(owner),), -1, device=device, dtype=torch.long)
        local[row_sel] = torch.arange(len(row_sel), device=device)
        d = delta.clone().requires_grad_(True)
        sel_owner = owner[row_sel]
        offset = rows_forward.offset(row_sel)  # [r]
        sel_pos = edit_pos[row_sel] - offset
        first = it == 0

        # The loop's tensors are bound as defaults: the hook must see this iteration's values.
        def shift_output(
            out: torch.Tensor, first=first, row_sel=row_sel, sel_owner=sel_owner, sel_pos=sel_pos, d=d
        ) -> torch.Tensor:  # out: [r, S, d_model]
            if first:
                bare = (~is_kl[row_sel]) & (torch.arange(len(row_sel), device=device) < n)
                h[sel_owner[bare]] = out[bare, sel_pos[bare]].detach().float()
            ar = torch.arange(out.shape[0], device=device)
            # index_select, not [sel_owner]: the backward of advanced indexing with repeated indices
            # (one δ row feeds every template row of its request) is an index_put with accumulate,
            # whose CPU kernel adds with atomics and makes z differ between processes at > 1 thread.
            shift = (base + d).index_select(0, sel_owner)[:, :d_model]  # [r, d_model]
            return out.index_put((ar, sel_pos), shift.to(out.dtype), accumulate=True)

        def shift_site(
            out: torch.Tensor, j: int, row_sel=row_sel, sel_owner=sel_owner, sel_pos=sel_pos, d=d
        ) -> torch.Tensor:  # out: [r, S, d_model]
            ar = torch.arange(out.shape[0], device=device)
            shift = (base + d).index_select(0, sel_owner)[:, (j + 1) * d_model : (j + 2) * d_model]  # [r, d_model]
            return out.index_put((ar, sel_pos), shift.to(out.dtype), accumulate=True)

        def record_ref(out: torch.Tensor, row_sel=row_sel, sel_owner=sel_owner, sel_pos=sel_pos) -> None:
            bare = (~is_kl[row_sel]) & (torch.arange(len(row_sel), device=device) < n)
            h_ref[sel_owner[bare]] = out[bare, sel_pos[bare]].detach().float()

        with ExitStack() as hooks:
            hooks.enter_context(torch.enable_grad())
            hooks.enter_context(edit_output(view.layer(layer), f"layer {layer}", shift_output))
            for j, (module, name) in enumerate(extra_sites):
                hooks.enter_context(edit_output(module, name, partial(shift_site, j=j)))
            if norm_ref is not None and first:
                hooks.enter_context(edit_output(norm_ref[0], norm_ref[1], record_ref))
            hidden = rows_forward(row_sel)  # [r, S, d]
            tsel = active[owner[tgt_row]]
            t_rows = local[tgt_row[tsel]]
            t_pos = tgt_pos[tsel] - offset[t_rows]
            logits = unembed(hidden[t_rows, t_pos]).float()  # [t, V]
            tok_nll = -logits.log_softmax(-1).gather(1, tgt_id[tsel].unsqueeze(1)).squeeze(1)  # [t]
            row_nll = _row_means(tok_nll, t_rows, len(row_sel))  # [r]
            rewrite = ~is_kl[row_sel] & ~is_extra[row_sel]
            nll = _row_means(row_nll[rewrite], sel_owner[rewrite], n)  # [n]
            fit = nll  # [n] the NLL term of the loss: averaged extra rows join the rewrite rows
            if bool(joined.any()):
                w = torch.where(rewrite, 1.0, row_weight[row_sel]) * (rewrite | joined[row_sel])  # [r]
                fit = _row_means(row_nll * w, sel_owner, n) / _row_means(w, sel_owner, n).clamp_min(1e-30)
            kl_rows = is_kl[row_sel].nonzero().squeeze(1)
            kl_sel = row_sel[kl_rows]
            kl_at = kl_token_index(cfg.kl_position, full.lengths[kl_sel], edit_pos[kl_sel]) - offset[kl_rows]  # [a]
            kl_logp = unembed(hidden[kl_rows, kl_at]).float().log_softmax(-1)  # [a, V]
            if kl_init is None:  # zero base: the first forward is the unshifted one
                kl_init = kl_logp.detach()
            kl = (kl_logp.exp() * (kl_logp - kl_init[act_req])).sum(-1)  # [a] KL(current || initial)
            norm_h = h_ref[act_req].norm(dim=1)
            wd = cfg.weight_decay * (base[act_req] + d[act_req]).norm(dim=1) / norm_h**2
            loss = fit[act_req] + cfg.kl_factor * kl + wd  # [a]
            if has_extra:  # Σ weight · NLL over each request's extra rows; the separate ones join the loss
                ex = is_extra[row_sel]
                ex_nll = torch.zeros(n, device=device).index_add(
                    0, sel_owner[ex], row_nll[ex] * row_weight[row_sel][ex]
                )
                sep = ex & ~joined[row_sel]
                sep_nll = torch.zeros(n, device=device).index_add(
                    0, sel_owner[sep], row_nll[sep] * row_weight[row_sel][sep]
                )
                loss = loss + sep_nll[act_req]
                last_extra[act_req] = ex_nll[act_req].detach()
            if extra_loss is not None:
                loss = loss + extra_loss(act_req, (base + d)[act_req])
        last_loss[act_req] = loss.detach()
        last_nll[act_req] = nll[act_req].detach()
        bar.set_postfix(active=int(active.sum()), loss=f"{float(loss.detach().mean()):.3f}")
        done = loss.detach() < cfg.early_stop_loss
        if it == steps - 1 and not update_last:
            break
        keep = act_req[~done]
        if len(keep) == 0:
            active[act_req] = False
            break
        loss[~done].sum().backward()
        grad = d.grad[keep]  # [k, width]
        if record_grad is not None:
            record_grad(keep, grad.detach().clone())
        if mask is not None:
            # Entries outside the mask get no gradient, so Adam's moments and step stay exactly 0.
            grad = grad * mask[keep]
        adam.step(delta, grad, keep)
        with torch.no_grad():
            max_norm = cfg.clamp_norm_factor * h_ref[keep].norm(dim=1, keepdim=True)  # [k, 1]
            total = base[keep] + delta[keep]  # [k, d_model] the whole shift is what is clamped
            norm = total.norm(dim=1, keepdim=True)
            total = torch.where(norm > max_norm, total * max_norm / norm, total)
            delta[keep] = total - base[keep]
        active[act_req[done]] = False
    bar.close()
    return OffsetDescent(delta=delta, h=h, loss=last_loss, nll=last_nll, updates=adam.t.clone(), extra_nll=last_extra)


def _descend_in_chunks(
    view, tok, requests, templates, layer, cfg, steps, base, update_last, progress, desc, extra,
    extra_sites, mask, extra_loss, record_grad, norm_ref,
) -> OffsetDescent:  # fmt: skip
    """:func:`descend_offsets` over consecutive chunks of ``cfg.requests_per_forward`` requests,
    concatenated in request order. Each chunk gets its own requests' base, mask and extra rows
    (owners renumbered), and the callbacks see the step's request indices, not the chunk's."""
    size = cfg.requests_per_forward
    one_forward = dataclasses.replace(cfg, requests_per_forward=None)
    parts: list[OffsetDescent] = []
    n_chunks = -(-len(requests) // size)
    for c, start in enumerate(range(0, len(requests), size)):
        stop = min(start + size, len(requests))
        rows = [dataclasses.replace(e, owner=e.owner - start) for e in extra or [] if start <= e.owner < stop]
        parts.append(
            descend_offsets(
                view,
                tok,
                requests[start:stop],
                templates,
                layer,
                one_forward,
                steps,
                base=None if base is None else base[start:stop],
                update_last=update_last,
                progress=progress,
                desc=f"{desc} {c + 1}/{n_chunks}",
                extra=rows or None,
                extra_sites=extra_sites,
                mask=None if mask is None else mask[start:stop],
                extra_loss=None if extra_loss is None else partial(_shifted_loss, extra_loss, start),
                record_grad=None if record_grad is None else partial(_shifted_record, record_grad, start),
                norm_ref=norm_ref,
            )
        )
    extra_nll = [p.extra_nll for p in parts]
    return OffsetDescent(
        delta=torch.cat([p.delta for p in parts]),
        h=torch.cat([p.h for p in parts]),
        loss=torch.cat([p.loss for p in parts]),
        nll=torch.cat([p.nll for p in parts]),
        updates=torch.cat([p.updates for p in parts]),
        # A chunk without extra rows returns None: its requests' extra NLL is 0.
        extra_nll=None
        if all(e is None for e in extra_nll)
        else torch.cat([torch.zeros_like(p.loss) if e is None else e for p, e in zip(parts, extra_nll, strict=True)]),
    )


def _shifted_loss(fn, start: int, act_req: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return fn(act_req + start, shift)


def _shifted_record(fn, start: int, rows: torch.Tensor, grad: torch.Tensor) -> None:
    fn(rows + start, grad)


@dataclass
class ClusterTargetResult(TargetResult):
    """TargetResult of the two-step optimisation, with who shared what."""

    shared: torch.Tensor  # [n, d_model] Uz_u of each request's cluster
    cluster: torch.Tensor  # [n] cluster index of each request
    is_anchor: torch.Tensor  # [n] bool
    shared_updates: torch.Tensor  # [n] phase-1 updates of the request's cluster
    instance_updates: torch.Tensor  # [n] phase-2 updates of the request's own δ_i
    seconds_shared: float
    seconds_instance: float


def check_clusters(n: int, clusters: list[list[int]], anchors: list[int]) -> None:
    """Clusters must partition range(n), each with its anchor among its members."""
    flat = sorted(i for c in clusters for i in c)
    if flat != list(range(n)):
        raise ValueError(f"clusters must partition the {n} requests exactly, got {clusters}")
    if len(anchors) != len(clusters) or any(a not in c for a, c in zip(anchors, clusters, strict=True)):
        raise ValueError(f"anchors {anchors} must name one member of each cluster {clusters}")


def cluster_labels(n: int, clusters: list[list[int]]) -> torch.Tensor:
    """[n] long on the CPU: each request's cluster, as its position in ``clusters``."""
    cluster = torch.empty(n, dtype=torch.long)
    for c, members in enumerate(clusters):
        cluster[members] = c
    return cluster


def optimize_cluster_targets(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    cfg: TargetConfig,
    clusters: list[list[int]],
    anchors: list[int],
    shared_steps: int = 20,
    instance_steps: int = 5,
    progress: bool = True,
) -> ClusterTargetResult:
    """ECE's two-step z: z_i = h_i + Uz_u + δ_i (eq. 13) for request i in cluster u.

    Phase 1 (eq. 11): one shift Uz_u per cluster, optimised on the cluster's anchor's loss only,
    for ``shared_steps`` forward+update rounds — one padded forward over the anchors' rows, all
    clusters batched. Phase 2 (eq. 12): every request's own δ_i on top of its cluster's Uz_u for
    ``instance_steps`` forwards, all requests batched, the last forward only measuring (as in
    optimize_targets). So 20 + 5 runs 25 forwards and 24 updates per request, as per-instance
    optimisation with 25 steps does; phase 1's forwards cover only the anchors' rows.

    Loss, clamp (of the whole shift Uz_u + δ_i to clamp_norm_factor·‖h_i‖) and early stop are
    MEMIT's (see :func:`descend_offsets`); ``cfg.steps`` is not read. With shared_steps = 0 this is
    optimize_targets with steps = instance_steps. With instance_steps = 0 every member gets
    z_i = h_i + Uz_u (no projection: the clamp is part of an update step) and, not having been
    measured at its final z, loss and nll NaN (anchors keep their last phase-1 values).
    """
    import time  # local imports: this module's header is shared code, left as it was

    from editlab.editing.keys import keys_and_outputs

    n = len(requests)
    check_clusters(n, clusters, anchors)
    if shared_steps < 0 or instance_steps < 0 or shared_steps + instance_steps < 1:
        raise ValueError(
            f"options shared_steps={shared_steps}, instance_steps={instance_steps} must be >= 0 with a positive sum"
        )
    device = view.device
    d_model = view.model.config.hidden_size
    k = len(clusters)
    cluster = cluster_labels(n, clusters).to(device)
    anchor_idx = torch.tensor(anchors, dtype=torch.long, device=device)
    is_anchor = torch.zeros(n, dtype=torch.bool, device=device)
    is_anchor[anchor_idx] = True
    t0 = time.perf_counter()
    uz = torch.zeros(k, d_model, device=device)  # [k, d_model] Uz_u
    phase1: OffsetDescent | None = None
    if shared_steps > 0:
        phase1 = descend_offsets(
            view,
            tok,
            [requests[a] for a in anchors],
            templates,
            layer,
            cfg,
            shared_steps,
            update_last=instance_steps > 0,
            progress=progress,
            desc=f"z shared ({k} clusters)",
        )
        uz = phase1.delta
    shared = uz[cluster]  # [n, d_model]
    shared_updates = phase1.updates[cluster] if phase1 is not None else torch.zeros(n, device=device)
    t1 = time.perf_counter()
    if instance_steps > 0:
        phase2 = descend_offsets(
            view,
            tok,
            requests,
            templates,
            layer,
            cfg,
            instance_steps,
            base=shared,
            progress=progress,
            desc="z instance",
        )
        h, delta, loss, nll, inst_updates = phase2.h, phase2.delta, phase2.loss, phase2.nll, phase2.updates
    else:
        assert phase1 is not None
        _, h64 = keys_and_outputs(view, tok, requests, ["{}"], layer, layer)  # [n, d_model] bare-prompt residual
        h = h64.float()
        delta = torch.zeros(n, d_model, device=device)
        loss = torch.full((n,), float("nan"), device=device)
        nll = torch.full((n,), float("nan"), device=device)
        loss[anchor_idx], nll[anchor_idx] = phase1.loss, phase1.nll
        inst_updates = torch.zeros(n, device=device)
    t2 = time.perf_counter()
    return ClusterTargetResult(
        z=h + shared + delta,
        h=h,
        loss=loss,
        nll=nll,
        steps=shared_updates + inst_updates,
        shared=shared,
        cluster=cluster,
        is_anchor=is_anchor,
        shared_updates=shared_updates,
        instance_updates=inst_updates,
        seconds_shared=t1 - t0,
        seconds_instance=t2 - t1,
    )
