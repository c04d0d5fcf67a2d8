"""Atomic writes of editlab's own files (caches, edit states)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_torch_atomic(obj, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path`` (named per process, so concurrent writers
    never share one), flushed to disk, then renamed over ``path``: a crash leaves either the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` the same way: a temporary file per process, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
