"""Atomic writes of editlab's own files (caches, edit states, results, delta files)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from editlab.errors import DiskFullError, UserError


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """The one atomic writer: ``write(tmp)`` fills a temporary file beside ``path`` (named
    ``<name>.<pid>.tmp``, per process, so concurrent writers never share one; benchmarks/soak.py
    looks for that name), which is flushed to disk, then renamed over ``path``: a crash leaves either
    the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with _disk_full_named(path, tmp):
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_torch_atomic(obj, path: str | Path) -> Path:
    """``torch.save`` through :func:`write_atomic`."""

    def write(tmp: Path) -> None:
        # Into an open file, not by name: torch names the archive inside after a file name, and
        # the bytes must not depend on the temporary name.
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return write_atomic(path, write)


def load_torch_file(path: str | Path, label: str, error: type[Exception] = UserError):
    """``torch.load`` (weights_only, onto the CPU) of one of editlab's own files, None where there is
    none; a file that cannot be read (truncated, foreign: unpickling fails in many ways) is one
    ``error`` naming it (``label``: what kind of file) and saying to delete it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        raise error(f"{label} {path} is unreadable ({type(err).__name__}): delete it") from err


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text`` through :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """``safetensors.torch.save_file`` through :func:`write_atomic`."""
    from safetensors.torch import save_file

    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def publish_dir(target: str | Path, write: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """Atomic publication of a directory that several processes may build at once (the embedded
    model's conversion, when two study runs start on a fresh machine): ``write(tmp)`` fills a
    directory beside ``target`` that is this process's own (``<name>.<pid>.tmp``), which is then
    renamed onto ``target``. A process that loses the race (the rename fails: ``target`` exists
    and is not empty) removes its copy and uses the winner's, once ``complete(target)`` says the
    winner's is whole. A target that is not complete (written before publication was atomic)
    is replaced."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed process that had this pid
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists() and not complete(target):
        shutil.rmtree(target)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not complete(target):
            raise
    return target


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
