"""One editlab process per run directory: ``<run dir>/.editlab.lock`` holds the owner's pid and host.

Two runs writing into one directory would interleave cases.jsonl, metrics.csv and the edit state
without either noticing. The lock is taken before anything is written; a lock whose process is
gone (killed, crashed: nothing released it) is taken over, so an interrupted run resumes without a
manual step. A lock from another host cannot be checked and is respected.
"""

from __future__ import annotations

import atexit
import os
import socket
from pathlib import Path

from editlab.errors import RunDirRefused

LOCK_NAME = ".editlab.lock"


class RunDirInUse(RunDirRefused):
    """Another live editlab process writes into the run directory."""


def lock_path(root: str | Path) -> Path:
    return Path(root) / LOCK_NAME


def lock_text(pid: int, host: str) -> str:
    return f"{pid} {host}\n"


def parse_lock(text: str) -> tuple[int | None, str | None]:
    """(pid, host) of a lock file's text; (None, None) when it is not one."""
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return None, None
    return int(parts[0]), parts[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def owner_alive(pid: int | None, host: str | None, here: str) -> bool:
    """Whether the lock's owner may still be running. Unreadable locks are stale (ours are written
    whole, by a link, so a half-written one cannot be a live process's)."""
    if pid is None:
        return False
    if host != here:
        return True  # another machine on a shared file system: its processes are not visible here
    return pid_alive(pid)


# Variables that give a process a non-zero rank before Lightning has set anything up: those that
# Lightning's own environments read (LightningEnvironment: LOCAL_RANK, NODE_RANK or GROUP_RANK;
# torchrun: RANK; SLURMEnvironment: SLURM_PROCID; LSFEnvironment: JSM_NAMESPACE_RANK).
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_rank_zero_process(environ=os.environ) -> bool:
    """Whether this process will be global rank 0, the one that locks and writes the run directory.
    The other ranks share its directory and its lock: the processes Lightning starts on each node
    (LOCAL_RANK set), a second node's launcher (NODE_RANK), and, under ``srun``, every task but the
    first (SLURM starts them all with the same command line and only SLURM_PROCID tells them apart)."""
    return all(environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists, atomically: written beside it, then
    linked (a link never replaces a file). No reader ever sees an empty lock."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def acquire_run_lock(root: str | Path) -> Path:
    """Take the run directory's lock for this process, or raise :class:`RunDirInUse`."""
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    here, me = socket.gethostname(), os.getpid()
    for _ in range(5):
        if _create_exclusive(path, lock_text(me, here)):
            atexit.register(release_run_lock, path)  # also when the run fails; SIGKILL leaves it stale
            return path
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue  # released meanwhile: try again
        pid, host = parse_lock(text)
        if pid == me and host == here:
            return path  # already ours (the CLI built twice in one process)
        if owner_alive(pid, host, here):
            where = f"process {pid}" if host == here else f"process {pid} on {host}"
            raise RunDirInUse(
                f"editlab: {Path(root)} is in use by another editlab run ({where}, lock {path}); wait for it "
                "to end or choose another --trainer.default_root_dir"
            )
        # Stale: taken over by renaming it away (only one of several racing processes succeeds in
        # renaming this file), then the loop creates ours.
        stale = path.with_name(f"{path.name}.{me}.stale")
        try:
            os.rename(path, stale)
        except FileNotFoundError:
            continue
        if parse_lock(stale.read_text()) != (pid, host):
            # Between our read and the rename a live process replaced the stale lock: give it back.
            try:
                os.link(stale, path)
            except FileExistsError:
                pass
        stale.unlink(missing_ok=True)
    raise RunDirInUse(f"editlab: could not take the lock {path}: other processes keep taking it")


def release_run_lock(path: str | Path) -> None:
    """Remove the lock if it is still this process's (never another's that took over a stale one)."""
    path = Path(path)
    try:
        pid, host = parse_lock(path.read_text())
    except FileNotFoundError:
        return
    if pid == os.getpid() and host == socket.gethostname():
        path.unlink(missing_ok=True)
