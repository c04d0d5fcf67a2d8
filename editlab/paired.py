"""Paired differences of two runs' per-case metrics, with a bootstrap interval.

Two runs of a study edit and score the same cases, so the question "does method B keep more
neighbourhood success than A at 2,000 edits?" is about the per-case differences b_i − a_i, not two
independent means: a paired bootstrap (resample the cases, keep each case's pair together) gives
the interval of the mean difference. The per-case values come from cases.jsonl (a run directory's
``post`` block: the final evaluation point) or from the compact copy a study keeps beside its
results JSON (:func:`write_case_values`).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from editlab.files import write_atomic
from editlab.report import load_jsonl

CASE_FILE_SUFFIX = ".cases.jsonl.gz"  # OUT/<run>.cases.jsonl.gz beside OUT/<run>.json
# OUT/<run>.probes.jsonl.gz: per-example probe outcomes, one record per example (case_id "<task>/<i>").
PROBE_FILE_SUFFIX = ".probes.jsonl.gz"


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    cases: int
    mean_a: float
    mean_b: float
    difference: float  # mean of b_i − a_i
    low: float  # bootstrap interval of the difference
    high: float
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def compact_case_records(records: list[dict]) -> list[dict]:
    """cases.jsonl's records without their per-prompt detail: case id, step, pre and post values."""
    keep = ("case_id", "step", "pre", "post")
    return [{key: record[key] for key in keep if key in record} for record in records]


def write_case_values(cases_jsonl: Path, out: Path) -> Path:
    """The compact, gzipped copy of a run's cases.jsonl (~250 KB for 2,000 cases instead of ~10 MB):
    what a paired comparison needs once the run directory is gone."""
    return write_records(compact_case_records(read_case_records(cases_jsonl)), out)


def write_records(records: list[dict], out: Path) -> Path:
    """Gzipped JSON lines, one per record, written atomically (read back by :func:`read_case_records`)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    data = gzip.compress(text.encode(), mtime=0)  # mtime 0: the same records give the same bytes
    return write_atomic(out, lambda tmp: tmp.write_bytes(data))


def read_case_records(path: Path) -> list[dict]:
    """Records of a cases.jsonl or of its compact ``.cases.jsonl.gz`` copy."""
    path = Path(path)
    if not path.name.endswith(".gz"):
        records = load_jsonl(path)
        if records is None:
            raise FileNotFoundError(f"{path}: no such case file")
        return records
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such case file")
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line.strip()]


def case_values(records: list[dict], metric: str, point: str = "post", only_present: bool = False) -> dict[str, float]:
    """{case_id: value} of ``metric`` in each record's ``point`` block ("post": the final
    evaluation, "pre": before any edit). A record without it is an error naming the case, or with
    ``only_present`` left out (fluency: only the cases generated from carry it)."""
    values = {}
    for record in records:
        block = record.get(point)
        if block is None or metric not in block:
            if only_present:
                continue
            raise KeyError(f"case {record.get('case_id')!r}: no {point}.{metric}")
        values[str(record["case_id"])] = float(block[metric])
    return values


def probe_values(records: list[dict], task: str, point: str = "post") -> dict[str, float]:
    """{example_id: 1.0 or 0.0}: whether each example of probe ``task`` was answered correctly at
    ``point``, from a per-example probe file's records (every task's examples in one file)."""
    values = case_values([r for r in records if r["task"] == task], "correct", point=point)
    if not values:
        raise KeyError(f"probe task {task!r}: no examples in the probe file")
    return values


def paired_difference(
    a: dict[str, float],
    b: dict[str, float],
    metric: str = "",
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Mean of b_i − a_i over the cases both have, with the percentile interval of ``resamples``
    bootstrap resamples of the cases (a seeded CPU generator: the same inputs give the same
    interval). The two runs must have scored the same cases."""
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(
            f"{metric or 'paired difference'}: the runs scored different cases "
            f"({len(only_a)} only in the first, e.g. {only_a[:3]}; {len(only_b)} only in the second, e.g. {only_b[:3]})"
        )
    if not a:
        raise ValueError(f"{metric or 'paired difference'}: no cases")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1; got {level}, {resamples}")
    ids = sorted(a)
    va = torch.tensor([a[i] for i in ids], dtype=torch.float64)  # [n]
    vb = torch.tensor([b[i] for i in ids], dtype=torch.float64)  # [n]
    diff = vb - va  # [n]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(ids), (resamples, len(ids)), generator=gen)  # [resamples, n]
    means = diff[picks].mean(dim=1)  # [resamples]
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return PairedDifference(metric, len(ids), va.mean().item(), vb.mean().item(), diff.mean().item(), low, high, level)
