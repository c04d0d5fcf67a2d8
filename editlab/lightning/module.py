"""EditingModule: one ``training_step`` is one edit batch of the stream (manual optimization).

The module turns Lightning's hooks into the calls of an EditRun (editlab.lightning.run), which
holds the stream itself; the module keeps what is Lightning's (the LM's loading, the loggers, the
trainer's step count, device moves):
  configure_model  load the frozen LM (once), resolve its architecture
  on_fit_start     the run's recorder (editlab.lightning.recorder); with ``--ckpt_path``, the edit
                   state read (editlab.lightning.editstate.resume_fit) and the data module told where
                   the stream continues
  on_train_start   the EditRun started: requests checked, method set up, edit state restored (the
                   loggers given the earlier rows again) or the unedited model evaluated
  on_train_batch_start  the edit state after the previous step saved when due, and a periodic
                   evaluation point due after that step (editlab.lightning.run.EditRun.before_step)
  training_step    one edit step, logged; then what the evaluation schedule says right after it
  on_train_end     the final edit state, the final evaluation, the result files
  on_fit_end       only for an edit state written after the last step: Lightning has no batch to
                   run and skips on_train_start / on_train_end, so both run here
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from editlab.console import stderr_is_terminal, step_line
from editlab.distributed import Ranks
from editlab.editing.methods.base import EditMethod
from editlab.evaluation import EvaluationConfig
from editlab.keyed_cache import cache_root
from editlab.lightning.callbacks import WeightNormTracker
from editlab.lightning.editstate import Resume, resume_fit
from editlab.lightning.recorder import LoggedRows, RunRecorder
from editlab.lightning.run import EditRun, LoadedModel, RunSettings
from editlab.models.arch import ModelView
from editlab.models.load import DType, load_model_and_tokenizer


def journal_z_note(method) -> str:
    """What a journal keeps for a method whose z do not go through the step's parts (z on θ₀ in
    the z cache): where a run started over on a fresh machine finds them."""
    bank = getattr(method, "z_cache", None)
    again = f"takes its z from the z bank {bank} (z_cache)" if isinstance(bank, str) else "computes its z again"
    return (
        f"{method.name} takes no z through the step's parts, so the journal keeps its evaluation "
        f"points only; a run started over {again}"
    )


class SaveOnSigterm(L.Callback):
    """On the SIGTERMException Lightning raises after the step in progress, the edit state after
    that step (:meth:`EditingModule.save_after_sigterm`)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            pl_module.save_after_sigterm()


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
        cache_dir: str | None = None,
        journal: str | None = None,
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
                this many steps, after the last step and after the pre-edit evaluation, for
                ``--ckpt_path last``; 0: never.
            progress: show progress bars for long phases.
            cache_dir: root of the disk caches (covariance statistics, z on θ₀, probe scores, the
                embedded model's conversion); None: ``$EDITLAB_CACHE``, default ``~/.cache/editlab``.
            journal: a directory that keeps for good what a run started over needs so as not to
                compute it again: every step's z (``step_<k>.pt``, the step's parts: z chunk by
                chunk, named by the step, the weights it starts from and its requests; the MEMIT
                family) and every evaluation point's parts (``point_<timing>_<steps>.pt``, named by
                the weights, cases and options), instead of the parts files the run drops. A run
                started from step 0 with the same journal, on any machine, takes each step's z and
                each point's parts from it while the weights it reaches are the ones the journal
                names, and computes keys and solves only: a stream whose run directory (an edit
                state of 130 MB) cannot outlive the machine keeps its journal (about 0.5 MB of z per
                100 requests) and replays it. One journal per run. None: no journal.
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
        self.cache_dir = cache_dir
        self.journal = journal
        self.resume_from: Path | None = None  # set by the CLI from --ckpt_path
        self.resume: Resume | None = None
        self._fit_device: torch.device | None = None
        self.lm: torch.nn.Module | None = None
        self.tok = None
        self.view: ModelView | None = None
        self.recorder: RunRecorder | None = None
        self.run: EditRun | None = None

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.lm is not None:
            return
        cache = cache_root(self.cache_dir)
        lm, tok = load_model_and_tokenizer(self.model_name, self.lm_dtype, device=self.device, cache=cache)
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
        return [WeightNormTracker(), SaveOnSigterm()]

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
    def fingerprint(self) -> str | None:
        """Of the unedited weights, once the run has started."""
        return self.run.fingerprint if self.run is not None else None

    def stream_length(self) -> int | None:
        """Steps of the whole stream as this run will do them (a resumed run counts the earlier
        steps; limit_train_batches may cut it short); None when the trainer does not know."""
        dm, batches = self.trainer.datamodule, self.trainer.num_training_batches
        steps = len(dm.steps()) if dm is not None and hasattr(dm, "steps") else None
        if isinstance(batches, int) and steps is not None:
            return min(steps, (self.resumed_from_step or 0) + batches)
        return steps

    def open_run(self) -> EditRun:
        """The EditRun of this fit or test, its requests read from the data module and checked."""
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "requests"):
            raise ValueError("EditingModule needs an EditDataModule (option data)")
        terminal = stderr_is_terminal()  # a log file gets plain lines (step_line, evaluation points)
        settings = RunSettings(
            self.model_name,
            self.lm_dtype,
            self.seed,
            self.evaluation,
            self.export,
            self.checkpoint_every,
            self.progress and terminal,
            self.progress and not terminal,
            cache_root(self.cache_dir),
            Path(self.journal) if self.journal is not None else None,
        )
        ranks = Ranks(self.global_rank, self.trainer.world_size)
        if self.journal is not None and ranks.world != 1:
            raise ValueError(
                f"option journal: one process only (this run has {ranks.world}); the journal is one file per step"
            )
        if self.journal is not None and not self.method.z_in_step_parts() and ranks.is_main:
            print(f"editlab: journal {self.journal}: {journal_z_note(self.method)}", file=sys.stderr, flush=True)
        model = LoadedModel(self.lm, self.tok, self.view)
        return EditRun(
            model,
            self.method,
            settings,
            self.recorder,
            list(dm.requests),
            ranks,
            self.log_row,
            self.stream_length,
            self.stop_on_sigterm,
        )

    def stop_on_sigterm(self, part: str) -> None:
        """Between the parts of an evaluation point: on SIGTERM, stop now rather than after the rest
        of the point (an hour on a CPU) and the next step. The state after the last step was saved
        before the point and the finished parts are kept: the resumed run evaluates only the rest.
        One process only: with several, the other ranks wait for rank 0 in the next step's
        collectives, so rank 0 finishes the point and all stop after that step, as Lightning does."""
        if self.trainer.world_size == 1 and self.trainer.received_sigterm:
            print(
                f"[editlab] SIGTERM: stopped in an evaluation point, its part {part!r} kept",
                file=sys.stderr,
                flush=True,
            )
            raise SIGTERMException

    def log_row(self, metrics: dict) -> None:
        # Straight to the loggers: self.log is not allowed in on_train_end (final evaluation).
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.steps_done)

    # -- fit -------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._fit_device = self.device
        self.recorder = RunRecorder(self.trainer.default_root_dir)
        loggers = [lg for lg in self.trainer.loggers if not isinstance(lg, LoggedRows)]  # not an earlier fit's
        if loggers:
            # The recorder keeps every row the loggers get (for a resumed run's metrics.csv).
            self.trainer.loggers = [*loggers, self.recorder.logged]
        ranks = Ranks(self.global_rank, self.trainer.world_size)
        self.resume = resume_fit(self.resume_from, ranks, self.trainer.default_root_dir, self.trainer.datamodule)

    def on_train_start(self) -> None:
        self.run = self.open_run()
        self.run.start(self.trainer.datamodule.steps(), self.resume)
        if self.resume is not None and self.run.ranks.is_main:
            self.recorder.logged.replay(self.loggers)
            # Lightning's logging step counts the batches of this process; continue the stream's count.
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.recorder.steps_done
        self.run.begin_stream()

    def save_after_sigterm(self) -> None:
        """Lightning ends a fit on SIGTERM (a scheduler's preemption or time limit) once the step in
        progress is done and its row logged; the state after that step, otherwise written when the
        next step starts, is written now, so the resumed run recomputes nothing."""
        run = getattr(self, "run", None)
        if run is None or not self.checkpoint_every or self.steps_done in (0, self.resumed_from_step):
            return
        # In the stream's last step Lightning stops at the epoch's end, before on_train_end: the
        # state is the final one (only the final evaluation remains), as run.finish would write it.
        final = self.steps_done == self.stream_length()
        run.save_state(final=final)
        if run.ranks.is_main:
            left = "the final evaluation" if final else f"step {self.steps_done + 1}"
            if not final and run.point_due():
                left = f"the evaluation after step {self.steps_done}, then {left}"
            print(
                f"[editlab] SIGTERM: stopped after step {self.steps_done}, its edit state saved; "
                f"--ckpt_path last continues with {left}",
                file=sys.stderr,
                flush=True,
            )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The state after step k is saved when step k + 1 starts: by then the callbacks have added
        # their values to step k's record and Lightning has handed step k's row to the loggers.
        # Nothing happens in between, so this is the state right after step k. A periodic point
        # after step k runs here too, after that save (its rows are logged at step k).
        self.run.before_step(self.resumed_from_step)

    def training_step(self, batch, batch_idx: int):
        batch = list(batch)
        record, scalars, seconds = self.run.edit(batch)
        scalars = {f"edit/{k}": v for k, v in scalars.items()}
        scalars.update({"edit/seconds_step": seconds, "edit/edits": float(self.recorder.edits_done)})
        self.log_dict(scalars, batch_size=len(batch), on_step=True, on_epoch=False)
        if self.run.settings.lines and self.run.ranks.is_main:
            print(step_line(record, self.stream_length()), file=sys.stderr, flush=True)
        probes = self.run.after_step(batch)
        if probes is not None:
            self.log_dict(probes, on_step=True, on_epoch=False, batch_size=1)
        return None

    def record_step(self, values: dict[str, float]) -> None:
        """Observers (callbacks) add their per-step values to the step's record."""
        self.recorder.add_step_values(values)

    def on_train_end(self) -> None:
        self.run.finish(self.loggers)

    def on_fit_end(self) -> None:
        # An edit state written after the last step leaves no batch to run: Lightning then skips
        # on_train_start / on_train_end, so the stream's start (restore) and finish (final
        # evaluation, results) run here.
        if self.resume is not None and self.resume.final and self.summary_path is None:
            self.to(self._fit_device)  # the trainer's teardown moved the module to CPU
            self.on_train_start()
            self.on_train_end()

    # -- editlab test: evaluate the loaded model as it is ---------------------------------------
    def on_test_start(self) -> None:
        self.recorder = RunRecorder(self.trainer.default_root_dir)
        self.run = self.open_run()
        self.run.open_test()

    def test_step(self, batch, batch_idx: int):
        self.run.test_batch(list(batch), batch_idx)
        return None

    def on_test_end(self) -> None:
        self.run.finish_test(self.loggers)
