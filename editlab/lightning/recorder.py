"""RunRecorder: the records of one edit stream and the run directory they are written to.

What a run records, in the order the files are written after the stream:
  cases.jsonl   one record per edited case: its step, pre / post summaries, the method's per-case
                details, the full evaluation records
  curve.jsonl   the evaluation points (pre, immediate, periodic, final, test) against edits
  steps.jsonl   one record per edit step: the method's scalars and details, the observers' values
  summary.json  the final metrics, the pre-edit metrics of the edited cases, numerics, timings
  report.md     rendered from the recorder's data (editlab.report), with the config the CLI saved

Every row the loggers are given is kept too (:class:`LoggedRows`, a logger among the trainer's), so
that a resumed run gives its loggers the rows of the steps before the interruption: metrics.csv of a
resumed run is the uninterrupted run's. The file names are editlab.rundir's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger

from editlab import rundir
from editlab.files import write_text_atomic
from editlab.numerics import numerics
from editlab.report import load_config, log_report_images, render_run_report
from editlab.types import EditRequest, EditResult

# The per-case W&B table: its columns, and where each value lives in a cases.jsonl record.
CASE_TABLE = (
    ("case_id", lambda r: r["case_id"]),
    ("step", lambda r: r["step"]),
    ("pre_prob_new", lambda r: r.get("pre", {}).get("prob_new")),
    ("post_prob_new", lambda r: r["post"].get("prob_new")),
    ("pre_prob_true", lambda r: r.get("pre", {}).get("prob_true")),
    ("post_prob_true", lambda r: r["post"].get("prob_true")),
    ("efficacy_success", lambda r: r["post"].get("efficacy_success")),
)


class LoggedRows(Logger):
    """A logger that keeps ``[step, metrics]`` of every row the trainer's loggers are given (every
    logger gets the same rows), so a resumed run can hand the earlier rows to the real loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list] = []

    # Name and version empty, as the CLI's CSV logger's: Lightning joins the loggers' distinct names
    # and versions (the progress bar's v_num, checkpoint folders), which then read as without this one.
    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the config is in config.yaml

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append([step, {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}])

    def replay(self, loggers: list[Logger]) -> None:
        """Give every other logger the rows kept so far (a resumed run's earlier steps)."""
        for logger in loggers:
            if logger is self:
                continue
            for step, metrics in self.rows:
                logger.log_metrics(metrics, step)
            logger.save()


class RunClock:
    """The wall-clock marks of a run, for the summary's ``seconds_*``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.setup_done = self.start
        self.stream_start = self.start
        self.eval_seconds = 0.0

    def seconds(self, end: float, step_seconds: list[float]) -> dict[str, float]:
        """This sitting's seconds (total, setup, editing without evaluation) and the mean edit
        seconds per step over ``step_seconds``, every step's own: a resumed run's steps of earlier
        sittings count, which this sitting's clock did not see."""
        stream = end - self.stream_start - self.eval_seconds  # editing only: evaluation time left out
        return {
            "seconds_total": time.perf_counter() - self.start,
            "seconds_setup": self.setup_done - self.start,
            "seconds_editing": stream,
            "seconds_per_step": sum(step_seconds) / max(len(step_seconds), 1),
        }


class RunRecorder:
    """The run directory and the records of the stream written into it (see the module doc)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.pre: dict = {}  # {"cases": {case_id: record}, "metrics": {...}} of the pre-edit evaluation
        self.curve: list[dict] = []
        self.steps: list[dict] = []
        self.case_step: dict[str, int] = {}  # case id -> index of the step that edited it
        self.case_edit_info: dict[str, dict] = {}
        self.post_cases: dict[str, dict] = {}
        self.logged = LoggedRows()
        self.steps_done = 0
        self.edits_done = 0
        self.clock = RunClock()
        self.summary_path: Path | None = None

    def path(self, name: str) -> Path:
        return self.root / name

    # -- the stream ------------------------------------------------------------------------------
    def record_step(
        self, batch: list[EditRequest], result: EditResult, seconds: float, seconds_cpu: float | None = None
    ) -> dict:
        """One edit step done: its cases, counts and record (returned; observers add to it);
        ``seconds_cpu``, the process's CPU seconds of the step, where measured."""
        for req in batch:
            self.case_step[req.case_id] = self.steps_done  # the step's index in the whole stream
        self.edits_done += len(batch)
        self.steps_done += 1
        cpu = {} if seconds_cpu is None else {"seconds_cpu": seconds_cpu}
        self.steps.append(
            {
                "step": self.steps_done,
                "edits": self.edits_done,
                "seconds": seconds,
                **cpu,
                **result.scalars,
                **result.details,
            }
        )
        self.case_edit_info.update(result.per_request)
        return self.steps[-1]

    def step_seconds(self) -> list[float]:
        """Each edit step's own seconds, the steps of earlier sittings included."""
        return [row["seconds"] for row in self.steps if "seconds" in row]

    def record_test_step(self, batch: list[EditRequest], batch_idx: int, cases: list[dict]) -> None:
        """One batch of ``editlab test`` evaluated (no edit)."""
        self.post_cases.update({c["case_id"]: c for c in cases})
        for req in batch:
            self.case_step[req.case_id] = batch_idx
        self.steps_done += 1
        self.edits_done += len(batch)

    def add_step_values(self, values: dict) -> None:
        """Observers (callbacks, in-stream probes) add their values to the last step's record."""
        self.steps[-1].update(values)

    def add_point(self, timing: str, metrics: dict) -> dict:
        point = {"step": self.steps_done, "edits": self.edits_done, "timing": timing, **metrics}
        self.curve.append(point)
        return point

    def evaluation_seconds(self) -> float:
        """Seconds of every timed evaluation point (pre, immediate, periodic, final), of every
        sitting of a resumed run (the curve comes back with the edit state)."""
        return sum(point.get("seconds_evaluation", 0.0) for point in self.curve)

    def done(self, requests: list[EditRequest]) -> list[EditRequest]:
        """The requests edited so far, in stream order."""
        return [r for r in requests if r.case_id in self.case_step]

    def trained_neighbours(self) -> dict[str, list[str]]:
        """case id -> the neighbourhood prompts its edit trained on (neighbour-assisted editing)."""
        return {
            cid: info["neighbor_prompts"] for cid, info in self.case_edit_info.items() if info.get("neighbor_prompts")
        }

    def pre_metrics(self, requests: list[EditRequest], evaluator) -> dict:
        """The pre-edit metrics of the requests edited (the stream may have been cut short by
        limit_train_batches): editing metrics recomputed on their cases, the quality ones as measured."""
        if len(self.case_step) == len(requests):
            return self.pre["metrics"]
        cases = [self.pre["cases"][r.case_id] for r in self.done(requests)]
        return {
            **evaluator.summarise_cases(cases),
            **{k: v for k, v in self.pre["metrics"].items() if k in evaluator.quality_keys},
        }

    # -- edit state ------------------------------------------------------------------------------
    def results_json(self) -> str:
        """Every result so far as one JSON string (the edit state's ``results``)."""
        results = {
            "pre": self.pre,
            "curve": self.curve,
            "steps_log": self.steps,
            "case_step": self.case_step,
            "case_edit_info": self.case_edit_info,
            "post_cases": self.post_cases,
            "logged": self.logged.rows,
        }
        return json.dumps(results)

    def restore(self, results_json: str, steps_done: int, edits_done: int) -> None:
        """Back to the records of :meth:`results_json` after ``steps_done`` steps."""
        results = json.loads(results_json)
        self.pre, self.curve, self.steps = results["pre"], results["curve"], results["steps_log"]
        self.case_step, self.case_edit_info = results["case_step"], results["case_edit_info"]
        self.post_cases, self.logged.rows = results["post_cases"], results["logged"]
        self.steps_done, self.edits_done = steps_done, edits_done

    # -- results ---------------------------------------------------------------------------------
    def case_records(self, requests: list[EditRequest], timing: str, summarise: Callable[[dict], dict]) -> list[dict]:
        """cases.jsonl's records of the edited requests (``summarise``: a case's pre / post summary)."""
        records = []
        for req in self.done(requests):
            after = self.post_cases[req.case_id]
            before = self.pre["cases"][req.case_id] if self.pre else None
            record = {"case_id": req.case_id, "step": self.case_step[req.case_id], "timing": timing}
            if before is not None:
                record["pre"] = summarise(before)
            record["post"] = summarise(after)
            if req.case_id in self.case_edit_info:
                record["edit"] = self.case_edit_info[req.case_id]
            record["detail"] = {"pre": before, "post": after} if before is not None else {"post": after}
            records.append(record)
        return records

    def write_results(
        self,
        requests: list[EditRequest],
        evaluator,
        head: dict,
        final: dict,
        end: float,
        tail: dict,
        export: Callable[[], dict] | None,
        loggers: list[Logger],
    ) -> Path:
        """Every result file, in order: the records, the exported model (``export``: writes it and
        returns its summary entries), summary.json (``head``: method, model, timing; ``final``: the
        final metrics; ``tail``: the run's facts after the timings), the report, the loggers' table."""
        timing = head["timing"]
        records = self.case_records(requests, timing, evaluator.case_summary)
        self.write_records(records)
        pre = self.pre_metrics(requests, evaluator) if self.pre else {}
        summary = {
            **head,
            "edits": self.edits_done if timing != "test" else 0,
            "evaluated": len(records),
            "steps": self.steps_done,
            **final,
            **{f"pre_{k}": v for k, v in pre.items() if isinstance(v, (int, float))},
            **numerics(),  # what the bits depend on besides the config
            **self.clock.seconds(end, self.step_seconds()),
            "seconds_evaluation": self.evaluation_seconds(),
            **tail,
        }
        if export is not None:
            summary.update(export())
        path = self.write_summary(summary)
        self.write_report(summary)
        self.publish(loggers, records)
        return path

    def write_records(self, records: list[dict]) -> None:
        """cases.jsonl, curve.jsonl, steps.jsonl, in this order (cases.jsonl first: benchmarks/soak.py
        dates the end of the final evaluation by it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.path(rundir.CASES), records)
        write_jsonl(self.path(rundir.CURVE), self.curve)
        write_jsonl(self.path(rundir.STEPS), self.steps)

    def write_summary(self, summary: dict) -> Path:
        """summary.json, the last result file: its presence marks a finished run."""
        self.summary_path = write_text_atomic(self.path(rundir.SUMMARY), json.dumps(summary, indent=2) + "\n")
        return self.summary_path

    def write_report(self, summary: dict) -> Path:
        """report.md and its plots, from this recorder's records (the config from config.yaml,
        which the CLI writes)."""
        return render_run_report(self.root, summary, load_config(self.root), self.curve, self.steps)

    def publish(self, loggers: list[Logger], records: list[dict]) -> None:
        """The report's plots as images and the per-case table, to the loggers that take them (W&B)."""
        log_report_images(loggers, self.root, step=self.steps_done)
        for logger in loggers:
            if hasattr(logger, "log_table"):
                rows = [[value(r) for _, value in CASE_TABLE] for r in records]
                logger.log_table(key="cases", columns=[name for name, _ in CASE_TABLE], data=rows)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
