"""Batched z optimisation equals per-request optimisation; the loss goes down."""

import dataclasses

import pytest
import torch

from editlab.editing.eac import AnchorMask
from editlab.editing.keys import keys_and_outputs
from editlab.editing.neighbours import NeighbourRows
from editlab.editing.targets import DescentTerm, ExtraRow, TargetConfig, TermLoss, descend_offsets, optimize_targets
from editlab.models.arch import ModelView

from helpers import TEMPLATES, facts, peaky_model


def test_batched_targets_equal_one_at_a_time():
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    cfg = TargetConfig(steps=8, lr=0.2)
    together = optimize_targets(view, tok, reqs, TEMPLATES, 1, cfg, progress=False)
    for i, req in enumerate(reqs):
        alone = optimize_targets(view, tok, [req], TEMPLATES, 1, cfg, progress=False)
        torch.testing.assert_close(together.z[i], alone.z[0], rtol=1e-4, atol=1e-4)
        assert together.steps[i] == alone.steps[0]


def test_rewrite_rows_are_the_metrics_answer_rows():
    """One teacher-forced row builder (models/scoring.AnswerRows): the rewrite rows of the z loss
    and their answer tokens are the metrics' rows of the same prompts and answers."""
    from editlab.editing.targets import target_rows
    from editlab.models.scoring import answer_rows

    _, tok = peaky_model()
    reqs = facts()
    tr = target_rows(tok, reqs, ["{}"], "{} is a")
    rows, t_row, t_pos, t_id = answer_rows(
        tok, [r.prompt.format(r.subject) for r in reqs], [r.target_new for r in reqs]
    )
    assert tr.batch_rows[: len(reqs)] == rows
    assert torch.equal(tr.tgt_row, t_row) and torch.equal(tr.tgt_pos, t_pos) and torch.equal(tr.tgt_id, t_id)
    assert tr.batch_rows[len(reqs) :] == [tok(f"{r.subject} is a")["input_ids"] for r in reqs]  # KL rows: no answer


def test_loss_decreases_and_delta_is_clamped():
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    start = optimize_targets(view, tok, reqs, TEMPLATES, 1, TargetConfig(steps=1), progress=False)
    cfg = TargetConfig(steps=20, clamp_norm_factor=0.5, kl_factor=0.0, weight_decay=0.0)
    end = optimize_targets(view, tok, reqs, TEMPLATES, 1, cfg, progress=False)
    assert (end.nll < start.nll).all()
    assert ((end.z - end.h).norm(dim=1) <= 0.5 * end.h.norm(dim=1) + 1e-4).all()


def test_initial_residual_is_the_bare_prompt_output():
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    res = optimize_targets(view, tok, reqs, TEMPLATES, 1, TargetConfig(steps=1), progress=False)
    _, h = keys_and_outputs(view, tok, reqs, TEMPLATES, 0, 1)
    torch.testing.assert_close(res.h.double(), h, rtol=1e-5, atol=1e-5)


def test_early_stop_removes_converged_requests():
    model, tok = peaky_model()
    view = ModelView.of(model)
    # An absurdly high early-stop bound: every request leaves after its first forward.
    res = optimize_targets(
        view, tok, facts(), TEMPLATES, 1, TargetConfig(steps=10, early_stop_loss=1e9), progress=False
    )
    assert (res.steps == 0).all() and torch.equal(res.z, res.h)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj", "gpt_neox", "qwen2"])
def test_prefix_cache_gives_the_same_targets_as_full_forwards(model_type):
    model, tok = peaky_model(model_type)
    view = ModelView.of(model)
    reqs = facts()  # "Microsoft" is the first token of its prompt: a row with an empty prefix
    cfg = TargetConfig(steps=6, lr=0.2)
    fast = optimize_targets(view, tok, reqs, TEMPLATES, 1, cfg, progress=False)
    slow = optimize_targets(
        view, tok, reqs, TEMPLATES, 1, TargetConfig(steps=6, lr=0.2, prefix_cache=False), progress=False
    )
    torch.testing.assert_close(fast.h, slow.h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.z, slow.z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj", "gpt_neox", "qwen2"])
def test_lower_cache_gives_the_same_targets_and_skips_the_layers_below(model_type, prefix_cache):
    model, tok = peaky_model(model_type)
    view = ModelView.of(model)
    reqs = facts()
    z_layer = len(view.layers()) - 1  # every layer but the last is below the z layer
    calls = []
    below = view.layer(0)
    sub = next(m for m in below.children() if sum(1 for _ in m.parameters()) > 0)  # runs only inside layer 0
    handle = sub.register_forward_hook(lambda *a: calls.append(1))
    try:
        cached = optimize_targets(
            view,
            tok,
            reqs,
            TEMPLATES,
            z_layer,
            TargetConfig(steps=6, lr=0.2, prefix_cache=prefix_cache),
            progress=False,
        )
        n_cached = len(calls)
        calls.clear()
        plain = optimize_targets(
            view,
            tok,
            reqs,
            TEMPLATES,
            z_layer,
            TargetConfig(steps=6, lr=0.2, prefix_cache=prefix_cache, lower_cache=False),
            progress=False,
        )
        n_plain = len(calls)
    finally:
        handle.remove()
    torch.testing.assert_close(cached.h, plain.h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.z, plain.z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached.loss, plain.loss, rtol=1e-4, atol=1e-4)
    assert int(cached.steps.max()) >= 2  # several optimisation forwards ran
    # Layer 0 ran once for the cache (and once for the prefix), not once per optimisation step.
    assert n_cached == 1 + prefix_cache and n_plain == n_cached - 1 + 6
    assert all("forward" not in m.__dict__ for m in view.layers())  # the skip is undone


# -- the KL term's position ----------------------------------------------------------------------
def loss_by_hand(model, tok, req, shift: torch.Tensor, layer: int, cfg: TargetConfig) -> dict[str, float]:
    """compute_z's loss for one request, template "{}", written out: ``shift`` [d_model] added to
    the output of ``layer`` at the subject's last token of each prompt, one plain forward per
    prompt. Returns the loss with the KL read at the subject's last token and at the last token."""
    view = ModelView.of(model)

    def log_probs(ids: list[int], pos: int, add: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        seen = {}

        def hook(module, args, out):
            hs = (out[0] if isinstance(out, tuple) else out).clone()  # [1, S, d_model]
            seen["h"] = hs[0, pos].clone()
            if add is not None:
                hs[0, pos] += add
            return (hs, *out[1:]) if isinstance(out, tuple) else hs

        handle = view.layer(layer).register_forward_hook(hook)
        try:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [S, V]
        finally:
            handle.remove()
        return logits.log_softmax(-1), seen["h"]

    pre = req.prompt[: req.prompt.index("{}")]
    subj = len(tok(pre + req.subject)["input_ids"]) - 1  # the subject's last token
    prompt_ids = tok(req.prompt.format(req.subject))["input_ids"]
    ans = tok(" " + req.target_new, add_special_tokens=False)["input_ids"]
    logp, h = log_probs(prompt_ids + ans[:-1], subj, shift)
    nll = -sum(float(logp[len(prompt_ids) - 1 + j, a]) for j, a in enumerate(ans)) / len(ans)
    kl_ids = tok(cfg.kl_prompt.format(req.subject))["input_ids"]
    kl_subj = len(tok(req.subject)["input_ids"]) - 1  # "{} is a": the subject starts the prompt
    shifted, _ = log_probs(kl_ids, kl_subj, shift)
    plain, _ = log_probs(kl_ids, kl_subj, None)
    wd = cfg.weight_decay * float(shift.norm()) / float(h.norm()) ** 2
    out = {}
    for name, at in (("subject", kl_subj), ("last", len(kl_ids) - 1)):
        kl = float((shifted[at].exp() * (shifted[at] - plain[at])).sum())  # KL(shifted || unshifted)
        out[name] = nll + cfg.kl_factor * kl + wd
    return out


@pytest.mark.parametrize("caches", [True, False])  # prefix and lower-layer caches on / off
@pytest.mark.parametrize("kl_position", ["subject", "last"])
def test_kl_term_is_read_at_the_configured_token(kl_position, caches):
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()[:2]  # multi-token subjects; the second prompt has text before its subject
    cfg = TargetConfig(
        steps=2,
        lr=2.0,
        clamp_norm_factor=4.0,
        kl_factor=100.0,  # large: the KL term dominates the loss
        early_stop_loss=0.0,
        kl_position=kl_position,
        prefix_cache=caches,
        lower_cache=caches,
    )
    # Two forwards: the loss returned is the one measured at δ₁ = z − h after one update.
    res = optimize_targets(view, tok, reqs, ["{}"], 1, cfg, progress=False)
    assert (res.steps == 1).all()
    other = "last" if kl_position == "subject" else "subject"
    for i, req in enumerate(reqs):
        by_hand = loss_by_hand(model, tok, req, (res.z[i] - res.h[i]).float(), 1, cfg)
        assert abs(by_hand["subject"] - by_hand["last"]) > 1e-2  # the two positions differ here
        assert abs(float(res.loss[i]) - by_hand[kl_position]) < 1e-4, (float(res.loss[i]), by_hand)
        assert abs(float(res.loss[i]) - by_hand[other]) > 1e-3


def test_kl_reference_with_a_base_shift_is_the_unshifted_subject_token():
    from editlab.editing.targets import descend_offsets

    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()[:2]
    cfg = TargetConfig(kl_factor=10.0, early_stop_loss=0.0)
    base = 2.0 * torch.randn(len(reqs), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    # One forward at the base (ECE's phase 2 start): its KL reference is an extra unshifted forward.
    run = descend_offsets(view, tok, reqs, ["{}"], 1, cfg, 1, base=base, progress=False)
    for i, req in enumerate(reqs):
        by_hand = loss_by_hand(model, tok, req, base[i], 1, cfg)
        assert abs(by_hand["subject"] - by_hand["last"]) > 1e-2
        assert abs(float(run.loss[i]) - by_hand["subject"]) < 1e-4, (float(run.loss[i]), by_hand)


@pytest.mark.parametrize("chunk", [1, 2])
def test_requests_in_chunks_give_the_z_of_one_forward(chunk):
    """Each request's z depends only on its own rows: chunks of 1 (the reference's one request at
    a time) or 2 of the 3 requests give one forward's z, losses and step counts."""
    model, tok = peaky_model()
    view = ModelView.of(model)
    cfg = TargetConfig(steps=8, lr=0.2)
    together = optimize_targets(view, tok, facts(), TEMPLATES, 1, cfg, progress=False)
    chunked = optimize_targets(
        view, tok, facts(), TEMPLATES, 1, dataclasses.replace(cfg, requests_per_forward=chunk), progress=False
    )
    torch.testing.assert_close(chunked.z, together.z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked.h, together.h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.loss, together.loss, rtol=1e-4, atol=1e-4)
    assert torch.equal(chunked.steps, together.steps)


class IndexedTerm(DescentTerm):
    """Test term whose loss depends on the request index (0.01 ‖shift‖² · (i + 1)) and which logs
    the requests it updates, both in the step's numbering (``start``: a chunk's first request)."""

    def __init__(self, rows: list, start: int = 0) -> None:
        self.updated, self.start = rows, start

    def loss(self, step) -> TermLoss:
        shift = (step.base + step.d)[step.act_req]
        return TermLoss(0.01 * shift.pow(2).sum(1) * (step.act_req + self.start + 1))

    def gradient(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        self.updated.append(rows + self.start)
        return grad

    def chunk(self, start: int, stop: int) -> "IndexedTerm":
        return IndexedTerm(self.updated, self.start + start)


def test_chunks_renumber_extra_rows_base_mask_and_callbacks():
    """A neighbour row owned by the third request, a base and a mask sliced per chunk, and
    callbacks that see the step's request indices: the same as one forward."""
    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    d = model.config.hidden_size
    extra = [ExtraRow(2, "{} was created by", "Apple", "Steve Jobs", 1.5)]
    base = torch.zeros(len(reqs), d)
    base[1, :4] = 0.3
    mask = torch.ones(len(reqs), d, dtype=torch.bool)
    mask[:, -3:] = False
    runs, seen = {}, {}
    for chunk in (None, 2):
        cfg = TargetConfig(steps=5, lr=0.2, requests_per_forward=chunk)
        rows: list[torch.Tensor] = []
        runs[chunk] = descend_offsets(
            view,
            tok,
            reqs,
            TEMPLATES,
            1,
            cfg,
            5,
            base=base,
            progress=False,
            terms=[NeighbourRows(extra), IndexedTerm(rows), AnchorMask(mask)],
        )
        seen[chunk] = sorted(set(torch.cat(rows).tolist()))
    one, chunked = runs[None], runs[2]
    torch.testing.assert_close(chunked.delta, one.delta, rtol=1e-4, atol=1e-4)
    chunked_nb, one_nb = chunked.records["neighbour_nll"], one.records["neighbour_nll"]
    torch.testing.assert_close(chunked_nb, one_nb, rtol=1e-4, atol=1e-4)
    assert float(one_nb[2]) > 0 and float(one_nb[0]) == 0.0  # the row joined request 3
    assert seen[2] == seen[None] == [0, 1, 2]
    assert bool((chunked.delta[:, -3:] == 0).all())


def test_requests_per_forward_is_in_the_z_cache_key_only_when_set():
    from editlab.editing.rewind import z_settings

    assert "requests_per_forward" not in z_settings(TargetConfig())
    assert z_settings(TargetConfig(requests_per_forward=10))["requests_per_forward"] == 10
    with pytest.raises(ValueError, match="requests_per_forward"):
        TargetConfig(requests_per_forward=0)


@pytest.mark.parametrize("chunk", [None, 2])
def test_neutral_plug_ins_leave_the_descent_bit_identical(chunk):
    """The plug-in interface changes no number: a term that overrides nothing, a full anchor mask
    with a gradient record and a zero-weight elastic net give the plain descent's bits. (The
    neighbour rows, PMET's site and ECE's base are checked against the plain path in
    test_iterative, below and in test_ece.)"""
    from editlab.editing.eac import GradientMean, RecordGradients, ScoredElasticNet

    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    d = model.config.hidden_size
    cfg = TargetConfig(steps=6, lr=0.2, kl_factor=1.0, requests_per_forward=chunk)
    plain = descend_offsets(view, tok, reqs, TEMPLATES, 1, cfg, 6, progress=False)
    grads = GradientMean((len(reqs), d), view.device)
    terms = [
        RecordGradients(grads),
        AnchorMask(torch.ones(len(reqs), d, dtype=torch.bool)),
        ScoredElasticNet(torch.ones(len(reqs), d), 0.0, 0.0, 1.0),
    ]
    if chunk is None:
        terms.append(DescentTerm())  # the base class cannot be cut into chunks: it refuses
    run = descend_offsets(view, tok, reqs, TEMPLATES, 1, cfg, 6, progress=False, terms=terms)
    for name in ("delta", "h", "loss", "nll", "updates"):
        assert torch.equal(getattr(run, name), getattr(plain, name)), name
    assert run.records == {} and bool((grads.count == plain.updates).all())


def test_a_term_without_chunks_refuses_requests_per_forward():
    model, tok = peaky_model()
    view = ModelView.of(model)
    cfg = TargetConfig(steps=2, requests_per_forward=2)
    with pytest.raises(NotImplementedError, match="cannot run in chunks"):
        descend_offsets(view, tok, facts(), TEMPLATES, 1, cfg, 2, progress=False, terms=[DescentTerm()])


def test_an_edit_site_at_zero_measures_the_plain_loss_and_trains_its_own_slice():
    """PMET's attention site (methods/pmet.attention_site): one measuring forward at δ = 0 adds
    exact zeros, so h, loss and NLL are the plain descent's bits; optimising moves the site's slice
    of δ too, and the result differs from the plain descent's."""
    from editlab.editing.methods.pmet import attention_site

    model, tok = peaky_model()
    view = ModelView.of(model)
    reqs = facts()
    d = model.config.hidden_size
    cfg = TargetConfig(steps=4, lr=0.2)
    plain, sited = (
        descend_offsets(view, tok, reqs, TEMPLATES, 1, cfg, 1, progress=False, sites=sites)
        for sites in ((), (attention_site(view, 1),))
    )
    assert sited.delta.shape == (len(reqs), 2 * d)
    for name in ("h", "loss", "nll"):
        assert torch.equal(getattr(sited, name), getattr(plain, name)), name
    plain, sited = (
        descend_offsets(view, tok, reqs, TEMPLATES, 1, cfg, 4, progress=False, sites=sites)
        for sites in ((), (attention_site(view, 1),))
    )
    assert float(sited.delta[:, d:].norm()) > 0 and not torch.allclose(sited.delta[:, :d], plain.delta)
