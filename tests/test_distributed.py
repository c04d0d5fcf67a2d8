"""Multi-process editing: work shares, gathering, and a 2-process CPU (gloo) run that edits
exactly what the 1-process run edits."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_cli import run_cli, tiny_args

from benchmarks.same_edit import compare
from editlab.cli import wants_several_processes
from editlab.distributed import Ranks, _assemble, map_rows

from conftest import SHARED_DATA


@pytest.mark.parametrize("n, world", [(10, 3), (2, 3), (7, 2), (0, 2)])
def test_contiguous_shares_cover_every_index_once(n, world):
    shares = [Ranks(r, world).contiguous_share(n) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_group_shares_keep_groups_whole_and_balance_load():
    groups = [[0, 1, 2, 3], [4], [5, 6], [7, 8, 9]]
    shares = [Ranks(r, 2).group_share(groups) for r in range(2)]
    assert sorted(i for s in shares for i in s) == list(range(10))
    for g in groups:
        assert sum(set(g) <= set(s) for s in shares) == 1  # each group on exactly one rank
    assert sorted(map(len, shares)) == [5, 5]


def test_assemble_puts_rows_back_in_request_order():
    indices = [[1, 3], [], [0, 2]]
    parts = [torch.tensor([[1.0], [3.0]]), None, torch.tensor([[0.0], [2.0]])]
    assert _assemble(parts, indices, 4).squeeze(1).tolist() == [0.0, 1.0, 2.0, 3.0]
    pairs = [(p, p * 10) if p is not None else None for p in parts]
    a, b = _assemble(pairs, indices, 4)
    assert b.squeeze(1).tolist() == [0.0, 10.0, 20.0, 30.0]


def test_one_rank_is_a_plain_call():
    seen = []
    out = map_rows(Ranks(), 3, lambda idx: seen.append(idx) or torch.tensor(idx), "cpu")
    assert seen == [[0, 1, 2]] and out.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "devices, nodes, several",
    [(1, 1, False), (2, 1, True), ("2", 1, True), ("auto", 1, False), ([0, 1], 1, True), ("0,", 1, False),
     (-1, 1, True), (1, 2, True)],
)  # fmt: skip
def test_which_trainer_settings_launch_several_processes(devices, nodes, several):
    assert wants_several_processes(devices, nodes) is several


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks = Ranks(rank, world)
        calls = []

        def rows(idx):
            calls.append(list(idx))
            return torch.tensor(idx, dtype=torch.float64)[:, None] * torch.ones(1, 3, dtype=torch.float64), len(idx)

        x, count = map_rows(ranks, 5, rows, "cpu", groups=[[0, 4], [1], [2, 3]])
        total = ranks.all_reduce_sum(torch.full((2,), float(rank + 1)))
        out[rank] = (calls, x.tolist(), count, total.tolist())
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_share_and_gather():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gather_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        out = dict(out)
    assert out[0][1] == out[1][1] == [[float(i)] * 3 for i in range(5)]  # every rank holds every row, in order
    assert sorted(i for r in (0, 1) for i in out[r][0][0]) == list(range(5))  # each row computed once
    assert out[0][3] == out[1][3] == [3.0, 3.0]


@pytest.mark.parametrize("method", ["memit", "ece"])
def test_two_process_cpu_run_edits_like_one_process(tmp_path, method):
    data = str(SHARED_DATA / "multi_counterfact.json.gz")
    extra = {"--model.export": "true", "--data.num_edits": "6", "--data.edits_per_step": "3"}
    if method == "ece":
        extra |= {
            "--model.method": "editlab.editing.methods.ece.ECE",
            "--model.method.z_mode": "two_step",  # clusters stay whole on one rank: the harder case
            "--model.method.shared_steps": "3",
            "--model.method.instance_steps": "1",
            "--model.method.clusters": "2",
        }
    runs = {}
    for devices in (1, 2):
        root = tmp_path / f"d{devices}"
        root.mkdir()
        args = tiny_args(root, data, **extra, **{"--trainer.devices": str(devices)})
        proc = run_cli(args, root, timeout=900)  # two processes share two cores here
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[devices] = root / "run"
    same = compare(runs[1], runs[2])  # the edit_delta.safetensors of both, and their summaries
    diff, changed = same["max_abs_delta_difference"], same["largest_edit"]
    print(f"\n{method}: 1 vs 2 processes, max |ΔW| difference {diff:.3e} (largest edit {changed:.3e})")
    assert changed > 1e-3  # the runs did edit
    assert diff < 1e-5 * max(changed, 1.0)
    # every metric (efficacy, generalization, specificity, perplexity, ...), edits and steps
    assert same["metrics_compared"] >= 10 and same["metrics_differing"] == {}
    s2 = json.loads((runs[2] / "summary.json").read_text())
    assert s2["steps"] == 2
    if method == "ece":  # the variant's name, in summary.json and the loggers' hyperparameters (W&B config)
        assert s2["method"] == "ECE-two-step"
        assert "method_name: ECE-two-step" in (runs[2] / "hparams.yaml").read_text()
    assert "estimated memory per device" in proc.stderr  # printed before the run starts
