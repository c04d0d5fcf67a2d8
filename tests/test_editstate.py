"""Edit-state checkpoints in pieces: a method restored from its state_dict continues exactly as the
original; the file is written atomically and a damaged or foreign one is named; RNG states round
trip; a checkpoint of another run is refused. Plus the faults a step can meet: NaN/Inf target
values or keys, singular and ill-conditioned systems, an unreadable or foreign covariance cache,
prompts longer than the model's context."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from editlab.data.sources import DataError
from editlab.editing.methods import memit as memit_module
from editlab.editing.solve import checked_solve, memit_delta, preserve_matrix, submatrix_delta
from editlab.editing.stats import (
    CovarianceConfig,
    cache_key,
    read_corpus,
    second_moments,
    statistics_cache,
)
from editlab.keyed_cache import StaleCacheError, cache_root
from editlab.lightning.editstate import (
    EditStateError,
    check_resumable,
    config_differences,
    load_edit_state,
    rng_state,
    save_edit_state,
    set_rng_state,
)
from editlab.models.arch import ModelView
from editlab.models.delta import DeltaMismatchError, apply_weight_deltas, snapshot, weight_deltas
from editlab.models.fingerprint import model_fingerprint
from editlab.types import EditRequest

from helpers import facts, make_ece, make_memit


@pytest.mark.parametrize("make", [make_memit, make_ece], ids=["MEMIT", "ECE"])
def test_method_restored_from_its_state_continues_identically(make, tmp_path, stats_cache):
    reqs = facts()
    ctx, method = make(tmp_path)
    names = method.edited_parameters(ctx.view)
    w0 = snapshot(ctx.model, names)
    method.apply(ctx, reqs[:2])
    path = save_edit_state(tmp_path / "s.pt", {"method": method.state_dict(), "deltas": weight_deltas(ctx.model, w0)})
    method.apply(ctx, reqs[2:])
    expected = snapshot(ctx.model, names)

    # A fresh process: same model and setup, then the saved state and weights.
    state = load_edit_state(path)
    ctx2, fresh = make(tmp_path)
    fresh.load_state_dict(state["method"])
    apply_weight_deltas(ctx2.model, state["deltas"], snapshot(ctx2.model, names))
    fresh.apply(ctx2, reqs[2:])
    for name in names:
        assert torch.equal(ctx2.model.get_parameter(name), expected[name]), name

    # The state matters: without it (no sequential cache) the second step lands elsewhere.
    ctx3, bare = make(tmp_path)
    apply_weight_deltas(ctx3.model, state["deltas"], snapshot(ctx3.model, names))
    bare.apply(ctx3, reqs[2:])
    assert any(not torch.equal(ctx3.model.get_parameter(n), expected[n]) for n in names)


def test_edit_state_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "edit_state.pt"
    save_edit_state(path, {"steps_done": 4, "t": torch.ones(3)})
    real_save = torch.save

    def crash_half_way(obj, f):
        real_save(obj, f)
        f.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_edit_state(path, {"steps_done": 6, "t": torch.zeros(3)})
    monkeypatch.undo()
    state = load_edit_state(path)  # the previous checkpoint, whole
    assert state["steps_done"] == 4 and torch.equal(state["t"], torch.ones(3))


def test_damaged_or_foreign_edit_state_is_named(tmp_path):
    good = save_edit_state(tmp_path / "good.pt", {"steps_done": 1})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:40])
    with pytest.raises(EditStateError, match="not a readable editlab edit state"):
        load_edit_state(cut)
    torch.save({"state_dict": {}, "epoch": 0}, tmp_path / "lightning.ckpt")  # what Lightning writes
    with pytest.raises(EditStateError, match="Lightning .ckpt"):
        load_edit_state(tmp_path / "lightning.ckpt")


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    path = save_edit_state(tmp_path / "rng.pt", {"rng": rng_state()})
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(load_edit_state(path)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_edit_state_of_another_run_is_refused():
    state = {"model": "m", "fingerprint": "abc", "dtype": "float32", "method": "MEMIT", "requests": "r1"}
    check_resumable(state, "m", "abc", "float32", "MEMIT", "r1")
    with pytest.raises(DeltaMismatchError, match="the data"):
        check_resumable(state, "m", "abc", "float32", "MEMIT", "r2")
    with pytest.raises(DeltaMismatchError, match="original weights"):
        check_resumable(state, "m", "xyz", "float32", "MEMIT", "r1")


def test_config_differences_name_model_and_data_options_only():
    saved = {
        "model": {"method": {"init_args": {"mom2_weight": 1.0}}, "checkpoint_every": 2, "progress": True},
        "data": {"path": "a.json"},
        "trainer": {"max_epochs": 1},
        "ckpt_path": None,
    }
    current = {
        # where the caches live does not change the results
        "model": {
            "method": {"init_args": {"mom2_weight": 2.0}},
            "checkpoint_every": 5,
            "progress": False,
            "cache_dir": "/elsewhere",
        },
        "data": {"path": "a.json", "offset": 3},
        "trainer": {"max_epochs": 2},
        "ckpt_path": "last",
    }
    assert config_differences(saved, current) == [
        "data.offset: None -> 3",
        "model.method.init_args.mom2_weight: 1.0 -> 2.0",
    ]


# -- faults inside a step ----------------------------------------------------------------------


def test_nan_target_values_stop_the_step_and_leave_the_model(tmp_path, stats_cache, monkeypatch):
    ctx, method = make_memit(tmp_path)
    real = memit_module.optimize_targets

    def diverged(*args, **kw):
        out = real(*args, **kw)
        out.z[1, 0] = float("nan")
        return out

    monkeypatch.setattr(memit_module, "optimize_targets", diverged)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"residuals z − h \(target values z\) has 1 NaN/Inf"):
        method.apply(ctx, facts())
    assert all(torch.equal(p, before[n]) for n, p in ctx.model.named_parameters())
    assert method.cache_c == {}


@pytest.mark.parametrize("solve", ["memit", "submatrix"])
def test_non_finite_inputs_are_named(solve):
    g = torch.Generator().manual_seed(0)
    keys, resid = torch.randn(3, 6, generator=g), torch.randn(3, 4, generator=g)
    preserve = torch.eye(6, dtype=torch.float64)

    def run(k, r, p):
        return memit_delta(k, r, p) if solve == "memit" else submatrix_delta(k, r, p, torch.arange(4))

    bad_keys = keys.clone()
    bad_keys[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="keys K"):
        run(bad_keys, resid, preserve)
    bad_p = preserve.clone()
    bad_p[2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="preserved moment"):
        run(keys, resid, bad_p)


def test_singular_and_ill_conditioned_systems_are_refused():
    keys = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    resid = torch.ones(2, 3, dtype=torch.float64)
    # λ = 0 and no past keys: KᵀK has rank 2 < 5, exactly singular or numerically so.
    with pytest.raises(FloatingPointError, match="singular|ill-conditioned"):
        memit_delta(keys, resid, preserve_matrix(torch.zeros(5, 5), 0.0, None))
    # Nearly singular but invertible: the solve "succeeds" with a solution of rounding noise.
    a = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-13]], dtype=torch.float64)
    b = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="ill-conditioned"):
        checked_solve(a, b, "test solve")
    # A merely poorly scaled system is fine and exact.
    a = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-6]], dtype=torch.float64)
    x = checked_solve(a, b, "test solve")
    assert torch.allclose(a @ x, b, atol=1e-9)


def test_unreadable_or_foreign_covariance_cache_is_refused(tiny_llama, tmp_path, stats_cache):
    model, tok = tiny_llama
    view = ModelView.of(model)
    fp = model_fingerprint(model)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"Text {i} about a city." for i in range(8)))
    cfg = CovarianceConfig(corpus=str(corpus), num_samples=8, batch_size=4, max_length=16)
    second_moments(view, tok, "tiny", fp, [0], cfg, statistics_cache(cache_root()), progress=False)
    key = cache_key("tiny", fp, view, 0, cfg, read_corpus(cfg)[1])
    path = statistics_cache(cache_root()).path(key)
    blob = torch.load(path, weights_only=True)
    # Written under this run's key by a run of another model (its fingerprint in the stored key).
    torch.save({**blob, "key": {**blob["key"], "fingerprint": "another-model"}}, path)
    with pytest.raises(StaleCacheError, match="fingerprint"):
        second_moments(view, tok, "tiny", fp, [0], cfg, statistics_cache(cache_root()), progress=False)
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash of some other tool
    with pytest.raises(StaleCacheError, match="unreadable"):
        second_moments(view, tok, "tiny", fp, [0], cfg, statistics_cache(cache_root()), progress=False)


def test_prompts_longer_than_the_context_are_named(tiny_llama):
    from editlab.evaluation import EvaluationConfig, check_requests_fit

    model, tok = tiny_llama
    cfg = EvaluationConfig(max_new_tokens=50)
    limit = model.config.max_position_embeddings
    long = " ".join(["city"] * limit)
    ok = EditRequest("7", "{} is in", "The tower", "Rome", "Paris", generation_prompts=["The tower is"])
    check_requests_fit([ok], tok, model.config, cfg)
    for field, req in [
        ("'prompt'", EditRequest("8", long + " {} is in", "The tower", "Rome", "Paris")),
        (
            "'neighborhood_prompts'",
            EditRequest("9", "{} is in", "The tower", "Rome", "Paris", neighborhood_prompts=[long]),
        ),
        ("'generation_prompts'", EditRequest("10", "{} is in", "X", "Rome", "Paris", generation_prompts=[long])),
    ]:
        with pytest.raises(DataError, match=f"case {req.case_id}: field {field}.*longer than the model's context"):
            check_requests_fit([ok, req], tok, model.config, cfg)
