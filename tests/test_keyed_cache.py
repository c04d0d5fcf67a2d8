"""The keyed disk cache: file names and layout stay what existing caches on disk carry."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from editlab.editing.rewind import TargetCache, z_cache_files
from editlab.editing.stats import statistics_cache
from editlab.keyed_cache import KeyedCache, StaleCacheError, cache_root


def sha(key: dict, chars: int) -> str:
    # Written out here as editlab has always named the files, not through editlab's own digest.
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:chars]


def test_file_names_are_the_historical_ones(tmp_path):
    key = {"layer": 3, "model": "m", "b": [1, 2], "a": {"y": 1, "x": 2}}
    assert statistics_cache(tmp_path).path(key) == tmp_path / "stats" / f"mom2_l3_{sha(key, 24)}.pt"
    assert z_cache_files(tmp_path).path(key) == tmp_path / "targets" / f"z_l3_{sha(key, 32)}.pt"


def test_cache_root_is_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("EDITLAB_CACHE")
    assert cache_root().parts[-2:] == (".cache", "editlab")


def test_a_configured_cache_root_comes_before_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "env"))
    assert cache_root(str(tmp_path / "configured")) == tmp_path / "configured"
    assert cache_root(None) == tmp_path / "env"


def test_save_writes_the_key_first_and_load_checks_it(tmp_path):
    cache = KeyedCache(tmp_path / "kind", "x", 8, "test cache")
    key = {"layer": 0, "setting": 1}
    assert cache.load(key) is None
    path = cache.save(key, {"t": torch.arange(3)})
    blob = torch.load(path, weights_only=True)
    assert list(blob) == ["key", "t"] and blob["key"] == key
    assert torch.equal(cache.load(key)["t"], torch.arange(3))
    torch.save({**blob, "key": {**key, "setting": 2}}, path)
    with pytest.raises(StaleCacheError, match="test cache .* does not match this run .*setting.*delete it"):
        cache.load(key)
    path.write_bytes(b"not a torch file")
    with pytest.raises(StaleCacheError, match="unreadable"):
        cache.load(key)


def test_z_cache_without_files_keeps_z_in_memory_only(tmp_path):
    cache = TargetCache(None)
    key = {"layer": 1, "prompt": "p"}
    cache.put(key, {"z": torch.ones(2)})
    assert torch.equal(cache.get(key)["z"], torch.ones(2))
    assert TargetCache(None).get(key) is None
    assert not any(tmp_path.iterdir())


def test_a_stored_row_of_a_batch_takes_its_own_size_on_disk_not_the_batch_storage(tmp_path):
    batch = torch.randn(100, 576)  # a step's z, one row per request
    files = z_cache_files(tmp_path)
    key = {"layer": 8, "request": 7}
    TargetCache(files).put(key, {"z": batch[7], "h": batch[8]})
    loaded = files.load(key)
    assert torch.equal(loaded["z"], batch[7]) and torch.equal(loaded["h"], batch[8])  # the same bits
    assert loaded["z"].untyped_storage().nbytes() == 576 * 4  # not the batch's 100 rows
    assert files.path(key).stat().st_size < 100 * 576 * 4 / 10
