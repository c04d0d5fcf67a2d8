"""Atomic writes of editlab's own files (caches, edit states)."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from editlab.errors import DiskFullError


def save_torch_atomic(obj, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path`` (named per process, so concurrent writers
    never share one), flushed to disk, then renamed over ``path``: a crash leaves either the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with _disk_full_named(path, tmp):
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
    with _disk_full_named(path, tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """``safetensors.torch.save_file`` the same way: a temporary file per process, fsync, rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with _disk_full_named(path, tmp):
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


@contextmanager
def _disk_full_named(path: Path, tmp: Path):
    """A failed write removes its half-written temporary file (on a full disk it holds the space
    the next attempt needs) and leaves ``path`` as it was. ENOSPC becomes :class:`DiskFullError`
    naming ``path``: the error of ``write`` or ``fsync`` itself names no file."""
    try:
        yield
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # torch.save reports a failed write of its zip writer as a RuntimeError with the OS's text.
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            raise DiskFullError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
