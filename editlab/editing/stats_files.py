"""Covariance statistics as portable files: what ``editlab stats export`` writes and ``import`` reads.

One safetensors file per layer, named as its cache entry (``mom2_l{layer}_{key digest}.safetensors``),
holding exactly what the cache holds: ``sum`` (Σ kkᵀ over every token, [d_ff, d_ff] in the key's
dtype) and ``count`` (the number of tokens, int64 []); E[kkᵀ] = sum / count. Its metadata holds the
cache key as JSON (model id and weights fingerprint, layer, module, corpus content hash, sampling
rule and seed, sample count, token cap, dtype, statistics version), what a reader may want besides
(corpus path, LM dtype, editlab and torch versions, threads), and ``digest``: a sha256 of all the
other metadata and the tensors, so a file whose metadata or tensors were changed after export is
refused (a check against damage and hand edits, not a signature).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from editlab.editing.stats import STATS_VERSION, SecondMoment, load_cached, save_cached, stats_digest
from editlab.errors import UserError
from editlab.files import save_safetensors_atomic, write_text_atomic
from editlab.keyed_cache import KeyedCache

STATS_FORMAT = "editlab-stats"


class StatsFileError(UserError, ValueError):
    """A statistics file or directory that cannot be exported or imported as asked (one line)."""


@dataclass(frozen=True)
class StatsFile:
    path: Path
    key: dict
    moment: SecondMoment
    meta: dict[str, str]  # every metadata entry but the key and the digest


def stats_file_name(key: dict) -> str:
    return f"mom2_l{key['layer']}_{stats_digest(key)}.safetensors"


def content_digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the metadata (without ``digest``) and of every tensor's dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "digest"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).numpy())  # the buffer itself, no copy (a d_ff² float64 matrix may be GiBs)
    return h.hexdigest()


def write_stats_file(directory: Path, key: dict, mom: SecondMoment, info: dict[str, str]) -> Path:
    """Write one layer's statistics (the cache's tensors, untouched) into ``directory``."""
    tensors = {"sum": mom.sum.cpu(), "count": torch.tensor(mom.count, dtype=torch.int64)}
    metadata = {
        **info,
        "format": STATS_FORMAT,
        "key": json.dumps(key, sort_keys=True),
        "computed_with": json.dumps(mom.made_with, sort_keys=True),
    }
    metadata["digest"] = content_digest(metadata, tensors)
    return save_safetensors_atomic(tensors, directory / stats_file_name(key), metadata)


def read_stats_file(path: Path) -> StatsFile:
    """One exported file, its digest checked; any damage or edit is a StatsFileError naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types on a damaged header
        raise StatsFileError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from err
    if metadata.get("format") != STATS_FORMAT:
        raise StatsFileError(f"{path} is not an editlab statistics file (format {metadata.get('format')!r})")
    if set(tensors) != {"sum", "count"} or "digest" not in metadata:
        raise StatsFileError(f"{path}: expected tensors sum and count and a digest, found {sorted(tensors)}")
    if content_digest(metadata, tensors) != metadata["digest"]:
        raise StatsFileError(
            f"{path}: its metadata or tensors were changed after export (digest mismatch): export it again"
        )
    try:
        key = json.loads(metadata["key"])
    except (KeyError, json.JSONDecodeError) as err:
        raise StatsFileError(f"{path}: no readable cache key in its metadata") from err
    mom = SecondMoment(tensors["sum"].shape[0], tensors["sum"].dtype, "cpu")
    mom.sum, mom.count = tensors["sum"], int(tensors["count"])
    mom.made_with = json.loads(metadata.get("computed_with", "null"))
    meta = {k: v for k, v in metadata.items() if k not in ("key", "digest")}
    return StatsFile(path, key, mom, meta)


def read_stats_dir(directory: Path) -> list[StatsFile]:
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise StatsFileError(f"statistics directory {directory} {what}")
    paths = sorted(directory.glob("*.safetensors"))
    if not paths:
        raise StatsFileError(f"statistics directory {directory} holds no .safetensors files")
    return [read_stats_file(p) for p in paths]


def key_differences(found: dict, wanted: dict) -> list[str]:
    """``name: file X, this config Y`` for every key entry that differs."""
    return [
        f"{k}: file {found.get(k)!r}, this config {wanted.get(k)!r}"
        for k in sorted(set(found) | set(wanted))
        if found.get(k) != wanted.get(k)
    ]


def check_same_model(file: StatsFile, wanted: dict, lm_dtype: str) -> None:
    """Refuse a file of another model, another LM dtype or another statistics version."""
    key = file.key
    if key.get("version") != wanted["version"]:
        raise StatsFileError(
            f"{file.path.name}: statistics version {key.get('version')!r}, this editlab's is {STATS_VERSION}: "
            "compute them again with editlab stats compute"
        )
    if (key.get("model"), key.get("fingerprint")) != (wanted["model"], wanted["fingerprint"]):
        raise StatsFileError(
            f"{file.path.name}: stats of model {key.get('model')!r} (fingerprint {key.get('fingerprint')}) "
            f"cannot be imported for model {wanted['model']!r} (fingerprint {wanted['fingerprint']})"
        )
    if file.meta.get("model_dtype") != lm_dtype:
        raise StatsFileError(
            f"{file.path.name}: stats of model {key.get('model')!r} in {file.meta.get('model_dtype')} cannot be "
            f"imported for the model in {lm_dtype} (option model.dtype)"
        )


@dataclass(frozen=True)
class ImportPlan:
    chosen: dict[int, StatsFile]  # layer -> the file whose key is this config's key for it
    skipped: list[tuple[StatsFile, str]]  # the other files of the directory, and why


def plan_import(files: list[StatsFile], wanted: dict[int, dict], lm_dtype: str) -> ImportPlan:
    """Match every layer of ``wanted`` (layer -> cache key) to a file with exactly that key.
    Every file must be of this model; a layer without its file names what its nearest file differs
    in. Nothing is written here."""
    reference = next(iter(wanted.values()))
    for file in files:
        check_same_model(file, reference, lm_dtype)
    chosen: dict[int, StatsFile] = {}
    for layer, key in wanted.items():
        exact = [f for f in files if f.key == key]
        if exact:
            chosen[layer] = exact[0]
            continue
        same_layer = [f for f in files if f.key.get("layer") == layer] or files
        nearest = min(same_layer, key=lambda f: len(key_differences(f.key, key)))
        raise StatsFileError(
            f"no statistics of layer {layer} ({key['module']}) for this config: the nearest file, "
            f"{nearest.path.name}, differs in " + "; ".join(key_differences(nearest.key, key))
        )
    used = {id(f) for f in chosen.values()}
    skipped = [
        (
            f,
            "; ".join(key_differences(f.key, wanted[f.key["layer"]]))
            if f.key.get("layer") in wanted
            else f"layer {f.key.get('layer')} is not among this config's layers {sorted(wanted)}",
        )
        for f in files
        if id(f) not in used
    ]
    return ImportPlan(chosen, skipped)


def import_into_cache(plan: ImportPlan, cache: KeyedCache, replace: bool) -> dict[int, str]:
    """Write the chosen files into the statistics cache ``cache`` (each atomically); an entry
    already there is kept unless ``replace``. Returns what happened to each layer, in words."""
    done: dict[int, str] = {}
    for layer, file in sorted(plan.chosen.items()):
        path = cache.path(file.key)
        there = None if replace else load_cached(cache, file.key)
        if there is not None:
            same = there.count == file.moment.count and torch.equal(there.sum, file.moment.sum)
            done[layer] = (
                f"already in the cache ({path.name}), identical"
                if same
                else f"already in the cache ({path.name}) with other bits (another thread count or device?): "
                "kept; --replace true replaces it"
            )
            continue
        save_cached(cache, file.key, file.moment)
        done[layer] = f"imported into {path}"
    return done


def export_from_cache(
    directory: Path, cache: KeyedCache, keys: dict[int, dict], info: dict[str, str]
) -> list[StatsFile]:
    """Write the entries of ``keys`` (layer -> cache key) in the statistics cache ``cache`` into
    ``directory``; all of them must be in the cache (nothing is written otherwise)."""
    found: dict[int, SecondMoment] = {}
    for layer, key in keys.items():
        mom = load_cached(cache, key)
        if mom is None:
            raise StatsFileError(
                f"the statistics of layer {layer} under this config are not in the cache ({cache.path(key)}): "
                "run editlab stats compute with the same options first"
            )
        found[layer] = mom
    directory.mkdir(parents=True, exist_ok=True)
    return [
        StatsFile(write_stats_file(directory, keys[layer], mom, info), keys[layer], mom, info)
        for layer, mom in sorted(found.items())
    ]


def readme_text(files: list[StatsFile], export_command: str) -> str:
    """The README.md written beside the files: what they hold and how to import them."""
    key = files[0].key
    info = files[0].meta
    # null: a cache entry written before editlab recorded how it was computed
    made_with = " / ".join(sorted({json.dumps(f.moment.made_with, sort_keys=True) for f in files}))
    common = [k for k in sorted(key) if k not in ("layer", "module")]
    rows = "\n".join(
        f"| {f.path.name} | {f.key['layer']} | `{f.key['module']}` | {list(f.moment.sum.shape)} | {f.moment.count:,} |"
        for f in files
    )
    keys = "\n".join(f"| {k} | `{key[k]}` |" for k in common)
    return f"""# Covariance statistics of {key["model"]}

Written by `editlab stats export` (editlab {info.get("editlab_version")}) with:

    {export_command}

One safetensors file per layer, holding exactly what editlab's statistics cache holds for it:
`sum` = Σ kkᵀ over every token of the sample (k: the input of the layer's FFN out-projection),
in `{key["dtype"]}`, and `count` = the number of tokens (int64); E[kkᵀ] = sum / count. Computed with
`{made_with}` (the bits of a sum depend on the torch version, thread count and device).

| file | layer | module | sum | tokens |
|---|---|---|---|---|
{rows}

Every file's metadata holds its cache key as JSON (`key`; below, the entries all files share),
the corpus path it was read from (`corpus_path`: {info.get("corpus_path")}), the LM's dtype
(`model_dtype`: {info.get("model_dtype")}) and `digest`, a sha256 of the other metadata and the
tensors: a file changed after export is refused.

| key | value |
|---|---|
{keys}

## Import

    editlab stats import DIR [the same model and covariance options as above]

(DIR: this directory, or a hub repository holding it.) The import loads the model, checks every
file against it and the config (weights fingerprint, LM dtype, layers, module, corpus hash, sample
count, sampling and seed, token cap, dtype, statistics version), refuses a mismatch by naming it,
and only then writes the cache entries (`$EDITLAB_CACHE/stats`) that `editlab fit` with the same
options reads instead of computing them. The corpus file itself is still read to check its hash.
"""


def export_info(corpus_path: str, lm_dtype: str) -> dict[str, str]:
    """The metadata besides the key: what a reader of the file may want to know."""
    from importlib.metadata import version

    return {
        "corpus_path": corpus_path,
        "model_dtype": lm_dtype,
        "editlab_version": version("editlab"),
    }


def write_readme(directory: Path, files: list[StatsFile], export_command: str) -> Path:
    return write_text_atomic(directory / "README.md", readme_text(files, export_command))


def fetch_stats_dir(source: str, repo_type: str = "model") -> Path:
    """A local statistics directory, or a hub repository downloaded into the hub cache."""
    from editlab.models.load import _offline, is_hub_id

    path = Path(source)
    if path.exists() or not is_hub_id(source):
        return path  # a local path (read_stats_dir says what is wrong with it)
    if _offline():
        raise StatsFileError(
            f"statistics directory {source} does not exist, and HF_HUB_OFFLINE is set: not looked up on the hub"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, repo_type=repo_type, allow_patterns=["*.safetensors", "README.md"]))
    except Exception as err:  # the hub's own error types: not found, gated, no network
        raise StatsFileError(
            f"statistics directory {source} does not exist, and the hub gave no {repo_type} repository of that "
            f"name ({type(err).__name__})"
        ) from err
