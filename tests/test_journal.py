"""A stream that cannot keep its run directory keeps a journal (``model.journal``): every step's z
and every evaluation point's parts, for good. A run started from step 0 in a fresh directory with
that journal takes them from it (optimising no z, scoring no case) and ends with the same weights
and results; a journal of another stream is recomputed over, never used. ECE and NSE keep their z
on θ₀ in a z bank (``z_cache``: a directory), which serves a new run the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import editlab.editing.methods.memit as memit_module
import editlab.editing.rewind as rewind_module
import editlab.evaluation as evaluation_module
from editlab.lightning.cli import EditLabCLI
from editlab.rundir import journal_point_path, journal_step_path

from helpers import SHARED_DATA, facts, tiny_args

DATA = str(SHARED_DATA / "multi_counterfact.json.gz")
STEPS = 3


def memit_seq_args(tmp: Path, run: Path, journal: Path) -> list[str]:
    """A tiny MEMIT_seq run of 3 steps of 2 edits into ``run`` with the journal ``journal``."""
    return tiny_args(
        tmp,
        DATA,
        **{
            "--data.num_edits": str(2 * STEPS),
            "--model.method.sequential": "true",
            "--model.export": "true",
            "--model.evaluation.fluency": "false",
            "--model.journal": str(journal),
            "--trainer.default_root_dir": str(run),
        },
    )


def fit(tmp: Path, run: str, journal: Path, *extra: str) -> Path:
    EditLabCLI(args=["fit", *memit_seq_args(tmp, tmp / run, journal), *extra])
    return tmp / run


def steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def no_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if "seconds" not in k and k not in ("export_dir", "export_delta")}


@pytest.fixture
def journaled(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    journal = tmp_path / "journal"
    return fit(tmp_path, "first", journal), journal


def assert_same_deltas(a: Path, b: Path) -> None:
    da, db = load_file(a / "edit_delta.safetensors"), load_file(b / "edit_delta.safetensors")
    assert set(da) == set(db) and all(torch.equal(da[k], db[k]) for k in da)


def replays_without(tmp: Path, args: list[str], monkeypatch, module, name: str) -> Path:
    """Fit ``args`` (a run into ``tmp/run`` with a journal), then the same into ``tmp/again`` with an
    empty cache and ``module.name`` (what computes z) failing: the replay ends with the same deltas."""
    EditLabCLI(args=["fit", *args])
    monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f"{name} called although the journal holds it"))
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp / "other_machine_cache"))
    again = list(args)
    again[again.index("--trainer.default_root_dir") + 1] = str(tmp / "again")
    EditLabCLI(args=["fit", *again])
    assert_same_deltas(tmp / "run", tmp / "again")
    return tmp / "again"


def test_the_journal_keeps_every_step_and_point_after_the_run_has_finished(journaled):
    run, journal = journaled
    assert (run / "summary.json").is_file()
    for k in range(1, STEPS + 1):
        stored = torch.load(journal_step_path(journal, k), weights_only=True)
        assert stored["unit"]["step"] == k
        assert [name.split(",")[0] for name in stored["parts"]] == ["z of requests 0-1"]
        assert stored["parts"][next(iter(stored["parts"]))]["z"].shape[0] == 2  # [requests, d_model]
    for timing, steps_done in (("pre", 0), ("final", STEPS)):
        stored = torch.load(journal_point_path(journal, timing, steps_done), weights_only=True)
        assert stored["unit"]["timing"] == timing and "cases" in stored["parts"]
    assert not (run / "checkpoints" / "step_parts").exists()  # nothing in the run directory


def test_a_fresh_run_with_the_journal_computes_no_z_and_no_case_and_ends_the_same(
    journaled, tmp_path, monkeypatch, capsys
):
    first, journal = journaled

    def recomputed(*args, **kwargs):
        raise AssertionError("computed again although the journal holds it")

    monkeypatch.setattr(memit_module, "optimize_targets", recomputed)
    monkeypatch.setattr(evaluation_module, "evaluate_cases", recomputed)
    # Another machine: an empty cache, so the statistics are computed again too.
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "other_machine_cache"))
    again = fit(tmp_path, "again", journal)
    assert (tmp_path / "other_machine_cache" / "stats").is_dir()
    said = capsys.readouterr().err
    assert "editlab: evaluation (pre) took cases" in said and "from the journal" in said
    rows = steps(again)
    assert len(rows) == STEPS and all(row.get("seconds_reused", 0) > 0 for row in rows)
    assert [no_timing(r) for r in rows] == [no_timing(r) for r in steps(first)]
    assert_same_deltas(first, again)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (first, again))
    assert no_timing(sa) == no_timing(sb)


def test_a_journal_of_other_requests_is_recomputed_over(journaled, tmp_path):
    _, journal = journaled
    before = torch.load(journal_step_path(journal, 1), weights_only=True)["unit"]
    other = fit(tmp_path, "other", journal, "--data.offset", "10")
    assert all("seconds_reused" not in row for row in steps(other))
    after = torch.load(journal_step_path(journal, 1), weights_only=True)["unit"]
    assert after["requests"] != before["requests"] and after["step"] == 1


def test_a_method_whose_z_has_no_parts_journals_its_points_only_and_says_so(tmp_path, monkeypatch, capsys):
    # ECE and NSE with rewinding keep their z on θ₀ in the z cache (or a z bank), not in the parts.
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    journal = tmp_path / "journal"
    options = {"--model.journal": str(journal), "--model.evaluation.fluency": "false"}
    EditLabCLI(args=["fit", *tiny_args(tmp_path, DATA, method="editlab.editing.methods.nse.NSE", **options)])
    said = capsys.readouterr().err
    assert "takes no z through the step's parts" in said and "NSE" in said
    assert sorted(p.name for p in journal.iterdir()) == ["point_final_2.pt", "point_pre_0.pt"]


def test_pmet_keeps_its_step_targets_whole_and_a_replay_computes_none(tmp_path, monkeypatch):
    import editlab.editing.methods.pmet as pmet_module

    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    journal = tmp_path / "journal"
    options = {"--model.journal": str(journal), "--model.evaluation.fluency": "false", "--model.export": "true"}
    args = tiny_args(tmp_path, DATA, method="editlab.editing.methods.pmet.PMET", **options)
    replays_without(tmp_path, args, monkeypatch, pmet_module, "descend_offsets")
    stored = torch.load(journal_step_path(journal, 2), weights_only=True)
    assert [name.split(",")[0] for name in stored["parts"]] == ["z of requests 0-1"]
    assert {"ffn_target", "attn_shift"} <= set(next(iter(stored["parts"].values())))


def test_rome_keeps_each_request_z_and_a_replay_computes_none(tmp_path, monkeypatch):
    # 2 steps of 2 edits: each request's z on the weights the one before it left.
    import editlab.editing.methods.rome as rome_module

    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    journal = tmp_path / "journal"
    options = {"--model.export": "true", "--model.evaluation.fluency": "false", "--model.journal": str(journal)}
    drop = ("--model.method.layers", "--model.method.mom2_weight")
    args = tiny_args(tmp_path, DATA, method="editlab.editing.methods.rome.ROME", drop=drop, **options)
    again = replays_without(
        tmp_path, [*args, "--model.method.layer", "1"], monkeypatch, rome_module, "optimize_targets"
    )
    assert all(row.get("seconds_reused", 0) > 0 for row in steps(again))
    stored = torch.load(journal_step_path(journal, 2), weights_only=True)
    names = [name.split(", weights")[0] for name in stored["parts"]]
    assert names == ["z of requests 0-0, request 0 of the step", "z of requests 0-0, request 1 of the step"]


def test_nse_without_rewinding_keeps_its_z_in_the_journal_and_a_replay_computes_none(tmp_path, monkeypatch):
    # z on the current weights (the paper's ablation) cannot be cached by request: it is journaled.
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    journal = tmp_path / "journal"
    options = {"--model.evaluation.fluency": "false", "--model.export": "true", "--model.journal": str(journal)}
    args = [
        *tiny_args(tmp_path, DATA, method="editlab.editing.methods.nse.NSE", **options),
        "--model.method.rewind",
        "false",
    ]
    replays_without(tmp_path, args, monkeypatch, rewind_module, "optimize_targets")
    assert sorted(p.name for p in journal.glob("step_*.pt")) == ["step_1.pt", "step_2.pt"]


# -- the z bank of ECE and NSE -----------------------------------------------------------------
def test_nse_z_bank_directory_serves_a_new_run_without_the_cache_root(tmp_path, stats_cache, monkeypatch):
    from test_nse import NO_FILTER, make

    bank = tmp_path / "bank"
    ctx, nse = make(tmp_path, z_cache=str(bank), **NO_FILTER)
    assert nse.apply(ctx, facts()).scalars["z_from_cache"] == 0
    written = sorted(p.name for p in bank.glob("z_l*_*.pt"))
    assert len(written) == len(facts())
    assert not (stats_cache / "targets").exists()  # the bank, not the cache root
    z_first, _ = nse.targets_for(ctx, facts())
    ctx_new, again = make(tmp_path, z_cache=str(bank), **NO_FILTER)
    monkeypatch.setattr(rewind_module, "optimize_targets", lambda *a, **k: pytest.fail("z recomputed"))
    z_bank, n_cached = again.targets_for(ctx_new, facts())
    assert n_cached == len(facts()) and torch.equal(z_bank.z, z_first.z)


def test_an_empty_z_bank_name_is_refused(tmp_path, stats_cache):
    from test_nse import NO_FILTER, make

    with pytest.raises(ValueError, match="z_cache"):
        make(tmp_path, z_cache=" ", **NO_FILTER)


@pytest.mark.slow  # starts processes
def test_a_replay_in_another_process_with_an_empty_cache_ends_bit_identical(tmp_path):
    # What a study does on a replaced machine: a new process, no statistics cache, the journal only.
    from helpers import run_cli

    journal = tmp_path / "journal"
    runs = []
    for name in ("machine_a", "machine_b"):
        (tmp_path / name).mkdir()
        args = memit_seq_args(tmp_path, tmp_path / name / "run", journal)
        proc = run_cli(args, tmp_path / name)  # EDITLAB_CACHE: <name>/cache, empty at the start
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((tmp_path / name / "run", proc.stderr))
    (first, _), (again, said) = runs
    assert [f"editlab: step {k} took 1 part(s)" in said for k in range(1, STEPS + 1)] == [True] * STEPS
    assert "editlab: evaluation (final) took cases" in said
    assert_same_deltas(first, again)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (first, again))
    assert no_timing(sa) == no_timing(sb)


def test_the_journal_note_names_the_z_bank_a_restarted_run_reads():
    from types import SimpleNamespace

    from editlab.lightning.module import journal_z_note

    banked = journal_z_note(SimpleNamespace(name="ECE", z_cache="studies/lifelong_p1/zbank"))
    assert banked.startswith("ECE takes no z") and "takes its z from the z bank studies/lifelong_p1/zbank" in banked
    assert journal_z_note(SimpleNamespace(name="NSE", z_cache=True)).endswith("computes its z again")
