"""Lightning callback for benchmarks/soak.py: writes one JSON line per phase boundary of an
``editlab fit`` so the soak can kill the run at a chosen moment and say afterwards where it landed.

It observes only: it reads ``pl_module.steps_done`` and registers a forward pre-hook (which
returns nothing, so no output changes) on the LM to learn when a step's computation, or the final
evaluation, has started. Nothing in editlab is patched, so the run it watches is the run a user gets.

Events, in the order one fit writes them (``step`` is 1-based):
  start k       Lightning is about to run step k; editlab then writes the checkpoint of step k-1
  forward k     the first LM forward of step k: the checkpoint write is over, the edit is running
  end k         step k (edit and any in-stream evaluation) is done
  final S       the stream is over; editlab then writes the final checkpoint and evaluates
  final_eval S  the first LM forward after ``final``: the final evaluation is running
  done S        results written (summary.json)
"""

from __future__ import annotations

import json
import os
import time

import lightning as L


class PhaseMarkers(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path
        self._armed: tuple[str, int] | None = None  # the event the next LM forward announces
        self._handles: list = []

    def write(self, event: str, step: int) -> None:
        # os.write on an O_APPEND descriptor: the line is in the kernel before the call returns,
        # so a SIGKILL right after cannot lose it (a buffered Python file could).
        # t: monotonic, comparable across processes of one machine; wall: to compare with file mtimes.
        row = {"event": event, "step": int(step), "t": time.monotonic(), "wall": time.time(), "pid": os.getpid()}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)

    def arm(self, pl_module, event: str, step: int) -> None:
        if not self._handles:
            # The top-level LM and its input embeddings: a method that runs only part of the
            # model still passes through the embeddings.
            for module in {id(m): m for m in (pl_module.lm, pl_module.lm.get_input_embeddings())}.values():
                self._handles.append(module.register_forward_pre_hook(self._on_forward))
        self._armed = (event, step)

    def _on_forward(self, module, args) -> None:
        if self._armed is not None:
            event, step = self._armed
            self._armed = None
            self.write(event, step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 0:
            step = pl_module.steps_done + 1
            self.write("start", step)
            self.arm(pl_module, "forward", step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0:
            self._armed = None
            self.write("end", pl_module.steps_done)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.write("final", pl_module.steps_done)
            self.arm(pl_module, "final_eval", pl_module.steps_done)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self._armed = None
            self.write("done", pl_module.steps_done)
