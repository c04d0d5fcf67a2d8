"""Streaming second moment: equals the batch computation, round-trips its cache, refuses a
mismatched cache."""

import json
from types import SimpleNamespace

import pytest
import torch

from editlab.editing.stats import (
    CovarianceConfig,
    accumulate_second_moments,
    cache_key,
    read_corpus,
    second_moments,
    statistics_cache,
    token_cap,
)
from editlab.keyed_cache import StaleCacheError, cache_root
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.hooks import capture_inputs
from editlab.models.tiny import tiny_model

TEXTS = [
    "The Eiffel Tower is in Paris.",
    "Water boils.",
    "She plays the piano in a band every night.",
    "Rome",
    "Toyota is a car maker from Japan; Apple makes phones.",
]


def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    return str(path)


def test_streaming_equals_batch_moment(tiny_llama):
    model, tok = tiny_llama
    view = ModelView.of(model)
    cfg = CovarianceConfig(corpus="x", num_samples=len(TEXTS), batch_size=2, max_length=64)
    streamed = accumulate_second_moments(view, tok, TEXTS, [0, 2], cfg, progress=False)
    # The obvious way: one text at a time, no padding, all keys stacked, KᵀK / N.
    for layer in (0, 2):
        rows = []
        for text in TEXTS:
            enc = tok(text, return_tensors="pt")
            with capture_inputs({"k": view.ffn_out(layer)}) as got:
                model(**enc)
            rows.append(got["k"][0])
        k = torch.cat(rows).double()  # [N, d_ff]
        assert streamed[layer].count == k.shape[0]
        torch.testing.assert_close(streamed[layer].mean(), k.T @ k / k.shape[0], rtol=1e-5, atol=1e-7)


def test_token_cap_limits_the_count(tiny_llama):
    model, tok = tiny_llama
    view = ModelView.of(model)
    cfg = CovarianceConfig(corpus="x", num_samples=len(TEXTS), batch_size=5, max_length=4)
    moms = accumulate_second_moments(view, tok, TEXTS, [1], cfg, progress=False)
    assert moms[1].count == sum(min(4, len(tok(t)["input_ids"])) for t in TEXTS)


def test_cache_round_trip_and_mismatch(tiny_llama, tmp_path, stats_cache):
    model, tok = tiny_llama
    view = ModelView.of(model)
    fp = model_fingerprint(model)
    cfg = CovarianceConfig(corpus=corpus_file(tmp_path), num_samples=4, batch_size=2, max_length=32)
    first = second_moments(view, tok, "tiny", fp, [0, 1], cfg, statistics_cache(cache_root()), progress=False)
    files = sorted(stats_cache.glob("stats/*.pt"))
    assert len(files) == 2
    again = second_moments(view, tok, "tiny", fp, [0, 1], cfg, statistics_cache(cache_root()), progress=False)
    for layer in (0, 1):
        assert torch.equal(first[layer], again[layer])
    # A different sample count is a different key, hence a different file (never the old one).
    other = CovarianceConfig(corpus=cfg.corpus, num_samples=3, batch_size=2, max_length=32)
    second_moments(view, tok, "tiny", fp, [0], other, statistics_cache(cache_root()), progress=False)
    assert len(sorted(stats_cache.glob("stats/*.pt"))) == 3
    # A file whose stored key differs from the key it is filed under (another model, layer...)
    # is an error, not a silent reuse.
    _, corpus_id = read_corpus(cfg)
    key = cache_key("tiny", fp, view, 0, cfg, corpus_id)
    blob = torch.load(statistics_cache(cache_root()).path(key), weights_only=True)
    blob["key"] = {**blob["key"], "layer": 1, "module": view.ffn_out_name(1)}
    torch.save(blob, statistics_cache(cache_root()).path(key))
    with pytest.raises(StaleCacheError, match="layer"):
        second_moments(view, tok, "tiny", fp, [0], cfg, statistics_cache(cache_root()), progress=False)


def test_fingerprint_changes_with_the_weights():
    a, _ = tiny_model("llama", seed=0)
    b, _ = tiny_model("llama", seed=1)
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(tiny_model("llama", seed=0)[0])


def test_corpus_shortfall_names_the_option(tmp_path):
    cfg = CovarianceConfig(corpus=corpus_file(tmp_path), num_samples=99)
    with pytest.raises(ValueError, match="num_samples=99"):
        read_corpus(cfg)


def test_real_corpus_reads(tmp_path):
    from helpers import SHARED_DATA

    texts, ident = read_corpus(CovarianceConfig(corpus=str(SHARED_DATA / "ME-PPL.json.gz"), num_samples=10))
    assert len(texts) == 10 and all(texts) and ident.startswith("file:ME-PPL.json.gz:")


# -- which texts, how long: as rome/layer_stats.py ---------------------------------------------------
def numbered_corpus(tmp_path, n: int = 60) -> str:
    """n numbered lines with a blank line after every fifth (blank texts are never drawn)."""
    lines = []
    for i in range(n):
        lines.append(f"Line {i} talks about a city.")
        if i % 5 == 4:
            lines.append("   ")
    path = tmp_path / "numbered.txt"
    path.write_text("\n".join(lines))
    return str(path)


def test_the_sample_is_a_seeded_random_subset(tmp_path):
    corpus = numbered_corpus(tmp_path)
    every = [f"Line {i} talks about a city." for i in range(60)]
    cfg = CovarianceConfig(corpus=corpus, num_samples=10)
    assert cfg.sample == "random" and cfg.seed == 0
    torch.manual_seed(1)  # the global RNG plays no part: every rank and every run draw the same
    texts, _ = read_corpus(cfg)
    torch.manual_seed(2)
    assert read_corpus(cfg)[0] == texts
    assert len(set(texts)) == 10 and set(texts) <= set(every)
    assert texts != every[:10] and max(every.index(t) for t in texts) >= 10  # not the first lines
    other, _ = read_corpus(CovarianceConfig(corpus=corpus, num_samples=10, seed=1))
    assert set(other) <= set(every) and other != texts
    first, _ = read_corpus(CovarianceConfig(corpus=corpus, num_samples=10, sample="first"))
    assert first == every[:10]  # the earlier behaviour, blank lines skipped
    with pytest.raises(ValueError, match="option covariance.sample='all'"):
        CovarianceConfig(sample="all")


def test_cache_key_records_sampling_and_the_resolved_cap(tiny_llama, tmp_path):
    model, _ = tiny_llama
    view = ModelView.of(model)
    corpus = numbered_corpus(tmp_path)

    def key(**kw):
        cfg = CovarianceConfig(corpus=corpus, num_samples=10, **kw)
        return cache_key("tiny", "fp", view, 0, cfg, read_corpus(cfg)[1])

    base = key()
    assert base["sample"] == "random" and base["seed"] == 0
    assert base["max_length"] == model.config.max_position_embeddings == 512  # None resolved
    for change in ({"seed": 1}, {"sample": "first"}, {"max_length": 128}):
        assert statistics_cache(cache_root()).path(key(**change)) != statistics_cache(cache_root()).path(base), change
    assert key(max_length=512) == base  # the same cap, the same statistics
    model.to(torch.float64)  # the LM's dtype changes its activations: another key
    assert key() != base and key()["lm_dtype"] == "torch.float64"
    model.to(torch.float32)


def test_token_cap_defaults_to_the_context_length(tiny_llama):
    model, tok = tiny_llama
    view = ModelView.of(model)
    long_text = " ".join(TEXTS * 3)
    n_tokens = len(tok(long_text)["input_ids"])
    assert 128 < n_tokens < 512
    full = accumulate_second_moments(view, tok, [long_text], [0], CovarianceConfig(corpus="x"), progress=False)
    assert full[0].count == n_tokens  # not cut at the former default 128
    capped = CovarianceConfig(corpus="x", max_length=128)
    assert accumulate_second_moments(view, tok, [long_text], [0], capped, progress=False)[0].count == 128
    assert token_cap(SimpleNamespace(n_positions=1024), CovarianceConfig()) == 1024  # GPT-2's name
    with pytest.raises(ValueError, match="option covariance.max_length=None"):
        token_cap(SimpleNamespace(), CovarianceConfig())


def test_a_131k_context_pads_only_to_the_longest_text(tiny_llama):
    model, tok = tiny_llama
    view = ModelView.of(model)
    widths = []
    handle = view.ffn_out(0).register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
    saved = model.config.max_position_embeddings
    model.config.max_position_embeddings = 131072  # Llama-3.1's context
    try:
        cfg = CovarianceConfig(corpus="x", batch_size=len(TEXTS))
        assert token_cap(model.config, cfg) == 131072
        accumulate_second_moments(view, tok, TEXTS, [0], cfg, progress=False)
    finally:
        model.config.max_position_embeddings = saved
        handle.remove()
    assert widths == [max(len(tok(t)["input_ids"]) for t in TEXTS)]


def test_ranks_share_exactly_the_sampled_texts(tiny_llama, tmp_path, monkeypatch):
    from editlab.editing import stats

    model, tok = tiny_llama
    view = ModelView.of(model)
    cfg = CovarianceConfig(corpus=numbered_corpus(tmp_path), num_samples=11, use_cache=False)
    seen: list[str] = []
    real = stats.accumulate_second_moments
    monkeypatch.setattr(
        stats,
        "accumulate_second_moments",
        lambda v, t, texts, *a, **k: seen.extend(texts) or real(v, t, texts, *a, **k),
    )

    class FakeRanks:  # world 3 without torch.distributed: each call is one rank's share
        world, barrier = 3, staticmethod(lambda: None)

        def __init__(self, rank):
            self.rank, self.is_main = rank, rank == 0

        def all_gather_object(self, obj):
            return [obj]

        def all_reduce_sum(self, t):
            return t

    for rank in range(3):
        second_moments(
            view, tok, "tiny", "fp", [0], cfg, statistics_cache(cache_root()), progress=False, ranks=FakeRanks(rank)
        )
    assert sorted(seen) == sorted(read_corpus(cfg)[0]) and len(seen) == 11
