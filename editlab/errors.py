"""User errors: what ``editlab`` reports as one ``editlab: error: …`` line and exit status 2.

A user error is something the person running editlab can fix (a bad record, a bad option value, a
missing file or model, a refused run directory, a full disk); a traceback would only bury the one
line that says what to fix. Anything else is a bug and keeps its traceback. ``--debug`` (or
``EDITLAB_DEBUG=1``) shows the traceback of user errors too.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

USAGE_EXIT = 2  # argparse's status for a usage error: the command line, not editlab, was wrong
SIGTERM_EXIT = 128 + 15  # the shell's status of a process ended by SIGTERM: a run or study stopped, not finished


class UserError(Exception):
    """Base of the errors a user can fix whose message is the line to print (a bad record, a stale
    cache file, a refused statistics file or edit state, a delta of another model). The classes that
    raise them live with their code and inherit from this one, so this module imports none of them."""


class ConfigError(UserError, ValueError):
    """An option value that editlab's classes refused when they were built from the config."""


class RunDirRefused(SystemExit):
    """The run directory may not be written by this run (a finished run, an interrupted one, other
    options, another live process). A SystemExit so that the bare LightningCLI, used in-process,
    still stops with the message; :func:`user_error_message` turns it into the one line."""


class DiskFullError(OSError):
    """No space left while writing ``filename``; the atomic writers left the previous file whole."""


def check_step_sum(option: str, steps: int, parts: dict[str, int], when: str = "") -> None:
    """Refuse (ValueError) the step budget ``option`` = ``steps`` unless it is the sum of ``parts``
    (option name -> steps): phases that replace one budget (ECE's two-step z, EAC's two stages)
    must spend exactly it."""
    if steps != sum(parts.values()):
        raise ValueError(
            f"option {option}={steps} must equal {' + '.join(parts)} ({' + '.join(str(v) for v in parts.values())})"
            + (f" {when}" if when else "")
        )


def debug_requested(argv: list[str], environ=os.environ) -> bool:
    return "--debug" in argv or environ.get("EDITLAB_DEBUG", "") not in ("", "0", "false", "False")


def without_debug_flag(argv: list[str]) -> list[str]:
    """``--debug`` is main()'s own flag: the Lightning parser of every subcommand would refuse it."""
    return [arg for arg in argv if arg != "--debug"]


def one_line(text: str) -> str:
    """A message on one line: the reader of a log greps for ``editlab: error:``."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def strip_prefix(message: str) -> str:
    """Messages written for a bare SystemExit start with ``editlab: `` / ``editlab fit: ``; the line
    printed for them starts with ``editlab: error: `` already."""
    head, sep, rest = message.partition(": ")
    if sep and head.split(" ")[0] == "editlab" and len(head.split(" ")) <= 2:
        return rest
    return message


def user_error_message(exc: BaseException) -> str | None:
    """The one line for a user error, or None for anything else (a bug, an ordinary exit)."""
    if isinstance(exc, SystemExit):
        code = exc.code
        # --help / --print_config exit 0, jsonargparse's own usage errors exit 2 having printed
        # theirs: only editlab's messages are rewritten.
        if isinstance(exc, RunDirRefused) or (isinstance(code, str) and code.startswith("editlab")):
            return one_line(strip_prefix(str(code)))
        return None
    if isinstance(exc, DiskFullError):
        return (
            f"no space left on device while writing {exc.filename}; the previous {Path(exc.filename).name} "
            "and the other files there are whole (each is written beside it, then renamed): free space "
            "and run again"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # a writer that is not atomic (export)
        return f"no space left on device while writing {exc.filename or 'the results'}: free space and run again"
    if isinstance(exc, FileNotFoundError):
        if exc.filename is not None:  # the OS's own: "[Errno 2] No such file or directory: 'x'"
            return f"{exc.filename}: no such file or directory"
        return one_line(str(exc))
    if isinstance(exc, UserError):
        return one_line(str(exc))
    return None
