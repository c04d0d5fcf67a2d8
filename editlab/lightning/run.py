"""EditRun: one edit stream on a loaded model, with nothing of Lightning in it.

The LightningModule (editlab.lightning.module) turns Lightning's hooks into these calls:
  EditRun(...)   requests read and checked against the tokenizer and context (before any weight
                 changes), the evaluator and the evaluation schedule made ready
  start()        the memory estimate, method.setup on the unedited model, W_0 kept, then either
                 the edit state restored (a resumed run) or the unedited model evaluated (and,
                 with checkpoints on, the state before the first step written)
  edit(batch)    method.apply on the step's requests, the step recorded
  after_step()   what the evaluation schedule says right after the step (immediate, probes)
  before_step()  the state after the previous step saved when due, and a periodic point due
                 after it evaluated (saved before and after: a crash in it loses no step)
  save_state()   the edit state after the steps done (for ``--ckpt_path last``)
  finish()       the final edit state, the final evaluation, the result files and the export
``editlab test`` evaluates the loaded model as it is: test_batch(), then finish_test().
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from editlab import rundir
from editlab.distributed import Ranks
from editlab.editing.methods.base import EditContext, EditMethod
from editlab.evaluation import EvaluationConfig, EvaluationSchedule, Evaluator, check_requests_fit
from editlab.lightning.editstate import Resume, RunIdentity, capture_edit_state, requests_digest, save_run_state
from editlab.lightning.parts import RunParts
from editlab.lightning.recorder import RunClock, RunRecorder
from editlab.lightning.stream import StreamEvaluation
from editlab.memory import MemoryEstimate, run_memory
from editlab.models.arch import ModelView
from editlab.models.delta import save_delta, snapshot, weight_deltas
from editlab.models.fingerprint import model_fingerprint
from editlab.types import EditRequest


@dataclass(frozen=True)
class RunSettings:
    """The module's options that a run reads (see EditingModule for each)."""

    model_name: str
    lm_dtype: str
    seed: int
    evaluation: EvaluationConfig
    export: bool
    checkpoint_every: int
    bars: bool  # progress bars (progress on, stderr a terminal)
    lines: bool  # plain progress lines instead (progress on, stderr a log file)
    cache_root: Path  # of the keyed disk caches (statistics, z, probe scores)
    journal: Path | None = None  # every step's z and every point's parts, kept for good (EditingModule.journal)


@dataclass
class LoadedModel:
    lm: torch.nn.Module
    tok: object
    view: ModelView


class EditRun:
    def __init__(
        self,
        model: LoadedModel,
        method: EditMethod,
        settings: RunSettings,
        recorder: RunRecorder,
        requests: list[EditRequest],
        ranks: Ranks,
        log_row: Callable[[dict], None],
        stream_length: Callable[[], int | None],
        after_part: Callable[[str], None] | None = None,
    ) -> None:
        """``log_row``: hand a row to every logger at the current step; ``stream_length``: the
        stream's steps as this run does them (the trainer knows); ``after_part(name)``: called once
        an evaluation point has kept a finished part (the module stops the run there on SIGTERM)."""
        self.model, self.method, self.settings, self.recorder, self.ranks = model, method, settings, recorder, ranks
        recorder.clock = RunClock()
        self.requests = requests
        check_requests_fit(requests, model.tok, model.lm.config, settings.evaluation)
        self.evaluator = Evaluator(
            settings.evaluation, model.view, model.tok, settings.seed, settings.bars, settings.cache_root
        )
        schedule = EvaluationSchedule.of(settings.evaluation)
        self.evaluation = StreamEvaluation(
            self.evaluator,
            schedule,
            recorder,
            requests,
            log_row,
            stream_length,
            announce=settings.lines and ranks.is_main,
            # With checkpoints a killed run resumes: a point killed part-way keeps its finished parts.
            parts_file=recorder.path(rundir.EVALUATION_PARTS) if settings.checkpoint_every else None,
            after_part=after_part,
            journal=settings.journal,
        )
        self.ctx: EditContext | None = None
        self.fingerprint: str | None = None  # of the unedited weights
        self.initial: dict[str, torch.Tensor] = {}  # W_0 of the edited parameters, on CPU
        self.memory: MemoryEstimate | None = None
        self.resume: Resume | None = None

    def start(self, steps: list[list[EditRequest]], resume: Resume | None) -> None:
        """Set up the method on the unedited model, then continue from the edit state
        (``resume``) or evaluate the unedited model. ``steps``: the stream's batches."""
        lm, rec = self.model.lm, self.recorder
        self.resume = resume
        self.fingerprint = model_fingerprint(lm)
        s = self.settings
        self.ctx = EditContext(
            lm,
            self.model.tok,
            self.model.view,
            s.model_name,
            self.fingerprint,
            s.seed,
            s.bars,
            self.ranks,
            s.cache_root,
        )
        if self.ranks.is_main:
            self.memory = run_memory(lm, self.model.tok, self.method, self.requests, steps)
            print(f"editlab: {self.memory.describe()}", file=sys.stderr, flush=True)
        torch.manual_seed(s.seed)
        self.method.setup(self.ctx)
        self.initial = snapshot(lm, self.method.edited_parameters(self.model.view))
        rec.clock.setup_done = time.perf_counter()
        if resume is not None:
            resume.restore(self.identity(), lm, self.initial, self.method, rec)  # every rank
        elif self.ranks.is_main and s.evaluation.pre:  # evaluation is rank 0's: other ranks only edit
            self.evaluation.before()
            if s.checkpoint_every:
                # The state before the first step: on a long stream the pre-edit evaluation takes
                # hours (every case, the full probe sets), and a crash in the first steps keeps it.
                self.save_state()

    def begin_stream(self) -> None:
        """The clock of the edit stream starts (after the restore or the pre-edit evaluation)."""
        self.recorder.clock.stream_start = time.perf_counter()
        self.recorder.clock.eval_seconds = 0.0

    def identity(self) -> RunIdentity:
        s = self.settings
        digest = requests_digest(self.requests)
        return RunIdentity(s.model_name, self.fingerprint, s.lm_dtype, type(self.method).__name__, digest)

    def edit(self, batch: list[EditRequest]) -> tuple[dict, dict[str, float], float]:
        """One edit step: the step's record, the method's scalars and the seconds it took. The record
        also has the process's CPU seconds: wall seconds count time the process waited (another
        process on its core, a stopped process), CPU seconds only the work."""
        t0, c0 = time.perf_counter(), time.process_time()
        parts = self.step_parts(batch)
        self.ctx.parts = parts
        try:
            result = self.method.apply(self.ctx, batch)
        finally:
            self.ctx.parts = None
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        record = self.recorder.record_step(batch, result, seconds, cpu)
        if parts is not None and parts.reused:
            # The step's own seconds are this sitting's; the kept parts' seconds are the interrupted one's.
            record["seconds_reused"] = parts.reused_seconds()
            kept = f"{len(parts.reused)} part(s) ({', '.join(parts.reused)})"
            source = "the journal" if self.settings.journal is not None else "the interrupted sitting"
            print(f"editlab: step {record['step']} took {kept} from {source}", file=sys.stderr, flush=True)
        return record, result.scalars, seconds

    def step_parts(self, batch: list[EditRequest]) -> RunParts | None:
        """Where the step keeps its finished parts (z chunk by chunk): in one process (a
        multi-process step would need one file per rank), with checkpoints on or a journal, named
        by the step, the weights it starts from and its requests; in the journal for good, else in
        the run directory until an edit state holds the step."""
        journal = self.settings.journal
        if not (self.settings.checkpoint_every or journal is not None) or self.ranks.world != 1:
            return None
        unit = {
            "step": self.recorder.steps_done + 1,
            "weights": model_fingerprint(self.model.lm),
            "requests": requests_digest(batch),
        }
        # One file per step: a run resumed from a checkpoint several steps back replays those steps
        # without touching the parts of the step it was killed in.
        if journal is not None:
            return RunParts(rundir.journal_step_path(journal, unit["step"]), unit)
        return RunParts(rundir.step_parts_path(self.recorder.root, unit["step"]), unit)

    def after_step(self, batch: list[EditRequest]) -> dict[str, float] | None:
        """What the schedule says after the step (rank 0 only); the in-stream probe scores or None."""
        return self.evaluation.after_step(batch) if self.ranks.is_main else None

    def checkpoint_due(self, resumed_from_step: int | None) -> bool:
        """When a step starts: the state after the previous step k is written when k is a multiple
        of checkpoint_every (and not the step this run resumed from)."""
        k, every = self.recorder.steps_done, self.settings.checkpoint_every
        return bool(every and k and k % every == 0 and k != resumed_from_step)

    def before_step(self, resumed_from_step: int | None) -> None:
        """When a step starts: the state after the previous step when a checkpoint is due, then a
        periodic point due after that step, with the state saved before it (whatever
        checkpoint_every says: a crash in an evaluation of an hour keeps the step) and after it
        (a crash in the next step keeps the point)."""
        due = self.point_due()
        every, k = self.settings.checkpoint_every, self.recorder.steps_done
        if self.checkpoint_due(resumed_from_step) or (due and every and k != resumed_from_step):
            self.save_state()
        if due:
            self.evaluation.periodic_point()
            if every:
                self.save_state()

    def point_due(self) -> bool:
        """A periodic point is due before the next step (rank 0 evaluates)."""
        return self.ranks.is_main and self.evaluation.point_due()

    def save_state(self, final: bool = False) -> None:
        """The edit state after the steps done, into the run directory (rank 0 writes it: every
        rank holds the same edit state)."""
        if not self.ranks.is_main:
            return
        state = capture_edit_state(self.identity(), self.recorder, self.model.lm, self.initial, self.method, final)
        save_run_state(self.recorder.root, state)
        self.drop_step_parts(up_to=self.recorder.steps_done)

    def drop_step_parts(self, up_to: int | None = None) -> None:
        """Remove the parts files of the steps the saved edit state holds (``up_to``; None: all)."""
        directory = self.recorder.path(rundir.STEP_PARTS)
        for path in directory.glob("step_*.pt") if directory.is_dir() else []:
            if up_to is None or int(path.stem.removeprefix("step_")) <= up_to:
                path.unlink(missing_ok=True)

    def finish(self, loggers: list) -> None:
        """The final edit state, the final evaluation (what the schedule says is left), the results."""
        if not self.ranks.is_main:
            return
        if self.settings.checkpoint_every and not (self.resume is not None and self.resume.final):
            self.save_state(final=True)
        end = time.perf_counter()
        final = self.evaluation.after_stream()
        self.write_results(final, end, self.settings.evaluation.timing, loggers)
        # Every step and point is in the results now: their parts files have nothing left to give.
        self.evaluation.drop_parts()
        self.drop_step_parts()

    # -- editlab test ------------------------------------------------------------------------------
    def open_test(self) -> None:
        clock = self.recorder.clock
        clock.setup_done = clock.stream_start = time.perf_counter()

    def test_batch(self, batch: list[EditRequest], batch_idx: int) -> None:
        self.evaluation.test_batch(batch, batch_idx)

    def finish_test(self, loggers: list) -> None:
        metrics = self.evaluation.after_test()
        if self.ranks.is_main:  # one writer: every rank of ``editlab test`` evaluates the same model
            self.write_results(metrics, time.perf_counter(), "test", loggers)

    # -- results ----------------------------------------------------------------------------------
    def write_results(self, final: dict, end: float, timing: str, loggers: list) -> None:
        # the variant (MEMIT_seq, MEMIT-EAC, ...), not only the class
        head = {"method": self.method.name, "model": self.settings.model_name, "timing": timing}
        tail = {}
        if self.memory is not None:
            tail["memory_estimate_gib"] = round(self.memory.device_total / 2**30, 3)
            device = self.model.view.device
            if torch.cuda.is_available() and device.type == "cuda":
                tail["memory_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        if self.resume is not None:
            tail["resumed_from_step"] = self.resume.steps_done
        export = self.export_edited if self.settings.export and timing != "test" else None
        self.recorder.write_results(self.requests, self.evaluator, head, final, end, tail, export, loggers)

    def export_edited(self) -> dict[str, str]:
        """The edited model (save_pretrained) and its delta file, in the run directory."""
        lm, tok, rec = self.model.lm, self.model.tok, self.recorder
        export_dir = rec.path(rundir.EDITED_MODEL)
        lm.save_pretrained(export_dir)
        tok.save_pretrained(export_dir)
        meta = {
            "model": self.settings.model_name,
            "fingerprint": self.fingerprint,
            "dtype": self.settings.lm_dtype,
            "model_type": lm.config.model_type,
            "method": self.method.name,
            "edits": rec.edits_done,
        }
        delta = save_delta(rec.path(rundir.EDIT_DELTA), weight_deltas(lm, self.initial), meta)
        return {"export_dir": str(export_dir), "export_delta": str(delta)}
