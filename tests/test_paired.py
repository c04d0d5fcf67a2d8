"""editlab.paired: per-case differences of two runs with a paired bootstrap interval."""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest

from editlab.paired import case_values, paired_difference, read_case_records, write_case_values


def test_a_hand_checkable_difference_and_its_interval():
    a = {"1": 0.0, "2": 0.0, "3": 1.0, "4": 1.0}
    b = {"1": 1.0, "2": 0.0, "3": 1.0, "4": 1.0}  # case 1 flips to success: mean +1/4
    d = paired_difference(a, b, "efficacy_success")
    assert (d.cases, d.mean_a, d.mean_b, d.difference) == (4, 0.5, 0.75, 0.25)
    # every resample's mean is k/4 for k copies of case 1: the interval lies on that grid, inside [0, 1]
    assert 0.0 <= d.low <= d.difference <= d.high <= 1.0
    assert d.low == 0.0 and not d.excludes_zero  # a single flipped case of four is no evidence
    same = paired_difference(a, dict(a))
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)


def test_the_interval_matches_the_normal_approximation_on_many_cases():
    # differences drawn with a known spread: the bootstrap interval of their mean must be close to
    # mean ± 1.96·s/√n (a check against the textbook formula, not against editlab itself)
    rng = random.Random(1)
    n = 3000
    a = {str(i): float(rng.random() < 0.6) for i in range(n)}
    b = {str(i): float(rng.random() < 0.65) for i in range(n)}
    d = paired_difference(a, b)
    diffs = [b[k] - a[k] for k in a]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    assert d.difference == pytest.approx(mean, abs=1e-12)
    assert d.low == pytest.approx(mean - half, abs=0.15 * half)
    assert d.high == pytest.approx(mean + half, abs=0.15 * half)
    assert paired_difference(a, b) == d  # seeded: the same interval again
    assert paired_difference(a, b, seed=1) != d


def test_runs_that_scored_different_cases_are_one_error():
    with pytest.raises(ValueError, match=r"specificity_success: the runs scored different cases \(1 only in the first"):
        paired_difference({"1": 0.0, "2": 1.0}, {"1": 0.0, "3": 1.0}, "specificity_success")
    with pytest.raises(ValueError, match="no cases"):
        paired_difference({}, {})


def test_the_compact_case_file_keeps_pre_and_post_without_the_detail(tmp_path):
    records = [
        {"case_id": "7", "step": 1, "timing": "final", "pre": {"efficacy_success": 0.0},
         "post": {"efficacy_success": 1.0}, "detail": {"post": {"rewrite": [1, 2, 3]}}},
        {"case_id": "9", "step": 2, "timing": "final", "post": {"efficacy_success": 0.5}, "detail": {}},
    ]  # fmt: skip
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = write_case_values(tmp_path / "cases.jsonl", tmp_path / "out" / "run.cases.jsonl.gz")
    first = out.read_bytes()
    assert write_case_values(tmp_path / "cases.jsonl", out).read_bytes() == first  # same records, same bytes
    kept = read_case_records(out)
    assert kept == [{k: r[k] for k in ("case_id", "step", "pre", "post") if k in r} for r in records]
    assert "detail" not in gzip.decompress(first).decode()
    assert case_values(kept, "efficacy_success") == {"7": 1.0, "9": 0.5}
    assert case_values(kept[:1], "efficacy_success", point="pre") == {"7": 0.0}
    with pytest.raises(KeyError, match="case '9': no pre.efficacy_success"):
        case_values(kept, "efficacy_success", point="pre")
    assert read_case_records(tmp_path / "cases.jsonl") == records  # the run directory's own file reads too


def test_probe_values_are_one_tasks_correct_flags_and_an_unknown_task_is_an_error():
    from editlab.paired import probe_values

    records = [
        {"case_id": "sst2/0", "task": "sst2", "pre": {"correct": 1}, "post": {"correct": 0}},
        {"case_id": "sst2/1", "task": "sst2", "pre": {"correct": 0}, "post": {"correct": 1}},
        {"case_id": "cola/0", "task": "cola", "pre": {"correct": 1}, "post": {"correct": 1}},
    ]
    assert probe_values(records, "sst2") == {"sst2/0": 0.0, "sst2/1": 1.0}
    assert probe_values(records, "sst2", point="pre") == {"sst2/0": 1.0, "sst2/1": 0.0}
    with pytest.raises(KeyError, match="probe task 'mrpc': no examples"):
        probe_values(records, "mrpc")
