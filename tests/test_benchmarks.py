"""The benchmark scripts run end to end on a tiny model and report what they claim to."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from editlab.models.tiny import save_tiny

from conftest import REPO, SHARED_DATA


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
            "--shared-steps",
            "3",
            "--instance-steps",
            "2",
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
    for arm in ("per_instance", "ece_two_step"):
        entry = result[arm]
        assert entry["seconds"] > 0
        for key in ("efficacy_success", "efficacy_accuracy"):
            assert 0.0 <= entry[key] <= 1.0
    # Same total budget: 3 + 2 two-step rounds against 5 per-instance ones.
    assert result["per_instance"]["steps"] == 5
    assert result["per_instance"]["updates_max"] <= 4
    # The two-step optimisation pushes fewer rows through the model than per-instance z.
    assert result["row_forward_ratio"] > 1.0
