"""The forwards of the z optimisation: each runs the selected rows of a step with the edit hooks in
place and returns the last hidden states. :class:`FullForward` runs every row from its first token
(the reference's way); :class:`PrefixCachedForward` runs the tokens before the edit position once;
:class:`LowerLayersCached` wraps either and runs the layers below the z layer once.
"""

from __future__ import annotations

import torch

from editlab.editing.targets.config import TargetConfig
from editlab.editing.targets.rows import TargetRows
from editlab.models.arch import ModelView
from editlab.models.hooks import StopForward, capture_inputs
from editlab.models.kv_cache import returned_cache, select_cache_rows
from editlab.models.prompts import PaddedBatch, pad


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


def rows_forward(
    view: ModelView,
    tr: TargetRows,
    full: PaddedBatch,
    edit_pos: torch.Tensor,
    pad_id: int,
    cfg: TargetConfig,
    layer: int,
):
    """The forward ``cfg`` asks for: prefix-cached or full, below-layers cached when the z layer
    has layers below it."""
    forward_class = PrefixCachedForward if cfg.prefix_cache else FullForward
    forward = forward_class(view, tr, full, edit_pos, pad_id)
    if cfg.lower_cache and layer > 0:
        forward = LowerLayersCached(forward, view, layer, len(tr.batch_rows), view.device)
    return forward
