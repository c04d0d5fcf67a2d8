"""Architecture registry keyed by ``config.model_type`` (never by the model's name).

Each entry names, as attribute paths from the *CausalLM* object, the list of decoder layers,
relative to one layer the FFN out-projection that locate-and-edit methods rewrite, and the final
norm. The unembedding is taken from ``get_output_embeddings()`` (GPT-NeoX renamed ``embed_out``
to ``lm_head`` in transformers 5; the HF accessor follows such renames).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # path to the ModuleList of decoder layers
    ffn_out: str  # path, inside one layer, to the FFN out-projection (edited matrix)
    final_norm: str
    attn: str  # path, inside one layer, to the self-attention block (PMET's attention target)


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", "transformer.ln_f", "attn"),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out", "transformer.ln_f", "attn"),
    "llama": ArchSpec("model.layers", "mlp.down_proj", "model.norm", "self_attn"),
    "mistral": ArchSpec("model.layers", "mlp.down_proj", "model.norm", "self_attn"),
    "qwen2": ArchSpec("model.layers", "mlp.down_proj", "model.norm", "self_attn"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "attention"),
}


def arch_spec(model_type: str) -> ArchSpec:
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown model_type {model_type!r} (config.model_type); supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise AttributeError(f"{type(root).__name__} has no submodule {path!r} (failed at {part!r})")
        module = getattr(module, part)
    return module


@dataclass(frozen=True)
class ModelView:
    """Resolved modules of one loaded model."""

    model: nn.Module
    spec: ArchSpec

    @classmethod
    def of(cls, model: nn.Module) -> "ModelView":
        view = cls(model, arch_spec(model.config.model_type))
        view.layers()  # resolve now: a wrong path fails at load, not mid-stream
        return view

    @property
    def n_layers(self) -> int:
        return len(self.layers())

    def layers(self) -> nn.ModuleList:
        return get_module(self.model, self.spec.layers)

    def layer(self, index: int) -> nn.Module:
        layers = self.layers()
        if not 0 <= index < len(layers):
            raise ValueError(f"layer {index} out of range: the model has {len(layers)} layers")
        return layers[index]

    def ffn_out(self, index: int) -> nn.Module:
        return get_module(self.layer(index), self.spec.ffn_out)

    def attn(self, index: int) -> nn.Module:
        return get_module(self.layer(index), self.spec.attn)

    def ffn_out_name(self, index: int) -> str:
        return f"{self.spec.layers}.{index}.{self.spec.ffn_out}"

    def final_norm(self) -> nn.Module:
        return get_module(self.model, self.spec.final_norm)

    def unembed(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        if head is None:
            raise AttributeError(f"{type(self.model).__name__} has no output embeddings (not a causal LM head?)")
        return head

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The LM's own dtype (of its first parameter)."""
        return next(self.model.parameters()).dtype

    def check_layers(self, layers: list[int], option: str = "layers") -> None:
        n = self.n_layers
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad or not layers:
            raise ValueError(f"option {option}={layers}: each must be in [0, {n - 1}] for this model")
        if sorted(set(layers)) != list(layers):
            raise ValueError(f"option {option}={layers}: must be strictly increasing")
