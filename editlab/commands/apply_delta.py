"""``editlab apply-delta``: the edited model from an exported delta file and the original model."""

from __future__ import annotations

import argparse

from editlab.models.delta import DeltaMismatchError, apply_delta, read_delta
from editlab.models.load import load_model_and_tokenizer


def apply_delta_main(argv: list[str]) -> int:
    """``editlab apply-delta DELTA --model M --out DIR [--dtype D]``: write the edited model."""
    parser = argparse.ArgumentParser(prog="editlab apply-delta", description=apply_delta_main.__doc__)
    parser.add_argument("delta", help="edit_delta.safetensors of a run (--model.export true)")
    parser.add_argument("--model", help="the original model (hub id, local dir); default: the one in the delta")
    parser.add_argument("--dtype", help="the model's dtype; default: the one in the delta")
    parser.add_argument("--out", required=True, help="directory for the edited model (save_pretrained)")
    args = parser.parse_args(argv)
    _, meta = read_delta(args.delta)
    model, tok = load_model_and_tokenizer(args.model or meta["model"], args.dtype or meta["dtype"])
    try:
        apply_delta(model, args.delta)
    except DeltaMismatchError as err:
        parser.exit(2, f"editlab apply-delta: {err}\n")
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(args.out)
    return 0
