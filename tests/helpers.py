"""Helpers shared by the tests: one module, imported as ``from helpers import ...`` (tests/ is on
the path). Fixtures stay in conftest.py; test files do not import each other."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from editlab.editing.context_templates import ContextTemplates
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.ece import ECE
from editlab.editing.methods.memit import MEMIT
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import TargetConfig
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.scoring import reduce_rows, score_answers, token_nll_and_hits
from editlab.models.tiny import save_tiny, tiny_config, tiny_tokenizer
from editlab.types import EditRequest

# --- paths and data -------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


SHARED_DATA = REPO.parent / "shared" / "data"


ARCHS = ["gpt2", "gptj", "llama", "mistral", "qwen2", "gpt_neox"]


TEMPLATES = ["{}", "Hello there. {}"]


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


def small_corpus(tmp_path: Path) -> Path:
    """A 20-line covariance corpus for tiny-model method tests."""
    corpus = tmp_path / "c.txt"
    lines = ["The Eiffel Tower is in Paris.", "Water boils at noon.", "Rome is old.", "Microsoft makes software."]
    corpus.write_text("\n".join([*lines, "She speaks French."] * 4))
    return corpus


def corpus_file(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(
        "\n".join(["The Eiffel Tower is in Paris.", "Water boils at noon.", "Rome is old.", "She speaks French."] * 5)
    )
    return str(corpus)


def full_rank_corpus(tmp_path):
    # Enough distinct tokens for a full-rank E[kkᵀ]: ROME inverts it.
    corpus = tmp_path / "c.txt"
    words = ["Paris", "Rome", "water", "software", "tower", "French", "old", "city", "river", "king", "moon"]
    corpus.write_text("\n".join(f"Item {i}: {words[i % 11]} near {words[(3 * i) % 11]} at {i * 7}." for i in range(80)))
    return corpus


# --- tiny models and set-up methods ---------------------------------------------------------


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


def peaky(model_type: str):
    if model_type == "llama":
        return peaky_model()
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(model_type, len(tok))
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False), tok


def context(model=None):
    model, tok = model or peaky_model()
    view = ModelView.of(model)
    return EditContext(model, tok, view, "tiny", model_fingerprint(model), seed=0, progress=False)


def cov_cfg(tmp_path):
    return CovarianceConfig(corpus=str(full_rank_corpus(tmp_path)), num_samples=80, batch_size=16)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_params(ctx, before):
    return {n for n, p in ctx.model.named_parameters() if not torch.equal(p, before[n])}


def target_nll(ctx, reqs):
    return score_answers(ctx.view, ctx.tok, [r.rewrite_prompt for r in reqs], [r.target_new for r in reqs])["nll"]


def make_memit(tmp_path, **kw):
    corpus = small_corpus(tmp_path)
    model, tok = peaky_model()
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, "tiny", model_fingerprint(model), seed=0, progress=False)
    method = MEMIT(
        layers=[0, 1],
        mom2_weight=kw.pop("mom2_weight", 0.01),
        targets=TargetConfig(steps=15, lr=0.5, kl_factor=0.0, weight_decay=0.0, clamp_norm_factor=2.0),
        context=ContextTemplates(count=kw.pop("count", 0), length=3),
        covariance=CovarianceConfig(corpus=str(corpus), num_samples=20, batch_size=8),
        **kw,
    )
    method.setup(ctx)
    return ctx, method


ECE_TARGETS = TargetConfig(steps=12, lr=0.5, kl_factor=0.0, weight_decay=0.0, clamp_norm_factor=2.0)


def make_ece(tmp_path, model_type: str = "llama", z_mode: str = "two_step", **kw):
    """A set-up ECE on a fresh peaky model; two_step takes shared_steps / instance_steps (8 + 4),
    per_request targets.steps 12."""
    corpus = small_corpus(tmp_path)
    model, tok = peaky(model_type)
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, "tiny", model_fingerprint(model), seed=0, progress=False)
    split = {}
    targets = ECE_TARGETS
    if z_mode == "two_step":
        split = {"shared_steps": kw.pop("shared_steps", 8), "instance_steps": kw.pop("instance_steps", 4)}
        targets = dataclasses.replace(ECE_TARGETS, steps=sum(split.values()))
    method = ECE(
        layers=[0, 1],
        mom2_weight=kw.pop("mom2_weight", 0.01),
        z_mode=z_mode,
        targets=targets,
        context=ContextTemplates(count=0, length=3),
        covariance=CovarianceConfig(corpus=str(corpus), num_samples=20, batch_size=8),
        **split,
        **kw,
    )
    method.setup(ctx)
    return ctx, method


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


# --- references ----------------------------------------------------------------------------


def answer_scores(
    logits: torch.Tensor, target: torch.Tensor, row: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced scores of answers from the logits at their positions: the plain reference
    (full logits, checked arguments) that editlab.models.scoring.score_answers computes batched.

    Args:
        logits: [T, V] logits predicting each answer token (one row per answer token).
        target: [T] answer token ids.
        row: [T] index in ``[0, n_rows)`` of the (prompt, answer) pair each token belongs to.
        n_rows: number of pairs N; every pair must own at least one token.

    Returns:
        mean token NLL [N], exact [N] bool (every token is the greedy prediction), token accuracy [N].
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1] or row.shape != target.shape:
        raise ValueError(
            f"expected logits [T, V], target [T], row [T]; got {tuple(logits.shape)}, "
            f"{tuple(target.shape)}, {tuple(row.shape)}"
        )
    row = row.long().cpu()
    if len(row) and (row.min() < 0 or row.max() >= n_rows):
        raise ValueError(f"row indices must lie in [0, {n_rows}); got [{int(row.min())}, {int(row.max())}]")
    counts = torch.bincount(row, minlength=n_rows)  # [N]
    if (counts == 0).any():
        # A pair without tokens would give 0/0 = NaN silently.
        raise ValueError(f"pairs {counts.eq(0).nonzero().squeeze(1).tolist()} have no answer token")
    tok_nll, tok_hit = token_nll_and_hits(logits, target.to(logits.device))  # [T], [T]
    # reduce_rows accumulates into CPU tensors.
    return reduce_rows(tok_nll.cpu(), tok_hit.cpu(), row, n_rows)


# --- the CLI in a subprocess -----------------------------------------------------------------


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


def tiny_args(
    tmp_path: Path, data: str, *, method: str | None = None, drop: tuple[str, ...] = (), **extra
) -> list[str]:
    """``editlab fit`` options of a tiny GPT-2 MEMIT run (``method``: another class path; ``drop``:
    options of MEMIT's that it does not take), then ``extra``."""
    model_dir = save_tiny(tmp_path / "tiny", "gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence number {i} talks about cities and people." for i in range(20)))
    args = {
        "--model.model": str(model_dir),
        "--model.progress": "false",
        "--model.method": "editlab.editing.methods.memit.MEMIT",
        "--model.method.layers": "[0, 1]",
        "--model.method.mom2_weight": "1.0",
        "--model.method.targets.steps": "4",
        "--model.method.context.count": "1",
        "--model.method.context.length": "3",
        "--model.method.covariance.corpus": str(corpus),
        "--model.method.covariance.num_samples": "20",
        "--model.evaluation.max_new_tokens": "8",
        "--data.path": data,
        "--data.num_edits": "4",
        "--data.edits_per_step": "2",
        "--trainer.default_root_dir": str(tmp_path / "run"),
        "--trainer.enable_progress_bar": "false",
        **extra,
    }
    if method is not None:
        args["--model.method"] = method
    for option in drop:
        del args[option]
    return [x for kv in args.items() for x in kv]


def run_cli(
    args: list[str], cwd: Path, command: str = "fit", timeout: int = 300, **env_extra: str
) -> subprocess.CompletedProcess:
    """``editlab COMMAND ARGS`` in a subprocess, offline, with its own statistics cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "EDITLAB_CACHE": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "editlab.cli", command, *args],
        cwd=cwd,
        env={**env, **env_extra},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def hold_lock(run: Path) -> subprocess.Popen:
    """A live process that owns ``run``'s lock, as a running editlab fit would."""
    import socket

    from editlab.runlock import lock_path, lock_text

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    run.mkdir(parents=True, exist_ok=True)
    lock_path(run).write_text(lock_text(holder.pid, socket.gethostname()))
    return holder


class HangInStep(L.Callback):
    """Makes a run hang in the middle of one edit step so a test can kill it there (test_resume's
    subprocess runs: ``--trainer.callbacks+=helpers.HangInStep``, tests/ on the PYTHONPATH).

    During step ``step`` (1-based), right after the method wrote its first edited layer, write
    ``marker`` and sleep ``seconds``: the process is then killed with half of that step applied
    (or, signalled to stop, finishes the step after the sleep)."""

    def __init__(self, step: int, marker: str, seconds: float = 600.0) -> None:
        self.step = step
        self.marker = marker
        self.seconds = seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.steps_done + 1 != self.step:
            return
        # The MEMIT family writes each layer's delta in the one spread loop (methods/stages.py).
        import editlab.editing.methods.stages as stages

        real = stages.add_delta

        def add_then_hang(module, delta):
            stages.add_delta = real  # once
            real(module, delta)
            Path(self.marker).write_text(f"step {self.step}: one layer written\n")
            time.sleep(self.seconds)

        stages.add_delta = add_then_hang


class HangInEvaluation(L.Callback):
    """Makes a run hang in the periodic evaluation point after step ``step`` (run when the next
    step starts, editlab.lightning.run.EditRun.before_step): writes ``marker`` as the evaluation
    starts, sleeps ``seconds``, then evaluates (``--trainer.callbacks+=helpers.HangInEvaluation``)."""

    def __init__(self, step: int, marker: str, seconds: float = 600.0) -> None:
        self.step = step
        self.marker = marker
        self.seconds = seconds

    skip = 0  # calls of the target that run before the one that hangs

    def target(self, pl_module) -> tuple[object, str]:
        """The object and the name of the function that hangs once when called."""
        return pl_module.run.evaluation, "evaluate"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Callbacks' hooks run before the module's: the evaluation has not started yet.
        if pl_module.steps_done != self.step:
            return
        owner, name = self.target(pl_module)
        real = getattr(owner, name)
        calls = []

        def hang_then_call(*args, **kwargs):
            calls.append(1)
            if len(calls) > self.skip:
                setattr(owner, name, real)  # once
                Path(self.marker).write_text(f"{name} after step {self.step} started\n")
                time.sleep(self.seconds)
            return real(*args, **kwargs)

        setattr(owner, name, hang_then_call)


class HangInGeneration(HangInEvaluation):
    """Makes a run hang in the generations of the periodic evaluation point after step ``step``,
    once the point's cases are scored (``--trainer.callbacks+=helpers.HangInGeneration``)."""

    def target(self, pl_module) -> tuple[object, str]:
        return pl_module.run.evaluator, "generation_metrics"


class HangInSecondZChunk(HangInEvaluation):
    """Makes a run hang in step ``step`` + 1 once the MEMIT z of its first chunk of requests
    (targets.requests_per_forward) is done (``--trainer.callbacks+=helpers.HangInSecondZChunk``)."""

    skip = 1

    def target(self, pl_module) -> tuple[object, str]:
        import editlab.editing.methods.memit as memit

        return memit, "optimize_targets"
