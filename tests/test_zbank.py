"""``editlab zbank``: z on θ₀ of a config's NSE (or ECE as released) computed ahead, into its z bank,
with the keys a run's steps use: a run with that bank takes those steps' z from it and ends with
the same weights as a run that computed them itself. Methods whose z cannot be computed ahead are
refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from editlab.cli import main
from editlab.lightning.cli import EditLabCLI

from helpers import SHARED_DATA, tiny_args

DATA = str(SHARED_DATA / "multi_counterfact.json.gz")


def nse_args(tmp: Path, bank: Path, run: str = "run", **extra: str) -> list[str]:
    """A tiny NSE (every neuron, no filtering: one pass) of 2 steps of 2 edits, its z in ``bank``."""
    options = {"--model.export": "true", "--model.evaluation.fluency": "false", "--model.method.z_cache": str(bank)}
    args = tiny_args(tmp, DATA, method="editlab.editing.methods.nse.NSE", **options, **extra)
    args[args.index("--trainer.default_root_dir") + 1] = str(tmp / run)
    return [*args, "--model.method.alpha", "0.0", "--model.method.max_iterations", "2"]


def zbank(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(["zbank", *args])
    return info.value.code


def steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def test_zbank_fills_the_z_a_run_then_takes_and_the_run_ends_the_same(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    bank = tmp_path / "bank"
    # The second step's records only (offset 2 = one step of 2), as a helper beside the run would.
    assert zbank(nse_args(tmp_path, bank, **{"--data.offset": "2", "--data.num_edits": "2"})) == 0
    assert "zbank step 1/1: 2 requests, 0 already there, 2 computed" in capsys.readouterr().err
    assert len(list(bank.glob("z_l1_*.pt"))) == 2
    assert zbank(nse_args(tmp_path, bank, **{"--data.offset": "2", "--data.num_edits": "2"})) == 0
    assert "2 already there, 0 computed" in capsys.readouterr().err  # nothing twice
    EditLabCLI(args=["fit", *nse_args(tmp_path, bank, "with_bank")])
    assert [row["z_from_cache"] for row in steps(tmp_path / "with_bank")] == [0, 2]
    EditLabCLI(args=["fit", *nse_args(tmp_path, tmp_path / "own_bank", "alone")])
    assert [row["z_from_cache"] for row in steps(tmp_path / "alone")] == [0, 0]
    da = load_file(tmp_path / "with_bank" / "edit_delta.safetensors")
    db = load_file(tmp_path / "alone" / "edit_delta.safetensors")
    assert set(da) == set(db) and all(torch.equal(da[k], db[k]) for k in da)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (("editlab.editing.methods.nse.NSE", "editlab.editing.methods.memit.MEMIT"), "takes no z on θ₀"),
        (("--model.method.alpha", "--model.method.rewind"), "rewind true"),
    ],
)
def test_zbank_refuses_a_method_whose_z_cannot_be_computed_ahead(tmp_path, monkeypatch, capsys, change, said):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    args = nse_args(tmp_path, tmp_path / "bank")
    old, new = change
    i = args.index(old)
    args[i] = new
    if old == "--model.method.alpha":
        args[i + 1] = "false"
    else:  # MEMIT has none of NSE's options
        args = args[: args.index("--model.method.z_cache")] + args[args.index("--model.method.z_cache") + 2 :]
        args = args[: args.index("--model.method.alpha")]
    assert zbank(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("editlab: error: ") and said in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bank").exists() and not (tmp_path / "cache" / "stats").exists()  # before any work


def test_ece_as_released_fills_its_z_ahead_and_two_step_is_refused(tmp_path, stats_cache):
    from helpers import facts, make_ece

    ctx, released = make_ece(tmp_path, z_mode="per_request")
    assert released.fill_z(ctx, facts()) == 0 and released.fill_z(ctx, facts()) == len(facts())
    _, two_step = make_ece(tmp_path, z_mode="two_step")
    with pytest.raises(ValueError, match="clusters of the edited weights"):
        two_step.check_fill_z()
