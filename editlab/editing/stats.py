"""Streaming second moment E[kkᵀ] of FFN keys over a text corpus, with a keyed disk cache.

As ``rome/layer_stats.py`` (the statistics of every released MEMIT-family method) computes it by
default: texts drawn at random from the corpus (seeded here; ``random_sample=1`` there), each cut
at the model's context length.

The cache (editlab.keyed_cache, under ``<cache root>/stats``) names a file by a hash of a key
holding everything that changes the result (model identity and weights fingerprint, layer and
module, corpus identity, sampling rule and seed, sample count, token cap, accumulation dtype, the
LM's dtype). The key is stored in the file and compared on load: a file whose key differs is an
error, never silently reused.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

from editlab.data.corpus import read_texts
from editlab.distributed import Ranks
from editlab.keyed_cache import KeyedCache, key_digest
from editlab.models.arch import ModelView
from editlab.models.trace import trace
from editlab.numerics import numerics

STATS_VERSION = 2  # 2: random sampling, seed and the resolved token cap in the key
STATS_DIGEST_CHARS = 24  # of the key's hash in the file names (cache and exported files)


@dataclass
class CovarianceConfig:
    """Where and how E[kkᵀ] is estimated.

    Args:
        corpus: "demo" (the package's own small corpus), a local .txt (one text per line),
            .json/.json.gz/.jsonl file (strings or objects with ``text_field``), or a hub dataset id.
        num_samples: number of (non-empty) texts used.
        sample: which texts. "random": a random subset drawn with ``seed`` (layer_stats draws
            at random too); "first": the first ``num_samples`` in corpus order (editlab's
            earlier default).
        seed: seed of the random draw (not the run's seed: the statistics, and their cache,
            stay the same across runs).
        max_length: token cap per text; None: the model's context length (max_position_embeddings
            or n_positions), as layer_stats cuts its texts. Texts are only truncated, never
            padded beyond the longest text of their batch, so a 131k context allocates nothing
            more for short texts (editlab's earlier default was 128).
        batch_size: texts per forward.
        dtype: accumulation dtype of the sum of kkᵀ.
        text_field: field holding the text in JSON objects / hub rows; None tries "text", "Text".
        split: hub dataset split.
        subset: hub dataset configuration name (e.g. "wikitext-103-raw-v1" of Salesforce/wikitext).
        use_cache: read/write the disk cache.
        offload: keep E[kkᵀ] and the accumulated Σ KKᵀ of past steps in CPU memory (each layer's
            is moved to the model's device only for its own solve): two d_ff x d_ff float64
            matrices per edited layer (1 GiB each for Llama-3-8B's d_ff 14336) leave the GPU.
    """

    corpus: str = "demo"
    num_samples: int = 400
    sample: Literal["random", "first"] = "random"
    seed: int = 0
    max_length: int | None = None
    batch_size: int = 16
    dtype: Literal["float32", "float64"] = "float64"
    text_field: str | None = None
    split: str = "train"
    subset: str | None = None
    use_cache: bool = True
    offload: bool = False

    def __post_init__(self) -> None:
        if self.num_samples < 1 or (self.max_length is not None and self.max_length < 2) or self.batch_size < 1:
            raise ValueError(f"invalid covariance options: {self}")
        if self.sample not in ("random", "first"):
            raise ValueError(f"option covariance.sample={self.sample!r} must be 'random' or 'first'")


class SecondMoment:
    """Σ kkᵀ and the token count, kept apart so partial sums merge exactly."""

    def __init__(self, dim: int, dtype: torch.dtype, device) -> None:
        self.sum = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.count = 0
        # How the sum was computed (torch version, threads, device: its bits depend on them); None
        # until it is saved, and for cache entries written before editlab recorded it.
        self.made_with: dict | None = None

    def update(self, k: torch.Tensor) -> None:  # k: [T, dim]
        k = k.to(self.sum.dtype)
        self.sum += k.T @ k
        self.count += k.shape[0]

    def merge(self, other: "SecondMoment") -> None:
        self.sum += other.sum
        self.count += other.count

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("second moment of zero tokens")
        return self.sum / self.count


def read_corpus(cfg: CovarianceConfig) -> tuple[list[str], str]:
    """``cfg.num_samples`` non-empty texts of ``cfg.corpus``, drawn as ``cfg.sample`` says, and a
    string identifying the corpus content (editlab.data.corpus reads it)."""
    return read_texts(cfg.corpus, cfg.num_samples, cfg.sample, cfg.seed, cfg.text_field, cfg.subset, cfg.split)


def token_cap(model_config, cfg: CovarianceConfig) -> int:
    """Tokens kept per text: ``cfg.max_length``, or the model's context length when it is None."""
    if cfg.max_length is not None:
        return cfg.max_length
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if not limit:
        raise ValueError(
            "option covariance.max_length=None needs the model's context length, but its config has neither "
            "max_position_embeddings nor n_positions: set covariance.max_length"
        )
    return int(limit)


def cache_key(
    model_id: str, fingerprint: str, view: ModelView, layer: int, cfg: CovarianceConfig, corpus_id: str
) -> dict:
    return {
        "version": STATS_VERSION,
        "model": model_id,
        "fingerprint": fingerprint,
        "layer": layer,
        "module": view.ffn_out_name(layer),
        "corpus": corpus_id,
        "text_field": cfg.text_field,
        "sample": cfg.sample,
        "seed": cfg.seed,
        "num_samples": cfg.num_samples,
        "max_length": token_cap(view.model.config, cfg),  # resolved: None and the same explicit cap agree
        "dtype": cfg.dtype,  # of the accumulation
        "lm_dtype": str(view.dtype),  # the activations of a half-precision LM are not float32's
    }


def statistics_cache(root: Path) -> KeyedCache:
    """The statistics' keyed cache under the cache root ``root`` (file names as ever:
    ``stats/mom2_l<layer>_<24 hex digits>.pt``)."""
    return KeyedCache(root / "stats", "mom2", STATS_DIGEST_CHARS, "covariance cache")


def stats_digest(key: dict) -> str:
    return key_digest(key, STATS_DIGEST_CHARS)


def load_cached(cache: KeyedCache, key: dict) -> SecondMoment | None:
    blob = cache.load(key)
    if blob is None:
        return None
    mom = SecondMoment(blob["sum"].shape[0], blob["sum"].dtype, "cpu")
    mom.sum, mom.count, mom.made_with = blob["sum"], int(blob["count"]), blob.get("made_with")
    return mom


def save_cached(cache: KeyedCache, key: dict, mom: SecondMoment) -> None:
    made_with = mom.made_with or {**numerics(), "device": str(mom.sum.device)}  # an import keeps the file's
    cache.save(key, {"sum": mom.sum.cpu(), "count": mom.count, "made_with": made_with})


@torch.no_grad()
def accumulate_second_moments(
    view: ModelView,
    tok,
    texts: list[str],
    layers: list[int],
    cfg: CovarianceConfig,
    progress: bool = True,
    report: Callable[[int, int], None] | None = None,
) -> dict[int, SecondMoment]:
    """Σ kkᵀ over every non-pad token, all layers in one pass stopped after the highest layer.

    ``report(texts_done, tokens_done)`` is called after every batch (``editlab stats`` prints a
    plain progress line from it where no bar can be drawn)."""
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    cap = token_cap(view.model.config, cfg)
    d_ff = view.ffn_out(layers[0]).weight.numel() // view.model.config.hidden_size
    moms = {layer: SecondMoment(d_ff, dtype, view.device) for layer in layers}
    bar = tqdm(total=len(texts), desc="covariance", unit="text", disable=not progress, file=sys.stderr, leave=False)
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(texts), cfg.batch_size):
        enc = tok(
            texts[start : start + cfg.batch_size],
            truncation=True,
            max_length=cap,
            padding=True,  # to the batch's longest text only, however large the cap
            return_tensors="pt",
        ).to(view.device)
        keys, _ = trace(view, enc["input_ids"], enc["attention_mask"], key_layers=layers)
        real = enc["attention_mask"].bool()  # [B, S]
        for layer in layers:
            moms[layer].update(keys[layer][real])  # [tokens, d_ff]
        tokens += int(real.sum())
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f} tokens/s", refresh=False)
        bar.update(enc["input_ids"].shape[0])
        if report is not None:
            report(min(start + cfg.batch_size, len(texts)), tokens)
    bar.close()
    return moms


def layer_cache_keys(
    model_id: str, fingerprint: str, view: ModelView, layers: list[int], cfg: CovarianceConfig, corpus_id: str
) -> dict[int, dict]:
    """The cache key of every layer's statistics under ``cfg``."""
    return {layer: cache_key(model_id, fingerprint, view, layer, cfg, corpus_id) for layer in layers}


@dataclass
class CacheFill:
    """What :func:`fill_cache` did: the key and cache file of every layer, which layers were
    already there, and the work done for the others."""

    keys: dict[int, dict]
    cached: list[int]
    computed: list[int]
    texts: int = 0
    tokens: int = 0  # per layer (every layer sees the same tokens)
    seconds: float = 0.0
    paths: dict[int, Path] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def cached_entries(
    view: ModelView,
    model_id: str,
    fingerprint: str,
    layers: list[int],
    cfg: CovarianceConfig,
    cache: KeyedCache,
    read: bool,
):
    """The corpus sample, each layer's cache key, and each layer's cached moment (None where the
    cache lacks it, or everywhere when ``read`` is off)."""
    texts, corpus_id = read_corpus(cfg)
    keys = layer_cache_keys(model_id, fingerprint, view, layers, cfg, corpus_id)
    found = {layer: load_cached(cache, k) if read else None for layer, k in keys.items()}
    return texts, keys, found


def fill_cache(
    view: ModelView,
    tok,
    model_id: str,
    fingerprint: str,
    layers: list[int],
    cfg: CovarianceConfig,
    cache: KeyedCache,
    progress: bool = True,
    report: Callable[[int, int], None] | None = None,
) -> CacheFill:
    """Compute into the disk cache the statistics of every layer of ``layers`` it lacks (one
    process: ``editlab stats compute``), the same entries :func:`second_moments` reads and writes."""
    # The cache is what this fills, whatever covariance.use_cache says for fits.
    texts, keys, found = cached_entries(view, model_id, fingerprint, layers, cfg, cache, read=True)
    paths = {layer: cache.path(key) for layer, key in keys.items()}
    cached = [layer for layer in layers if found[layer] is not None]
    missing = [layer for layer in layers if layer not in cached]
    fill = CacheFill(keys, cached, missing, paths=paths)
    if missing:
        started = time.perf_counter()
        moms = accumulate_second_moments(view, tok, texts, missing, cfg, progress, report)
        fill.seconds = time.perf_counter() - started
        fill.texts, fill.tokens = len(texts), moms[missing[0]].count
        for layer in missing:
            save_cached(cache, keys[layer], moms[layer])
    return fill


def second_moments(
    view: ModelView,
    tok,
    model_id: str,
    fingerprint: str,
    layers: list[int],
    cfg: CovarianceConfig,
    cache: KeyedCache,
    progress: bool = True,
    ranks: Ranks = Ranks(),
) -> dict[int, torch.Tensor]:
    """E[kkᵀ] per layer, [d_ff, d_ff], from the disk cache or computed (and cached) now.

    With several ranks each accumulates every world-th text of the sample (which every rank draws
    identically: :func:`sample_order` has its own seeded generator) and the sums and counts are
    all-reduced, so every rank gets the whole sample's moment; only rank 0 writes the cache."""
    texts, keys, found = cached_entries(view, model_id, fingerprint, layers, cfg, cache, read=cfg.use_cache)
    missing = [layer for layer in layers if found[layer] is None]
    # Every rank must take part in the same reductions: compute what any rank lacks.
    missing = sorted({layer for part in ranks.all_gather_object(missing) for layer in part})
    if missing:
        computed = accumulate_second_moments(view, tok, texts[ranks.rank :: ranks.world], missing, cfg, progress)
        for layer, mom in computed.items():
            mom.sum = ranks.all_reduce_sum(mom.sum)
            count = torch.tensor([mom.count], dtype=torch.float64, device=mom.sum.device)
            mom.count = int(ranks.all_reduce_sum(count).item())
            found[layer] = mom
            if cfg.use_cache and ranks.is_main:
                save_cached(cache, keys[layer], mom)
        ranks.barrier()
    device = "cpu" if cfg.offload else view.device
    return {layer: found[layer].mean().to(device) for layer in layers}
