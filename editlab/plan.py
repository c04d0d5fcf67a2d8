"""``editlab fit --config C --plan``: the resolved run and its memory estimate, without the weights.

The model is built on the meta device from its config (a local config.json, the published shapes
of editlab.models.shapes for a known hub id, else the hub config), so a plan for Llama-3-8B takes
seconds on a laptop with no download.
"""

from __future__ import annotations

from dataclasses import dataclass

from editlab.memory import PLAN_PROMPT_TOKENS, MemoryEstimate, plan_memory
from editlab.models.load import torch_dtype


@dataclass(frozen=True)
class Plan:
    model: str
    model_type: str
    n_params: int
    method: str  # the variant's name (MEMIT_seq, ECE-two-step, ...)
    method_class: str
    layers: list[int]
    dtype: str
    num_edits: int | None  # None: every record of the data file
    edits_per_step: int
    steps: int | None
    memory: MemoryEstimate

    def describe(self) -> str:
        return "\n".join(
            [
                f"model       {self.model} ({self.model_type}, {self.n_params:,} parameters, {self.dtype})",
                f"method      {self.method} ({self.method_class})",
                f"layers      {self.layers}",
                f"edits       {self.num_edits or 'all'} in {self.steps or '?'} steps of up to {self.edits_per_step}",
                f"memory      {self.memory.describe()}",
                f"            (z activations for prompts of {PLAN_PROMPT_TOKENS} tokens with the target, assumed)",
            ]
        )


def instantiate_method(method_cfg):
    """The method object of a parsed config (its class_path and init_args), without a model."""
    from jsonargparse import ArgumentParser, Namespace

    from editlab.editing.methods.base import EditMethod

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=EditMethod)
    as_dict = method_cfg.as_dict() if isinstance(method_cfg, Namespace) else method_cfg
    return parser.instantiate(parser.parse_object({"method": as_dict})).method


def make_plan(model_cfg, data_cfg) -> Plan:
    """The plan of a parsed ``fit`` config's ``model`` and ``data`` groups."""
    from editlab.models.arch import ModelView
    from editlab.models.shapes import meta_model, resolve_config

    method = instantiate_method(model_cfg.method)
    dtype = torch_dtype(model_cfg.dtype)
    config = resolve_config(model_cfg.model)
    lm = meta_model(config, dtype)
    view = ModelView.of(lm)  # the registry must find the layers, as a real run would
    view.check_layers(method.edited_layers())
    view.ffn_out(method.edited_layers()[0])
    n_params = sum(p.numel() for p in lm.parameters())
    num_edits, per_step = data_cfg.num_edits, int(data_cfg.edits_per_step)
    memory = plan_memory(config, method, dtype.itemsize, n_params, min(per_step, num_edits or per_step))
    return Plan(
        model=model_cfg.model,
        model_type=config.model_type,
        n_params=n_params,
        method=method.name,
        method_class=f"{type(method).__module__}.{type(method).__name__}",
        layers=method.edited_layers(),
        dtype=model_cfg.dtype,
        num_edits=num_edits,
        edits_per_step=per_step,
        steps=None if num_edits is None else -(-num_edits // per_step),
        memory=memory,
    )
