"""Weights rewinding (NSE, seed 002; ECE, seed 001 appendix C.4): every target z is computed on
the original weights θ₀ — ECE's two-step z in both phases too (:func:`rewound_cluster_targets`).

How z gets θ₀ while the model is already edited: the methods of the MEMIT family write only the
FFN out-projections of their edited layers, so θ₀ is the current model with those matrices put
back to W_0. :class:`OriginalWeights` keeps W_0 of the edited layers (taken in ``setup``, before
the first edit) and swaps them in for the duration of the z optimisation only; the edited
matrices go back afterwards, also when the optimisation fails.

Why this and not the authors' "compute every z before the stream": the two give the same z (z of
a request does not depend on the rest of its batch, see tests/test_targets.py), but the swap
needs no look at the whole stream before the first step (the method sees one step at a time), no
up-front pass over thousands of requests before the first edit, and costs one copy of the edited
matrices (GPT-J, 6 layers in fp32: 1.6 GB) and two copies of them per step. Computed z are kept
in memory and on disk (:class:`TargetCache`, its files under ``<cache root>/targets``), so a
second run with the same z settings (an ablation over λ, p, alpha) skips the optimisation
altogether, which is what precomputing bought the authors. Residuals are taken against the current
model by the caller.

The cache key holds everything that changes z: the model (id, θ₀ fingerprint, dtype), the z
layer and its module, the context templates, every field of TargetConfig, the request's prompt,
subject and target, and any extra loss rows. The authors' key (layer, clamp factor, case id) left
out lr and steps, so a changed setting silently reused stale z. A stored file whose key differs
from the wanted one is an error, never used.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch

from editlab.editing.cluster import ClusterTargetResult, cluster_labels, optimize_cluster_targets
from editlab.editing.targets import ExtraRow, TargetConfig, TargetResult, optimize_targets
from editlab.keyed_cache import KeyedCache
from editlab.keyed_cache import key_digest as digest_of
from editlab.models.arch import ModelView
from editlab.models.weights import read_weight, set_weight
from editlab.types import EditRequest

Z_CACHE_VERSION = 1
Z_DIGEST_CHARS = 32  # of the key's hash in the file names


class OriginalWeights:
    """W_0 of the edited layers' FFN out-projections, and a context that swaps them in."""

    def __init__(self, view: ModelView, layers: list[int]) -> None:
        self.weights = {layer: read_weight(view.ffn_out(layer)).detach().clone() for layer in layers}

    @contextmanager
    def swapped_in(self, view: ModelView) -> Iterator[None]:
        current = {layer: read_weight(view.ffn_out(layer)).detach().clone() for layer in self.weights}
        try:
            for layer, w0 in self.weights.items():
                set_weight(view.ffn_out(layer), w0)
            yield
        finally:
            for layer, w in current.items():
                set_weight(view.ffn_out(layer), w)


def z_cache_key(
    model_id: str,
    fingerprint: str,
    view: ModelView,
    layer: int,
    templates: list[str],
    cfg: TargetConfig,
    request: EditRequest,
    extra: list[ExtraRow] | None = None,
) -> dict:
    """Everything z of ``request`` depends on (``extra``: the request's own extra rows)."""
    return {
        "version": Z_CACHE_VERSION,
        "model": model_id,
        "fingerprint": fingerprint,  # of θ₀: taken before the first edit
        "dtype": str(view.dtype),
        "layer": layer,
        "module": view.ffn_out_name(layer),
        "templates": list(templates),
        "targets": z_settings(cfg),
        "prompt": request.prompt,
        "subject": request.subject,
        "target_new": request.target_new,
        # averaged only when set: the keys of z computed before it was part of the key stay valid.
        "extra": [
            [r.template, r.subject, r.answer, r.weight] + (["averaged"] if r.averaged else []) for r in extra or []
        ],
    }


def z_settings(cfg: TargetConfig) -> dict:
    """Every TargetConfig field; requests_per_forward only when set, so the keys of z computed
    before the option existed (every request in one forward) stay valid."""
    settings = dataclasses.asdict(cfg)
    if settings["requests_per_forward"] is None:
        del settings["requests_per_forward"]
    return settings


def key_digest(key: dict) -> str:
    return digest_of(key, Z_DIGEST_CHARS)


def z_cache_files(root: Path) -> KeyedCache:
    """The z files' keyed cache under the cache root ``root`` (file names as ever:
    ``targets/z_l<layer>_<32 hex digits>.pt``)."""
    return KeyedCache(root / "targets", "z", Z_DIGEST_CHARS, "z cache")


def z_bank_files(directory: Path) -> KeyedCache:
    """The z files' keyed cache in a directory of their own (``<directory>/z_l<layer>_<digest>.pt``,
    the names :func:`z_cache_files` gives): a z bank, which can be copied or committed whole."""
    return KeyedCache(directory, "z", Z_DIGEST_CHARS, f"z bank {directory}")


class TargetCache:
    """z per request, in memory and (unless ``files`` is None) on disk in ``files``; a stored key
    that differs from the wanted one raises editlab.keyed_cache.StaleCacheError."""

    def __init__(self, files: KeyedCache | None) -> None:
        self.files = files
        self.memory: dict[str, dict] = {}

    def get(self, key: dict) -> dict | None:
        digest = key_digest(key)
        if digest in self.memory:
            return self.memory[digest]
        blob = self.files.load(key) if self.files is not None else None
        if blob is not None:
            self.memory[digest] = blob
        return blob

    def put(self, key: dict, entry: dict) -> None:
        payload = {k: v.detach().cpu() for k, v in entry.items()}
        self.memory[key_digest(key)] = {"key": key, **payload}
        if self.files is not None:
            self.files.save(key, payload)


def rewound_target_rows(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    cfg: TargetConfig,
    original: OriginalWeights | None,
    cache: TargetCache,
    model_id: str,
    fingerprint: str,
    progress: bool = True,
) -> tuple[TargetResult, torch.Tensor]:
    """z of every request on θ₀ (``original`` swapped in; None: on the model as it is, which must
    then be θ₀ or the ablation "without rewinding"), from the cache where present. Returns the
    targets (rows in request order) and which rows came from the cache (bool [n], per row so
    that ranks can gather it).

    With ``original`` None the key cannot promise θ₀, so nothing is cached. With
    ``cfg.requests_per_forward`` the missing requests run chunk after chunk (the chunks
    optimize_targets would make, so the same z) and each chunk's z is cached as it is done: a run
    killed in the step keeps the chunks it finished."""
    fields = ("z", "h", "loss", "nll", "steps")
    keys = [z_cache_key(model_id, fingerprint, view, layer, templates, cfg, r) for r in requests]
    found = [cache.get(k) if original is not None else None for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    size = cfg.requests_per_forward or len(missing)
    for start in range(0, len(missing), max(size, 1)):
        part = missing[start : start + size]
        with original.swapped_in(view) if original is not None else nullcontext():
            res = optimize_targets(view, tok, [requests[i] for i in part], templates, layer, cfg, progress)
        for j, i in enumerate(part):
            entry = {f: getattr(res, f)[j] for f in fields}
            found[i] = entry
            if original is not None:
                cache.put(keys[i], entry)
    device = view.device
    stacked = {f: torch.stack([found[i][f].to(device) for i in range(len(requests))]) for f in fields}
    cached = torch.ones(len(requests), dtype=torch.bool, device=device)
    cached[missing] = False
    return TargetResult(**stacked), cached


def _request_id(request: EditRequest) -> list[str]:
    return [request.prompt, request.subject, request.target_new]


def two_step_cache_key(
    key: dict, shared_steps: int, instance_steps: int, members: list[EditRequest], anchor: EditRequest
) -> dict:
    """A request's z cache key (:func:`z_cache_key`) for ECE's two-step z: its z also depends on
    the split and on its cluster (whose anchor's loss drives the shared shift)."""
    return {
        **key,
        "two_step": {
            "shared_steps": shared_steps,
            "instance_steps": instance_steps,
            "cluster": [_request_id(r) for r in members],
            "anchor": _request_id(anchor),
        },
    }


def rewound_cluster_targets(
    view: ModelView,
    tok,
    requests: list[EditRequest],
    templates: list[str],
    layer: int,
    cfg: TargetConfig,
    clusters: list[list[int]],
    anchors: list[int],
    shared_steps: int,
    instance_steps: int,
    original: OriginalWeights | None,
    cache: TargetCache,
    model_id: str,
    fingerprint: str,
    progress: bool = True,
) -> tuple[ClusterTargetResult, torch.Tensor]:
    """ECE's two-step z (both phases) on θ₀ as :func:`rewound_target_rows`: a cluster is served
    from the cache when every member is, otherwise all of it is optimised again (the members share
    one shift). ``clusters``/``anchors`` index ``requests``. Returns the targets in request order
    (cluster ids are positions in ``clusters``) and which rows came from the cache (bool [n])."""
    fields = ("z", "h", "loss", "nll", "steps", "shared", "shared_updates", "instance_updates")
    keys = [
        two_step_cache_key(
            z_cache_key(model_id, fingerprint, view, layer, templates, cfg, requests[i]),
            shared_steps,
            instance_steps,
            [requests[m] for m in members],
            requests[anchor],
        )
        for members, anchor in zip(clusters, anchors, strict=True)
        for i in members
    ]
    order = [i for members in clusters for i in members]  # keys[j] belongs to request order[j]
    found: list[dict | None] = [None] * len(requests)
    if original is not None:
        for i, key in zip(order, keys, strict=True):
            found[i] = cache.get(key)
    todo = [c for c, members in enumerate(clusters) if any(found[i] is None for i in members)]
    seconds = (0.0, 0.0)
    if todo:
        idx = [i for c in todo for i in clusters[c]]
        pos = {g: j for j, g in enumerate(idx)}
        with original.swapped_in(view) if original is not None else nullcontext():
            res = optimize_cluster_targets(
                view,
                tok,
                [requests[g] for g in idx],
                templates,
                layer,
                cfg,
                [[pos[g] for g in clusters[c]] for c in todo],
                [pos[anchors[c]] for c in todo],
                shared_steps,
                instance_steps,
                progress,
            )
        seconds = (res.seconds_shared, res.seconds_instance)
        key_of = dict(zip(order, keys, strict=True))
        for j, g in enumerate(idx):
            found[g] = {f: getattr(res, f)[j] for f in fields}
            if original is not None:
                cache.put(key_of[g], found[g])
    device = view.device
    n = len(requests)
    stacked = {f: torch.stack([found[i][f].to(device) for i in range(n)]) for f in fields}
    cluster = cluster_labels(n, clusters)
    is_anchor = torch.zeros(n, dtype=torch.bool)
    is_anchor[anchors] = True
    cached = torch.ones(n, dtype=torch.bool)
    for c in todo:
        cached[clusters[c]] = False
    return (
        ClusterTargetResult(
            **stacked,
            cluster=cluster.to(device),
            is_anchor=is_anchor.to(device),
            seconds_shared=seconds[0],
            seconds_instance=seconds[1],
        ),
        cached.to(device),
    )
