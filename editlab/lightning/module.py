"""EditingModule: one ``training_step`` is one edit batch of the stream (manual optimization).

Order of work in a fit:
  configure_model     load the frozen LM (once), resolve its architecture
  on_train_start      validate every request against the tokenizer and context (before any
                      weight changes), method.setup (statistics, templates), pre-edit evaluation
  training_step       method.apply on the step's requests; per-step scalars; ``immediate`` /
                      ``periodic`` evaluation
  on_train_end        ``final`` evaluation; cases.jsonl, curve.jsonl, summary.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

from editlab.data.sources import DataError, check_tokenization
from editlab.distributed import Ranks
from editlab.editing.methods.base import EditContext, EditMethod, KeyValueMethod
from editlab.editing.prompts import check_context_length
from editlab.editing.stats import model_fingerprint
from editlab.evaluation import EvaluationConfig, Evaluator
from editlab.lightning.callbacks import WeightNormTracker
from editlab.memory import MemoryEstimate, estimate_memory
from editlab.models.arch import ModelView
from editlab.models.load import DType, load_model_and_tokenizer
from editlab.report import write_run_report
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
                ``<run dir>/edited_model`` after the stream, for ``editlab test`` or any HF loader.
            progress: show progress bars for long phases.
        """
        super().__init__()
        self.automatic_optimization = False
        self.method = method
        self.model_name = model
        self.lm_dtype = dtype
        self.seed = seed
        self.evaluation = evaluation
        self.export = export
        self.progress = progress
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
        self.evaluator = Evaluator(self.evaluation, self.view, self.tok, self.seed, self.progress)

    def on_train_start(self) -> None:
        self.prepare_stream()
        ranks = Ranks(self.global_rank, self.trainer.world_size)
        self.ctx = EditContext(
            self.lm, self.tok, self.view, self.model_name, model_fingerprint(self.lm), self.seed, self.progress, ranks
        )
        if ranks.is_main:
            self.memory = self.estimate_memory()
            print(f"editlab: {self.memory.describe()}", file=sys.stderr, flush=True)
        torch.manual_seed(self.seed)
        self.method.setup(self.ctx)
        self._clock["setup_done"] = time.perf_counter()
        if not ranks.is_main:
            return  # evaluation and results are rank 0's: the other ranks only share the editing work
        cases, metrics = self.evaluator.evaluate(self.requests, quality=True)
        self.pre = {"cases": {c["case_id"]: c for c in cases}, "metrics": metrics}
        self.add_curve_point("pre", metrics)
        self._clock["stream_start"] = time.perf_counter()
        self._clock["eval_seconds"] = 0.0

    def estimate_memory(self) -> MemoryEstimate:
        """What this run will need (editlab.memory), from the model and the method's settings."""
        method, cfg = self.method, self.lm.config
        stats = 0
        offload = False
        if isinstance(method, KeyValueMethod):
            stats = 2 if getattr(method, "sequential", True) else 1
            offload = bool(getattr(method.covariance, "offload", False))
        context = getattr(method, "context", None)
        templates = 1 + (context.count if context is not None else 0)
        per_step = max(len(b) for b in self.trainer.datamodule.steps())
        prompt = max(len(self.tok(r.rewrite_prompt)["input_ids"]) for r in self.requests)
        layer = method.edited_layers()[0]
        first = next(self.lm.parameters())
        return estimate_memory(
            n_params=sum(p.numel() for p in self.lm.parameters()),
            param_bytes=first.element_size(),
            d_ff=self.view.ffn_out(layer).weight.numel() // cfg.hidden_size,
            d_model=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            edited_layers=len(method.edited_layers()),
            stat_matrices_per_layer=stats,
            offload=offload,
            rows_per_step=per_step * (templates + 1),
            tokens_per_row=prompt + (context.length if context is not None else 0) + 8,
        )

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
                    try:
                        check_context_length(self.lm.config, n, f"case {req.case_id}: field {field!r}")
                    except ValueError as err:
                        raise DataError(str(err)) from None

    def training_step(self, batch, batch_idx: int):
        t0 = time.perf_counter()
        result = self.method.apply(self.ctx, list(batch))
        seconds = time.perf_counter() - t0
        for req in batch:
            self.case_step[req.case_id] = batch_idx
        self.edits_done += len(batch)
        self.steps_done += 1
        scalars = {f"edit/{k}": v for k, v in result.scalars.items()}
        scalars.update({"edit/seconds_step": seconds, "edit/edits": float(self.edits_done)})
        self.log_dict(scalars, batch_size=len(batch), on_step=True, on_epoch=False)
        self.steps_log.append(
            {"step": self.steps_done, "edits": self.edits_done, "seconds": seconds, **result.scalars, **result.details}
        )
        self.case_edit_info.update(result.per_request)
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
            self.add_curve_point("immediate", metrics)
        elif cfg.timing == "periodic" and self.steps_done % cfg.every_n_steps == 0:
            self.evaluate_all_so_far("periodic")
        if cfg.probes.due(self.steps_done) and not (
            cfg.timing == "periodic" and self.curve[-1]["step"] == self.steps_done
        ):
            probes = self.evaluator.probes()
            self.log_dict(probes, on_step=True, on_epoch=False, batch_size=1)
            self.steps_log[-1].update(probes)
        self._clock["eval_seconds"] += time.perf_counter() - t0

    def evaluate_all_so_far(self, timing: str) -> dict:
        done = [r for r in self.requests if r.case_id in self.case_step]
        cases, metrics = self.evaluator.evaluate(done, quality=True)
        self.post_cases = {c["case_id"]: c for c in cases}
        self.add_curve_point(timing, metrics)
        return metrics

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
        end = time.perf_counter()
        timing = self.evaluation.timing
        last = self.curve[-1]
        if timing == "final" or (timing == "periodic" and last["step"] != self.steps_done) or last["timing"] == "pre":
            final = self.evaluate_all_so_far(timing)
        elif timing == "immediate":
            # Edit metrics: every case right after its own step; quality: the final model.
            done = [self.post_cases[r.case_id] for r in self.requests if r.case_id in self.case_step]
            final = {
                **self.evaluator.summarise_cases(done),
                **self.evaluator.quality([r for r in self.requests if r.case_id in self.case_step]),
            }
        else:
            final = {k: v for k, v in last.items() if k not in ("step", "edits", "timing")}
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
            "method": type(self.method).__name__,
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
            "seconds_total": time.perf_counter() - clock["start"],
            "seconds_setup": clock["setup_done"] - clock["start"],
            "seconds_editing": stream,
            "seconds_per_step": stream / max(self.steps_done, 1),
        }
        if self.memory is not None:
            summary["memory_estimate_gib"] = round(self.memory.device_total / 2**30, 3)
            if torch.cuda.is_available() and self.device.type == "cuda":
                summary["memory_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        if self.export and timing != "test":
            export_dir = out / "edited_model"
            self.lm.save_pretrained(export_dir)
            self.tok.save_pretrained(export_dir)
            summary["export_dir"] = str(export_dir)
        self.summary_path = out / "summary.json"
        write_json_atomic(self.summary_path, summary)
        write_run_report(out)
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
