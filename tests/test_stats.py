"""Streaming second moment: equals the batch computation, round-trips its cache, refuses a
mismatched cache."""

import json

import pytest
import torch

from editlab.editing.stats import (
    CovarianceConfig,
    StaleCacheError,
    accumulate_second_moments,
    cache_key,
    cache_path,
    model_fingerprint,
    read_corpus,
    second_moments,
)
from editlab.models.arch import ModelView
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
    first = second_moments(view, tok, "tiny", fp, [0, 1], cfg, progress=False)
    files = sorted(stats_cache.glob("stats/*.pt"))
    assert len(files) == 2
    again = second_moments(view, tok, "tiny", fp, [0, 1], cfg, progress=False)
    for layer in (0, 1):
        assert torch.equal(first[layer], again[layer])
    # A different sample count is a different key, hence a different file (never the old one).
    other = CovarianceConfig(corpus=cfg.corpus, num_samples=3, batch_size=2, max_length=32)
    second_moments(view, tok, "tiny", fp, [0], other, progress=False)
    assert len(sorted(stats_cache.glob("stats/*.pt"))) == 3
    # A file whose stored key differs from the key it is filed under (another model, layer...)
    # is an error, not a silent reuse.
    _, corpus_id = read_corpus(cfg)
    key = cache_key("tiny", fp, view, 0, cfg, corpus_id)
    blob = torch.load(cache_path(key), weights_only=True)
    blob["key"] = {**blob["key"], "layer": 1, "module": view.ffn_out_name(1)}
    torch.save(blob, cache_path(key))
    with pytest.raises(StaleCacheError, match="layer"):
        second_moments(view, tok, "tiny", fp, [0], cfg, progress=False)


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
    from conftest import SHARED_DATA

    texts, ident = read_corpus(CovarianceConfig(corpus=str(SHARED_DATA / "ME-PPL.json.gz"), num_samples=10))
    assert len(texts) == 10 and all(texts) and ident.startswith("file:ME-PPL.json.gz:")
