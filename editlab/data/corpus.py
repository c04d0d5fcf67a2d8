"""Text corpora of the key statistics: a seeded sample of a corpus' texts and a string naming its content.

A corpus is "demo" (the package's own small corpus), a local .txt (one text per line) or
.json/.json.gz/.jsonl file (strings or objects with a text field; parsed as editlab.data.sources
parses record files), or a hub dataset id. The identity string is a hash of the file's bytes as
stored (compressed, for .gz) or the hub dataset's fingerprint: the statistics' cache keys hold it,
so it must stay exactly what it is.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from editlab.data.sources import DataError, parse_records


def _text_of(item, field: str | None, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for name in [field] if field else ["text", "Text"]:
            if name in item and isinstance(item[name], str):
                return item[name]
    raise ValueError(f"{where}: no text field {field or 'text/Text'} in corpus item {str(item)[:80]!r}")


def sample_order(n_items: int, sample: str, seed: int) -> torch.Tensor:
    """Order [n_items] in which corpus items are taken: corpus order ("first") or a permutation
    drawn from its own generator seeded with ``seed`` ("random"), so every rank of a
    multi-process run, and every run, draws the same texts whatever the global RNG state."""
    if sample == "first":
        return torch.arange(n_items)
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))


def take_texts(
    order: torch.Tensor, fetch: Callable[[list[int]], list], num_samples: int, text_field: str | None, where: str
) -> list[str]:
    """The first ``num_samples`` non-empty texts of the items in ``order`` (indices [N]);
    ``fetch(indices)`` returns those items. Items are fetched in chunks, so a hub corpus reads
    only about as many rows as it needs."""
    texts: list[str] = []
    chunk = 2 * num_samples  # room for empty texts (wikitext's blank lines)
    for start in range(0, len(order), chunk):
        items = fetch(order[start : start + chunk].tolist())
        texts += [t for t in (_text_of(x, text_field, where) for x in items) if t.strip()]
        if len(texts) >= num_samples:
            return texts[:num_samples]
    raise ValueError(f"option covariance.num_samples={num_samples}: corpus {where!r} has only {len(texts)} texts")


def local_items(corpus: str) -> tuple[list, str]:
    """The items of the demo corpus or of a local file, and the string identifying its content."""
    if corpus == "demo":
        raw = resources.files("editlab.data").joinpath("demo_corpus.txt").read_bytes()
        return raw.decode().splitlines(), "demo:" + hashlib.sha256(raw).hexdigest()[:16]
    raw = Path(corpus).read_bytes()
    ident = f"file:{Path(corpus).name}:" + hashlib.sha256(raw).hexdigest()[:16]
    data = gzip.decompress(raw) if corpus.endswith(".gz") else raw
    name = corpus[:-3] if corpus.endswith(".gz") else corpus
    if name.endswith(".txt"):
        return data.decode().splitlines(), ident
    if name.endswith(".jsonl") or name.endswith(".json"):
        return parse_records(data, corpus, encoding="utf-8"), ident
    raise DataError(f"option covariance.corpus={corpus!r}: expected .txt, .json, .jsonl (optionally .gz)")


def read_texts(
    corpus: str,
    num_samples: int,
    sample: str = "random",
    seed: int = 0,
    text_field: str | None = None,
    subset: str | None = None,
    split: str = "train",
) -> tuple[list[str], str]:
    """``num_samples`` non-empty texts of ``corpus``, drawn as ``sample`` says, and a string
    identifying the corpus content."""
    if corpus == "demo" or os.path.exists(corpus):
        items, ident = local_items(corpus)
        return take_texts(
            sample_order(len(items), sample, seed), lambda idx: [items[i] for i in idx], num_samples, text_field, corpus
        ), ident
    import datasets

    ds = datasets.load_dataset(corpus, subset, split=split)
    ident = f"hub:{corpus}:{subset}:{split}:{ds._fingerprint}"
    return take_texts(sample_order(len(ds), sample, seed), ds.select, num_samples, text_field, corpus), ident
