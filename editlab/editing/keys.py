"""FFN keys at the subject's last token, averaged over the context templates.

The released ``compute_ks`` (MEMIT, and AlphaEdit, NSE, ECE which copy it) groups the templates
by context type, [["{}"], [the generated prefixes]], takes the mean within each type and then the
mean of those means: the bare prompt weighs 1/2 and each of c prefixes 1/(2c) ("per_type"). ROME's
``compute_u`` takes the flat mean over its templates ("flat"). editlab generates every prefix with
the same length, so template 0 ("{}") is one type and the rest the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from editlab.models.arch import ModelView
from editlab.models.prompts import pad, subject_last_index
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


KeyWeighting = Literal["per_type", "flat"]


def template_weights(n_templates: int, weighting: KeyWeighting) -> torch.Tensor:
    """Weight of each template in a request's key, [T] float64, summing to 1 (template 0 is "{}").

    "per_type": the mean of the per-type means ([["{}"], prefixes], as compute_ks): 1/2 for the
    bare prompt, 1/(2(T-1)) for each prefix; a bare prompt alone weighs 1. "flat": 1/T each."""
    if n_templates < 1:
        raise ValueError("keys need at least one template")
    if weighting == "flat" or n_templates == 1:
        return torch.full((n_templates,), 1.0 / n_templates, dtype=torch.float64)
    if weighting == "per_type":
        w = torch.full((n_templates,), 0.5 / (n_templates - 1), dtype=torch.float64)
        w[0] = 0.5
        return w
    raise ValueError(f"option context.key_weighting={weighting!r} must be 'per_type' or 'flat'")


@torch.no_grad()
def keys_at_layers(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    key_layers: list[int],
    out_layer: int,
    batch_size: int = 64,
    weighting: KeyWeighting = "per_type",
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Keys at each of ``key_layers`` averaged over templates with :func:`template_weights`, one
    [n, d_ff] per layer in that order, and the output of ``out_layer`` at the subject's last token
    of the bare prompt (template 0 is "{}"), [n, d_model]. One forward per chunk serves every key
    layer: keys of several layers on the same weights cost one pass, not one per layer."""
    assert templates[0] == "{}", "template 0 must be the bare prompt"
    sr = subject_rows(tok, requests, templates)
    n = len(requests)
    # Rows are template-major: row r is template r // n.
    row_weight = template_weights(len(templates), weighting).repeat_interleave(n)  # [R]
    key_sums: list[torch.Tensor] = []
    outs = torch.empty(0)
    for start in range(0, len(sr.rows), batch_size):
        chunk = slice(start, start + batch_size)
        batch = pad(sr.rows[chunk], tok.pad_token_id).to(view.device)
        keys, layer_out = trace(view, batch.input_ids, batch.attention_mask, list(key_layers), [out_layer])
        ar = torch.arange(batch.input_ids.shape[0], device=view.device)
        pos = sr.subject_pos[chunk].to(view.device)
        owner = sr.owner[chunk].to(view.device)
        # mix[i, j]: weight of the chunk's row j in request i's key. A matmul sums each request's
        # rows in a fixed order (index_add_ on a GPU adds them in whatever order its atomics run).
        mix = torch.zeros(n, len(ar), dtype=torch.float64, device=view.device)  # [n, b]
        mix[owner, ar] = row_weight[chunk].to(view.device)
        for j, layer in enumerate(key_layers):
            k = keys[layer][ar, pos].double()  # [b, d_ff]
            if j == len(key_sums):
                key_sums.append(torch.zeros(n, k.shape[1], dtype=torch.float64, device=view.device))
            key_sums[j] += mix @ k  # [n, d_ff]
        if start == 0:
            outs = torch.zeros(n, layer_out[out_layer].shape[-1], dtype=torch.float64, device=view.device)
        # Rows [0, n) are the bare-prompt rows of template 0.
        bare = torch.arange(start, start + len(owner), device=view.device) < n
        if bare.any():
            outs[owner[bare]] = layer_out[out_layer][ar, pos][bare].double()
    return tuple(key_sums), outs


def keys_and_outputs(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    key_layer: int,
    out_layer: int,
    batch_size: int = 64,
    weighting: KeyWeighting = "per_type",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`keys_at_layers` of one layer: keys [n, d_ff] and outputs of ``out_layer`` [n, d_model]."""
    keys, outs = keys_at_layers(view, tok, requests, templates, [key_layer], out_layer, batch_size, weighting)
    return keys[0], outs
