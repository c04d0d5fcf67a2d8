"""The names of the files in a run directory (``--trainer.default_root_dir``), in one place.

Written by the run (editlab.lightning.recorder.RunRecorder, the CLI's config callback, the CSV
logger, the edit-state checkpoints) and read by ``editlab report``, ``editlab study`` and the
benchmarks: every one of them takes the names from here. No imports beyond the standard library:
``editlab report`` must not pull in Lightning or torch to find a file.
"""

from __future__ import annotations

from pathlib import Path

SUMMARY = "summary.json"  # written last: a run directory with it holds a finished run
CASES = "cases.jsonl"  # one record per edited case (written first of the results)
CURVE = "curve.jsonl"  # evaluation points against edits
STEPS = "steps.jsonl"  # one record per edit step
CONFIG = "config.yaml"  # the resolved config
METRICS = "metrics.csv"  # the CSV logger's rows
REPORT = "report.md"
EDITED_MODEL = "edited_model"  # --model.export: save_pretrained of the edited model
EDIT_DELTA = "edit_delta.safetensors"  # --model.export: W_t − W_0 of the edited matrices
CHECKPOINTS = "checkpoints"
EDIT_STATE = "edit_state.pt"
# The finished parts of the evaluation point in progress and of the edit steps since the last
# checkpoint, one file per step (editlab.lightning.parts).
EVALUATION_PARTS = f"{CHECKPOINTS}/evaluation_parts.pt"
STEP_PARTS = f"{CHECKPOINTS}/step_parts"


def step_parts_path(run_dir: str | Path, step: int) -> Path:
    """``<run dir>/checkpoints/step_parts/step_<k>.pt``: the finished parts of step ``step``."""
    return Path(run_dir) / STEP_PARTS / f"step_{step}.pt"


def journal_step_path(journal: str | Path, step: int) -> Path:
    """``<journal>/step_<k>.pt``: step ``step``'s parts in a journal (EditingModule.journal)."""
    return Path(journal) / f"step_{step}.pt"


def journal_point_path(journal: str | Path, timing: str, steps_done: int) -> Path:
    """``<journal>/point_<timing>_<steps>.pt``: the parts of the evaluation point after
    ``steps_done`` steps in a journal (EditingModule.journal)."""
    return Path(journal) / f"point_{timing}_{steps_done}.pt"


def edit_state_path(run_dir: str | Path) -> Path:
    """``<run dir>/checkpoints/edit_state.pt``: the checkpoint ``--ckpt_path last`` continues from."""
    return Path(run_dir) / CHECKPOINTS / EDIT_STATE
