"""The method interface: ``setup`` once before the first edit, ``apply`` once per edit step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from editlab.models.arch import ModelView
from editlab.models.weights import read_weight, set_weight
from editlab.types import EditRequest, EditResult


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


class EditMethod(ABC):
    """A locate-and-edit method. Subclasses take their hyperparameters as typed __init__ args,
    which is the configuration schema the CLI exposes."""

    layers: list[int]

    def setup(self, ctx: EditContext) -> None:
        """Work done once on the unedited model (statistics, context templates)."""

    @abstractmethod
    def apply(self, ctx: EditContext, requests: list[EditRequest]) -> EditResult:
        """Edit the model in place so that it knows ``requests``."""

    def edited_layers(self) -> list[int]:
        return list(self.layers)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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
