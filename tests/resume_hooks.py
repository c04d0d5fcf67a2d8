"""Test-only Lightning callback: makes a run hang in the middle of one edit step so a test can
kill it there (used by tests/test_resume.py through --trainer.callbacks)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class HangInStep(L.Callback):
    """During step ``step`` (1-based), right after the method wrote its first edited layer, write
    ``marker`` and sleep: the process is then killed with half of that step applied."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.steps_done + 1 != self.step:
            return
        # The MEMIT family writes each layer's delta in the one spread loop (methods/stages.py).
        import editlab.editing.methods.stages as stages

        real = stages.add_delta

        def add_then_hang(module, delta):
            real(module, delta)
            Path(self.marker).write_text(f"step {self.step}: one layer written\n")
            time.sleep(600)

        stages.add_delta = add_then_hang
