"""How null is AlphaEdit's null space on a model? Per edited layer of an AlphaEdit config: the
dimension of P (eigenvalues of E[kkᵀ] below ``nullspace_threshold``) and the share of the preserved
keys' second moment inside it, tr(P C) / tr(C) = E‖P k₀‖² / E‖k₀‖² (solve.null_space_key_share).
The method assumes P k₀ ≈ 0; its threshold is absolute, so on a model with small keys much of
their energy can lie in the "null" space and the projected update still moves them. Also, per
layer, how many of the smallest directions hold at most 0.1%, 1% and 5% of tr(C): the size a
nearly null space could have on this model.

Reads the statistics a fit with the same options reads (from the cache, or computes them), no
edit data:

    python -m benchmarks.nullspace_share --config configs/alphaedit_smollm2.yaml \
        --out benchmarks/results/nullspace_share_smollm2.json
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from editlab.commands.stats import ModelUnderStats, device_of, resolve_fit_config
from editlab.commands.study import commit_of
from editlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHARES = (0.001, 0.01, 0.05)  # of tr(C), for dims_holding_at_most


def layer_report(cov: torch.Tensor, proj: torch.Tensor, threshold: float) -> dict:
    """One layer's figures from C [d_ff, d_ff] and its projector P."""
    from editlab.editing.solve import null_space_key_share, null_space_mask

    evals = torch.linalg.eigvalsh(cov.double())  # ascending
    return {
        "d_ff": int(evals.numel()),
        "null_space_dim": round(float(proj.trace())),
        "key_share_in_null_space": null_space_key_share(cov, proj),
        "largest_eigenvalue": float(evals[-1]),
        "median_eigenvalue": float(evals.median()),
        "threshold_over_largest_eigenvalue": threshold / float(evals[-1]),
        # How large a null space could be and still be nearly null: the number of smallest
        # eigen-directions whose eigenvalues sum to at most this share of tr(C) (AlphaEdit's
        # nullspace_share option takes exactly these).
        "dims_holding_at_most": {str(s): int(null_space_mask(evals, threshold, s).sum()) for s in SHARES},
    }


def main(argv: list[str]) -> dict:
    out = None
    if "--out" in argv:
        i = argv.index("--out")
        out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
    cfg = resolve_fit_config(argv)
    from editlab.editing.methods.alphaedit import AlphaEdit
    from editlab.editing.methods.base import EditContext
    from editlab.keyed_cache import cache_root
    from editlab.numerics import set_threads
    from editlab.plan import instantiate_method

    method = instantiate_method(cfg.model.method)
    if not isinstance(method, AlphaEdit):
        raise ConfigError(f"option model.method: {method.name} has no null space (an AlphaEdit config is needed)")
    set_threads(cfg.get("threads"))
    root = cache_root(cfg.model.get("cache_dir"))
    model = ModelUnderStats.load(cfg.model.model, cfg.model.dtype, device_of(cfg.trainer.accelerator), root)
    ctx = EditContext(
        model.lm, model.tok, model.view, model.model_id, model.fingerprint, seed=0, progress=False, cache_root=root
    )
    method.setup(ctx)  # C from the statistics cache, P from C
    result = {
        "command": "python -m benchmarks.nullspace_share " + shlex.join(sys.argv[1:]),
        "commit": commit_of(REPO),
        "model": model.model_id,
        "nullspace_threshold": method.nullspace_threshold,
        "layers": {
            str(layer): layer_report(method.cov[layer], method.proj[layer], method.nullspace_threshold)
            for layer in method.layers
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
