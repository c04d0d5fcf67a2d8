"""The method interface: ``setup`` once before the first edit, ``apply`` once per edit step."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from editlab.distributed import Ranks, map_rows
from editlab.editing.solve import preserve_matrix
from editlab.keyed_cache import cache_root
from editlab.memory import MemoryProfile
from editlab.models.arch import ModelView
from editlab.models.weights import read_weight, set_weight
from editlab.types import EditRequest, EditResult, Parts

T = TypeVar("T")


@dataclass
class Stopwatch:
    """Seconds per label, summed over the blocks timed with it. A step reads a label before and
    after one of its stages to split that stage's seconds (the spread's key forwards from its solves)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timing(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

    def read(self, label: str) -> float:
        return self.seconds.get(label, 0.0)


@dataclass
class EditContext:
    """Everything a method may touch: the model (edited in place), its tokenizer and identity."""

    model: torch.nn.Module
    tok: object
    view: ModelView
    model_id: str
    fingerprint: str
    seed: int = 0
    progress: bool = True
    ranks: Ranks = field(default_factory=Ranks)
    cache_root: Path = field(default_factory=cache_root)  # of the keyed disk caches (statistics, z)
    stopwatch: Stopwatch = field(default_factory=Stopwatch)  # "keys": the key forwards of the edited layers
    # The finished parts of the step in progress (z chunk by chunk), kept by the run so that a step
    # killed part-way resumes there (editlab.lightning.parts); None: nowhere.
    parts: Parts | None = None

    def per_request(self, requests: list[EditRequest], fn: Callable[[list[EditRequest]], T]) -> T:
        """``fn`` on this rank's share of the requests, rows of every rank gathered in request
        order (see editlab.distributed.map_rows); with one process simply ``fn(requests)``.
        ``fn`` must compute each request's rows independently of the others in its share."""
        return self.per_index(len(requests), lambda idx: fn([requests[i] for i in idx]))

    def per_index(self, n: int, fn: Callable[[list[int]], T], groups: list[list[int]] | None = None) -> T:
        """:meth:`per_request` over indices; ``groups`` (e.g. clusters) each stay on one rank."""
        return map_rows(self.ranks, n, fn, self.view.device, groups)


class EditMethod(ABC):
    """A locate-and-edit method. Subclasses take their hyperparameters as typed __init__ args,
    which is the configuration schema the CLI exposes."""

    layers: list[int]

    @property
    def name(self) -> str:
        """The method's name in summary.json, reports and W&B: the class name, unless a subclass
        names its variant (MEMIT_seq, ROME-EAC, ...)."""
        return type(self).__name__

    def setup(self, ctx: EditContext) -> None:
        """Work done once on the unedited model (statistics, context templates)."""

    @abstractmethod
    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        """Edit the model in place so that it knows ``requests``."""

    def edited_layers(self) -> list[int]:
        return list(self.layers)

    def z_in_step_parts(self) -> bool:
        """Whether ``apply`` takes its z through the step's parts (``EditContext.parts``), which a z
        journal keeps (EditingModule.journal). Default: no."""
        return False

    def covariance_statistics(self) -> tuple[list[int], object] | None:
        """The layers whose key statistics ``setup`` reads (editlab.editing.stats) and their
        CovarianceConfig, or None for a method that uses none (``editlab stats`` computes,
        exports and imports exactly these)."""
        return None

    def edited_parameters(self, view: ModelView) -> list[str]:
        """Names of every parameter ``apply`` may change (checkpoints store their deltas; a resumed
        run checks that nothing else changed). Default: the FFN out-projections of the edited layers."""
        return [f"{view.ffn_out_name(layer)}.weight" for layer in self.edited_layers()]

    def state_dict(self) -> dict:
        """Everything ``apply`` carries from one step to the next (caches, accumulated moments, z
        caches, templates), as tensors / dicts with string keys / lists / strings / numbers.

        Resuming calls ``setup`` on the unedited model, then ``load_state_dict`` with this, then
        puts back the edited weights: a method whose state is incomplete here resumes differently."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def memory_profile(self) -> MemoryProfile:
        """What this method keeps and runs, for the memory estimate printed before a run and by
        ``--plan`` (editlab.memory). Default: no statistics, no z rows (FT)."""
        return MemoryProfile()


@contextmanager
def restore_on_error(view: ModelView, layers: list[int]) -> Iterator[None]:
    """If a step fails half-way (after some layers were written), put those layers back: a failed
    step leaves the model exactly as the previous step left it."""
    saved = {layer: read_weight(view.ffn_out(layer)).detach().clone() for layer in layers}
    try:
        yield
    except BaseException:
        for layer, weight in saved.items():
            set_weight(view.ffn_out(layer), weight)
        raise


class KeyValueMethod(EditMethod):
    """The shared state of the MEMIT family (MEMIT, ECE, ...): edited layers, λ, the preserved key
    moment C = E[kkᵀ] per layer, context templates, and the sequential cache Σ KKᵀ of past steps."""

    def __init__(self, layers: list[int], mom2_weight: float, targets, context, covariance) -> None:
        if mom2_weight < 0:
            raise ValueError(f"option mom2_weight={mom2_weight} must be >= 0")
        self.layers = list(layers)
        self.mom2_weight = mom2_weight
        self.targets = targets
        self.context = context
        self.covariance = covariance
        self.cov: dict[int, torch.Tensor] = {}
        self.cache_c: dict[int, torch.Tensor] = {}
        self.templates: list[str] = []

    def setup(self, ctx: EditContext) -> None:
        from editlab.editing.context_templates import make_context_templates
        from editlab.editing.stats import second_moments, statistics_cache

        ctx.view.check_layers(self.layers)
        self.templates = make_context_templates(ctx.model, ctx.tok, self.context, ctx.seed)
        self.cov = second_moments(
            ctx.view,
            ctx.tok,
            ctx.model_id,
            ctx.fingerprint,
            self.layers,
            self.covariance,
            statistics_cache(ctx.cache_root),
            ctx.progress,
            ctx.ranks,
        )

    def covariance_statistics(self) -> tuple[list[int], object] | None:
        return list(self.layers), self.covariance

    def memory_profile(self) -> MemoryProfile:
        # C and the sequential cache Σ KKᵀ per layer; solve: λC + cache, KᵀK and A (ROME's; the
        # MEMIT family, AlphaEdit and RewindingMethod change the counts).
        return MemoryProfile(
            stat_matrices=2,
            solve_matrices=3,
            offload=self.covariance.offload,
            context_templates=self.context.count,
            context_length=self.context.length,
            requests_per_forward=self.targets.requests_per_forward,
        )

    def preserve(self, layer: int) -> torch.Tensor:
        """P = λC + Σ past KKᵀ of ``layer`` [d_ff, d_ff], float64 on C's device: the preserved-key
        moment of the solves (solve.preserve_matrix)."""
        return preserve_matrix(self.cov[layer], self.mom2_weight, self.cache_c.get(layer))

    def accumulate(self, new_kk: dict[int, torch.Tensor]) -> None:
        """cache[l] += K_l K_lᵀ once a step has been fully applied (kept beside C: on the CPU
        when the covariance is offloaded)."""
        for layer, kk in new_kk.items():
            kk = kk.to(self.cov[layer].device) if layer in self.cov else kk
            self.cache_c[layer] = self.cache_c.get(layer, torch.zeros_like(kk)) + kk

    def state_dict(self) -> dict:
        # cov is not saved: setup recomputes it from the unedited model (or reads the keyed disk
        # cache), identically.
        return {"cache_c": {str(k): v.cpu() for k, v in self.cache_c.items()}, "templates": list(self.templates)}

    def load_state_dict(self, state: dict) -> None:
        # Back on the device of the covariance, where the solves run (the checkpoint is on CPU).
        device = next(iter(self.cov.values())).device if self.cov else "cpu"
        self.cache_c = {int(k): v.to(device) for k, v in state["cache_c"].items()}
        self.templates = list(state["templates"])
