"""What a run prints on stderr: progress bars on a terminal, one plain line per step in a log file,
and none of Lightning's start-up chatter (which would push an error line out of sight)."""

from __future__ import annotations

import logging
import math
import sys
import warnings


def stderr_is_terminal() -> bool:
    """Bars redraw one line with carriage returns: in a file (a long run's log) they never show a
    finished line, so off a terminal editlab prints plain lines instead."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def quiet_lightning() -> None:
    """Silence what Lightning says at every start and that says nothing about this run: the
    litlogger tip, "GPU available: False" / "TPU available", the seed it picks (the module has its
    own seed) and deprecation warnings of the libraries' own calls."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*No seed found, seed set to.*")
    warnings.filterwarnings("ignore", message=r"(?s).*skip_none parameter was deprecated.*")  # Lightning's save call
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # The CSV logger writes into the run directory itself, which holds the lock and config.yaml by
    # then; editlab refuses a directory with a run in it (cli.check_run_dir) before this point.
    warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty.*")


def quiet_library_bars() -> None:
    """No "Loading weights" / "Writing model shards" bars of transformers off a terminal."""
    if stderr_is_terminal():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


def _seconds(value) -> str:
    return f"{value:.1f}s" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def step_line(record: dict, total: int | None) -> str:
    """One line for a finished step, from its ``steps.jsonl`` record: where the stream is, how long
    the step took and in which stage, and how well z fit (a rising z loss is the first sign of a
    run going wrong)."""
    of = f"/{total}" if total else ""
    parts = [f"editlab: step {record['step']}{of}", f"{record['edits']} edits", f"{_seconds(record['seconds'])}"]
    stages = [
        f"{name} {_seconds(record[key])}"
        for name, key in (("z", "seconds_z"), ("keys", "seconds_keys"), ("solve", "seconds_solve"))
        if key in record
    ]
    if stages:
        parts[-1] += " (" + ", ".join(stages) + ")"
    if isinstance(record.get("z_loss"), (int, float)):
        parts.append(f"z loss {record['z_loss']:.4g}")
    return ", ".join(parts)
