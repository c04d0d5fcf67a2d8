"""Multi-process editing: work shares, gathering, and a 2-process CPU (gloo) run that edits
exactly what the 1-process run edits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.same_edit import compare
from editlab.distributed import Ranks, assemble_rows, map_rows
from editlab.lightning.cli import wants_several_processes
from editlab.lightning.editstate import EditStateError, check_same_resume_point, resume_point
from editlab.runlock import is_rank_zero_process, lock_path, parse_lock

from helpers import REPO, SHARED_DATA, hold_lock, run_cli, tiny_args


def test_the_strategy_waits_out_rank_zeros_evaluation_unless_told_otherwise(monkeypatch):
    # Rank 0 evaluates alone while the others wait in a collective: Lightning's 30-minute
    # process-group timeout would end a run whose evaluation takes longer.
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from editlab.lightning.strategy import EVALUATION_WAIT, EditStrategy

    seen = []
    monkeypatch.setattr(DDPStrategy, "setup_distributed", lambda self: seen.append(self._timeout))
    EditStrategy().setup_distributed()
    EditStrategy(timeout=timedelta(hours=2)).setup_distributed()
    assert seen == [EVALUATION_WAIT, timedelta(hours=2)] and EVALUATION_WAIT >= timedelta(hours=6)


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
    assert assemble_rows(parts, indices, 4).squeeze(1).tolist() == [0.0, 1.0, 2.0, 3.0]
    pairs = [(p, p * 10) if p is not None else None for p in parts]
    a, b = assemble_rows(pairs, indices, 4)
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


@pytest.mark.slow  # starts processes
def test_two_gloo_processes_share_and_gather():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gather_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        out = dict(out)
    assert out[0][1] == out[1][1] == [[float(i)] * 3 for i in range(5)]  # every rank holds every row, in order
    assert sorted(i for r in (0, 1) for i in out[r][0][0]) == list(range(5))  # each row computed once
    assert out[0][3] == out[1][3] == [3.0, 3.0]


def _resume_worker(rank: int, port: int, points: list, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=len(points))
    try:
        gathered = Ranks(rank, len(points)).all_gather_object(points[rank])
        try:
            check_same_resume_point(gathered, "run/checkpoints/edit_state.pt")
            out[rank] = "ok"
        except EditStateError as err:
            out[rank] = str(err)
    finally:
        torch.distributed.destroy_process_group()


def test_resume_point_of_an_edit_state():
    assert resume_point(None) is None
    assert resume_point({"steps_done": 3, "edits_done": 6, "final": False, "deltas": {}}) == (3, 6, False)


@pytest.mark.parametrize(
    "points, bad_rank",
    [([None, None], None), ([(2, 4, False)] * 3, None), ([(2, 4, False), None], 1), ([None, (2, 4, False)], 1),
     ([(2, 4, False), (2, 4, False), (1, 2, False)], 2), ([(2, 4, True), (2, 4, False)], 1)],
)  # fmt: skip
def test_every_rank_must_resume_from_rank_zeros_point(points, bad_rank):
    if bad_rank is None:
        check_same_resume_point(points, "run/checkpoints/edit_state.pt")
        return
    with pytest.raises(EditStateError, match=rf"rank 0 .*, rank {bad_rank} .*file system all nodes share"):
        check_same_resume_point(points, "run/checkpoints/edit_state.pt")


@pytest.mark.slow  # starts processes
def test_a_node_without_the_edit_state_stops_every_rank():
    """A second node that cannot see the run directory (no edit state: it would start over while
    rank 0 continues) makes both ranks raise the same error, rather than one edit a mixed batch or
    hang in a collective."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_resume_worker, args=(_free_port(), [(2, 4, False), None], out), nprocs=2, join=True)
        out = dict(out)
    assert out[0] == out[1]
    assert out[0].startswith("run/checkpoints/edit_state.pt: rank 0 continues after step 2 (4 edits), rank 1 found "
                             "no edit state and starts from the first step")  # fmt: skip


@pytest.mark.slow  # starts processes
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


@pytest.mark.parametrize(
    "env, zero",
    [({}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0", "RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
     ({"NODE_RANK": "1"}, False), ({"GROUP_RANK": "1"}, False), ({"RANK": "3"}, False),
     ({"SLURM_PROCID": "0", "SLURM_NODEID": "0"}, True), ({"SLURM_PROCID": "2", "SLURM_NODEID": "1"}, False),
     ({"SLURM_PROCID": "1", "SLURM_NODEID": "0", "SLURM_LOCALID": "1"}, False), ({"JSM_NAMESPACE_RANK": "1"}, False)],
)  # fmt: skip
def test_which_process_is_rank_zero_before_lightning_starts(env, zero):
    assert is_rank_zero_process(env) is zero


@pytest.mark.slow  # starts processes
def test_a_second_srun_task_shares_the_first_ones_lock(tmp_path, monkeypatch):
    """Under ``srun`` every task runs the same ``editlab fit``; only SLURM_PROCID tells them apart.
    Task 1 must not take (and so be refused) the run directory that task 0 holds."""
    from types import SimpleNamespace

    from editlab.lightning.cli import EditLabCLI

    for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    run = tmp_path / "run"
    task0 = hold_lock(run)  # a live process holding the lock, as task 0 does
    try:
        cli = SimpleNamespace()
        EditLabCLI.take_run_dir(cli, run)  # raised RunDirInUse when SLURM_PROCID was not read
        assert cli.run_lock is None
        assert parse_lock(lock_path(run).read_text())[0] == task0.pid
    finally:
        task0.kill()
        task0.wait()


def _this_checkout() -> str:
    """PYTHONPATH that imports editlab from this checkout, whatever the installed copy points to."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def _start_node(args: list[str], cwd: Path, **env_extra: str) -> subprocess.Popen:
    """One simulated machine: ``editlab fit`` in its own session (so a hang kills all its ranks)."""
    cwd.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "EDITLAB_CACHE": str(cwd / "cache"),  # each machine its own statistics cache
        "PYTHONPATH": _this_checkout(),
        **env_extra,
    }
    cmd = [sys.executable, "-m", "editlab.cli", "fit", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def _wait_nodes(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Wait for every node; a node that fails or a run past ``timeout`` kills them all (a node whose
    peer died would otherwise wait at the rendezvous for gloo's 30 minutes) and fails the test."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.returncode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            errs = [p.communicate()[1][-3000:] for p in procs]
            why = "a node failed" if failed else f"no result in {timeout:.0f} s"
            pytest.fail(f"{why}: " + "\n---\n".join(errs))
        time.sleep(0.5)
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.mark.slow  # launches 5 processes
def test_two_nodes_of_two_processes_edit_like_one_process(tmp_path):
    """``--trainer.num_nodes 2 --trainer.devices 2`` on localhost: two launchers with NODE_RANK 0/1,
    MASTER_ADDR and MASTER_PORT (what Lightning's LightningEnvironment reads), each starting its
    second rank itself, 4 gloo ranks in all. Each node has its own working directory, run
    directory and statistics cache, as machines without a shared file system would: the second
    node (global ranks 2 and 3, local ranks 0 and 1) must write nothing."""
    data = str(SHARED_DATA / "multi_counterfact.json.gz")
    # 4 requests a step: one per rank; 2 steps: the second edits on the first's shared result.
    extra = {"--model.export": "true", "--data.num_edits": "8", "--data.edits_per_step": "4", "--threads": "1"}
    args = tiny_args(tmp_path, data, **extra)  # tiny GPT-2 and corpus, saved once under tmp_path
    one = tmp_path / "one"
    one.mkdir()
    proc = run_cli(args, one, timeout=600, PYTHONPATH=_this_checkout(), OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run1 = tmp_path / "run"

    port = _free_port()
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        node_args = [*args, "--trainer.num_nodes", "2", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
        node_args[node_args.index("--trainer.default_root_dir") + 1] = str(cwd / "run")
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node)}
        procs.append(_start_node(node_args, cwd, **env))
    (out0, _), (out1, err1) = _wait_nodes(procs, timeout=900)  # four processes share two cores here

    run0 = tmp_path / "node0" / "run"
    assert out0.strip().splitlines()[-1] == str(run0 / "summary.json")
    assert "num_nodes: 2" in (run0 / "config.yaml").read_text()
    same = compare(run1, run0)  # edit_delta.safetensors of both, and their summaries
    diff, changed = same["max_abs_delta_difference"], same["largest_edit"]
    print(f"\n1 process vs 2 nodes x 2 processes: max |ΔW| difference {diff:.3e} (largest edit {changed:.3e})")
    assert changed > 1e-3  # the runs did edit
    assert diff < 1e-5 * max(changed, 1.0)  # the tolerance of the 2-process test above
    assert same["metrics_compared"] >= 10 and same["metrics_differing"] == {}
    assert json.loads((run0 / "summary.json").read_text())["steps"] == 2
    # Global rank 0 alone wrote: the second node has no run directory, no statistics cache, printed
    # no summary path; the lock was released.
    assert sorted(p.name for p in (tmp_path / "node1").iterdir()) == [], err1[-2000:]
    assert out1.strip() == ""
    assert not lock_path(run0).exists()
