"""Export: the saved model reloads with the edited model's logits; the delta file applied to the
original gives the edited weights bit for bit, and is refused on any other model; weight deltas
are exact or refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from editlab.cli import main
from editlab.lightning.cli import EditLabCLI
from editlab.models.delta import DeltaMismatchError, apply_delta, read_delta, weight_deltas
from editlab.models.tiny import save_tiny

from helpers import SHARED_DATA, tiny_args


@pytest.fixture(scope="module", params=["gpt2", "llama"])  # Conv1D (transposed) and nn.Linear
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"export_{request.param}")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDITLAB_CACHE", str(tmp / "cache"))
    original = save_tiny(tmp / f"orig_{request.param}", request.param)
    args = tiny_args(tmp, str(SHARED_DATA / "multi_counterfact.json.gz"), **{"--model.export": "true"})
    args[args.index("--model.model") + 1] = str(original)
    cli = EditLabCLI(args=["fit", *args])
    mp.undo()
    return cli.model, original, tmp / "run"


def test_exported_model_reloads_with_the_same_logits(exported):
    module, _, run = exported
    edited = module.lm
    reloaded = AutoModelForCausalLM.from_pretrained(run / "edited_model").eval()
    ids = module.tok(["The Eiffel Tower is located in", "Danielle Darrieux speaks"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = edited(**ids).logits
        b = reloaded(**ids).logits
    assert torch.equal(a, b)


def test_delta_applied_to_the_original_gives_the_edited_weights(exported):
    module, original, run = exported
    edited = module.lm
    model = AutoModelForCausalLM.from_pretrained(original).eval()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, edited.get_parameter(n))]
    deltas, meta = read_delta(run / "edit_delta.safetensors")
    assert sorted(changed) == sorted(deltas)  # exactly the edited matrices differ, and the file holds them
    assert meta["model"] == str(original) and meta["dtype"] == "float32" and meta["fingerprint"] == module.fingerprint
    apply_delta(model, run / "edit_delta.safetensors")
    for name, param in edited.named_parameters():
        assert torch.equal(param, model.get_parameter(name)), name
    # Applying it again (the model now holds the edit) is refused, not doubled.
    with pytest.raises(DeltaMismatchError, match="fingerprint"):
        apply_delta(model, run / "edit_delta.safetensors")


def test_delta_refuses_another_model_or_dtype(exported, tmp_path):
    _, original, run = exported
    model_type = AutoModelForCausalLM.from_pretrained(original).config.model_type
    other = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "other", model_type, seed=1))
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(DeltaMismatchError, match="original, unedited weights"):
        apply_delta(other, run / "edit_delta.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())  # refused before any write
    half = AutoModelForCausalLM.from_pretrained(original, dtype=torch.bfloat16)
    with pytest.raises(DeltaMismatchError, match="bfloat16"):
        apply_delta(half, run / "edit_delta.safetensors")


def test_apply_delta_command_writes_the_edited_model(exported, tmp_path):
    module, original, run = exported
    out = tmp_path / "applied"
    with pytest.raises(SystemExit) as info:
        main(["apply-delta", str(run / "edit_delta.safetensors"), "--model", str(original), "--out", str(out)])
    assert info.value.code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, param in module.lm.named_parameters():
        assert torch.equal(param, model.get_parameter(name)), name
    # The wrong model: a clear message and a non-zero exit, nothing written.
    wrong = save_tiny(tmp_path / "wrong", model.config.model_type, seed=3)
    with pytest.raises(SystemExit) as info:
        main(["apply-delta", str(run / "edit_delta.safetensors"), "--model", str(wrong), "--out", str(tmp_path / "x")])
    assert info.value.code == 2 and not (tmp_path / "x").exists()


def test_weight_delta_that_would_not_reproduce_the_weight_is_refused():
    # W_0 = 1 and W_t = 2^-40·(1 + 2^-23): W_t − W_0 needs 64 significant bits, more than float64 has.
    model = torch.nn.Linear(1, 1, bias=False)
    w0 = {"weight": torch.ones(1, 1)}
    with torch.no_grad():
        model.weight.fill_(2.0**-40 * (1 + 2.0**-23))
    with pytest.raises(FloatingPointError, match="does not reproduce"):
        weight_deltas(model, w0)
    with torch.no_grad():
        model.weight.fill_(0.75)  # an ordinary edit: exact
    assert torch.equal(weight_deltas(model, w0)["weight"], torch.full((1, 1), -0.25, dtype=torch.float64))


def test_not_a_delta_file_is_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DeltaMismatchError, match="not a readable safetensors delta"):
        read_delta(bad)
