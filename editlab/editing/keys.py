"""FFN keys at the subject's last token, averaged over the context templates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editlab.editing.prompts import pad, subject_last_index
from editlab.models.arch import ModelView
from editlab.models.trace import trace
from editlab.types import EditRequest


@dataclass
class SubjectRows:
    """Every (request, template) prompt of a step, tokenised once."""

    rows: list[list[int]]
    subject_pos: torch.Tensor  # [R] index of the subject's last token in each row
    owner: torch.Tensor  # [R] request index of each row
    n_templates: int


def subject_rows(tok, requests: list[EditRequest], templates: list[str]) -> SubjectRows:
    rows, pos, owner = [], [], []
    for t in templates:
        for i, req in enumerate(requests):
            ids, idx = subject_last_index(tok, t.format(req.prompt), req.subject)
            rows.append(ids)
            pos.append(idx)
            owner.append(i)
    return SubjectRows(rows, torch.tensor(pos), torch.tensor(owner), len(templates))


@torch.no_grad()
def keys_and_outputs(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    key_layer: int,
    out_layer: int,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at ``key_layer`` averaged over templates, [n, d_ff], and the output of ``out_layer``
    at the subject's last token of the bare prompt (template 0 is "{}"), [n, d_model]."""
    assert templates[0] == "{}", "template 0 must be the bare prompt"
    sr = subject_rows(tok, requests, templates)
    n = len(requests)
    key_sum = None
    outs = torch.empty(0)
    for start in range(0, len(sr.rows), batch_size):
        chunk = slice(start, start + batch_size)
        batch = pad(sr.rows[chunk], tok.pad_token_id).to(view.device)
        keys, layer_out = trace(view, batch.input_ids, batch.attention_mask, [key_layer], [out_layer])
        ar = torch.arange(batch.input_ids.shape[0], device=view.device)
        pos = sr.subject_pos[chunk].to(view.device)
        k = keys[key_layer][ar, pos].double()  # [b, d_ff]
        owner = sr.owner[chunk].to(view.device)
        if key_sum is None:
            key_sum = torch.zeros(n, k.shape[1], dtype=torch.float64, device=view.device)
            outs = torch.zeros(n, layer_out[out_layer].shape[-1], dtype=torch.float64, device=view.device)
        key_sum.index_add_(0, owner, k)
        # Rows [0, n) are the bare-prompt rows of template 0.
        bare = torch.arange(start, start + len(owner), device=view.device) < n
        if bare.any():
            outs[owner[bare]] = layer_out[out_layer][ar, pos][bare].double()
    return key_sum / sr.n_templates, outs
