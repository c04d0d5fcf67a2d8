"""EditingModule: one ``training_step`` is one edit batch of the stream (manual optimization).

Order of work in a fit:
  configure_model     load the frozen LM (once), resolve its architecture
  on_train_start      validate every request against the tokenizer and context (before any
                      weight changes), method.setup (statistics, templates), pre-edit evaluation
  training_step       method.apply on the step's requests; per-step scalars; ``immediate`` /
                      ``periodic`` evaluation
  on_train_end        ``final`` evaluation; cases.jsonl, curve.jsonl, summary.json

Resuming (``editlab fit ... --ckpt_path last``, see editlab/lightning/editstate.py): on_fit_start
reads the edit state and tells the data module where the stream stopped; on_train_start runs
method.setup on the unedited model as usual, then restores the method state, the edited weights,
the RNG states and every result so far instead of evaluating the unedited model again.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning as L
import torch

from editlab.console import stderr_is_terminal, step_line
from editlab.data.sources import DataError, check_tokenization
from editlab.distributed import Ranks
from editlab.editing.methods.base import EditContext, EditMethod
from editlab.evaluation import EvaluationConfig, Evaluator, held_out_specificity
from editlab.files import write_text_atomic
from editlab.lightning.callbacks import WeightNormTracker
from editlab.lightning.editstate import (
    EditStateError,
    check_resumable,
    check_same_resume_point,
    edit_state_path,
    load_edit_state,
    requests_digest,
    resume_point,
    rng_state,
    save_edit_state,
    set_rng_state,
)
from editlab.memory import MemoryEstimate, plan_memory
from editlab.models.arch import ModelView
from editlab.models.delta import apply_weight_deltas, save_delta, snapshot, weight_deltas
from editlab.models.fingerprint import model_fingerprint
from editlab.models.load import DType, load_model_and_tokenizer
from editlab.models.prompts import check_context_length
from editlab.numerics import numerics, numerics_differences
from editlab.report import log_report_images, write_run_report
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
        # Set by the CLI from --ckpt_path: the edit state this fit continues from.
        self.resume_from: Path | None = None
        self.resumed_from_step: int | None = None
        self._resume: dict | None = None
        self._fit_device: torch.device | None = None
        self.initial: dict[str, torch.Tensor] = {}  # W_0 of the edited parameters, on CPU
        self.fingerprint: str | None = None  # of the unedited weights
        self.logged: list[list] = []  # [step, metrics] of every row the loggers got, replayed on resume
        self.lm: torch.nn.Module | None = None
        self.tok = None
        self.view: ModelView | None = None
        self.ctx: EditContext | None = None
        self.evaluator: Evaluator | None = None
        self.requests: list[EditRequest] = []
        self.case_step: dict[str, int] = {}
        self.case_edit_info: dict[str, dict] = {}
        self.pre: dict = {}
        self.post_cases: dict[str, dict] = {}
        self.curve: list[dict] = []
        self.steps_log: list[dict] = []
        self.edits_done = 0
        self.steps_done = 0
        self.summary_path: Path | None = None
        self.memory: MemoryEstimate | None = None
        self._clock: dict[str, float] = {}

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

    # -- stream ------------------------------------------------------------------------------
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

    def prepare_stream(self) -> None:
        """Requests checked and reference data read: everything before the first edit."""
        self._clock["start"] = time.perf_counter()
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "requests"):
            raise ValueError("EditingModule needs an EditDataModule (option data)")
        self.requests = list(dm.requests)
        self.validate_requests(self.requests)
        self.evaluator = Evaluator(self.evaluation, self.view, self.tok, self.seed, self.bars)

    def on_fit_start(self) -> None:
        self._fit_device = self.device
        if self.resume_from is not None:
            # Read before the train dataloader is made: the data module must start where the stream stopped.
            self._resume = load_edit_state(self.resume_from)
        # Every rank reads the edit state from its own view of the run directory (several machines).
        points = Ranks(self.global_rank, self.trainer.world_size).all_gather_object(resume_point(self._resume))
        check_same_resume_point(points, edit_state_path(self.run_dir()))
        if self._resume is None:
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "first_step"):
            raise ValueError("resuming needs an EditDataModule (option data)")
        steps = dm.steps()
        done = int(self._resume["steps_done"])
        if done > len(steps) or sum(len(b) for b in steps[:done]) != int(self._resume["edits_done"]):
            raise EditStateError(
                f"{self.resume_from}: {done} steps with {self._resume['edits_done']} edits done do not match this "
                f"data ({len(steps)} steps of up to {dm.edits_per_step} edits)"
            )
        total = len(steps)
        dm.first_step = total if self._resume["final"] else done

    def on_train_start(self) -> None:
        self.prepare_stream()
        ranks = Ranks(self.global_rank, self.trainer.world_size)
        self.fingerprint = model_fingerprint(self.lm)
        self.ctx = EditContext(
            self.lm, self.tok, self.view, self.model_name, self.fingerprint, self.seed, self.bars, ranks
        )
        if ranks.is_main:
            self.memory = self.estimate_memory()
            print(f"editlab: {self.memory.describe()}", file=sys.stderr, flush=True)
        torch.manual_seed(self.seed)
        self.method.setup(self.ctx)
        self.initial = snapshot(self.lm, self.method.edited_parameters(self.view))
        self._clock["setup_done"] = time.perf_counter()
        if self._resume is not None:
            self.restore(self._resume)  # every rank: weights and method state
            if ranks.is_main:
                self.replay_logged()
        elif ranks.is_main and self.evaluation.pre:  # evaluation is rank 0's: other ranks only edit
            cases, metrics = self.evaluator.evaluate(self.requests, quality=True)
            self.pre = {"cases": {c["case_id"]: c for c in cases}, "metrics": metrics}
            self.add_curve_point("pre", metrics)
        self.record_logged()
        self._clock["stream_start"] = time.perf_counter()
        self._clock["eval_seconds"] = 0.0

    def record_logged(self) -> None:
        """Keep a copy of what the first logger is given, so a resumed run's metrics.csv / W&B
        history holds the steps before the interruption too (every logger gets the same rows)."""
        if not self.loggers or getattr(self.loggers[0], "_editlab_recorded", False):
            return
        logger, real = self.loggers[0], self.loggers[0].log_metrics

        def log_metrics(metrics, step=None):
            self.logged.append([step, {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}])
            return real(metrics, step)

        logger.log_metrics, logger._editlab_recorded = log_metrics, True

    def replay_logged(self) -> None:
        for logger in self.loggers:
            for step, metrics in self.logged:
                logger.log_metrics(metrics, step)
            logger.save()
        # Lightning's logging step counts the batches of this process; continue the stream's count.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.steps_done

    # -- edit-state checkpoints ------------------------------------------------------------------
    def edit_state(self, final: bool) -> dict:
        results = {
            "pre": self.pre,
            "curve": self.curve,
            "steps_log": self.steps_log,
            "case_step": self.case_step,
            "case_edit_info": self.case_edit_info,
            "post_cases": self.post_cases,
            "logged": self.logged,
        }
        return {
            "model": self.model_name,
            "fingerprint": self.fingerprint,
            "dtype": self.lm_dtype,
            "method": type(self.method).__name__,
            "requests": requests_digest(self.requests),
            "steps_done": self.steps_done,
            "edits_done": self.edits_done,
            "final": final,
            "deltas": weight_deltas(self.lm, self.initial),
            # Of the whole edited model: a resumed run checks it got back exactly this model.
            "edited_fingerprint": model_fingerprint(self.lm),
            "method_state": self.method.state_dict(),
            "rng": rng_state(),
            # torch version and thread count: a resumed run compares them (the bits depend on them).
            "numerics": numerics(),
            # JSON (what the result files hold): plain strings for the weights_only loader.
            "results": json.dumps(results),
        }

    def save_checkpoint(self, final: bool = False) -> None:
        if self.global_rank != 0:
            return  # every rank holds the same edit state; one writes it
        save_edit_state(edit_state_path(self.run_dir()), self.edit_state(final))

    def restore(self, state: dict) -> None:
        """Continue from ``state`` on the freshly loaded (unedited) model, after method.setup."""
        digest = requests_digest(self.requests)
        check_resumable(state, self.model_name, self.fingerprint, self.lm_dtype, type(self.method).__name__, digest)
        missing = set(self.initial) ^ set(state["deltas"])
        if missing:
            raise EditStateError(f"{self.resume_from}: edited parameters differ from this method's: {sorted(missing)}")
        self.method.load_state_dict(state["method_state"])
        apply_weight_deltas(self.lm, state["deltas"], self.initial)
        if model_fingerprint(self.lm) != state["edited_fingerprint"]:
            raise EditStateError(
                f"{self.resume_from}: the restored model differs from the checkpointed one (a parameter outside "
                f"{type(self.method).__name__}.edited_parameters() was changed?)"
            )
        results = json.loads(state["results"])
        self.pre, self.curve, self.steps_log = results["pre"], results["curve"], results["steps_log"]
        self.case_step, self.case_edit_info = results["case_step"], results["case_edit_info"]
        self.post_cases, self.logged = results["post_cases"], results["logged"]
        self.steps_done, self.edits_done = int(state["steps_done"]), int(state["edits_done"])
        self.resumed_from_step = self.steps_done
        set_rng_state(state["rng"])
        changed = numerics_differences(state.get("numerics"), numerics())
        if changed:
            print(
                f"[editlab] warning: resuming with other numerics than the interrupted run ({'; '.join(changed)}): "
                "its results will not be bit-identical to an uninterrupted run's",
                file=sys.stderr,
            )
        print(f"[editlab] resumed from {self.resume_from} after step {self.steps_done}", file=sys.stderr)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The state after step k is saved when step k + 1 starts: by then the callbacks have added
        # their values to step k's record and Lightning has handed step k's row to the loggers.
        # Nothing happens in between, so this is the state right after step k.
        k = self.steps_done
        if self.checkpoint_every and k and k % self.checkpoint_every == 0 and k != self.resumed_from_step:
            self.save_checkpoint()

    def on_fit_end(self) -> None:
        # A checkpoint written after the last step leaves no batch to run: Lightning then skips
        # on_train_start / on_train_end, so the final phase (evaluation, results) runs here.
        if self._resume is not None and self._resume["final"] and self.summary_path is None:
            self.to(self._fit_device)  # the trainer's teardown moved the module to CPU
            self.on_train_start()
            self.on_train_end()

    def estimate_memory(self) -> MemoryEstimate:
        """What this run will need (editlab.memory), from the model and the method's settings."""
        per_step = max(len(b) for b in self.trainer.datamodule.steps())
        prompt = max(len(self.tok(r.rewrite_prompt)["input_ids"]) for r in self.requests)
        first = next(self.lm.parameters())
        n_params = sum(p.numel() for p in self.lm.parameters())
        # + 8: room for the target's tokens after the prompt
        return plan_memory(self.lm.config, self.method, first.element_size(), n_params, per_step, prompt + 8)

    def validate_requests(self, requests: list[EditRequest]) -> None:
        """Everything that can be checked without editing, checked before the first edit."""
        check_tokenization(requests, self.tok)
        for req in requests:
            for field, prompts in (
                ("prompt", [req.rewrite_prompt]),
                ("paraphrase_prompts", req.paraphrase_prompts),
                ("neighborhood_prompts", req.neighborhood_prompts),
            ):
                for prompt in prompts:
                    n = len(self.tok(prompt)["input_ids"]) + 64  # room for a prefix and the answer
                    self.check_prompt_length(n, f"case {req.case_id}: field {field!r}")
            if self.evaluation.fluency:  # generated from: the prompt and its continuation must fit
                cfg = self.evaluation
                for prompt in cfg.generation_prompts_of(req):
                    n = cfg.generated_length(len(self.tok(prompt)["input_ids"]))
                    self.check_prompt_length(n, f"case {req.case_id}: field 'generation_prompts' (+ max_new_tokens)")

    def check_prompt_length(self, n_tokens: int, what: str) -> None:
        try:
            check_context_length(self.lm.config, n_tokens, what)
        except ValueError as err:
            raise DataError(str(err)) from None

    def training_step(self, batch, batch_idx: int):
        t0 = time.perf_counter()
        result = self.method.apply(self.ctx, list(batch))
        seconds = time.perf_counter() - t0
        for req in batch:
            self.case_step[req.case_id] = self.steps_done  # the step's index in the whole stream
        self.edits_done += len(batch)
        self.steps_done += 1
        scalars = {f"edit/{k}": v for k, v in result.scalars.items()}
        scalars.update({"edit/seconds_step": seconds, "edit/edits": float(self.edits_done)})
        self.log_dict(scalars, batch_size=len(batch), on_step=True, on_epoch=False)
        self.steps_log.append(
            {"step": self.steps_done, "edits": self.edits_done, "seconds": seconds, **result.scalars, **result.details}
        )
        self.case_edit_info.update(result.per_request)
        if self.progress and not stderr_is_terminal() and self.ctx.ranks.is_main:
            print(step_line(self.steps_log[-1], self.stream_length()), file=sys.stderr, flush=True)
        self.evaluate_during_stream(list(batch))
        return None

    def record_step(self, values: dict[str, float]) -> None:
        """Observers (callbacks) add their per-step values to the step's record."""
        self.steps_log[-1].update(values)

    def evaluate_during_stream(self, batch: list[EditRequest]) -> None:
        if not self.ctx.ranks.is_main:
            return
        cfg, t0 = self.evaluation, time.perf_counter()
        if cfg.timing == "immediate":
            cases, metrics = self.evaluator.evaluate(batch, quality=False)
            self.post_cases.update({c["case_id"]: c for c in cases})
            metrics.update(self.held_out(batch, cases))
            self.add_curve_point("immediate", metrics)
        elif cfg.timing == "periodic" and self.steps_done % cfg.every_n_steps == 0:
            # The stream's last point is its final evaluation: probes on their full sets.
            self.evaluate_all_so_far("periodic", final=self.steps_done == self.stream_length())
        if cfg.probes.due(self.steps_done) and not (
            cfg.timing == "periodic" and self.curve and self.curve[-1]["step"] == self.steps_done
        ):
            probes = self.evaluator.probes(final=False)
            self.log_dict(probes, on_step=True, on_epoch=False, batch_size=1)
            self.steps_log[-1].update(probes)
        self._clock["eval_seconds"] += time.perf_counter() - t0

    def evaluate_all_so_far(self, timing: str, final: bool = True) -> dict:
        """``final``: probes on every loaded example (after the stream), else on their subset."""
        done = [r for r in self.requests if r.case_id in self.case_step]
        cases, metrics = self.evaluator.evaluate(done, quality=True, final=final)
        self.post_cases = {c["case_id"]: c for c in cases}
        metrics.update(self.held_out(done, cases))
        self.add_curve_point(timing, metrics)
        return metrics

    def held_out(self, done: list[EditRequest], cases: list[dict]) -> dict[str, float]:
        """specificity_heldout_* when some edit trained on neighbourhood prompts (NA editing)."""
        trained = {
            cid: info["neighbor_prompts"] for cid, info in self.case_edit_info.items() if info.get("neighbor_prompts")
        }
        return held_out_specificity(cases, done, trained) if trained else {}

    def add_curve_point(self, timing: str, metrics: dict) -> None:
        point = {"step": self.steps_done, "edits": self.edits_done, "timing": timing, **metrics}
        self.curve.append(point)
        if timing != "pre":
            # Straight to the loggers: self.log is not allowed in on_train_end (final evaluation).
            numeric = {f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            numeric["eval/edits"] = float(self.edits_done)
            for logger in self.loggers:
                logger.log_metrics(numeric, step=self.steps_done)

    def on_train_end(self) -> None:
        if not self.ctx.ranks.is_main:
            return
        if self.checkpoint_every and not (self._resume is not None and self._resume["final"]):
            self.save_checkpoint(final=True)
        end = time.perf_counter()
        timing = self.evaluation.timing
        last = self.curve[-1] if self.curve else None  # None: evaluation.pre false and nothing evaluated yet
        if (
            timing == "final"
            or last is None
            or (timing == "periodic" and last["step"] != self.steps_done)
            or last["timing"] == "pre"
        ):
            final = self.evaluate_all_so_far(timing)
        elif timing == "immediate":
            # Edit metrics: every case right after its own step; quality: the final model.
            done_reqs = [r for r in self.requests if r.case_id in self.case_step]
            done = [self.post_cases[r.case_id] for r in done_reqs]
            final = {
                **self.evaluator.summarise_cases(done),
                **self.held_out(done_reqs, done),
                **self.evaluator.quality(done_reqs),
            }
        else:
            final = {k: v for k, v in last.items() if k not in ("step", "edits", "timing")}
            if self.steps_done != self.stream_length():  # the last periodic point probed the subsets only
                full = self.evaluator.probes(final=True)
                final.update(full)
                last.update(full)
                for logger in self.loggers:
                    logger.log_metrics({f"eval/{k}": v for k, v in full.items()}, step=self.steps_done)
        self.write_results(final, end)

    # -- editlab test: evaluate the loaded model as it is ---------------------------------------
    def on_test_start(self) -> None:
        self.prepare_stream()
        self._clock["setup_done"] = self._clock["stream_start"] = time.perf_counter()
        self._clock["eval_seconds"] = 0.0

    def test_step(self, batch, batch_idx: int):
        cases, _ = self.evaluator.evaluate(list(batch), quality=False)
        self.post_cases.update({c["case_id"]: c for c in cases})
        for req in batch:
            self.case_step[req.case_id] = batch_idx
        self.steps_done += 1
        self.edits_done += len(batch)
        return None

    def on_test_end(self) -> None:
        done = [r for r in self.requests if r.case_id in self.case_step]
        metrics = {
            **self.evaluator.summarise_cases([self.post_cases[r.case_id] for r in done]),
            **self.evaluator.quality(done),
        }
        self.add_curve_point("test", metrics)
        self.write_results(metrics, time.perf_counter(), timing="test")

    def write_results(self, final: dict, end: float, timing: str | None = None) -> None:
        if self.global_rank != 0:
            return  # one writer: every rank of ``editlab test`` evaluates the same model
        timing = timing or self.evaluation.timing
        out = self.run_dir()
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for req in self.requests:
            if req.case_id not in self.case_step:
                continue
            after = self.post_cases[req.case_id]
            before = self.pre["cases"][req.case_id] if self.pre else None
            record = {"case_id": req.case_id, "step": self.case_step[req.case_id], "timing": timing}
            if before is not None:
                record["pre"] = self.evaluator.case_summary(before)
            record["post"] = self.evaluator.case_summary(after)
            if req.case_id in self.case_edit_info:
                record["edit"] = self.case_edit_info[req.case_id]
            record["detail"] = {"pre": before, "post": after} if before is not None else {"post": after}
            records.append(record)
        write_jsonl(out / "cases.jsonl", records)
        write_jsonl(out / "curve.jsonl", self.curve)
        write_jsonl(out / "steps.jsonl", self.steps_log)
        clock = self._clock
        stream = end - clock["stream_start"] - clock["eval_seconds"]
        summary = {
            "method": self.method.name,  # the variant (MEMIT_seq, MEMIT-EAC, ...), not only the class
            "model": self.model_name,
            "timing": timing,
            "edits": self.edits_done if timing != "test" else 0,
            "evaluated": len(records),
            "steps": self.steps_done,
            **final,
            **(
                {f"pre_{k}": v for k, v in self.pre_metrics_of_edited().items() if isinstance(v, (int, float))}
                if self.pre
                else {}
            ),
            **numerics(),  # what the bits depend on besides the config
            "seconds_total": time.perf_counter() - clock["start"],
            "seconds_setup": clock["setup_done"] - clock["start"],
            "seconds_editing": stream,
            "seconds_per_step": stream / max(self.steps_done, 1),
        }
        if self.memory is not None:
            summary["memory_estimate_gib"] = round(self.memory.device_total / 2**30, 3)
            if torch.cuda.is_available() and self.device.type == "cuda":
                summary["memory_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        if self.resumed_from_step is not None:
            summary["resumed_from_step"] = self.resumed_from_step
        if self.export and timing != "test":
            export_dir = out / "edited_model"
            self.lm.save_pretrained(export_dir)
            self.tok.save_pretrained(export_dir)
            summary["export_dir"] = str(export_dir)
            meta = {
                "model": self.model_name,
                "fingerprint": self.fingerprint,
                "dtype": self.lm_dtype,
                "model_type": self.lm.config.model_type,
                "method": self.method.name,
                "edits": self.edits_done,
            }
            delta = save_delta(out / "edit_delta.safetensors", weight_deltas(self.lm, self.initial), meta)
            summary["export_delta"] = str(delta)
        self.summary_path = out / "summary.json"
        write_json_atomic(self.summary_path, summary)
        write_run_report(out)
        log_report_images(self.loggers, out, step=self.steps_done)  # W&B: the report's plots as images
        for logger in self.loggers:
            if hasattr(logger, "log_table"):  # W&B: the per-case table
                cols = [
                    "case_id",
                    "step",
                    "pre_prob_new",
                    "post_prob_new",
                    "pre_prob_true",
                    "post_prob_true",
                    "efficacy_success",
                ]
                rows = [
                    [
                        r["case_id"],
                        r["step"],
                        r.get("pre", {}).get("prob_new"),
                        r["post"].get("prob_new"),
                        r.get("pre", {}).get("prob_true"),
                        r["post"].get("prob_true"),
                        r["post"].get("efficacy_success"),
                    ]
                    for r in records
                ]
                logger.log_table(key="cases", columns=cols, data=rows)

    def pre_metrics_of_edited(self) -> dict:
        """Pre-edit metrics restricted to the requests that were edited (the stream may have been
        cut short by limit_train_batches)."""
        if len(self.case_step) == len(self.requests):
            return self.pre["metrics"]
        cases = [self.pre["cases"][r.case_id] for r in self.requests if r.case_id in self.case_step]
        return {
            **self.evaluator.summarise_cases(cases),
            **{k: v for k, v in self.pre["metrics"].items() if k in self.evaluator.quality_keys},
        }


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
