"""Published shapes on the meta device: the registry's edited modules, the memory estimate against
a count by hand, the README's memory table, and ``editlab fit --plan``."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace

from editlab.editing.methods.memit import MEMIT
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import TargetConfig
from editlab.memory import GiB, plan_memory
from editlab.models.arch import ModelView
from editlab.models.shapes import PUBLISHED, meta_model
from editlab.plan import make_plan

REPO = Path(__file__).resolve().parents[1]

# model: (parameters, d_model, d_ff, layers, vocab) as published (the model cards' parameter counts)
BY_HAND = {
    "gpt2-xl": (1_557_611_200, 1600, 6400, 48, 50257),
    "EleutherAI/gpt-j-6B": (6_050_882_784, 4096, 16384, 28, 50400),
    "meta-llama/Meta-Llama-3-8B": (8_030_261_248, 4096, 14336, 32, 128256),
    "mistralai/Mistral-7B-v0.1": (7_241_732_096, 4096, 14336, 32, 32000),
    "Qwen/Qwen2.5-7B": (7_615_616_512, 3584, 18944, 28, 152064),
    "EleutherAI/gpt-neox-20b": (20_554_567_680, 6144, 24576, 44, 50432),
}
EDITED = {"gpt2-xl": "mlp.c_proj", "EleutherAI/gpt-j-6B": "mlp.fc_out", "EleutherAI/gpt-neox-20b": "mlp.dense_4h_to_h"}


def hand_count(
    params, d, d_ff, n_layers, vocab, *, layers, stats, solve, rewind, requests, templates, prompt, dtype_bytes
):
    """Bytes on the device, counted as memory.py's docstring says, written out."""
    weights = params * dtype_bytes
    statistics = stats * len(layers) * d_ff * d_ff * 8  # float64 matrices kept per edited layer
    largest_solve = solve * d_ff * d_ff * 8
    rows = requests * (templates + 1)  # every template row and the KL row of every request
    above_z = n_layers - layers[-1] - 1  # autograd keeps nothing below δ's layer
    z = rows * (prompt * above_z * (6 * d + 2 * d_ff) * dtype_bytes + 3 * vocab * 4)
    rewound = 2 * len(layers) * d * d_ff * dtype_bytes if rewind else 0
    return weights + statistics + largest_solve + z + rewound


@pytest.mark.parametrize("model_id", sorted(PUBLISHED))
def test_published_shapes_on_meta_device(model_id):
    params, d, d_ff, n_layers, vocab = BY_HAND[model_id]
    model = meta_model(PUBLISHED[model_id].config())
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == params
    view = ModelView.of(model)
    assert view.n_layers == n_layers
    assert view.ffn_out_name(3).endswith(EDITED.get(model_id, "mlp.down_proj"))
    w = view.ffn_out(3).weight
    # Conv1D stores [in, out] (d_ff rows), Linear [out, in]
    assert tuple(w.shape) == ((d_ff, d) if model_id == "gpt2-xl" else (d, d_ff))
    assert type(view.ffn_out(3)).__name__ == ("Conv1D" if model_id == "gpt2-xl" else "Linear")

    layers = [3, 4, 5, 6, 7]
    for offload in (False, True):
        method = MEMIT(layers=layers, covariance=CovarianceConfig(offload=offload))
        est = plan_memory(model.config, method, 2, params, 100, prompt_tokens=24)
        expect = hand_count(
            params, d, d_ff, n_layers, vocab, layers=layers, stats=2, solve=3, rewind=False,
            requests=100, templates=6, prompt=24 + 10, dtype_bytes=2,
        )  # fmt: skip
        saving = 2 * 5 * d_ff * d_ff * 8 if offload else 0  # C and Σ KKᵀ of 5 layers move to the CPU
        assert est.device_total == expect - saving
        assert est.cpu_total == saving

    # z in chunks of 25 requests: the activations of 25, not 100, requests are alive at once.
    chunked = MEMIT(layers=layers, targets=TargetConfig(requests_per_forward=25))
    est = plan_memory(model.config, chunked, 2, params, 100, prompt_tokens=24)
    expect = hand_count(
        params, d, d_ff, n_layers, vocab, layers=layers, stats=2, solve=3, rewind=False,
        requests=25, templates=6, prompt=24 + 10, dtype_bytes=2,
    )  # fmt: skip
    assert est.device_total == expect


def readme_rows() -> dict[str, tuple[float, float]]:
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `configs/(\w+)\.yaml` \| [^|]+\| [^|]+\| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    return {name: (float(a), float(b)) for name, a, b in rows}


# Counted by hand from the methods' code (see memory.py): statistics kept per layer (MEMIT-EAC: C,
# no cache; AlphaEdit: C, P, cache; ECE / NSE: C, cache), d_ff² matrices alive in the largest
# solve on the device, without and with offload (AlphaEdit then copies P over; ECE / NSE slice
# P[I, I] on the CPU), and whether W_0 is kept for rewinding.
MEMIT_EAC, ALPHAEDIT, ECE_NSE = (1, 3, 3, False), (3, 4, 5, False), (2, 4, 3, True)
CONFIGS = {
    "memit_eac_gpt2xl": ("gpt2-xl", *MEMIT_EAC),
    "alphaedit_gpt2xl": ("gpt2-xl", *ALPHAEDIT),
    "ece_gpt2xl": ("gpt2-xl", *ECE_NSE),
    "nse_gpt2xl": ("gpt2-xl", *ECE_NSE),
    "alphaedit_gptj": ("EleutherAI/gpt-j-6B", *ALPHAEDIT),
    "ece_gptj": ("EleutherAI/gpt-j-6B", *ECE_NSE),
    "nse_gptj": ("EleutherAI/gpt-j-6B", *ECE_NSE),
    "memit_eac_llama3_8b": ("meta-llama/Meta-Llama-3-8B", *MEMIT_EAC),
    "alphaedit_llama3_8b": ("meta-llama/Meta-Llama-3-8B", *ALPHAEDIT),
    "ece_llama3_8b": ("meta-llama/Meta-Llama-3-8B", *ECE_NSE),
    "nse_llama3_8b": ("meta-llama/Meta-Llama-3-8B", *ECE_NSE),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_readme_memory_table_matches_the_hand_count(name):
    model_id, stats, solve, solve_offloaded, rewind = CONFIGS[name]
    cfg = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    init = cfg["model"]["method"]["init_args"]
    per_step = cfg["data"]["edits_per_step"]
    assert cfg["model"]["dtype"] == "float32"
    by_hand = hand_count(
        *BY_HAND[model_id], layers=init["layers"], stats=stats, solve=solve, rewind=rewind,
        requests=per_step, templates=1 + init["context"]["count"], prompt=24 + init["context"]["length"], dtype_bytes=4,
    )  # fmt: skip
    mat = BY_HAND[model_id][2] ** 2 * 8
    offloaded = by_hand - stats * len(init["layers"]) * mat + (solve_offloaded - solve) * mat
    plan = make_plan(Namespace(**cfg["model"]), Namespace(**cfg["data"]))
    assert plan.memory.device_total == by_hand
    init["covariance"]["offload"] = True
    assert make_plan(Namespace(**cfg["model"]), Namespace(**cfg["data"])).memory.device_total == offloaded
    assert readme_rows()[name] == (round(by_hand / GiB, 1), round(offloaded / GiB, 1))


def test_fit_plan_prints_without_weights(capsys):
    from editlab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs" / "ece_llama3_8b.yaml"), "--plan"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "meta-llama/Meta-Llama-3-8B-Instruct (llama, 8,030,261,248 parameters, float32)" in out
    assert "ECE" in out and "[4, 5, 6, 7, 8]" in out and "2000 in 20 steps of up to 100" in out
    assert "estimated memory per device ~" in out and "rewind" in out
    assert not torch.cuda.is_initialized()
