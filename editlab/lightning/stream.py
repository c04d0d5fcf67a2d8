"""StreamEvaluation: the evaluation of one edit stream, as its schedule says.

The schedule (editlab.evaluation.EvaluationSchedule) decides what is evaluated after each step and
after the stream; the evaluator (editlab.evaluation.Evaluator) runs it on the model as it is; each
result becomes a point of the run's records (RunRecorder) and a row for the loggers (``log_row``).
Evaluation is rank 0's: the module asks only there.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from editlab.evaluation import EvaluationSchedule, Evaluator, held_out_specificity
from editlab.lightning.recorder import RunRecorder
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
    ) -> None:
        """``log_row``: hand a row to every logger at the current step; ``stream_length``: the
        stream's steps as this run does them (the module's, from the trainer)."""
        self.evaluator = evaluator
        self.schedule = schedule
        self.recorder = recorder
        self.requests = requests
        self.log_row = log_row
        self.stream_length = stream_length

    def before(self) -> None:
        """The unedited model: every request, with the quality metrics."""
        cases, metrics = self.evaluator.evaluate(self.requests, quality=True)
        self.recorder.pre = {"cases": {c["case_id"]: c for c in cases}, "metrics": metrics}
        self.add_point("pre", metrics)

    def after_step(self, batch: list[EditRequest]) -> dict[str, float] | None:
        """What the schedule says after the step just recorded; returns the in-stream probe scores
        when they were due (the module logs them with the step's row), else None."""
        rec, t0 = self.recorder, time.perf_counter()
        what = self.schedule.after_step(rec.steps_done)
        if what == "batch":
            cases, metrics = self.evaluator.evaluate(batch, quality=False)
            rec.post_cases.update({c["case_id"]: c for c in cases})
            metrics.update(self.held_out(batch, cases))
            self.add_point("immediate", metrics)
        elif what == "so_far":
            # The stream's last point is its final evaluation: probes on their full sets.
            self.so_far("periodic", final=rec.steps_done == self.stream_length())
        probes = None
        if self.schedule.probes_after_step(rec.steps_done):
            probes = self.evaluator.probes(final=False)
            rec.add_step_values(probes)
        rec.clock.eval_seconds += time.perf_counter() - t0
        return probes

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
                **self.evaluator.quality(done_reqs),
            }
        final = {k: v for k, v in last.items() if k not in ("step", "edits", "timing")}
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
        cases, metrics = self.evaluator.evaluate(done, quality=True, final=final)
        self.recorder.post_cases = {c["case_id"]: c for c in cases}
        metrics.update(self.held_out(done, cases))
        self.add_point(timing, metrics)
        return metrics

    def held_out(self, done: list[EditRequest], cases: list[dict]) -> dict[str, float]:
        """specificity_heldout_* when some edit trained on neighbourhood prompts (NA editing)."""
        trained = self.recorder.trained_neighbours()
        return held_out_specificity(cases, done, trained) if trained else {}

    def add_point(self, timing: str, metrics: dict) -> None:
        self.recorder.add_point(timing, metrics)
        if timing != "pre":
            numeric = {f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            numeric["eval/edits"] = float(self.recorder.edits_done)
            self.log_row(numeric)
