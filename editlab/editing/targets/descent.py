"""The descent of z: per-row Adam on the offsets δ of a step's requests, with pluggable loss
terms (:class:`DescentTerm`) and edit sites (:class:`EditSite`).

Each request i owns one row δ_i of a [n, width] tensor. Adam is applied per row with its own
step counter, which makes the batched optimisation identical to optimising each request alone;
a request leaves the batch once its loss is under ``early_stop_loss``.

The plain loss is MEMIT's: NLL over the context templates + kl_factor·KL on the essence prompt +
weight decay. The plug-ins live beside their methods: EAC's anchor mask, gradient record and
scored elastic net (editing/eac.py), the neighbour rows of neighbour-assisted editing
(editing/neighbours.py), PMET's attention site (methods/pmet.py); ECE's cluster phase
(editing/cluster.py) runs the descent twice, the second time on top of a fixed ``base``.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from editlab.editing.targets.config import TargetConfig, TargetResult
from editlab.editing.targets.forwards import rows_forward
from editlab.editing.targets.rows import ExtraRow, TargetRows, kl_token_index, target_rows
from editlab.models.arch import ModelView
from editlab.models.hooks import edit_output
from editlab.models.prompts import PaddedBatch, pad
from editlab.types import EditRequest


class EditSite(NamedTuple):
    """A module whose main output receives a slice of the shift at the subject's last token (or,
    as ``norm_ref``, whose output there is read), and its name for hook errors."""

    module: torch.nn.Module
    name: str


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


def row_means(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """[n] mean of ``values`` [t] grouped by ``index`` [t] (0 for an empty group)."""
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, values)
    count = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, index, torch.ones_like(values))
    return total / count.clamp_min(1)


@dataclass(frozen=True)
class DescentSetup:
    """What a term is bound to before the first forward (:meth:`DescentTerm.bind`)."""

    n: int  # requests of this descent
    base: torch.Tensor  # [n, width] float32 fixed offset under δ, on the descent's device
    row_weight: torch.Tensor  # [R] float32 loss weight of each extra row (0 elsewhere)
    own_rows: slice  # where the term's ``rows`` are among the step's R rows


@dataclass(frozen=True)
class DescentStep:
    """What a term sees of one optimisation forward."""

    n: int  # requests of this descent
    act_req: torch.Tensor  # [a] active requests
    row_sel: torch.Tensor  # [r] rows of the active requests
    sel_owner: torch.Tensor  # [r] request of each selected row
    row_nll: torch.Tensor  # [r] mean token NLL of each selected row (0 for a row without answer)
    rewrite: torch.Tensor  # [r] bool, the rewrite rows (template × request)
    base: torch.Tensor  # [n, width] fixed offset
    d: torch.Tensor  # [n, width] δ of this forward, the leaf the gradient is taken for


@dataclass
class TermLoss:
    """A term's part of the loss of the active requests."""

    added: torch.Tensor | None  # [a] added to the loss, or None
    recorded: torch.Tensor | None = None  # [a] kept as the term's last value (OffsetDescent.records)


class DescentTerm:
    """A plug-in of :func:`descend_offsets`. Every hook here leaves the plain descent as it is; a
    plug-in overrides the hooks it needs. Terms act in the order they are given: their rows are
    appended, their ``fit`` applied, their losses added and their gradient hooks run in that order.
    """

    name = "term"  # key of the values it records
    rows: Sequence[ExtraRow] = ()  # more teacher-forced rows, each carrying its owner's shift

    def bind(self, setup: DescentSetup) -> DescentTerm:
        """The term for one descent: checks its tensors against the setup and moves them to its
        device."""
        return self

    def fit(self, step: DescentStep, nll: torch.Tensor) -> torch.Tensor:
        """The NLL term of the loss [n], given the rewrite rows' mean NLL per request [n]."""
        return nll

    def loss(self, step: DescentStep) -> TermLoss | None:
        """A term added to the loss of the active requests (None: nothing)."""
        return None

    def gradient(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient [k, width] of the requests ``rows`` [k] that Adam applies, given ∂loss/∂δ."""
        return grad

    def chunk(self, start: int, stop: int) -> DescentTerm | None:
        """The term of requests [start, stop) renumbered from 0 (None: it has nothing there)."""
        raise NotImplementedError(f"{type(self).__name__} cannot run in chunks (targets.requests_per_forward)")


@dataclass
class OffsetDescent:
    """What :func:`descend_offsets` returns (rows in the order of its requests)."""

    delta: torch.Tensor  # [n, width] the optimised offset, on top of ``base`` (width = d_model without extra sites)
    h: torch.Tensor  # [n, d_model] initial residual at the z layer (bare prompt)
    loss: torch.Tensor  # [n] last measured loss
    nll: torch.Tensor  # [n] last measured target NLL
    updates: torch.Tensor  # [n] gradient updates applied to each row
    records: dict[str, torch.Tensor] = field(default_factory=dict)  # term name -> [n] its last recorded value


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
    terms: Sequence[DescentTerm] = (),
    sites: Sequence[EditSite] = (),
    norm_ref: EditSite | tuple[torch.nn.Module, str] | None = None,
) -> OffsetDescent:
    """MEMIT's z loop on top of a fixed offset ``base`` [n, width]: the residual at the subject's
    last token becomes h + base + δ.

    Loss: NLL over the context templates + kl_factor·KL on the essence prompt + weight decay on
    the whole shift ‖base + δ‖/‖h‖², then each term's loss; per-row Adam; early stop; the clamp
    projects the whole shift base + δ into the ball of radius clamp_norm_factor·‖h‖. ``steps``
    forwards are run (``cfg.steps`` is not read); each is followed by an update except, when
    ``update_last`` is False, the last one, which only measures (optimize_targets' rule).

    The KL reference is the unshifted distribution: with a non-zero base it comes from one extra
    no-grad forward of the KL rows (the first optimisation forward already carries the base).

    - ``terms``: plug-ins (:class:`DescentTerm`): rows, NLL term, loss terms, gradient hooks.
    - ``sites``: modules inside the z layer whose main output also receives an offset at the
      subject's last token (PMET: the attention output). The optimised vector then has
      (1 + len(sites))·d_model columns: the first d_model go to the layer output, slice j + 1 to
      site j. Weight decay and clamp act on the whole concatenated shift. A non-zero base is
      refused with sites (h is read at the layer output, which the sites' base would move).
    - ``norm_ref``: a module inside the z layer whose output at the bare prompt's subject token,
      read in the first forward, replaces h as the norm of the clamp radius and the weight decay
      (ROME: the FFN output it edits, rome/compute_v.py). δ enters at the layer's output, after
      the module, so that output does not depend on δ. None: h, the layer's output.
    """
    if steps < 1:
        raise ValueError(f"descend_offsets needs steps >= 1, got {steps}")
    chunk = cfg.requests_per_forward
    if chunk is not None and len(requests) > chunk:
        return _descend_in_chunks(
            view, tok, requests, templates, layer, cfg, steps, base, update_last, progress, desc, terms, sites, norm_ref
        )
    device = view.device
    extra = [row for term in terms for row in term.rows]
    rows = _StepRows.build(tok, requests, templates, cfg.kl_prompt, extra, device)
    n = rows.n
    d_model = view.model.config.hidden_size
    width = d_model * (1 + len(sites))  # layer-output offset, then one per extra site
    base = torch.zeros(n, width, device=device) if base is None else base.to(device=device, dtype=torch.float32)
    if base.shape != (n, width):
        raise ValueError(f"base must be [{n}, {width}], got {tuple(base.shape)}")
    if sites and bool((base != 0).any()):
        raise ValueError("descend_offsets: a non-zero base is not supported together with extra sites")
    terms = _bind(terms, n, base, rows.row_weight, len(rows.tr.batch_rows) - len(extra))
    delta = torch.zeros(n, width, device=device, dtype=torch.float32)
    adam = RowAdam(delta.shape, cfg.lr, device)
    h = torch.zeros(n, d_model, device=device)
    h_ref = torch.zeros(n, d_model, device=device) if norm_ref is not None else h  # norm of clamp and decay
    active = torch.ones(n, dtype=torch.bool, device=device)
    last_loss = torch.zeros(n, device=device)
    last_nll = torch.zeros(n, device=device)
    records: dict[str, torch.Tensor] = {}
    unembed = view.unembed()
    forward = rows_forward(view, rows.tr, rows.full, rows.edit_pos, tok.pad_token_id, cfg, layer)
    kl_init: torch.Tensor | None = None  # [n, V] log-probs on the KL prompt without any shift
    if bool((base != 0).any()):
        kl_init = _unshifted_kl_reference(rows, forward, unembed, cfg)
    bar = tqdm(range(steps), desc=f"{desc} ({n} rows)", disable=not progress, file=sys.stderr, leave=False)
    for it in bar:
        sel = _Selection.of(active, rows, forward)
        d = delta.clone().requires_grad_(True)
        # Rows whose residual at the subject is h (or the norm reference): the bare prompts'.
        bare = (~rows.is_kl[sel.row_sel]) & (torch.arange(len(sel.row_sel), device=device) < n) if it == 0 else None

        def shift(j: int, d=d, sel_owner=sel.sel_owner) -> torch.Tensor:  # [r, d_model] slice j of each row's shift
            # index_select, not [sel_owner]: the backward of advanced indexing with repeated indices
            # (one δ row feeds every template row of its request) is an index_put with accumulate,
            # whose CPU kernel adds with atomics and makes z differ between processes at > 1 thread.
            return (base + d).index_select(0, sel_owner)[:, j * d_model : (j + 1) * d_model]

        with ExitStack() as hooks:
            hooks.enter_context(torch.enable_grad())
            record_h = _Record(h, sel.sel_owner, sel.sel_pos, bare)
            hooks.enter_context(
                edit_output(view.layer(layer), f"layer {layer}", _ShiftAt(0, shift, sel.sel_pos, record_h))
            )
            for j, (module, name) in enumerate(sites):
                hooks.enter_context(edit_output(module, name, _ShiftAt(j + 1, shift, sel.sel_pos)))
            if norm_ref is not None and it == 0:
                record_ref = _Record(h_ref, sel.sel_owner, sel.sel_pos, bare)
                hooks.enter_context(edit_output(norm_ref[0], norm_ref[1], record_ref))
            hidden = forward(sel.row_sel)  # [r, S, d]
            loss, nll, kl_init = _loss(rows, sel, hidden, unembed, cfg, terms, base, d, h_ref, kl_init, records)
        act_req = sel.act_req
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
        for term in terms:
            grad = term.gradient(keep, grad)
        adam.step(delta, grad, keep)
        _clamp(delta, base, h_ref, keep, cfg.clamp_norm_factor)
        active[act_req[done]] = False
    bar.close()
    return OffsetDescent(delta=delta, h=h, loss=last_loss, nll=last_nll, updates=adam.t.clone(), records=records)


@dataclass
class _StepRows:
    """The step's rows (:func:`target_rows`) with their index tensors on the descent's device."""

    tr: TargetRows
    n: int  # requests
    full: PaddedBatch  # the rows, right-padded
    edit_pos: torch.Tensor  # [R] subject-last position where the shift enters
    owner: torch.Tensor  # [R] request of each row
    is_kl: torch.Tensor  # [R] bool
    is_extra: torch.Tensor  # [R] bool, the terms' rows
    row_weight: torch.Tensor  # [R] loss weight of each extra row (0 elsewhere)
    tgt_row: torch.Tensor  # [T] row of each answer token
    tgt_pos: torch.Tensor  # [T] position whose logits predict it
    tgt_id: torch.Tensor  # [T] its id

    @classmethod
    def build(cls, tok, requests, templates, kl_prompt: str, extra: list[ExtraRow], device) -> _StepRows:
        tr = target_rows(tok, requests, templates, kl_prompt, extra or None)
        return cls(
            tr,
            tr.n_requests,
            pad(tr.batch_rows, tok.pad_token_id).to(device),
            tr.edit_pos.to(device),
            tr.owner.to(device),
            tr.is_kl.to(device),
            tr.is_extra.to(device),
            tr.row_weight.to(device),
            tr.tgt_row.to(device),
            tr.tgt_pos.to(device),
            tr.tgt_id.to(device),
        )


@dataclass
class _Selection:
    """The rows of the requests still active in one iteration."""

    active: torch.Tensor  # [n] bool, the requests still optimised
    act_req: torch.Tensor  # [a] their indices
    row_sel: torch.Tensor  # [r] their rows
    local: torch.Tensor  # [R] position of each row in row_sel (-1: not selected)
    sel_owner: torch.Tensor  # [r] request of each selected row
    offset: torch.Tensor  # [r] first position the forward runs (prefix cache), per selected row
    sel_pos: torch.Tensor  # [r] the subject's last token, counted from that offset

    @classmethod
    def of(cls, active: torch.Tensor, rows: _StepRows, forward) -> _Selection:
        device = active.device
        act_req = active.nonzero().squeeze(1)
        row_sel = active[rows.owner].nonzero().squeeze(1)
        local = torch.full((len(rows.owner),), -1, device=device, dtype=torch.long)
        local[row_sel] = torch.arange(len(row_sel), device=device)
        offset = forward.offset(row_sel)
        return cls(
            active.clone(), act_req, row_sel, local, rows.owner[row_sel], offset, rows.edit_pos[row_sel] - offset
        )


def _unshifted_kl_reference(rows: _StepRows, forward, unembed, cfg: TargetConfig) -> torch.Tensor:
    """[n, V] log-probs at the KL token of each request's KL row, from a no-grad forward without
    any shift (a non-zero base would already shift the first optimisation forward)."""
    kl_all = rows.is_kl.nonzero().squeeze(1)  # [n] one KL row per request, in request order
    with torch.no_grad():
        hid = forward(kl_all)
    at = kl_token_index(cfg.kl_position, rows.full.lengths[kl_all], rows.edit_pos[kl_all]) - forward.offset(kl_all)
    return unembed(hid[torch.arange(rows.n, device=hid.device), at]).float().log_softmax(-1)


def _loss(
    rows: _StepRows,
    sel: _Selection,
    hidden: torch.Tensor,
    unembed,
    cfg: TargetConfig,
    terms: Sequence[DescentTerm],
    base: torch.Tensor,
    d: torch.Tensor,
    h_ref: torch.Tensor,
    kl_init: torch.Tensor | None,
    records: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [a] of the active requests, target NLL [n], KL reference [n, V]) of one forward's
    hidden states [r, S, d]: fit + kl_factor·KL + weight decay, then each term's loss in order (the
    terms' recorded values go into ``records``). Without a reference yet (zero base), this
    forward is the unshifted one and gives it."""
    n, act_req, row_sel, sel_owner, offset = rows.n, sel.act_req, sel.row_sel, sel.sel_owner, sel.offset
    tsel = sel.active[rows.owner[rows.tgt_row]]  # [T] answer tokens of active requests
    t_rows = sel.local[rows.tgt_row[tsel]]
    t_pos = rows.tgt_pos[tsel] - offset[t_rows]
    logits = unembed(hidden[t_rows, t_pos]).float()  # [t, V]
    tok_nll = -logits.log_softmax(-1).gather(1, rows.tgt_id[tsel].unsqueeze(1)).squeeze(1)  # [t]
    row_nll = row_means(tok_nll, t_rows, len(row_sel))  # [r]
    rewrite = ~rows.is_kl[row_sel] & ~rows.is_extra[row_sel]
    nll = row_means(row_nll[rewrite], sel_owner[rewrite], n)  # [n]
    step = DescentStep(n, act_req, row_sel, sel_owner, row_nll, rewrite, base, d)
    fit = nll  # [n] the NLL term of the loss (neighbour rows averaged in join it)
    for term in terms:
        fit = term.fit(step, fit)
    kl_rows = rows.is_kl[row_sel].nonzero().squeeze(1)
    kl_sel = row_sel[kl_rows]
    kl_at = kl_token_index(cfg.kl_position, rows.full.lengths[kl_sel], rows.edit_pos[kl_sel]) - offset[kl_rows]  # [a]
    kl_logp = unembed(hidden[kl_rows, kl_at]).float().log_softmax(-1)  # [a, V]
    if kl_init is None:  # zero base: the first forward is the unshifted one
        kl_init = kl_logp.detach()
    kl = (kl_logp.exp() * (kl_logp - kl_init[act_req])).sum(-1)  # [a] KL(current || initial)
    norm_h = h_ref[act_req].norm(dim=1)
    wd = cfg.weight_decay * (base[act_req] + d[act_req]).norm(dim=1) / norm_h**2
    loss = fit[act_req] + cfg.kl_factor * kl + wd  # [a]
    for term in terms:
        part = term.loss(step)
        if part is None:
            continue
        if part.added is not None:
            loss = loss + part.added
        if part.recorded is not None:
            records.setdefault(term.name, torch.zeros(n, device=loss.device))[act_req] = part.recorded
    return loss, nll, kl_init


class _Record:
    """Output hook of the first forward: the output at the bare prompts' subject token, stored in
    ``into`` [n, d_model] (h, or ROME's norm reference) for their requests. A no-op later."""

    def __init__(self, into: torch.Tensor, sel_owner: torch.Tensor, sel_pos: torch.Tensor, bare: torch.Tensor | None):
        self.into, self.sel_owner, self.sel_pos, self.bare = into, sel_owner, sel_pos, bare

    def __call__(self, out: torch.Tensor) -> None:  # out: [r, S, d_model]
        if self.bare is not None:
            bare = self.bare
            self.into[self.sel_owner[bare]] = out[bare, self.sel_pos[bare]].detach().float()


class _ShiftAt:
    """Output hook adding slice ``j`` of each row's shift at its subject's last token (after
    ``record``, which reads the output before the shift)."""

    def __init__(self, j: int, shift, sel_pos: torch.Tensor, record: _Record | None = None) -> None:
        self.j, self.shift, self.sel_pos, self.record = j, shift, sel_pos, record

    def __call__(self, out: torch.Tensor) -> torch.Tensor:  # out: [r, S, d_model]
        if self.record is not None:
            self.record(out)
        ar = torch.arange(out.shape[0], device=out.device)
        return out.index_put((ar, self.sel_pos), self.shift(self.j).to(out.dtype), accumulate=True)


def _bind(
    terms: Sequence[DescentTerm], n: int, base: torch.Tensor, row_weight: torch.Tensor, first_row: int
) -> list[DescentTerm]:
    """Each term bound to this descent, with the slice of the step's rows that are its own (the
    terms' rows follow the rewrite and KL rows, in the terms' order)."""
    bound = []
    for term in terms:
        rows = slice(first_row, first_row + len(term.rows))
        bound.append(term.bind(DescentSetup(n, base, row_weight, rows)))
        first_row = rows.stop
    return bound


@torch.no_grad()
def _clamp(delta: torch.Tensor, base: torch.Tensor, h_ref: torch.Tensor, keep: torch.Tensor, factor: float) -> None:
    """Project the whole shift base + δ of the rows ``keep`` into the ball of radius factor·‖h‖."""
    max_norm = factor * h_ref[keep].norm(dim=1, keepdim=True)  # [k, 1]
    total = base[keep] + delta[keep]  # [k, width] the whole shift is what is clamped
    norm = total.norm(dim=1, keepdim=True)
    total = torch.where(norm > max_norm, total * max_norm / norm, total)
    delta[keep] = total - base[keep]


def _descend_in_chunks(
    view, tok, requests, templates, layer, cfg, steps, base, update_last, progress, desc, terms, sites, norm_ref
) -> OffsetDescent:
    """:func:`descend_offsets` over consecutive chunks of ``cfg.requests_per_forward`` requests,
    concatenated in request order. Each chunk gets its own requests' base and terms
    (:meth:`DescentTerm.chunk`: their rows, masks and scores, renumbered)."""
    size = cfg.requests_per_forward
    one_forward = dataclasses.replace(cfg, requests_per_forward=None)
    parts: list[OffsetDescent] = []
    n_chunks = -(-len(requests) // size)
    for c, start in enumerate(range(0, len(requests), size)):
        stop = min(start + size, len(requests))
        mine = [t for t in (term.chunk(start, stop) for term in terms) if t is not None]
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
                terms=mine,
                sites=sites,
                norm_ref=norm_ref,
            )
        )
    names = {name: None for p in parts for name in p.records}  # in order of first appearance
    return OffsetDescent(
        delta=torch.cat([p.delta for p in parts]),
        h=torch.cat([p.h for p in parts]),
        loss=torch.cat([p.loss for p in parts]),
        nll=torch.cat([p.nll for p in parts]),
        updates=torch.cat([p.updates for p in parts]),
        # A chunk where a term recorded nothing (no rows of it there): 0 for its requests.
        records={name: torch.cat([p.records.get(name, torch.zeros_like(p.loss)) for p in parts]) for name in names},
    )


def optimize_targets(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    cfg: TargetConfig,
    progress: bool = True,
    terms: Sequence[DescentTerm] = (),
    norm_ref: EditSite | tuple[torch.nn.Module, str] | None = None,
) -> TargetResult:
    """MEMIT's z for every request of a step, batched: z_i = h_i + δ_i after at most
    ``cfg.steps`` forwards (the last one only measures, as in the reference). ``terms``: plug-ins
    of the loss (the neighbour rows of editing/neighbours.py); ``nll`` stays the target's.
    ``norm_ref``: see :func:`descend_offsets`."""
    run = descend_offsets(
        view, tok, requests, templates, layer, cfg, cfg.steps, progress=progress, terms=terms, norm_ref=norm_ref
    )
    return TargetResult(z=run.h + run.delta, h=run.h, loss=run.loss, nll=run.nll, steps=run.updates)
