"""The reference (authors') MEMIT pipeline, re-implemented faithfully and slow on purpose.

What makes the reference slow, kept here as it is there:
  - covariance: one pass over the corpus per edited layer (its layer_stats runs per layer), each a
    whole forward including the vocabulary projection;
  - keys and current outputs: whole forwards with the vocabulary projection;
  - z: one request at a time; every optimisation step runs every row from its first token through
    the whole model and takes log-softmax of the full-vocabulary logits at every position, then
    gathers the few target positions.

The loss, the stop rule, the clamp and the solve are the same as editlab's (targets/, solve.py),
so the two pipelines should land on the same z and ΔW; the test suite checks that on tiny models.
Tokenisation is shared (editlab.editing.targets.target_rows / keys.subject_rows) so that both see
the same token rows.
"""

from __future__ import annotations

import torch

from editlab.editing.keys import subject_rows
from editlab.editing.targets import TargetConfig, target_rows
from editlab.models.arch import ModelView
from editlab.models.hooks import capture_inputs, capture_output, edit_output
from editlab.models.prompts import pad
from editlab.types import EditRequest


@torch.no_grad()
def covariance(view: ModelView, tok, texts: list[str], layers: list[int], max_length: int, batch_size: int):
    """E[kkᵀ] per layer [d_ff, d_ff] (float64), one whole-model pass over the corpus per layer."""
    out = {}
    for layer in layers:
        total, count = None, 0
        for start in range(0, len(texts), batch_size):
            enc = tok(
                texts[start : start + batch_size],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(view.device)
            with capture_inputs({"k": view.ffn_out(layer)}) as cap:
                view.model(**enc)  # whole model, logits included
            k = cap["k"][enc["attention_mask"].bool()].double()  # [tokens, d_ff]
            total = k.T @ k if total is None else total + k.T @ k
            count += k.shape[0]
        out[layer] = total / count
    return out


@torch.no_grad()
def keys_and_outputs(view: ModelView, tok, requests, templates, key_layer: int, out_layer: int):
    """Keys at key_layer [n, d_ff] as compute_ks averages them (the mean of the bare prompt's key
    and of the prefixes' mean key) and the bare prompt's output of out_layer at the subject's
    last token [n, d_model], both float64, from whole forwards."""
    sr = subject_rows(tok, requests, templates)
    batch = pad(sr.rows, tok.pad_token_id).to(view.device)
    with capture_inputs({"k": view.ffn_out(key_layer)}) as cap, capture_output(view.layer(out_layer), "h") as hid:
        view.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    ar = torch.arange(len(sr.rows), device=view.device)
    pos = sr.subject_pos.to(view.device)
    k = cap["k"][ar, pos].double()  # [R, d_ff]
    n = len(requests)
    per_template = k.view(sr.n_templates, n, -1)  # [T, n, d_ff]: rows are template-major
    type_means = [per_template[:1].mean(0)] + ([per_template[1:].mean(0)] if sr.n_templates > 1 else [])
    keys = torch.stack(type_means).mean(0)  # [n, d_ff]
    outs = hid["h"][ar[:n], pos[:n]].double()  # rows [0, n) are template 0, the bare prompt
    return keys, outs


def z_one_request(view: ModelView, tok, req: EditRequest, templates: list[str], layer: int, cfg: TargetConfig):
    """compute_z for one request: (z [d_model], final loss, final NLL, updates applied)."""
    device = view.device
    tr = target_rows(tok, [req], templates, cfg.kl_prompt)
    batch = pad(tr.batch_rows, tok.pad_token_id).to(device)
    rows = torch.arange(len(tr.batch_rows), device=device)
    edit_pos = tr.edit_pos.to(device)
    is_kl = tr.is_kl.to(device)
    tgt_row, tgt_pos, tgt_id = tr.tgt_row.to(device), tr.tgt_pos.to(device), tr.tgt_id.to(device)
    n_rewrite = int((~is_kl).sum())
    delta = torch.zeros(view.model.config.hidden_size, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    h: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None
    loss = nll = torch.tensor(float("nan"))
    updates = 0
    for it in range(cfg.steps):

        def shift(out: torch.Tensor) -> torch.Tensor:  # out: [R, S, d_model]
            nonlocal h
            if h is None:
                h = out[0, edit_pos[0]].detach().float()  # row 0: template "{}", the bare prompt
            return out.index_put((rows, edit_pos), delta.to(out.dtype).expand(len(rows), -1), accumulate=True)

        with torch.enable_grad(), edit_output(view.layer(layer), f"layer {layer}", shift):
            logits = view.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [R, S, V]
            logp = logits.float().log_softmax(-1)  # every position, full vocabulary
            tok_nll = -logp[tgt_row, tgt_pos, tgt_id]  # [T]
            per_row = torch.zeros(n_rewrite, device=device).index_add(0, tgt_row, tok_nll)
            per_row = per_row / torch.zeros(n_rewrite, device=device).index_add(0, tgt_row, torch.ones_like(tok_nll))
            nll = per_row.mean()
            kl_row = int(is_kl.nonzero()[0])
            # compute_z reads the KL row at its lookup index, the subject's last token.
            kl_at = int(edit_pos[kl_row]) if cfg.kl_position == "subject" else int(batch.lengths[kl_row]) - 1
            kl_logp = logp[kl_row, kl_at]  # [V]
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl = (kl_logp.exp() * (kl_logp - kl_init)).sum()
            loss = nll + cfg.kl_factor * kl + cfg.weight_decay * delta.norm() / h.norm() ** 2
        if loss.item() < cfg.early_stop_loss or it == cfg.steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        updates += 1
        with torch.no_grad():
            max_norm = cfg.clamp_norm_factor * h.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return h + delta.detach(), float(loss.detach()), float(nll.detach()), updates


def targets(view: ModelView, tok, requests, templates, layer: int, cfg: TargetConfig):
    """z [n, d_model] for every request, one request at a time; and the final NLL of each [n]."""
    zs, nlls = [], []
    for req in requests:
        z, _, nll, _ = z_one_request(view, tok, req, templates, layer, cfg)
        zs.append(z)
        nlls.append(nll)
    return torch.stack(zs), torch.tensor(nlls)


def solve(keys: torch.Tensor, resid: torch.Tensor, preserve: torch.Tensor) -> torch.Tensor:
    """ΔW [d_model, d_ff] = Rᵀ (A⁻¹ Kᵀ)ᵀ with A = P + KᵀK, as the reference writes it."""
    k = keys.double()
    adj = torch.linalg.solve(preserve.double() + k.T @ k, k.T)  # [d_ff, n]
    return resid.double().T @ adj.T
