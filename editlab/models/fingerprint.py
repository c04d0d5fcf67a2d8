"""A cheap digest of a model's weights: the identity that keys caches, resume states and deltas.

It lives with the models because every floor above uses it (the statistics cache, the run's
resume state, an exported delta's check), and none of them should import another to get it.
"""

from __future__ import annotations

import hashlib

import torch


def model_fingerprint(model) -> str:
    """A cheap digest of the weights (per-tensor sums), so a cache never crosses models."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(
                f"{name}:{tuple(p.shape)}:{float(p.float().sum()):.6e}:{float(p.float().abs().sum()):.6e}".encode()
            )
    return h.hexdigest()[:24]
