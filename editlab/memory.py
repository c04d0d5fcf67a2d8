"""An estimate, printed before a run starts, of the memory it needs.

Counted: the model's weights; the method's per-layer statistics (E[kkᵀ] and the accumulated
Σ KKᵀ: d_ff x d_ff float64 each) on the device or, offloaded, on the CPU; the largest solve's
working set (the d_ff x d_ff float64 system and its factorisation); and the activations kept for
z's backward pass (every row of a step through every layer, float32). The last is the roughest:
real peaks depend on the attention kernel and on how many rows early stopping has removed.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes on each device
    statistics: int  # bytes of E[kkᵀ] + Σ KKᵀ for every edited layer
    statistics_on_cpu: bool
    solve: int  # bytes of the largest transient solve
    activations: int  # bytes kept for z's backward pass

    @property
    def device_total(self) -> int:
        return self.weights + self.solve + self.activations + (0 if self.statistics_on_cpu else self.statistics)

    @property
    def cpu_total(self) -> int:
        return self.statistics if self.statistics_on_cpu else 0

    def describe(self) -> str:
        where = "CPU" if self.statistics_on_cpu else "device"
        return (
            f"estimated memory per device ~{self.device_total / GiB:.2f} GiB "
            f"(weights {self.weights / GiB:.2f}, statistics {self.statistics / GiB:.2f} on the {where}, "
            f"solve {self.solve / GiB:.2f}, z activations {self.activations / GiB:.2f})"
            + (f"; CPU {self.cpu_total / GiB:.2f} GiB" if self.cpu_total else "")
        )


def estimate_memory(
    n_params: int,
    param_bytes: int,
    d_ff: int,
    d_model: int,
    n_layers: int,
    edited_layers: int,
    stat_matrices_per_layer: int,
    offload: bool,
    rows_per_step: int,
    tokens_per_row: int,
) -> MemoryEstimate:
    """Bytes of each part (see the module docstring). ``stat_matrices_per_layer``: 2 for
    sequential key-value methods (C and Σ KKᵀ), 1 without the sequential cache, 0 for methods that
    keep no statistics. ``rows_per_step``: requests x (context templates + 1 KL row)."""
    mat = 8 * d_ff * d_ff  # one float64 d_ff x d_ff matrix
    statistics = stat_matrices_per_layer * edited_layers * mat
    solve = 2 * mat if stat_matrices_per_layer else 0  # the system and its LU factors
    # Per token and layer autograd keeps about the residual stream, attention projections and the
    # FFN's two intermediate activations: ~ (6 d_model + 2 d_ff) float32 values.
    activations = rows_per_step * tokens_per_row * n_layers * (6 * d_model + 2 * d_ff) * 4
    return MemoryEstimate(n_params * param_bytes, statistics, offload, solve, activations)
