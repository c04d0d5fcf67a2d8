"""The keyed disk cache: files that hold ``{"key": key, ...}``, named by a digest of the key.

Three kinds live under the cache root: the key statistics E[kkᵀ] (``stats/mom2_l<layer>_<digest>.pt``,
editlab.editing.stats), the targets z computed on θ₀ (``targets/z_l<layer>_<digest>.pt``,
editlab.editing.rewind) and the probe tasks' label log-probs of given weights
(``probes/logprobs_<digest>.pt``, editlab.metrics.probes). A key holds everything that changes the
stored result; it is stored in the file and compared on load, so a file whose key differs is an
error, never silently reused.

``EDITLAB_CACHE`` is read here only (:func:`cache_root`); the entry points (the run's edit context,
``editlab stats``, the model loader) read it once and pass the root down.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from editlab.errors import UserError
from editlab.files import load_torch_file, save_torch_atomic


class StaleCacheError(UserError, RuntimeError):
    pass


def cache_root(configured: str | Path | None = None) -> Path:
    """The root of editlab's disk caches: ``configured`` (a run's ``model.cache_dir``) when given,
    else ``$EDITLAB_CACHE``, default ``~/.cache/editlab``."""
    if configured is not None:
        return Path(configured)
    return Path(os.environ.get("EDITLAB_CACHE", Path.home() / ".cache" / "editlab"))


def key_digest(key: dict, chars: int) -> str:
    """The first ``chars`` hex digits of the SHA-256 of the key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:chars]


@dataclass(frozen=True)
class KeyedCache:
    """One kind of keyed file under a cache root: ``<directory>/<stem>_l<layer>_<digest>.pt``.

    ``digest_chars`` and ``stem`` are part of the file names that existing caches on disk carry:
    they stay what each kind has always used. ``label`` names the kind in errors."""

    directory: Path
    stem: str
    digest_chars: int
    label: str

    def digest(self, key: dict) -> str:
        return key_digest(key, self.digest_chars)

    def path(self, key: dict) -> Path:
        # A kind without layers (probe scores) has no ``_l<layer>`` part.
        layer = f"_l{key['layer']}" if "layer" in key else ""
        return self.directory / f"{self.stem}{layer}_{self.digest(key)}.pt"

    def load(self, key: dict) -> dict | None:
        """The stored blob of ``key`` (its ``"key"`` included), None where there is no file; a file
        that cannot be read or holds another key raises StaleCacheError."""
        path = self.path(key)
        blob = load_torch_file(path, self.label, StaleCacheError)
        if blob is None:
            return None
        stored = blob.get("key") if isinstance(blob, dict) else None
        if stored != key:
            diff = {
                k: (stored.get(k) if isinstance(stored, dict) else None, key[k])
                for k in key
                if not isinstance(stored, dict) or stored.get(k) != key[k]
            }
            raise StaleCacheError(f"{self.label} {path} does not match this run (stored, wanted): {diff}; delete it")
        return blob

    def save(self, key: dict, payload: dict) -> Path:
        """Write ``{"key": key, **payload}`` atomically (the key first: the files' layout as before).
        Each tensor is written as a compact copy: torch.save writes a view's whole storage, so one
        request's z, a row of its step's [n, d_model] batch, took n times its own size on disk."""
        compact = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in payload.items()}
        return save_torch_atomic({"key": key, **compact}, self.path(key))
