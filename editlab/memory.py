"""An estimate, printed before a run starts, of the memory it needs.

Counted, per device (every count below was checked against the code that allocates it):
- weights: every parameter in the LM's dtype;
- statistics: the d_ff x d_ff float64 matrices each edited layer keeps for the whole run: E[kkᵀ],
  the sequential cache Σ KKᵀ, and AlphaEdit's null-space projector P; on the CPU when offloaded;
- solve: the d_ff x d_ff float64 matrices alive at once in the largest solve (solve.py: MEMIT's
  λC + cache, KᵀK and A, then A's LU copy; the sub-matrix solve of ECE / NSE one more for the
  sliced P[I, I], AlphaEdit's P M, l2·I and A beside M); offloading moves the persistent ones to
  the CPU but each solve still copies its operands to the device;
- rewind (ECE, NSE): W_0 of the edited matrices, and the current weights held aside while z runs on W_0;
- z activations: what autograd keeps for the backward pass of the z optimisation, every row of a
  step (requests x (context templates + the KL row)) in one forward: per token, about
  6 d_model + 2 d_ff values in the LM's dtype in each layer above the z layer (δ enters at the z
  layer's output, so the layers below keep nothing), and three float32 vocabulary-wide rows
  (logits, log-softmax, gradient) per row. The roughest part: real peaks depend on the attention
  kernel, the prefix cache and how many rows early stopping has removed.
Not counted: the evaluation's forwards (no gradient, smaller) and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes on each device
    statistics: int  # bytes of the per-layer float64 matrices kept for the run, all edited layers
    statistics_on_cpu: bool
    solve: int  # bytes of the largest transient solve, on the device
    activations: int  # bytes kept for z's backward pass
    rewind: int = 0  # bytes of W_0 and the set-aside current weights (ECE / NSE weights rewinding)

    @property
    def device_total(self) -> int:
        on_device = 0 if self.statistics_on_cpu else self.statistics
        return self.weights + on_device + self.solve + self.activations + self.rewind

    @property
    def cpu_total(self) -> int:
        return self.statistics if self.statistics_on_cpu else 0

    def describe(self) -> str:
        where = "CPU" if self.statistics_on_cpu else "device"
        return (
            f"estimated memory per device ~{self.device_total / GiB:.2f} GiB "
            f"(weights {self.weights / GiB:.2f}, statistics {self.statistics / GiB:.2f} on the {where}, "
            f"solve {self.solve / GiB:.2f}, z activations {self.activations / GiB:.2f}"
            + (f", rewind {self.rewind / GiB:.2f}" if self.rewind else "")
            + ")"
            + (f"; CPU {self.cpu_total / GiB:.2f} GiB" if self.cpu_total else "")
        )


@dataclass(frozen=True)
class MemoryProfile:
    """What a method keeps and runs, as the estimate counts it (``EditMethod.memory_profile()``;
    the default, all zero, is a method with no statistics and no z rows, as FT)."""

    stat_matrices: int = 0  # d_ff x d_ff float64 matrices kept per edited layer for the whole run
    solve_matrices: int = 0  # d_ff x d_ff float64 matrices alive at once on the device in its largest solve
    solve_matrices_offloaded: int | None = None  # as many with the statistics on the CPU (None: the same)
    rewind: bool = False  # keeps W_0 of the edited matrices (and the current ones aside) on the device
    offload: bool = False  # the statistics live on the CPU
    context_templates: int = 0  # random context prefixes per request (each one more z row)
    context_length: int = 0  # tokens of each prefix
    requests_per_forward: int | None = None  # z's forwards hold at most this many requests (None: all)

    def solve(self) -> int:
        """Matrices of the largest solve where the statistics are (``offload``)."""
        if self.offload and self.solve_matrices_offloaded is not None:
            return self.solve_matrices_offloaded
        return self.solve_matrices


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
    *,
    solve_matrices: int | None = None,
    grad_layers: int | None = None,
    vocab_size: int = 0,
    rewind: bool = False,
) -> MemoryEstimate:
    """Bytes of each part (see the module docstring). ``stat_matrices_per_layer``: 2 for
    sequential key-value methods (C and Σ KKᵀ), 1 without the sequential cache, 0 for methods that
    keep no statistics (a method's ``memory_profile()`` gives its counts).
    ``rows_per_step``: requests x (context templates + 1 KL row). ``solve_matrices``: default 3
    (MEMIT's). ``grad_layers``: layers above the z layer (default all)."""
    mat = 8 * d_ff * d_ff  # one float64 d_ff x d_ff matrix
    statistics = stat_matrices_per_layer * edited_layers * mat
    if solve_matrices is None:
        solve_matrices = 3 if stat_matrices_per_layer else 0
    grad_layers = n_layers if grad_layers is None else grad_layers
    per_token = grad_layers * (6 * d_model + 2 * d_ff) * param_bytes
    logits = 3 * vocab_size * 4  # float32 logits, log-softmax and gradient of one position
    activations = rows_per_step * (tokens_per_row * per_token + logits)
    rewound = 2 * edited_layers * d_model * d_ff * param_bytes if rewind else 0
    return MemoryEstimate(n_params * param_bytes, statistics, offload, solve_matrices * mat, activations, rewound)


# Tokens of a CounterFact / ZsRE rewrite prompt with its target, assumed where no tokenizer is
# at hand (a plan without the weights); runs count their own prompts.
PLAN_PROMPT_TOKENS = 24


def plan_memory(
    config, method, param_bytes: int, n_params: int, requests_per_step: int, prompt_tokens: int = PLAN_PROMPT_TOKENS
) -> MemoryEstimate:
    """The estimate of one run from the model's config, the method object (its
    ``memory_profile()``) and the step size — nothing here needs the weights (``n_params``: count
    them on a meta-device build)."""
    profile = method.memory_profile()
    layers = method.edited_layers()
    templates = 1 + profile.context_templates
    chunk = profile.requests_per_forward
    z_requests = requests_per_step if chunk is None else min(chunk, requests_per_step)
    return estimate_memory(
        n_params=n_params,
        param_bytes=param_bytes,
        d_ff=ffn_width(config),
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        edited_layers=len(layers),
        stat_matrices_per_layer=profile.stat_matrices,
        offload=profile.offload,
        rows_per_step=z_requests * (templates + 1),
        tokens_per_row=prompt_tokens + profile.context_length,
        solve_matrices=profile.solve(),
        grad_layers=config.num_hidden_layers - layers[-1] - 1,  # z at the last edited layer
        vocab_size=config.vocab_size,
        rewind=profile.rewind,
    )


def run_memory(lm, tok, method, requests: list, steps: list[list]) -> MemoryEstimate:
    """The estimate of a run on its loaded model: its parameters, the largest step of ``steps``
    and the longest rewrite prompt of ``requests``."""
    per_step = max(len(b) for b in steps)
    prompt = max(len(tok(r.rewrite_prompt)["input_ids"]) for r in requests)
    first = next(lm.parameters())
    n_params = sum(p.numel() for p in lm.parameters())
    # + 8: room for the target's tokens after the prompt
    return plan_memory(lm.config, method, first.element_size(), n_params, per_step, prompt + 8)


def ffn_width(config) -> int:
    """d_ff from a transformers config (GPT-2 / GPT-J: n_inner, None meaning 4 x hidden)."""
    width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return int(width or 4 * config.hidden_size)
