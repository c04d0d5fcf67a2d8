"""EditingModule: one ``training_step`` is one edit batch of the stream (manual optimization).

Order of work in a fit:
  configure_model  load the frozen LM (once), resolve its architecture
  on_fit_start     the run's recorder (editlab.lightning.recorder); with ``--ckpt_path``, the edit
                   state read (editlab.lightning.editstate.Resume) and the data module told where
                   the stream continues
  on_train_start   start_stream: requests checked against the tokenizer and context (before any
                   weight changes), method.setup (statistics, templates), then either the edit
                   state restored (weights, method state, records, RNG) or the pre-edit evaluation
  training_step    method.apply on the step's requests, recorded; then what the evaluation
                   schedule says (editlab.lightning.stream.StreamEvaluation)
  on_train_end     finish_stream: the final edit state, the final evaluation, the result files
  on_fit_end       only for an edit state written after the last step: Lightning has no batch to
                   run and skips on_train_start / on_train_end, so start_stream and finish_stream
                   run here
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import torch

from editlab import rundir
from editlab.console import stderr_is_terminal, step_line
from editlab.distributed import Ranks
from editlab.editing.methods.base import EditContext, EditMethod
from editlab.evaluation import EvaluationConfig, EvaluationSchedule, Evaluator, check_requests_fit
from editlab.keyed_cache import cache_root
from editlab.lightning.callbacks import WeightNormTracker
from editlab.lightning.editstate import (
    Resume,
    RunIdentity,
    capture_edit_state,
    requests_digest,
    resume_fit,
    save_run_state,
)
from editlab.lightning.recorder import LoggedRows, RunClock, RunRecorder
from editlab.lightning.stream import StreamEvaluation
from editlab.memory import MemoryEstimate, run_memory
from editlab.models.arch import ModelView
from editlab.models.delta import save_delta, snapshot, weight_deltas
from editlab.models.fingerprint import model_fingerprint
from editlab.models.load import DType, load_model_and_tokenizer
from editlab.types import EditRequest


class EditingModule(L.LightningModule):
    def __init__(
        self,
        method: EditMethod,
        model: str = "smollm2-135m-instruct",
        dtype: DType = "float32",
        seed: int = 0,
        evaluation: EvaluationConfig = EvaluationConfig(),
        export: bool = False,
        checkpoint_every: int = 10,
        progress: bool = True,
    ) -> None:
        """
        Args:
            method: the editing method and its stages.
            model: hub id, local directory, or "smollm2-135m-instruct" (the embedded default).
            dtype: the LM's own dtype (solves always run in float64).
            seed: seeds context templates, generation and any sampling.
            evaluation: when and what to evaluate.
            export: save the edited model (``save_pretrained`` safetensors + tokenizer) into
                ``<run dir>/edited_model`` after the stream, for ``editlab test`` or any HF loader,
                and the compact ``<run dir>/edit_delta.safetensors`` (W_t − W_0 of the edited
                matrices, see ``editlab apply-delta``).
            checkpoint_every: write the edit state (``<run dir>/checkpoints/edit_state.pt``) every
                this many steps and after the last step, for ``--ckpt_path last``; 0: never.
            progress: show progress bars for long phases.
        """
        super().__init__()
        if checkpoint_every < 0:
            raise ValueError(f"option checkpoint_every={checkpoint_every} must be >= 0 (0 disables checkpoints)")
        self.automatic_optimization = False
        self.method = method
        self.model_name = model
        self.lm_dtype = dtype
        self.seed = seed
        self.evaluation = evaluation
        self.export = export
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.resume_from: Path | None = None  # set by the CLI from --ckpt_path
        self.resume: Resume | None = None
        self._fit_device: torch.device | None = None
        self.initial: dict[str, torch.Tensor] = {}  # W_0 of the edited parameters, on CPU
        self.fingerprint: str | None = None  # of the unedited weights
        self.lm: torch.nn.Module | None = None
        self.tok = None
        self.view: ModelView | None = None
        self.ctx: EditContext | None = None
        self.evaluator: Evaluator | None = None
        self.evaluation_run: StreamEvaluation | None = None
        self.requests: list[EditRequest] = []
        self.recorder: RunRecorder | None = None
        self.memory: MemoryEstimate | None = None

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.lm is not None:
            return
        lm, tok = load_model_and_tokenizer(self.model_name, self.lm_dtype, device=self.device)
        self.view = ModelView.of(lm)  # an unknown model_type fails here, before anything else
        self.lm, self.tok = lm, tok

    def train(self, mode: bool = True):
        # Lightning puts the module in train mode at fit start; the LM must stay in eval mode
        # (dropout would make keys, targets and evaluation random).
        super().train(mode)
        if self.lm is not None:
            self.lm.eval()
        return self

    def configure_optimizers(self):
        return None

    def configure_callbacks(self):
        # Weight-norm tracking is part of every run's record (steps.jsonl, plots); a tracker given
        # in the trainer's callbacks is replaced by this one (Lightning's rule), not duplicated.
        return [WeightNormTracker()]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a list of EditRequest: strings only, nothing to move

    # -- the stream's state --------------------------------------------------------------------
    @property
    def steps_done(self) -> int:
        return self.recorder.steps_done if self.recorder is not None else 0

    @property
    def summary_path(self) -> Path | None:
        """summary.json once the results are written (the CLI prints it)."""
        return self.recorder.summary_path if self.recorder is not None else None

    @property
    def resumed_from_step(self) -> int | None:
        return self.resume.steps_done if self.resume is not None else None

    @property
    def schedule(self) -> EvaluationSchedule:
        return EvaluationSchedule.of(self.evaluation)

    @property
    def bars(self) -> bool:
        """Progress bars on a terminal only; a log file gets one line per step instead (step_line)."""
        return self.progress and stderr_is_terminal()

    def stream_length(self) -> int | None:
        """Steps of the whole stream as this run will do them (a resumed run counts the earlier
        steps; limit_train_batches may cut it short); None when the trainer does not know."""
        dm, batches = self.trainer.datamodule, self.trainer.num_training_batches
        steps = len(dm.steps()) if dm is not None and hasattr(dm, "steps") else None
        if isinstance(batches, int) and steps is not None:
            return min(steps, (self.resumed_from_step or 0) + batches)
        return steps

    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def identity(self) -> RunIdentity:
        digest = requests_digest(self.requests)
        return RunIdentity(self.model_name, self.fingerprint, self.lm_dtype, type(self.method).__name__, digest)

    # -- fit -------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._fit_device = self.device
        self.recorder = RunRecorder(self.run_dir())
        loggers = [lg for lg in self.trainer.loggers if not isinstance(lg, LoggedRows)]  # not an earlier fit's
        if loggers:
            # The recorder keeps every row the loggers get (for a resumed run's metrics.csv).
            self.trainer.loggers = [*loggers, self.recorder.logged]
        ranks = Ranks(self.global_rank, self.trainer.world_size)
        self.resume = resume_fit(self.resume_from, ranks, self.run_dir(), self.trainer.datamodule)

    def on_train_start(self) -> None:
        self.start_stream()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The state after step k is saved when step k + 1 starts: by then the callbacks have added
        # their values to step k's record and Lightning has handed step k's row to the loggers.
        # Nothing happens in between, so this is the state right after step k.
        k = self.steps_done
        if self.checkpoint_every and k and k % self.checkpoint_every == 0 and k != self.resumed_from_step:
            self.save_checkpoint()

    def training_step(self, batch, batch_idx: int):
        t0 = time.perf_counter()
        result = self.method.apply(self.ctx, list(batch))
        seconds = time.perf_counter() - t0
        record = self.recorder.record_step(list(batch), result, seconds)
        scalars = {f"edit/{k}": v for k, v in result.scalars.items()}
        scalars.update({"edit/seconds_step": seconds, "edit/edits": float(self.recorder.edits_done)})
        self.log_dict(scalars, batch_size=len(batch), on_step=True, on_epoch=False)
        if self.progress and not stderr_is_terminal() and self.ctx.ranks.is_main:
            print(step_line(record, self.stream_length()), file=sys.stderr, flush=True)
        if self.ctx.ranks.is_main:
            probes = self.evaluation_run.after_step(list(batch))
            if probes is not None:
                self.log_dict(probes, on_step=True, on_epoch=False, batch_size=1)
        return None

    def record_step(self, values: dict[str, float]) -> None:
        """Observers (callbacks) add their per-step values to the step's record."""
        self.recorder.add_step_values(values)

    def on_train_end(self) -> None:
        self.finish_stream()

    def on_fit_end(self) -> None:
        # An edit state written after the last step leaves no batch to run: Lightning then skips
        # on_train_start / on_train_end, so the stream's start (restore) and finish (final
        # evaluation, results) run here.
        if self.resume is not None and self.resume.final and self.summary_path is None:
            self.to(self._fit_device)  # the trainer's teardown moved the module to CPU
            self.start_stream()
            self.finish_stream()

    # -- the stream's phases ---------------------------------------------------------------------
    def prepare_stream(self) -> None:
        """Requests checked and reference data read: everything before the first edit."""
        self.recorder.clock = RunClock()
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "requests"):
            raise ValueError("EditingModule needs an EditDataModule (option data)")
        self.requests = list(dm.requests)
        check_requests_fit(self.requests, self.tok, self.lm.config, self.evaluation)
        self.evaluator = Evaluator(self.evaluation, self.view, self.tok, self.seed, self.bars, cache_root())
        self.evaluation_run = StreamEvaluation(
            self.evaluator, self.schedule, self.recorder, self.requests, self.log_row, self.stream_length
        )

    def start_stream(self) -> None:
        """Set up the method on the unedited model, then continue from the edit state (resumed)
        or evaluate the unedited model."""
        self.prepare_stream()
        rec, ranks = self.recorder, Ranks(self.global_rank, self.trainer.world_size)
        self.fingerprint = model_fingerprint(self.lm)
        self.ctx = EditContext(
            self.lm, self.tok, self.view, self.model_name, self.fingerprint, self.seed, self.bars, ranks
        )
        if ranks.is_main:
            steps = self.trainer.datamodule.steps()
            self.memory = run_memory(self.lm, self.tok, self.method, self.requests, steps)
            print(f"editlab: {self.memory.describe()}", file=sys.stderr, flush=True)
        torch.manual_seed(self.seed)
        self.method.setup(self.ctx)
        self.initial = snapshot(self.lm, self.method.edited_parameters(self.view))
        rec.clock.setup_done = time.perf_counter()
        if self.resume is not None:
            self.resume.restore(self.identity(), self.lm, self.initial, self.method, rec)  # every rank
            if ranks.is_main:
                rec.logged.replay(self.loggers)
                # Lightning's logging step counts the batches of this process; continue the stream's count.
                self.trainer.fit_loop.epoch_loop._batches_that_stepped = rec.steps_done
        elif ranks.is_main and self.evaluation.pre:  # evaluation is rank 0's: other ranks only edit
            self.evaluation_run.before()
        rec.clock.stream_start = time.perf_counter()
        rec.clock.eval_seconds = 0.0

    def finish_stream(self) -> None:
        """The final edit state, the final evaluation (what the schedule says is left), the results."""
        if not self.ctx.ranks.is_main:
            return
        if self.checkpoint_every and not (self.resume is not None and self.resume.final):
            self.save_checkpoint(final=True)
        end = time.perf_counter()
        final = self.evaluation_run.after_stream()
        self.write_results(final, end)

    def log_row(self, metrics: dict) -> None:
        # Straight to the loggers: self.log is not allowed in on_train_end (final evaluation).
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.steps_done)

    # -- edit-state checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, final: bool = False) -> None:
        if self.global_rank != 0:
            return  # every rank holds the same edit state; one writes it
        state = capture_edit_state(self.identity(), self.recorder, self.lm, self.initial, self.method, final)
        save_run_state(self.run_dir(), state)

    # -- editlab test: evaluate the loaded model as it is ---------------------------------------
    def on_test_start(self) -> None:
        self.recorder = RunRecorder(self.run_dir())
        self.prepare_stream()
        clock = self.recorder.clock
        clock.setup_done = clock.stream_start = time.perf_counter()

    def test_step(self, batch, batch_idx: int):
        self.evaluation_run.test_batch(list(batch), batch_idx)
        return None

    def on_test_end(self) -> None:
        metrics = self.evaluation_run.after_test()
        self.write_results(metrics, time.perf_counter(), timing="test")

    # -- results ----------------------------------------------------------------------------------
    def write_results(self, final: dict, end: float, timing: str | None = None) -> None:
        if self.global_rank != 0:
            return  # one writer: every rank of ``editlab test`` evaluates the same model
        timing = timing or self.evaluation.timing
        # the variant (MEMIT_seq, MEMIT-EAC, ...), not only the class
        head = {"method": self.method.name, "model": self.model_name, "timing": timing}
        tail = {}
        if self.memory is not None:
            tail["memory_estimate_gib"] = round(self.memory.device_total / 2**30, 3)
            if torch.cuda.is_available() and self.device.type == "cuda":
                tail["memory_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        if self.resumed_from_step is not None:
            tail["resumed_from_step"] = self.resumed_from_step
        export = self.export_edited if self.export and timing != "test" else None
        self.recorder.write_results(self.requests, self.evaluator, head, final, end, tail, export, self.loggers)

    def export_edited(self) -> dict[str, str]:
        """The edited model (save_pretrained) and its delta file, in the run directory."""
        export_dir = self.recorder.path(rundir.EDITED_MODEL)
        self.lm.save_pretrained(export_dir)
        self.tok.save_pretrained(export_dir)
        meta = {
            "model": self.model_name,
            "fingerprint": self.fingerprint,
            "dtype": self.lm_dtype,
            "model_type": self.lm.config.model_type,
            "method": self.method.name,
            "edits": self.recorder.edits_done,
        }
        delta = save_delta(self.recorder.path(rundir.EDIT_DELTA), weight_deltas(self.lm, self.initial), meta)
        return {"export_dir": str(export_dir), "export_delta": str(delta)}
