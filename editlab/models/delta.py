"""Weight deltas of the edited matrices: W_t − W_0 per edited parameter, and their application.

Used twice: the edit-state checkpoint (resume) and the exported delta file
(``<run dir>/edit_delta.safetensors``, a compact alternative to the full ``edited_model``).

Deltas are kept in the parameter's own layout (``model.get_parameter(name)``, so GPT-2's Conv1D
stays transposed) and in float64: the difference of two float32 / bfloat16 / float16 numbers is
exact in float64 unless their exponents are far apart, so W_0 + Δ rounded back to the model's
dtype gives W_t bit for bit. :func:`weight_deltas` verifies that on every entry and refuses a delta
that would not reproduce W_t (never a silently different model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from editlab.errors import UserError
from editlab.files import save_safetensors_atomic
from editlab.models.fingerprint import model_fingerprint

DELTA_FORMAT = "editlab-delta-1"


class DeltaMismatchError(UserError, ValueError):
    """A delta (or edit state) made for another model, dtype or layout."""


def snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies on CPU of the named parameters (W_0 must not follow the in-place edits)."""
    return {name: model.get_parameter(name).detach().to("cpu", copy=True) for name in names}


def reconstruct(initial: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W_0 + Δ computed in float64, rounded once into W_0's dtype."""
    return (initial.double() + delta.to(initial.device).double()).to(initial.dtype)


@torch.no_grad()
def weight_deltas(model: nn.Module, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{parameter name: W_t − W_0} in float64 on CPU, checked to reproduce W_t exactly."""
    out = {}
    for name, w0 in initial.items():
        wt = model.get_parameter(name).detach().cpu()
        delta = wt.double() - w0.double()  # same layout as the parameter
        if not torch.equal(reconstruct(w0, delta), wt):
            raise FloatingPointError(f"the float64 delta of {name} does not reproduce the edited weight exactly")
        out[name] = delta
    return out


@torch.no_grad()
def apply_weight_deltas(model: nn.Module, deltas: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    """W ← W_0 + Δ for each named parameter; ``initial`` holds the W_0 the deltas were made against."""
    for name, delta in deltas.items():
        param = model.get_parameter(name)
        if tuple(delta.shape) != tuple(param.shape):
            raise DeltaMismatchError(
                f"delta of {name} has shape {tuple(delta.shape)}, the model's parameter {tuple(param.shape)}"
            )
        if not torch.isfinite(delta).all():
            raise DeltaMismatchError(f"delta of {name} has NaN/Inf entries")
        param.copy_(reconstruct(initial[name], delta).to(param.device))


def save_delta(path: str | Path, deltas: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a delta file: safetensors of {parameter name: Δ} plus string metadata (model id,
    fingerprint of the *original* weights, dtype, format). Atomic (editlab.files.write_atomic)."""
    meta = {"format": DELTA_FORMAT, **{k: str(v) for k, v in metadata.items()}}
    meta["parameters"] = json.dumps(sorted(deltas))
    return save_safetensors_atomic({k: v.contiguous() for k, v in deltas.items()}, path, meta)


def read_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"delta file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types on a damaged header
        raise DeltaMismatchError(f"{path} is not a readable safetensors delta file: {err}") from err
    if meta.get("format") != DELTA_FORMAT:
        raise DeltaMismatchError(f"{path} is not an editlab delta file (format {meta.get('format')!r})")
    return tensors, meta


def apply_delta(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Apply an exported delta file to the *original* model in place and return its metadata.

    Refuses (DeltaMismatchError) a model whose weights fingerprint differs from the one the delta
    was made against: another model, another dtype, or a model that already holds the edit.
    """
    deltas, meta = read_delta(path)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    found = model_fingerprint(model)
    if found != meta.get("fingerprint"):
        raise DeltaMismatchError(
            f"delta {path} was made for model {meta.get('model')!r} ({meta.get('dtype')}) with weights fingerprint "
            f"{meta.get('fingerprint')}, but this model ({dtype}) has fingerprint {found}: apply it to the original, "
            "unedited weights in the same dtype"
        )
    initial = snapshot(model, list(deltas))
    apply_weight_deltas(model, deltas, initial)
    return meta
