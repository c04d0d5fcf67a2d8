"""RunParts: the finished parts of the unit of work in progress, kept in the run directory.

The edit state saved after a step keeps whole steps, and on a long stream a step or an evaluation
point is long: an evaluation point of 2,000 cases takes an hour on a CPU (the cases' scores, 500
generated texts, the probe sets), a step of 100 MEMIT-EAC requests twenty minutes of z. Each unit
keeps its parts as they finish in one file of ``checkpoints/``:

- ``evaluation_parts.pt``: the point's cases, greedy answers, generations' metrics, ME-PPL-50
  perplexity and probe scores (editlab.evaluation.Evaluator);
- ``step_parts/step_<k>.pt``: step k's z, chunk by chunk (``targets.requests_per_forward`` requests
  each; editlab.editing.methods.memit), one file per step since the last edit state (a run resumed
  from a checkpoint several steps back replays them without touching the killed step's).

A unit killed part-way and done again by the resumed run takes the parts it had finished and
computes the rest. A unit is named by what its values depend on (for a point: its timing, steps,
the weights' fingerprint, its cases, the evaluation options; for a step: its number, the weights'
fingerprint when it starts and its requests); a file naming another unit is left alone until this
unit's first part replaces it; an edit state that holds a step removes its file, and the run removes
every parts file once its results are written. Parts
are written with torch.save and read with weights_only: tensors and plain data come back bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from editlab.errors import UserError
from editlab.files import load_torch_file, save_torch_atomic


class RunParts:
    """One unit's parts (editlab.types.Parts), read from and written to ``path``.

    ``unit``: the unit's identity (plain data). Each part's seconds are kept with it, so a unit that
    takes parts from an interrupted sitting still reports what the whole unit cost."""

    def __init__(self, path: Path, unit: dict, after_put: Callable[[str], None] | None = None) -> None:
        """``after_put(name)``: called once each part is kept (a run stops there on SIGTERM)."""
        self.path, self.unit, self.after_put = Path(path), unit, after_put
        self.parts: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []  # the parts taken from the file, in the order asked for
        stored = read_parts(self.path)
        if stored is not None and stored["unit"] == unit:
            self.parts, self.seconds = stored["parts"], stored["seconds"]
        self.clock = time.perf_counter()

    def get(self, name: str) -> Any | None:
        self.clock = time.perf_counter()  # the next part's seconds start here
        if name not in self.parts:
            return None
        self.reused.append(name)
        return self.parts[name]

    def put(self, name: str, value: Any) -> None:
        now = time.perf_counter()
        self.parts[name], self.seconds[name] = value, now - self.clock
        self.clock = now
        save_torch_atomic({"unit": self.unit, "parts": self.parts, "seconds": self.seconds}, self.path)
        if self.after_put is not None:
            self.after_put(name)

    def reused_seconds(self) -> float:
        """Seconds the interrupted sitting spent on the parts taken from it."""
        return sum(self.seconds[name] for name in self.reused)


def read_parts(path: Path) -> dict | None:
    """The stored ``{"unit", "parts", "seconds"}`` of ``path``, None when there is no file."""
    stored = load_torch_file(path, "parts file")
    if stored is None:
        return None
    if not isinstance(stored, dict) or set(stored) != {"unit", "parts", "seconds"}:
        keys = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
        raise UserError(f"parts file {path} is not editlab's ({keys}): delete it")
    return stored
