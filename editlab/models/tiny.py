"""Tiny random models with an in-memory tokenizer, one per supported architecture.

Used by the unit tests and by anyone who wants to try a pipeline in seconds without a download.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TEXT = [
    "The Eiffel Tower is located in the city of Paris.",
    "The mother tongue of Danielle Darrieux is French.",
    "Microsoft was founded by Bill Gates and Paul Allen.",
    "Rome is the capital of Italy, and Berlin is the capital of Germany.",
    "Toyota is a car maker from Japan; Apple makes phones and computers.",
    "She plays the piano and he plays the guitar in a band.",
    "Water boils at one hundred degrees, and ice melts when it is warm.",
]


def tiny_tokenizer(add_bos: bool = False, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(TINY_TEXT * 4, trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tk.token_to_id("<bos>"))]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    tok.padding_side = "right"
    return tok


def tiny_config(model_type: str, vocab_size: int, width: int = 32, layers: int = 3):
    from transformers import AutoConfig

    common = {"vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    # The decoder-only families with separate hidden/intermediate sizes share one layout;
    # mistral and qwen2 get grouped-query attention (one KV head) to exercise that path.
    decoder = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=512,
    )
    by_type = {
        "gpt2": dict(n_embd=width, n_layer=layers, n_head=2, n_positions=512, resid_pdrop=0.1, embd_pdrop=0.1),
        "gptj": dict(n_embd=width, n_layer=layers, n_head=2, n_positions=512, rotary_dim=8),
        "llama": {**decoder, "num_key_value_heads": 2},
        "mistral": {**decoder, "num_key_value_heads": 1},
        "qwen2": {**decoder, "num_key_value_heads": 1},
        "gpt_neox": decoder,
    }
    if model_type not in by_type:
        raise ValueError(f"no tiny config for model_type {model_type!r}")
    return AutoConfig.for_model(model_type, **common, **by_type[model_type])


def tiny_model(model_type: str = "llama", seed: int = 0, add_bos: bool = False, **kw):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(add_bos=add_bos)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, len(tok), **kw))
    model.eval().requires_grad_(False)
    return model, tok


def save_tiny(path: str | Path, model_type: str = "llama", seed: int = 0, **kw) -> Path:
    model, tok = tiny_model(model_type, seed, **kw)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
