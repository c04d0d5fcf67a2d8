"""StreamEvaluation: the evaluation of one edit stream, as its schedule says.

The schedule (editlab.evaluation.EvaluationSchedule) decides what is evaluated after each step and
after the stream; the evaluator (editlab.evaluation.Evaluator) runs it on the model as it is; each
result becomes a point of the run's records (RunRecorder) and a row for the loggers (``log_row``).
Evaluation is rank 0's: the module asks only there. Each point records its own seconds
(``seconds_evaluation``: a resumed run's earlier points keep theirs) and, with ``announce``, says
on stderr when it starts and how long it took (a log file shows nothing else for the hour a
2,000-case evaluation can take). With ``parts_file`` each point keeps its finished parts there
(editlab.lightning.parts), so a point killed part-way redoes only the parts it had not finished.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from editlab import rundir
from editlab.evaluation import EvaluationSchedule, Evaluator, held_out_specificity
from editlab.lightning.editstate import requests_digest
from editlab.lightning.parts import RunParts
from editlab.lightning.recorder import RunRecorder
from editlab.models.fingerprint import model_fingerprint
from editlab.report import POINT_KEYS
from editlab.types import EditRequest


class StreamEvaluation:
    def __init__(
        self,
        evaluator: Evaluator,
        schedule: EvaluationSchedule,
        recorder: RunRecorder,
        requests: list[EditRequest],
        log_row: Callable[[dict], None],
        stream_length: Callable[[], int | None],
        announce: bool = False,
        parts_file: Path | None = None,
        after_part: Callable[[str], None] | None = None,
        journal: Path | None = None,
    ) -> None:
        """``log_row``: hand a row to every logger at the current step; ``stream_length``: the
        stream's steps as this run does them (the module's, from the trainer); ``announce``: one
        plain stderr line when an evaluation point starts and one when it ends; ``parts_file``:
        where the point in progress keeps its finished parts (None: nowhere); ``after_part(name)``:
        called once each part is kept (the module stops the run there on SIGTERM); ``journal``: a
        directory that keeps every point's parts for good, one file per point, instead of
        ``parts_file`` (EditingModule.journal)."""
        self.evaluator = evaluator
        self.schedule = schedule
        self.recorder = recorder
        self.requests = requests
        self.log_row = log_row
        self.stream_length = stream_length
        self.announce = announce
        self.parts_file = parts_file
        self.after_part = after_part
        self.journal = journal

    def evaluate(self, requests: list[EditRequest], timing: str, quality: bool, final: bool = True):
        """The evaluator's cases and metrics of ``requests``, and the seconds they took (with the
        seconds of the parts an interrupted sitting had finished, when they are taken from it)."""
        if self.announce:
            edits = self.recorder.edits_done
            print(f"editlab: evaluating {len(requests)} cases ({timing}, {edits} edits)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        parts = self.point_parts(requests, timing, quality, final)
        cases, metrics = self.evaluator.evaluate(requests, quality=quality, final=final, parts=parts)
        seconds = time.perf_counter() - t0
        if parts is not None and parts.reused:
            seconds += parts.reused_seconds()
            kept = ", ".join(parts.reused)
            source = "the journal" if self.journal is not None else "the interrupted sitting"
            print(f"editlab: evaluation ({timing}) took {kept} from {source}", file=sys.stderr, flush=True)
        if self.announce:
            print(f"editlab: evaluation ({timing}) done in {seconds:.1f}s", file=sys.stderr, flush=True)
        return cases, metrics, seconds

    def point_parts(self, requests: list[EditRequest], timing: str, quality: bool, final: bool) -> RunParts | None:
        """The parts store of the point about to be evaluated, named by what its values depend on."""
        if self.parts_file is None and self.journal is None:
            return None
        rec = self.recorder
        point = {
            "timing": timing,
            "steps": rec.steps_done,
            "edits": rec.edits_done,
            "quality": quality,
            "final": final,
            "weights": model_fingerprint(self.evaluator.view.model),
            "cases": requests_digest(requests),
            "settings": self.evaluator.settings_digest(),
        }
        if self.journal is not None:
            return RunParts(rundir.journal_point_path(self.journal, timing, rec.steps_done), point, self.after_part)
        return RunParts(self.parts_file, point, self.after_part)

    def drop_parts(self) -> None:
        """Remove the parts file once the run's results are written: every point is in them (a
        journal keeps its points)."""
        if self.parts_file is not None:
            self.parts_file.unlink(missing_ok=True)

    def before(self) -> None:
        """The unedited model: every request, with the quality metrics."""
        cases, metrics, seconds = self.evaluate(self.requests, "pre", quality=True)
        self.recorder.pre = {"cases": {c["case_id"]: c for c in cases}, "metrics": metrics}
        self.add_point("pre", metrics, seconds)

    def after_step(self, batch: list[EditRequest]) -> dict[str, float] | None:
        """What the schedule says right after the step just recorded: the step's own requests
        (immediate) and the in-stream probes; returns the probe scores when they were due (the
        module logs them with the step's row), else None. A periodic point is not run here but
        when the next step starts (:meth:`point_due`), or after the stream."""
        rec, t0 = self.recorder, time.perf_counter()
        if self.schedule.after_step(rec.steps_done) == "batch":
            cases, metrics, seconds = self.evaluate(batch, "immediate", quality=False)
            rec.post_cases.update({c["case_id"]: c for c in cases})
            metrics.update(self.held_out(batch, cases))
            self.add_point("immediate", metrics, seconds)
        probes = None
        if self.schedule.probes_after_step(rec.steps_done):
            probes = self.evaluator.probes(final=False)
            rec.add_step_values(probes)
        rec.clock.eval_seconds += time.perf_counter() - t0
        return probes

    def point_due(self) -> bool:
        """A periodic point is due after the steps done and not evaluated yet. It runs when the
        next step starts, once the state after the step is saved (an evaluation of an hour that
        crashes loses no step), or after the stream as its final evaluation."""
        rec = self.recorder
        k = rec.steps_done
        if k == 0 or self.schedule.after_step(k) != "so_far":
            return False
        last = rec.curve[-1] if rec.curve else None
        return not (last is not None and last["step"] == k and last["timing"] == "periodic")

    def periodic_point(self) -> None:
        """The periodic point after the steps done, before the next step: every request edited
        so far, probes on their subsets (the stream's last point is after_stream's, on the full sets)."""
        t0 = time.perf_counter()
        self.so_far("periodic", final=False)
        self.recorder.clock.eval_seconds += time.perf_counter() - t0

    def after_stream(self) -> dict:
        """The final metrics: what the schedule says is left to evaluate after the stream."""
        rec = self.recorder
        last = rec.curve[-1] if rec.curve else None  # None: evaluation.pre false and nothing evaluated yet
        what = self.schedule.at_end(last, rec.steps_done)
        if what == "all":
            return self.so_far(self.schedule.timing)
        if what == "immediate":
            # Edit metrics: every case right after its own step; quality: the final model.
            done_reqs = rec.done(self.requests)
            done = [rec.post_cases[r.case_id] for r in done_reqs]
            return {
                **self.evaluator.summarise_cases(done),
                **self.held_out(done_reqs, done),
                **self.evaluator.quality(
                    done_reqs, parts=self.point_parts(done_reqs, timing="final", quality=True, final=True)
                ),
            }
        final = {k: v for k, v in last.items() if k not in POINT_KEYS and k != "seconds_evaluation"}
        if rec.steps_done != self.stream_length():  # the last periodic point probed the subsets only
            full = self.evaluator.probes(final=True)
            final.update(full)
            last.update(full)
            self.log_row({f"eval/{k}": v for k, v in full.items()})
        return final

    def test_batch(self, batch: list[EditRequest], batch_idx: int) -> None:
        """``editlab test``: one batch of the loaded model, as it is."""
        cases, _ = self.evaluator.evaluate(batch, quality=False)
        self.recorder.record_test_step(batch, batch_idx, cases)

    def after_test(self) -> dict:
        done = self.recorder.done(self.requests)
        metrics = {
            **self.evaluator.summarise_cases([self.recorder.post_cases[r.case_id] for r in done]),
            **self.evaluator.quality(done),
        }
        self.add_point("test", metrics)
        return metrics

    def so_far(self, timing: str, final: bool = True) -> dict:
        """Every request edited so far, with the quality metrics. ``final``: probes on every loaded
        example (after the stream), else on their subset."""
        done = self.recorder.done(self.requests)
        cases, metrics, seconds = self.evaluate(done, timing, quality=True, final=final)
        self.recorder.post_cases = {c["case_id"]: c for c in cases}
        metrics.update(self.held_out(done, cases))
        self.add_point(timing, metrics, seconds)
        return metrics

    def held_out(self, done: list[EditRequest], cases: list[dict]) -> dict[str, float]:
        """specificity_heldout_* when some edit trained on neighbourhood prompts (NA editing)."""
        trained = self.recorder.trained_neighbours()
        return held_out_specificity(cases, done, trained) if trained else {}

    def add_point(self, timing: str, metrics: dict, seconds: float | None = None) -> None:
        """A curve point: the metrics, and the seconds its evaluation took where one was timed."""
        point = self.recorder.add_point(timing, metrics)
        if seconds is not None:
            point["seconds_evaluation"] = seconds
        if timing != "pre":
            numeric = {f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            if seconds is not None:
                numeric["eval/seconds_evaluation"] = seconds
            numeric["eval/edits"] = float(self.recorder.edits_done)
            self.log_row(numeric)
