"""End-to-end checks on the embedded SmolLM2-135M-Instruct with real data (marked slow)."""

import json
import os
import subprocess
import sys

import pytest

from editlab.data.sources import load_requests
from editlab.evaluation import editing_metrics, evaluate_cases
from editlab.models.arch import ModelView

from helpers import REPO, SHARED_DATA

pytestmark = pytest.mark.slow


def test_embedded_model_knows_a_fact(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    enc = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])


def test_unedited_model_on_counterfact(smollm2):
    # Before any edit the model prefers the true answers: efficacy low, specificity high.
    model, tok = smollm2
    reqs = load_requests(str(SHARED_DATA / "multi_counterfact.json.gz"), num_edits=40)
    metrics = editing_metrics(evaluate_cases(ModelView.of(model), tok, reqs))
    assert metrics["efficacy_success"] < 0.5
    assert metrics["generalization_success"] < 0.5
    assert metrics["specificity_success"] > 0.5


def test_demo_config_edits_smollm2(tmp_path):
    # The demo config on 8 of its facts in 2 sequential steps, quality metrics off for time.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "editlab.cli",
            "fit",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--data.num_edits",
            "8",
            "--data.edits_per_step",
            "4",
            "--model.evaluation.fluency",
            "false",
            "--model.progress",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(run),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["edits"] == 8 and summary["steps"] == 2
    assert summary["pre_efficacy_success"] <= 0.25
    assert summary["efficacy_success"] >= 0.9
    assert summary["specificity_success"] >= 0.6
