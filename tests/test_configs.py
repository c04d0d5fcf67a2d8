"""Every config resolves and builds its classes; the composed form (a method file, a model file and
a data file, passed as several --config the way LightningCLI merges them) resolves to the flat file.

jsonargparse 4.53 applies a ``config:`` key inside a file only at the top level (its own keys
replace the included ``model`` branch whole), so a flat file cannot itself include model and
method parts with nested overrides: the flat per-model files stay the published settings, and the
composed pairs below show what they are made of."""

import contextlib
import functools
import importlib
import inspect
import io
import os
import pkgutil
import sys
from unittest import mock

import pytest
import yaml
from jsonargparse import ArgumentParser

from editlab.data.datamodule import EditDataModule
from editlab.editing.methods.base import EditMethod
from editlab.lightning.cli import EditLabCLI
from editlab.lightning.module import EditingModule

from helpers import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
GPU_MODELS = ("gptj", "gpt2xl", "llama3_8b")

# flat config -> (method file, model file, data file, what the run itself sets beyond them).
# The last part holds the published values where a model's setting differs from the method
# file's (GPT-J's), e.g. ECE's λ 20000 and threshold 0.8 on GPT2-XL.
COMPOSED = {
    "ece_gptj": ("ece", "gptj", "counterfact_2000", {}),
    "ece_gpt2xl": (
        "ece",
        "gpt2xl",
        "counterfact_2000",
        {"mom2_weight": 20000, "neurons": {"init_args": {"threshold": 0.8}}},
    ),
    "ece_llama3_8b": ("ece", "llama3_8b", "counterfact_2000", {}),
    "ece_smollm2": ("ece", "smollm2", "counterfact_300", {"mom2_weight": 2000}),
    "nse_gptj": ("nse", "gptj", "counterfact_2000", {}),
    "nse_gpt2xl": (
        "nse",
        "gpt2xl",
        "counterfact_2000",
        {"mom2_weight": 10000, "alpha": 35, "upper_bound": 150, "neurons": {"init_args": {"threshold": 1.0}}},
    ),
    "nse_llama3_8b": (
        "nse",
        "llama3_8b",
        "counterfact_2000",
        {"alpha": 2.5, "upper_bound": 50, "neurons": {"init_args": {"threshold": 1.0}}},
    ),
    "nse_smollm2": ("nse", "smollm2", "counterfact_300", {"mom2_weight": 2000, "upper_bound": 150}),
    "alphaedit_gptj": ("alphaedit", "gptj", "counterfact_2000", {}),
    "alphaedit_gpt2xl": ("alphaedit", "gpt2xl", "counterfact_2000", {}),
    "alphaedit_llama3_8b": ("alphaedit", "llama3_8b", "counterfact_2000", {}),
    "alphaedit_smollm2": ("alphaedit", "smollm2", "counterfact_30", {}),
    "ece_twostep_gptj": ("ece_twostep", "gptj", "counterfact_2000", {}),
    "ece_twostep_gpt2xl": ("ece_twostep", "gpt2xl", "counterfact_2000", {"mom2_weight": 20000, "shared_steps": 15}),
    "ece_twostep_llama3_8b": ("ece_twostep", "llama3_8b", "counterfact_2000", {}),
    "ece_twostep_smollm2": ("ece_twostep", "smollm2", "counterfact_300", {"mom2_weight": 2000}),
    "pmet_gptj": (
        "pmet",
        "gptj",
        "counterfact_2000",
        {"mom2_weight": 6000, "targets": {"lr": 0.2, "steps": 30, "kl_factor": 1.0}},
    ),
    "pmet_gpt2xl": ("pmet", "gpt2xl", "counterfact_2000", {"mom2_weight": 20000}),
    "pmet_llama3_8b": ("pmet", "llama3_8b", "counterfact_2000", {}),
    "pmet_smollm2": ("pmet", "smollm2", "counterfact_30", {"mom2_weight": 2000}),
    "memit_smollm2": ("memit", "smollm2", "counterfact_30", {"mom2_weight": 2000}),
    "memit_seq_smollm2": ("memit_seq", "smollm2", "counterfact_30", {"mom2_weight": 2000}),
    "memit_eac_gpt2xl": ("memit_eac", "gpt2xl", "zsre_1000", {"mom2_weight": 20000, "targets": {"steps": 25}}),
    "memit_eac_llama3_8b": (
        "memit_eac",
        "llama3_8b",
        "zsre_1000",
        {"eac": {"percentile": 95}, "targets": {"weight_decay": 0.001}},
    ),
    "memit_eac_smollm2": ("memit_eac", "smollm2", "zsre_30", {"mom2_weight": 2000}),
}


def composed_args(name: str) -> list[str]:
    """``--config`` options of the composed form of ``name``: the method file first (it names the
    class whose init_args the model file sets), then the model and data files, then the run's own
    part (its directory, its W&B run name on the GPU models, the published per-model values) as
    a YAML string, which --config takes as well as a path."""
    method, model, data, settings = COMPOSED[name]
    run: dict = {"trainer": {"default_root_dir": f"runs/{name}"}}
    if model in GPU_MODELS:
        wandb = {"project": "editlab", "name": name, "log_model": False}
        run["trainer"]["logger"] = [{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": wandb}]
    if settings:
        run["model"] = {"method": {"init_args": settings}}
    files = [f"configs/methods/{method}.yaml", f"configs/models/{model}.yaml", f"configs/data/{data}.yaml"]
    return [x for f in [*files, yaml.safe_dump(run, default_flow_style=True).strip()] for x in ("--config", f)]


def resolved(args: list[str]) -> dict:
    """The fully resolved config of ``editlab fit ARGS`` (what --print_config prints), as a dict."""
    config = yaml.safe_load(printed_config(tuple(args), os.getcwd()))
    assert config["model"]["method"]["class_path"]  # a config, not an empty print
    return config


@functools.cache
def printed_config(args: tuple[str, ...], cwd: str) -> str:
    # Cached: a flat config is resolved by two tests (built, and compared with its composition).
    out = io.StringIO()
    # pytest's own argv is not the CLI's: LightningCLI warns when it sees both.
    with (
        pytest.raises(SystemExit) as exit_info,
        contextlib.redirect_stdout(out),
        mock.patch.object(sys, "argv", sys.argv[:1]),
    ):
        EditLabCLI(args=["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def instantiate(config: dict):
    """The EditingModule (with its method, neuron rule, evaluation) and the EditDataModule the
    config describes, built as LightningCLI builds them, without loading any model or data."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(EditingModule, "model")
    parser.add_class_arguments(EditDataModule, "data")
    cfg = parser.parse_object({"model": config["model"], "data": config["data"]})
    built = parser.instantiate(cfg)
    return built.model, built.data


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "memit_smollm2.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses_and_builds_its_method_and_data(config, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name ../shared/data relative to the repository
    printed = resolved(["--config", str(config)])
    assert printed["model"]["method"]["class_path"].startswith("editlab.editing.methods")
    assert "default_root_dir" in printed["trainer"]
    module, data = instantiate(printed)
    assert isinstance(module, EditingModule) and isinstance(module.method, EditMethod)
    method = type(module.method)
    assert f"{method.__module__}.{method.__name__}" == printed["model"]["method"]["class_path"]
    assert isinstance(data, EditDataModule)
    assert (data.path, data.num_edits, data.edits_per_step) == tuple(
        printed["data"][k] for k in ("path", "num_edits", "edits_per_step")
    )


@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_the_composed_config_resolves_to_the_flat_one_and_builds(name, monkeypatch):
    monkeypatch.chdir(REPO)
    composed = resolved(composed_args(name))
    assert composed == resolved(["--config", str(REPO / "configs" / f"{name}.yaml")])
    module, _ = instantiate(composed)
    assert module.method.layers == composed["model"]["method"]["init_args"]["layers"]


def test_every_part_file_is_used_by_a_composed_pair():
    used = {
        f"{kind}/{part}.yaml"
        for parts in COMPOSED.values()
        for kind, part in zip(("methods", "models", "data"), parts[:3], strict=True)
    }
    on_disk = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").glob("*/*.yaml")}
    assert on_disk == used


def method_classes() -> set[type]:
    """The EditMethod classes defined in editlab/editing/methods, found by walking the package."""
    import editlab.editing.methods as package

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found |= {
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, EditMethod) and obj.__module__ == module.__name__
        }
    return found


def class_paths(node) -> set[str]:
    if isinstance(node, dict):
        own = {node["class_path"]} if "class_path" in node else set()
        return own.union(*(class_paths(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(class_paths(v) for v in node))
    return set()


def test_every_method_class_has_a_config_and_every_config_names_one():
    # Leaves only: a class another method class derives from (EditMethod, LayerSpreadMethod, MEMIT
    # for PMET, ...) may be a base rather than a method a user runs.
    classes = method_classes()
    leaves = {
        c for c in classes if not inspect.isabstract(c) and not any(o is not c and issubclass(o, c) for o in classes)
    }
    assert len(leaves) >= 7
    configured = set().union(*(class_paths(yaml.safe_load(p.read_text())) for p in CONFIGS))
    assert {f"{c.__module__}.{c.__name__}" for c in leaves} <= configured
    methods = {c for c in configured if c.startswith("editlab.editing.methods.")}
    assert methods <= {f"{c.__module__}.{c.__name__}" for c in classes}
