"""EvaluationParts: the finished parts of the evaluation point in progress, kept in the run directory.

An evaluation point of a long stream takes an hour on a CPU (2,000 cases scored, 500 texts
generated, the probe sets), and the edit state saved before it keeps only the steps. This file
(``checkpoints/evaluation_parts.json``) keeps each part of the point as it finishes (the cases'
scores, the generations' metrics, the ME-PPL-50 perplexity, the probe scores), so a point killed
part-way and evaluated again by the resumed run computes only the parts it had not finished.

A point is named by what its values depend on: its timing, the steps and edits done, whether it
scores the quality metrics and the full probe sets, the weights' fingerprint and the digest of its
cases. A file that names another point is left alone until this point's first part replaces it;
the run removes it once its results are written. Parts are JSON, which gives back every float as
it was (Python writes the shortest repr that reads back to the same double).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from editlab.errors import UserError
from editlab.files import write_text_atomic


class EvaluationParts:
    """One point's parts (editlab.evaluation.PointParts), read from and written to ``path``.

    ``point``: the point's identity (JSON data). Each part's seconds are kept with it, so a point
    that takes parts from an interrupted sitting still reports what the whole point cost."""

    def __init__(self, path: Path, point: dict) -> None:
        self.path, self.point = Path(path), point
        self.parts: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []  # the parts taken from the file, in the order asked for
        stored = read_parts(self.path)
        if stored is not None and stored["point"] == point:
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
        text = json.dumps({"point": self.point, "parts": self.parts, "seconds": self.seconds})
        write_text_atomic(self.path, text)

    def reused_seconds(self) -> float:
        """Seconds the interrupted sitting spent on the parts taken from it."""
        return sum(self.seconds[name] for name in self.reused)


def read_parts(path: Path) -> dict | None:
    """The stored ``{"point", "parts", "seconds"}`` of ``path``, None when there is no file."""
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"evaluation parts file {path} is unreadable ({err}): delete it") from err
    if not isinstance(stored, dict) or set(stored) != {"point", "parts", "seconds"}:
        raise UserError(f"evaluation parts file {path} is not editlab's (keys {sorted(stored)}): delete it")
    return stored
