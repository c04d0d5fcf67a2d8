"""The benchmark scripts run end to end on a tiny model and report what they claim to."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from editlab.models.tiny import save_tiny

from helpers import REPO, SHARED_DATA, facts, tiny_memit_fit_options


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ece_z_benchmark_reports_time_and_efficacy_of_both(tmp_path: Path, stats_cache):
    ece_z = load_script("ece_z")
    model_dir = save_tiny(tmp_path / "tiny", "llama")
    out = tmp_path / "ece_z.json"
    result = ece_z.main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(SHARED_DATA / "multi_counterfact.json.gz"),
            "--n",
            "6",
            "--layers",
            "0,1",
            "--steps",
            "5",
            "--splits",
            "3+2,0+5,1+6",
            "--cov-corpus",
            "demo",
            "--cov-samples",
            "40",
            "--context-count",
            "2",
            "--context-length",
            "3",
            "--out",
            str(out),
        ]  # fmt: skip
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["requests"] == 6
    assert sum(result["cluster_sizes"]) == 6
    inst, splits = result["per_instance"], result["ece_two_step"]
    assert [(e["shared_steps"], e["instance_steps"]) for e in splits] == [(3, 2), (0, 5), (1, 6)]
    for entry in [inst, *splits]:
        assert entry["seconds"] > 0
        for key in ("efficacy_success", "efficacy_accuracy"):
            assert 0.0 <= entry[key] <= 1.0
    for entry in splits:
        for key, gap in entry["efficacy_gap_points"].items():
            assert gap == pytest.approx(100 * (inst[key] - entry[key]), abs=1e-3)
    # Same total budget: 3 + 2 two-step rounds against 5 per-instance ones.
    assert inst["steps"] == 5
    assert inst["updates_max"] <= 4
    # The two-step optimisation pushes fewer rows through the model than per-instance z.
    assert splits[0]["row_forward_ratio"] > 1.0
    # 0 + 5 is per-instance z with the same 5 rounds: the same z, the same efficacy, the same rows.
    assert splits[1]["z_relative_gap_mean"] < 1e-4
    assert splits[1]["efficacy_gap_points"] == {"efficacy_success": 0.0, "efficacy_accuracy": 0.0}
    assert splits[1]["row_forward_ratio"] == 1.0
    # The fastest split at equal efficacy is one of them (0 + 5 always qualifies), and the fastest.
    best = result["fastest_at_equal_efficacy"]
    assert best is not None and best["split"] in {"3+2", "0+5", "1+6"}
    equal = [e for e in splits if max(e["efficacy_gap_points"].values()) <= 2.0]
    assert best["speedup"] == max(e["speedup"] for e in equal)


def test_ece_z_benchmark_rejects_a_malformed_split():
    ece_z = load_script("ece_z")
    for bad in ("20-5", "20+5,20+5", "0+0", "a+b"):
        with pytest.raises(SystemExit):
            ece_z.parse_args(["--splits", bad])
    assert ece_z.parse_splits("20+5, 10+15") == [(20, 5), (10, 15)]


def test_ece_z_equal_efficacy_counts_float32_fractions_exactly():
    """0.97 and 0.95 of 100 requests, read back from float32, are 2 points apart, not 2.000004:
    the fastest split within 2 points is the one 2 points below, and none when the tolerance is 1."""
    ece_z = load_script("ece_z")
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    inst = {"efficacy_success": f32(0.97), "efficacy_accuracy": f32(0.74)}
    splits = [
        {"shared_steps": 20, "instance_steps": 5, "seconds": 1.0, "speedup": 3.0}
        | {"efficacy_success": f32(0.61), "efficacy_accuracy": f32(0.22)},
        {"shared_steps": 5, "instance_steps": 20, "seconds": 2.0, "speedup": 1.5}
        | {"efficacy_success": f32(0.95), "efficacy_accuracy": f32(0.72)},
        {"shared_steps": 0, "instance_steps": 25, "seconds": 3.0, "speedup": 1.0}
        | {"efficacy_success": f32(0.97), "efficacy_accuracy": f32(0.75)},
    ]
    assert 100 * (inst["efficacy_success"] - splits[1]["efficacy_success"]) > 2.0  # the float32 artefact
    assert ece_z.fastest_at_equal_efficacy(inst, splits, 2.0) == {"split": "5+20", "speedup": 1.5}
    assert ece_z.fastest_at_equal_efficacy(inst, splits, 1.0) == {"split": "0+25", "speedup": 1.0}
    assert ece_z.fastest_at_equal_efficacy(inst, splits[:1], 2.0) is None


def test_reference_z_equals_editlab_z_on_one_request(tiny_llama):
    """The slow reference z (one request, full logits, whole forwards, torch Adam) and editlab's
    batched, prefix-cached z land on the same vector: both pipelines optimise the same loss."""
    from benchmarks import reference
    from editlab.editing.targets import TargetConfig, optimize_targets
    from editlab.models.arch import ModelView

    model, tok = tiny_llama
    view = ModelView.of(model)
    reqs = facts()[:3]
    templates = ["{}", "Hello. {}"]
    cfg = TargetConfig(lr=0.5, steps=6, early_stop_loss=1e-9)
    batched = optimize_targets(view, tok, reqs, templates, 1, cfg, progress=False)
    for i, req in enumerate(reqs):
        z, _, nll, updates = reference.z_one_request(view, tok, req, templates, 1, cfg)
        assert updates == int(batched.steps[i]) == 5
        torch.testing.assert_close(z, batched.z[i], rtol=1e-4, atol=1e-4)
        assert abs(nll - float(batched.nll[i])) < 1e-3


def test_reference_covariance_keys_and_solve_equal_editlab(tiny_llama):
    from benchmarks import reference
    from editlab.data.sources import load_requests
    from editlab.editing.keys import keys_and_outputs
    from editlab.editing.solve import memit_delta
    from editlab.editing.stats import CovarianceConfig, accumulate_second_moments, read_corpus
    from editlab.models.arch import ModelView

    model, tok = tiny_llama
    view = ModelView.of(model)
    cfg = CovarianceConfig(corpus="demo", num_samples=30, max_length=32, batch_size=8, use_cache=False)
    texts, _ = read_corpus(cfg)
    mine = accumulate_second_moments(view, tok, texts, [0, 1], cfg, progress=False)
    ref = reference.covariance(view, tok, texts, [0, 1], 32, 8)
    for layer in (0, 1):
        torch.testing.assert_close(mine[layer].mean(), ref[layer], rtol=1e-6, atol=1e-9)
    reqs = load_requests(str(SHARED_DATA / "multi_counterfact.json.gz"), num_edits=4)
    templates = ["{}", "Hello. {}", "Good morning to you all. {}"]  # 3: per-type and flat means differ
    k1, h1 = keys_and_outputs(view, tok, reqs, templates, 0, 1)
    k2, h2 = reference.keys_and_outputs(view, tok, reqs, templates, 0, 1)
    torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-6)
    resid = torch.randn(4, h1.shape[1], dtype=torch.float64)
    p = ref[0] * 10
    torch.testing.assert_close(memit_delta(k1, resid, p), reference.solve(k1, resid, p))


def test_pipeline_benchmark_reports_every_stage_and_method(tmp_path: Path):
    from benchmarks import pipeline

    model_dir = save_tiny(tmp_path / "tiny", "gpt2")
    out = tmp_path / "pipeline.json"
    report = pipeline.main(
        [
            "--model",
            str(model_dir),
            "--n",
            "4",
            "--layers",
            "0,1",
            "--steps",
            "4",
            "--context-count",
            "2",
            "--context-length",
            "3",
            "--cov-corpus",
            "demo",
            "--cov-samples",
            "24",
            # every request above alpha and below the bound: NSE must make at least one pass
            "--nse-alpha",
            "0",
            "--nse-upper-bound",
            "1e9",
            "--out",
            str(out),
        ]  # fmt: skip
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["methods"]) == {"memit", "reference", "ece", "nse"}
    for name in ("memit", "reference"):
        assert set(report["methods"][name]["seconds"]) == {"z", "keys", "solve", "total"}
    assert report["covariance"]["max_relative_difference"] < 1e-6
    assert report["covariance"]["tokens"] > 24
    # Same loss and rules: the two MEMIT pipelines reach the same efficacy on the same requests.
    assert report["methods"]["memit"]["efficacy_success"] == report["methods"]["reference"]["efficacy_success"]
    assert set(report["ratios"]) >= {"reference_over_editlab_memit", "editlab_memit_z_over_ece_z", "reference_over_nse"}
    # NSE's z is MEMIT's z on the unedited weights (restored between methods), then its own passes.
    nse = report["methods"]["nse"]
    assert nse["z_nll_mean"] == pytest.approx(report["methods"]["memit"]["z_nll_mean"], rel=1e-5)
    assert nse["passes"] >= 1 and set(nse["seconds"]) == {"z", "passes", "total"}


def test_iterative_benchmark_holds_out_exactly_the_neighbour_prompts_used():
    held_out = load_script("iterative_memit").held_out
    reqs = [
        type("R", (), {"neighborhood_prompts": ["a is", "b is", "c is"], "target_true": "x"})(),
        type("R", (), {"neighborhood_prompts": ["d is"], "target_true": "y"})(),
    ]
    assert held_out(reqs, [[], []]) == [("a is", "x"), ("b is", "x"), ("c is", "x"), ("d is", "y")]
    # The first request trained on "b is"; the second had no qualifying neighbour.
    assert held_out(reqs, [["b is"], []]) == [("a is", "x"), ("c is", "x"), ("d is", "y")]


@pytest.mark.slow  # launches five editlab fit processes (about a minute on 2 CPU cores)
def test_soak_killed_three_times_ends_identical_to_the_uninterrupted_run(tmp_path: Path, stats_cache):
    """benchmarks/soak.py on a tiny model: a run killed in a step, in a checkpoint write and in the
    final evaluation, resumed each time, ends with every compared file identical to a run left alone."""
    import gzip

    from benchmarks import soak

    save_tiny(tmp_path / "tiny", "gpt2")
    with gzip.open(SHARED_DATA / "multi_counterfact.json.gz", "rt") as f:
        (tmp_path / "data.json").write_text(json.dumps(json.load(f)[:7]))
    (tmp_path / "corpus.txt").write_text("\n".join(f"Sentence {i} talks about cities and people." for i in range(20)))
    fit = {
        # periodic every 3 of 7 steps: evaluations inside steps, and a final one of its own
        **tiny_memit_fit_options(tmp_path),
        "--data.path": str(tmp_path / "data.json"),
        "--trainer.enable_progress_bar": "false",
    }
    out = tmp_path / "soak.json"
    argv = ["--num-edits", "7", "--edits-per-step", "1", "--kills", "3", "--seed", "0", "--threads", "1"]
    argv += ["--out", str(out), "--dir", str(tmp_path / "soak"), *[x for kv in fit.items() for x in kv]]
    status = soak.main(argv)
    result = json.loads(out.read_text())
    assert status in (0, 2), (
        result
    )  # 2: identical, but a moment was never hit (a checkpoint write can be quicker than the watcher)
    assert result["identical"] and all(f["identical"] for f in result["files"].values()), result["files"]
    assert set(result["files"]) >= {
        "steps.jsonl",
        "cases.jsonl",
        "curve.jsonl",
        "summary.json",
        "edit_delta.safetensors",
    }
    assert result["steps"] == 7 and result["threads"] == 1 and len(result["commit"]) == 40
    kills = result["kills"]
    assert len(kills) == 3 and len({k["phase"] for k in kills}) >= 2, kills
    assert all(r["as_expected"] for r in result["resumes"]) and len(result["resumes"]) == 3
    assert {"step", "final_eval", "final_write"} & set(result["phases_hit"]), kills


def test_gpu_check_tiny_cpu_run_writes_its_report(tmp_path):
    """``python -m benchmarks.gpu_check --device cpu --tiny``: every method in both dtypes, stage
    seconds, estimates, no problems (peak memory is CUDA's only: None on the CPU)."""
    import json

    from benchmarks import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and report["problems"] == []
    assert set(report["dtypes"]) == {"bfloat16", "float32"}
    for res in report["dtypes"].values():
        assert res["covariance_seconds"] > 0 and res["requests"] == 4
        assert set(res["methods"]) == set(gpu_check.METHODS)
        for name, run in res["methods"].items():
            assert run["error"] is None and run["finite"] and 0 <= run["efficacy"] <= 1
            assert run["peak_bytes"] is None and run["estimate_bytes"] > 0
            assert {"z", "evaluation"} <= set(run["seconds"])
            assert {"keys", "solve"} <= set(run["seconds"]) if name == "memit" else "spread" in run["seconds"]
    assert report["cpu_figures"]["methods"]["memit"]["z"] > 0


def test_gpu_check_builds_each_method_with_its_smollm2_config_settings():
    """The check edits with what a SmolLM2 run uses, not the classes' defaults (a first H200 run
    built NSE with upper_bound 100, GPT-J's scale: efficacy 0.65 against 1.00)."""
    import yaml

    from benchmarks import gpu_check

    layers = [4, 5, 6, 7, 8]
    contexts = set()
    for name in gpu_check.METHODS:
        init = yaml.safe_load(gpu_check.CONFIGS[name].read_text())["model"]["method"]["init_args"]
        method = gpu_check.make_method(name, layers, tiny=False)
        assert method.edited_layers() == layers
        assert getattr(method, "z_cache", False) is False
        for key in ("mom2_weight", "upper_bound", "alpha", "max_iterations", "nullspace_threshold", "l2", "z_mode"):
            if key in init:
                assert getattr(method, key) == init[key], (name, key)
        if "neurons" in init:
            assert method.neurons.threshold == init["neurons"]["init_args"]["threshold"], name
        assert method.targets.steps == init["targets"]["steps"] and method.targets.lr == init["targets"]["lr"]
        contexts.add((method.context.count, method.context.length))
    assert len(contexts) == 1  # one set of context templates serves every method
    assert gpu_check.make_method("nse", layers, tiny=False).upper_bound == 150.0  # the class default is 100
    tiny = gpu_check.make_method("ece", [1, 2], tiny=True)
    assert tiny.edited_layers() == [1, 2] and (tiny.context.count, tiny.context.length) == (2, 5)


def test_gpu_check_flags_what_is_off():
    from benchmarks.gpu_check import problems

    def run(**kw):
        return {"error": None, "finite": True, "efficacy": 0.9, "peak_bytes": 10, "estimate_bytes": 20, **kw}

    report = {
        "dtypes": {
            "bfloat16": {"methods": {"memit": run(efficacy=0.7), "ece": run(peak_bytes=30), "nse": run(finite=False)}},
            "float32": {"methods": {"memit": run(), "ece": run(), "nse": run(error="RuntimeError: x")}},
        }
    }
    found = problems(report, tolerance=0.05)
    assert any("memit: bf16 efficacy 0.700 is 0.200 below" in p for p in found)
    assert any("ece bfloat16: peak" in p for p in found)
    assert "nse bfloat16: non-finite edited weights" in found and "nse float32: RuntimeError: x" in found


def test_soak_plan_covers_every_phase_and_kills_are_placed_by_what_the_process_left(tmp_path):
    import os
    import random

    from benchmarks import soak
    from editlab import rundir

    for seed in range(20):
        plan = soak.plan_kills(5, 10, random.Random(seed))
        assert {t["phase"] for t in plan} == {"step", "checkpoint", "final"}
        assert plan[-1]["phase"] == "final" and [t["phase"] for t in plan].count("final") == 1
        assert [t["step"] for t in plan] == sorted(t["step"] for t in plan)  # in the order they occur
    assert soak.plan_kills(5, 10, random.Random(3)) == soak.plan_kills(5, 10, random.Random(3))
    ev = lambda event, step: {"event": event, "step": step, "t": 0.0}  # noqa: E731
    stream = [ev("start", 4), ev("forward", 4), ev("end", 4), ev("start", 5)]
    assert soak.landed(stream, True, False, False) == ("checkpoint", 4)  # its temporary file is left
    assert soak.landed(stream[:2], False, False, False) == ("step", 4)
    assert soak.landed(stream, False, False, False) == ("after_start", 5)  # neither: not counted as covered
    final = [ev("end", 7), ev("final", 7), ev("final_eval", 7)]
    assert soak.landed(final, False, False, False) == ("final_eval", 7)
    assert soak.landed(final, False, True, False) == ("final_write", 7)
    assert soak.landed(final, False, True, True) == ("after_results", 7)
    assert [soak.expected_resume(p, 4) for p in ("step", "checkpoint", "final_eval", "after_start")] == [3, 3, 4, None]
    # The final kill's moment scales with this attempt's pace against the full run's steps.
    timings = {"step": {1: 10.0, 2: 10.0}, "final_eval": 100.0, "steps": 2}
    at = lambda event, step, t: {"event": event, "step": step, "t": t, "wall": 1000.0 + t}  # noqa: E731
    quick = [at("forward", 1, 0.0), at("end", 1, 5.0), at("forward", 2, 5.0), at("end", 2, 10.0)]
    assert soak.pace(quick, timings) == 0.5 and soak.pace([], timings) == 1.0
    target = {"phase": "final", "step": 2, "fraction": 0.5}
    events = [*quick, at("final_eval", 2, 20.0)]
    assert soak.decide(target, events, Path("/nonexistent"), Path("/nonexistent.tmp"), timings, 44.0) == "wait"
    assert target["deadline"] == 20.0 + 0.5 * 100.0 * 0.5
    assert soak.decide(target, events, Path("/nonexistent"), Path("/nonexistent.tmp"), timings, 45.0) == "kill"
    # Before the deadline, an evaluation part saved since the evaluation began is a moment inside it.
    run_dir = tmp_path / "run"
    parts = run_dir / rundir.EVALUATION_PARTS
    parts.parent.mkdir(parents=True)
    parts.write_bytes(b"x")
    os.utime(parts, (1019.0, 1019.0))  # kept before this evaluation (at wall 1020): not one of its parts
    target = {"phase": "final", "step": 2, "fraction": 0.5}
    assert soak.decide(target, events, run_dir, run_dir / "x.tmp", timings, 21.0) == "wait"
    os.utime(parts, (1020.5, 1020.5))
    assert soak.decide(target, events, run_dir, run_dir / "x.tmp", timings, 21.0) == "kill"
    assert target["trigger"] == "evaluation_part"
    dropped = set()
    row = {"step": 1, "seconds": 2.0, "edit": {"z_seconds": 1.0, "n": [{"seconds_x": 0}]}, "export_dir": "x"}
    assert soak.strip(row, dropped) == {"step": 1, "edit": {"n": [{}]}}
    assert dropped == {"seconds", "z_seconds", "seconds_x", "export_dir"}


def test_determinism_cost_benchmark_times_both_gathers_and_checks_their_gradients(tmp_path):
    from benchmarks import determinism_cost

    out = tmp_path / "dc.json"
    res = determinism_cost.main(["--tiny", "--repeats", "2", "--inner", "2", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    # Both gathers give the per-request sum of their rows' gradients; on one thread, bit for bit.
    assert res["max_grad_difference"] == 0.0
    assert set(res["gather_seconds"]) == {"advanced_index", "index_select"}
    assert all(s > 0 for s in res["gather_seconds"].values()) and res["z_iteration_seconds"] > 0
    assert res["shapes"]["rows"] == res["shapes"]["requests"] * 6


def tiny_memit_config(tmp_path: Path) -> Path:
    """An editlab fit config of MEMIT on the tiny Llama's layers 0 and 1 (z options of the SmolLM2
    config but 5 steps and clamp factor 10, 2 short context templates, covariance from the demo
    corpus). The tiny model's residual is short: at 0.75 one Adam step of lr 0.5 already reaches
    the clamp, at 10 the reference setting stays inside it."""
    model_dir = save_tiny(tmp_path / "tiny", "llama")
    targets = {"lr": 0.5, "steps": 5, "clamp_norm_factor": 10.0, "weight_decay": 0.5, "kl_factor": 0.0625}
    config = {
        "model": {
            "model": str(model_dir),
            "dtype": "float32",
            "seed": 0,
            "method": {
                "class_path": "editlab.editing.methods.memit.MEMIT",
                "init_args": {
                    "layers": [0, 1],
                    "mom2_weight": 1.0,
                    "sequential": True,
                    "targets": targets,
                    "context": {"count": 2, "length": 3},
                    "covariance": {"corpus": "demo", "num_samples": 40},
                },
            },
        }
    }
    path = tmp_path / "tiny_memit.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_z_setting_benchmark_times_each_setting_and_scores_the_memit_step_it_gives(tmp_path: Path, stats_cache):
    from benchmarks import z_setting
    from editlab.data.sources import load_requests
    from editlab.editing.methods.base import EditContext
    from editlab.evaluation import editing_metrics, evaluate_cases
    from editlab.models.arch import ModelView
    from editlab.models.fingerprint import model_fingerprint
    from editlab.models.load import load_model_and_tokenizer

    config = tiny_memit_config(tmp_path)
    out = tmp_path / "z_setting.json"
    data = str(SHARED_DATA / "multi_counterfact.json.gz")
    settings = ["lr=0.5,steps=5", "lr=0.5,steps=2", "lr=50,steps=5"]
    argv = ["--config", str(config), "--data", data, "--n", "6", "--repeats", "2", "--out", str(out)]
    result = z_setting.main([*argv, "--settings", *settings])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["config"]["reference_is_config"] is True
    entries = {e["setting"]: e for e in result["settings"]}
    assert list(entries) == ["lr=0.5,steps=5", "lr=0.5,steps=2", "lr=50,steps=5"]
    for label, e in entries.items():
        # Two rounds, the second in reverse order: the last setting ran last, then first.
        assert [r["round"] for r in e["runs"]] == [0, 1]
        assert all(r["cpu_seconds"] > 0 and r["wall_seconds"] > 0 for r in e["runs"])
        assert sum(e["updates_histogram"].values()) == 6
        assert e["updates_max"] <= e["steps"] - 1  # the last forward only measures
        assert e["shift_over_clamp_max"] <= 1 + 1e-5  # the clamp holds
        assert result["z_identical_across_repeats"][label] is True
        for key in z_setting.METRICS:
            assert 0.0 <= e[key] <= 1.0
            assert e["gap_points"][key] == pytest.approx(100 * (result["settings"][0][key] - e[key]), abs=1e-3)
    assert result["weights_restored"] is True
    # Two steps allow one update: less work than five.
    assert entries["lr=0.5,steps=2"]["updates_max"] <= 1
    assert entries["lr=0.5,steps=2"]["row_forwards"] < entries["lr=0.5,steps=5"]["row_forwards"]
    # Adam's first step moves every coordinate by ~lr: at lr 50 every shift is projected onto the clamp.
    assert entries["lr=50,steps=5"]["fraction_at_clamp"] == 1.0
    assert entries["lr=0.5,steps=5"]["fraction_at_clamp"] < 1.0

    # The reference's scores are those of one real MEMIT step (MEMIT.apply, no sequential cache) on
    # a fresh copy of the model: the benchmark's z and update are the runs' own.
    block, memit = z_setting.method_from_config(config)
    model, tok = load_model_and_tokenizer(block["model"], "float32", "cpu")
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, block["model"], model_fingerprint(model), 0, progress=False)
    memit.setup(ctx)
    assert memit.templates == result["config"]["templates"]
    requests = load_requests(data, num_edits=6)
    memit.apply(ctx, requests)
    applied = editing_metrics(evaluate_cases(view, tok, requests))
    for key in z_setting.METRICS:
        assert entries["lr=0.5,steps=5"][key] == pytest.approx(applied[key], abs=1e-6)


def test_z_setting_options_and_recommendation():
    from benchmarks import z_setting

    assert z_setting.parse_setting("lr=1.0, steps=15") == {"lr": 1.0, "steps": 15}
    assert z_setting.parse_setting("steps=10") == {"steps": 10}
    for bad in ("lr=1,lr=2", "clamp_norm_factor=1.0", "steps=x", "lr"):
        with pytest.raises(ValueError):
            z_setting.parse_setting(bad)
    with pytest.raises(SystemExit):
        z_setting.parse_args(["--settings", "early_stop_loss=0.5"])  # a looser stop rule is not a z setting

    def entry(setting, cpu, eff, acc, para):
        lr, steps = (float(x.split("=")[1]) for x in setting.split(","))
        return (
            {"setting": setting, "lr": lr, "steps": int(steps), "cpu_seconds": cpu, "cpu_speedup": 10.0 / cpu}
            | {"wall_speedup": 1.0, "row_forward_ratio": 1.0}
            | {"efficacy_success": eff, "efficacy_accuracy": acc, "generalization_success": para}
        )

    ref = entry("lr=0.5,steps=25", 10.0, 0.97, 0.80, 0.60)
    fast_lower_paraphrase = entry("lr=2,steps=10", 4.0, 0.97, 0.80, 0.58)
    fast_lower_efficacy = entry("lr=2,steps=12", 5.0, 0.95, 0.80, 0.60)
    slower_equal = entry("lr=1,steps=15", 6.0, 0.965, 0.795, 0.61)
    fastest_equal = entry("lr=1,steps=12", 5.5, 0.97, 0.81, 0.60)
    entries = [ref, fast_lower_paraphrase, fast_lower_efficacy, slower_equal, fastest_equal]
    best = z_setting.recommend(entries, 1.0, 0.0)
    assert best["setting"] == "lr=1,steps=12"
    assert best["options"] == "--model.method.init_args.targets.lr 1 --model.method.init_args.targets.steps 12"
    # A looser tolerance admits the faster settings in turn; none but the reference: no recommendation.
    assert z_setting.recommend(entries, 2.0, 0.0)["setting"] == "lr=2,steps=12"
    assert z_setting.recommend(entries, 2.0, 2.0)["setting"] == "lr=2,steps=10"
    assert z_setting.recommend([ref, fast_lower_paraphrase, fast_lower_efficacy], 1.0, 0.0) is None


def test_nullspace_share_reports_each_layers_dimension_and_key_share():
    # Eigenvalues 3, 1 (kept) and 0.01, 0.005 (below 0.02) in a random basis: a 2-dimensional null
    # space holding 0.015 / 4.015 of tr(C).
    from editlab.editing.solve import null_space_projection

    nullspace_share = load_script("nullspace_share")
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    cov = q @ torch.diag(torch.tensor([3.0, 1.0, 0.01, 0.005], dtype=torch.float64)) @ q.T
    got = nullspace_share.layer_report(cov, null_space_projection(cov, 0.02), 0.02)
    assert got["d_ff"] == 4 and got["null_space_dim"] == 2
    # cumulative shares of tr(C): 0.005/4.015 ≈ 0.00125, 0.015/4.015 ≈ 0.0037, 1.015/4.015 ≈ 0.25
    assert got["dims_holding_at_most"] == {"0.001": 0, "0.01": 2, "0.05": 2}
    assert got["key_share_in_null_space"] == pytest.approx(0.015 / 4.015, rel=1e-10)
    assert got["largest_eigenvalue"] == pytest.approx(3.0) and got[
        "threshold_over_largest_eigenvalue"
    ] == pytest.approx(0.02 / 3.0)


def test_nullspace_share_refuses_a_method_without_a_null_space(monkeypatch):
    from editlab.errors import ConfigError

    monkeypatch.chdir(REPO)
    nullspace_share = load_script("nullspace_share")
    with pytest.raises(ConfigError, match="option model.method: MEMIT_seq has no null space"):
        nullspace_share.main(["--config", "configs/memit_seq_smollm2.yaml"])
