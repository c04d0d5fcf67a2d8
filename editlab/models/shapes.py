"""Published shapes of the large models editlab's configs name, to build them without weights.

The values are those of each model's config.json on the hub. They let ``editlab fit --plan`` and
the memory tests build the real architecture on the meta device (no download, no memory) when the
hub config itself is not at hand (offline machines, gated models).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    extra: tuple[tuple[str, object], ...] = ()  # further config.json values that change parameter shapes

    def config(self):
        """The transformers config with these values (each family's own key names)."""
        from transformers import AutoConfig

        if self.model_type in ("gpt2", "gptj"):  # GPT-2 / GPT-J spell the sizes n_*; n_inner None means 4 x n_embd
            keys = dict(
                n_embd=self.hidden_size,
                n_inner=None if self.intermediate_size == 4 * self.hidden_size else self.intermediate_size,
                n_layer=self.num_layers,
                n_head=self.num_heads,
                n_positions=self.max_positions,
            )
        else:
            keys = dict(
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                max_position_embeddings=self.max_positions,
            )
            if self.model_type != "gpt_neox":  # GPT-NeoX has no grouped-query attention
                keys["num_key_value_heads"] = self.num_kv_heads
        return AutoConfig.for_model(
            self.model_type,
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
            **keys,
            **dict(self.extra),
        )


# Values from each model's published config.json.
PUBLISHED: dict[str, ModelShape] = {
    "gpt2-xl": ModelShape("gpt2", 1600, 6400, 48, 25, 25, 50257, 1024, True),
    "EleutherAI/gpt-j-6B": ModelShape("gptj", 4096, 16384, 28, 16, 16, 50400, 2048, False, (("rotary_dim", 64),)),
    "meta-llama/Meta-Llama-3-8B": ModelShape("llama", 4096, 14336, 32, 32, 8, 128256, 8192, False),
    "mistralai/Mistral-7B-v0.1": ModelShape("mistral", 4096, 14336, 32, 32, 8, 32000, 32768, False),
    "Qwen/Qwen2.5-7B": ModelShape("qwen2", 3584, 18944, 28, 28, 4, 152064, 131072, False),
    "EleutherAI/gpt-neox-20b": ModelShape(
        "gpt_neox", 6144, 24576, 44, 64, 64, 50432, 2048, False, (("rotary_pct", 0.25),)
    ),
}
# Instruct / chat releases share their base model's shapes.
ALIASES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "meta-llama/Meta-Llama-3-8B",
    "Qwen/Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistralai/Mistral-7B-v0.1",
}


def published_shape(model_id: str) -> ModelShape | None:
    return PUBLISHED.get(ALIASES.get(model_id, model_id))


def resolve_config(name_or_path: str):
    """The model's config without its weights: a local directory's config.json, else the published
    shapes of a known hub id, else the hub config (cached or downloaded)."""
    from transformers import AutoConfig

    from editlab.models.load import EMBEDDED_DEFAULT, embedded_model_dir

    if name_or_path == EMBEDDED_DEFAULT:
        return AutoConfig.from_pretrained(embedded_model_dir())
    if (Path(name_or_path) / "config.json").is_file():
        return AutoConfig.from_pretrained(name_or_path)
    shape = published_shape(name_or_path)
    if shape is not None:
        return shape.config()
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        raise ValueError(
            f"model {name_or_path!r}: no local config.json, no published shapes in editlab.models.shapes "
            f"({sorted(PUBLISHED)}), and the hub config is unavailable ({type(err).__name__})"
        ) from None


def meta_model(config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The architecture of ``config`` on the meta device: real shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
