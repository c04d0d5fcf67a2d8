"""The settings the bits of a run depend on (torch version, threads), and the formulations that
keep the edit path deterministic at a given thread count."""

import os
import subprocess
import sys

import pytest
import torch

from editlab.keyed_cache import cache_root
from editlab.numerics import numerics, numerics_differences, set_threads


def test_numerics_names_what_differs():
    now = {"torch_version": "2.13.0", "threads": 2}
    assert numerics_differences(now, dict(now)) == []
    assert numerics_differences({"torch_version": "2.13.0", "threads": 1}, now) == ["threads: 1 -> 2"]
    # A checkpoint written before the numerics were recorded: every setting is unknown.
    assert len(numerics_differences(None, now)) == 2


def test_set_threads_refuses_zero_and_reports_the_count():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == numerics()["threads"]
        assert set_threads(None) == 1  # None leaves the count as it is
        with pytest.raises(ValueError, match="threads=0"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


GATHER = """
import hashlib, torch
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
owner = torch.arange(600) % 100  # each of 100 rows feeds 6 rows, as a request feeds its templates
grad_out = torch.randn(600, 576, generator=g)
d = torch.zeros(100, 576, requires_grad=True)
(d.index_select(0, owner) * grad_out).sum().backward()
print(hashlib.md5(d.grad.numpy().tobytes()).hexdigest())
"""


@pytest.mark.slow  # launches processes
def test_the_row_gather_of_z_has_a_deterministic_gradient():
    # z's δ rows reach their template rows through index_select, whose backward (index_add) sums
    # in a fixed order; the backward of d[owner] sums with atomics and differs between processes
    # at 2 threads (seen here in 3 of 5 runs). Five processes must agree with one another and
    # with the slow, obvious sum.
    runs = {
        subprocess.run([sys.executable, "-c", GATHER], capture_output=True, text=True, check=True).stdout
        for _ in range(5)
    }
    assert len(runs) == 1
    g = torch.Generator().manual_seed(0)
    owner = torch.arange(600) % 100
    grad_out = torch.randn(600, 576, generator=g)
    by_hand = torch.stack([grad_out[owner == i].sum(0) for i in range(100)])
    d = torch.zeros(100, 576, requires_grad=True)
    (d.index_select(0, owner) * grad_out).sum().backward()
    torch.testing.assert_close(d.grad, by_hand)


def _fit_smollm2(run, cache) -> dict:
    from helpers import REPO

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "EDITLAB_CACHE": str(cache)}
    env.pop("OMP_NUM_THREADS", None)  # --threads decides
    cmd = [sys.executable, "-m", "editlab.cli", "fit", "--config", str(REPO / "configs" / "memit_seq_smollm2.yaml")]
    cmd += ["--data.num_edits", "10", "--data.edits_per_step", "5", "--seed_everything", "7", "--threads", "2"]
    cmd += ["--model.evaluation.fluency", "false", "--model.evaluation.pre", "false", "--model.progress", "false"]
    cmd += ["--model.method.init_args.covariance.num_samples", "200", "--trainer.enable_progress_bar", "false"]
    cmd += ["--trainer.default_root_dir", str(run)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: (run / name).read_bytes() for name in ("steps.jsonl", "cases.jsonl", "summary.json")}


def _without_seconds(name: str, data: bytes) -> list[dict]:
    """The rows of a result file (summary.json is one object), with every seconds value left out."""
    import json

    text = data.decode()
    rows = [json.loads(text)] if name == "summary.json" else [json.loads(line) for line in text.splitlines()]
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


@pytest.mark.slow  # two SmolLM2 editlab fit processes
def test_two_smollm2_processes_at_two_threads_write_the_same_bits(tmp_path):
    # Before the index_select gather, step 1 already differed in delta_norm's 8th digit.
    # The session's cache (conftest): the converted model is there already; a computes the statistics, b reads them.
    cache = cache_root()
    a = _fit_smollm2(tmp_path / "a", cache)
    b = _fit_smollm2(tmp_path / "b", cache)
    assert a["cases.jsonl"] == b["cases.jsonl"]  # no seconds in case records: byte-identical
    for name in ("steps.jsonl", "summary.json"):
        assert _without_seconds(name, a[name]) == _without_seconds(name, b[name]), name
    assert b'"threads": 2' in a["summary.json"]
