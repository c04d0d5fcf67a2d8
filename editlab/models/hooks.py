"""Context-managed forward hooks that capture or edit module inputs/outputs.

Hooks use ``with_kwargs=True`` and accept a tensor or a tuple output, because transformers moved
decoder layers from tuple outputs to plain tensors (v5): the old ``output[0]`` would silently take
batch row 0 of a tensor. Every hook must fire at least once inside its ``with`` block, or we raise.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class HookNeverFired(RuntimeError):
    pass


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the last needed layer has run."""


def main_tensor(output) -> torch.Tensor:
    """The hidden-state tensor of a module output that may be a tensor or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden-state tensor in a module output of type {type(output)}")


def replace_main_tensor(output, new: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:]) if isinstance(output, tuple) else [new, *output[1:]]


class _Hooks:
    def __init__(self) -> None:
        self.handles: list = []
        self.fired: dict[str, int] = {}

    def check(self) -> None:
        silent = [name for name, count in self.fired.items() if count == 0]
        if silent:
            raise HookNeverFired(f"hooks on {silent} never fired: the module path or forward changed")


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], stop_after: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input of each module (the FFN keys for an out-projection).

    ``stop_after``: name of a module after whose input capture the forward is aborted with
    StopForward (the caller catches it); layers above it are then never computed.
    """
    captured: dict[str, torch.Tensor] = {}
    state = _Hooks()

    def make(name: str) -> Callable:
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            captured[name] = x.detach()
            state.fired[name] += 1
            if name == stop_after:
                raise StopForward

        return hook

    for name, module in modules.items():
        state.fired[name] = 0
        state.handles.append(module.register_forward_pre_hook(make(name), with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in state.handles:
            handle.remove()
    state.check()


@contextmanager
def _output_hook(module: nn.Module, name: str, on_output: Callable) -> Iterator[None]:
    """A forward hook that passes the main output tensor to ``on_output``; a tensor it returns
    replaces the output. Removed on exit; raises if it never fired."""
    state = _Hooks()
    state.fired[name] = 0

    def hook(mod, args, kwargs, output):
        state.fired[name] += 1
        new = on_output(main_tensor(output))
        return None if new is None else replace_main_tensor(output, new)

    state.handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in state.handles:
            handle.remove()
    state.check()


@contextmanager
def edit_output(module: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's main output tensor by ``fn(output)`` for every forward in the block."""
    with _output_hook(module, name, fn):
        yield


@contextmanager
def capture_output(module: nn.Module, name: str) -> Iterator[dict[str, torch.Tensor]]:
    """Record the module's main output tensor (the last forward's) under ``name``."""
    captured: dict[str, torch.Tensor] = {}

    def record(output: torch.Tensor) -> None:
        captured[name] = output

    with _output_hook(module, name, record):
        yield captured
