"""EditingModule: one ``training_step`` is one edit batch of the stream (manual optimization).

Order of work in a fit:
  configure_model  load the frozen LM (once), resolve its architecture
  on_train_start   validate every request against the tokenizer and context (before any weight
                   changes), method.setup (statistics, templates), pre-edit evaluation
  training_step    method.apply on the step's requests; per-step scalars logged
  on_train_end     post-edit evaluation; cases.jsonl and summary.json into the run directory
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import torch

from editlab.data.sources import DataError, check_tokenization
from editlab.editing.methods.base import EditContext, EditMethod
from editlab.editing.prompts import check_context_length
from editlab.editing.stats import model_fingerprint
from editlab.evaluation import aggregate, case_flags, evaluate_cases, rewrite_probs
from editlab.models.arch import ModelView
from editlab.models.load import DType, load_model_and_tokenizer
from editlab.types import EditRequest


class EditingModule(L.LightningModule):
    def __init__(
        self,
        method: EditMethod,
        model: str = "smollm2-135m-instruct",
        dtype: DType = "float32",
        seed: int = 0,
        eval_batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        """
        Args:
            method: the editing method and its stages.
            model: hub id, local directory, or "smollm2-135m-instruct" (the embedded default).
            dtype: the LM's own dtype (solves always run in float64).
            seed: seeds context templates and any sampling.
            eval_batch_size: prompts per forward in evaluation.
            progress: show progress bars for long phases.
        """
        super().__init__()
        self.automatic_optimization = False
        self.method = method
        self.model_name = model
        self.lm_dtype = dtype
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.progress = progress
        self.lm: torch.nn.Module | None = None
        self.tok = None
        self.view: ModelView | None = None
        self.ctx: EditContext | None = None
        self.requests: list[EditRequest] = []
        self.pre_cases: list[dict] = []
        self.case_step: dict[str, int] = {}
        self.edits_done = 0
        self.steps_done = 0
        self.summary_path: Path | None = None
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

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a list of EditRequest: strings only, nothing to move

    # -- stream ------------------------------------------------------------------------------
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def on_train_start(self) -> None:
        self._clock["start"] = time.perf_counter()
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "requests"):
            raise ValueError("EditingModule needs an EditDataModule (option data)")
        self.requests = list(dm.requests)
        self.validate_requests(self.requests)
        self.ctx = EditContext(
            self.lm, self.tok, self.view, self.model_name, model_fingerprint(self.lm), self.seed, self.progress
        )
        torch.manual_seed(self.seed)
        self.method.setup(self.ctx)
        self._clock["setup_done"] = time.perf_counter()
        self.pre_cases = evaluate_cases(self.view, self.tok, self.requests, self.eval_batch_size)
        self._clock["stream_start"] = time.perf_counter()

    def validate_requests(self, requests: list[EditRequest]) -> None:
        """Everything that can be checked without editing, checked before the first edit."""
        check_tokenization(requests, self.tok)
        for req in requests:
            for field, prompts in (("prompt", [req.rewrite_prompt]), ("paraphrase_prompts", req.paraphrase_prompts),
                                   ("neighborhood_prompts", req.neighborhood_prompts)):
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
        return None

    def on_train_end(self) -> None:
        end = time.perf_counter()
        post = evaluate_cases(self.view, self.tok, self.requests, self.eval_batch_size)
        summary, records = self.summarise(self.pre_cases, post, end)
        out = self.run_dir()
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "cases.jsonl", records)
        self.summary_path = out / "summary.json"
        write_json_atomic(self.summary_path, summary)
        if self.logger is not None:
            self.logger.log_metrics({f"final/{k}": v for k, v in summary.items()}, step=self.steps_done)

    def summarise(self, pre: list[dict], post: list[dict], end: float) -> tuple[dict, list[dict]]:
        edited = [c for c, p in zip(post, self.requests) if p.case_id in self.case_step]
        pre_edited = [c for c, p in zip(pre, self.requests) if p.case_id in self.case_step]
        records = []
        for req, before, after in zip(self.requests, pre, post):
            if req.case_id not in self.case_step:
                continue
            records.append({
                "case_id": req.case_id,
                "step": self.case_step[req.case_id],
                "pre": {**rewrite_probs(before), **case_flags(before)},
                "post": {**rewrite_probs(after), **case_flags(after)},
                "detail": {"pre": before, "post": after},
            })
        clock = self._clock
        stream = end - clock["stream_start"]
        summary = {
            "edits": self.edits_done,
            "steps": self.steps_done,
            **aggregate([case_flags(c) for c in edited]),
            **{f"pre_{k}": v for k, v in aggregate([case_flags(c) for c in pre_edited]).items()},
            "seconds_total": time.perf_counter() - clock["start"],
            "seconds_setup": clock["setup_done"] - clock["start"],
            "seconds_editing": stream,
            "seconds_per_step": stream / max(self.steps_done, 1),
        }
        return summary, records


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
