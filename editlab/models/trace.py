"""One forward pass that records what the editing stages need, and nothing more.

``trace`` captures FFN out-projection inputs (keys) and decoder-layer outputs (residual stream)
at chosen layers and stops the forward right after the highest layer needed, so layers above it
(and the vocabulary projection) are never computed.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from editlab.models.arch import ModelView
from editlab.models.hooks import StopForward, capture_inputs, capture_output


def trace(
    view: ModelView,
    input_ids: torch.Tensor,  # [B, S]
    attention_mask: torch.Tensor,  # [B, S]
    key_layers: list[int] = (),
    output_layers: list[int] = (),
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Return ({layer: keys [B, S, d_ff]}, {layer: layer output [B, S, d_model]})."""
    last = max([*key_layers, *output_layers])
    key_modules = {f"keys@{layer}": view.ffn_out(layer) for layer in key_layers}
    stop_key = f"keys@{last}" if last in key_layers and last not in output_layers else None
    with ExitStack() as stack:
        keys = stack.enter_context(capture_inputs(key_modules, stop_after=stop_key)) if key_layers else {}
        outs = {
            layer: stack.enter_context(capture_output(view.layer(layer), f"out@{layer}")) for layer in output_layers
        }
        stop_hook = None
        if stop_key is None:
            # Stop after the last layer's output has been captured (forward hooks run in order).
            def stop(module, args, output):
                raise StopForward

            stop_hook = view.layer(last).register_forward_hook(stop)
        try:
            view.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
        finally:
            if stop_hook is not None:
                stop_hook.remove()
    key_out = {int(name.split("@")[1]): value for name, value in keys.items()}
    layer_out = {layer: captured[f"out@{layer}"] for layer, captured in outs.items()}
    return key_out, layer_out
