"""What the deterministic gather of z costs: ``index_select`` against advanced indexing.

z optimisation adds each request's δ row to the hidden state of every one of its template rows.
Written ``(base + d)[owner]``, the backward of the advanced index is an ``index_put`` with
accumulate, whose CPU kernel adds the repeated rows with atomics in thread order, so z differed
between two processes at 2 threads (the determinism fix, editlab/editing/targets/descent.py
``descend_offsets``). ``(base + d).index_select(0, owner)`` has a backward that adds in a fixed
order. This benchmark times both, forward + backward at the shapes of a SmolLM2 step, interleaved
A/B in one process, and puts the difference beside one z iteration (a forward and backward of the
same rows through the model), so the cost per edit is stated as a fraction of z's own time.
It also checks, in this process, that the two give gradients equal to float32 rounding.

    python -m benchmarks.determinism_cost --out benchmarks/results/determinism_cost_smollm2.json
    python -m benchmarks.determinism_cost --tiny --repeats 3 --out /tmp/determinism_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def gather_advanced(base: torch.Tensor, d: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    return (base + d)[owner]  # [r, D]


def gather_select(base: torch.Tensor, d: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    return (base + d).index_select(0, owner)  # [r, D]


def time_gather(fn, base: torch.Tensor, owner: torch.Tensor, upstream: torch.Tensor, inner: int) -> float:
    """Seconds of one forward + backward of ``fn``, the mean over ``inner`` calls."""
    t0 = time.perf_counter()
    for _ in range(inner):
        d = torch.zeros_like(base, requires_grad=True)
        fn(base, d, owner).backward(upstream)
    return (time.perf_counter() - t0) / inner


def time_iteration(model, ids: torch.Tensor, inner: int) -> float:
    """Seconds of one forward + backward of the template rows through the model (a z iteration)."""
    t0 = time.perf_counter()
    for _ in range(inner):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        hidden = model.base_model(inputs_embeds=emb).last_hidden_state  # [r, S, d_model]
        # Logits at one position per row, as z reads them (not all S positions).
        logits = model.get_output_embeddings()(hidden[:, -1])  # [r, V]
        logits.float().log_softmax(-1)[:, 0].sum().backward()
    return (time.perf_counter() - t0) / inner


def load_model(tiny: bool):
    if tiny:
        from editlab.models.tiny import tiny_model

        model, _tok = tiny_model("llama")
        return model
    from editlab.models.load import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m-instruct")[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=30, help="requests per step (SmolLM2 configs: 30)")
    p.add_argument("--templates", type=int, default=6, help="rows per request: bare prompt + 5 prefixes")
    p.add_argument("--tokens", type=int, default=12, help="tokens per template row (below the z layer: cached)")
    p.add_argument("--repeats", type=int, default=20, help="interleaved A/B pairs")
    p.add_argument("--inner", type=int, default=50, help="gather calls per timing")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2 (tests)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = load_model(args.tiny).eval()
    d_model = model.config.hidden_size
    n, rows = args.requests, args.requests * args.templates
    owner = torch.arange(n).repeat_interleave(args.templates)  # [r] each request's rows together
    base = torch.randn(n, d_model)  # [n, d_model]
    upstream = torch.randn(rows, d_model)  # [r, d_model] a gradient from above

    # The same gradient from both, up to float32 summation order.
    grads = []
    for fn in (gather_advanced, gather_select):
        d = torch.zeros_like(base, requires_grad=True)
        fn(base, d, owner).backward(upstream)
        grads.append(d.grad)
    max_grad_diff = float((grads[0] - grads[1]).abs().max())
    slow = torch.zeros(n, d_model).index_add_(0, owner, upstream)  # the obvious sum per request
    if not torch.allclose(grads[1], slow, atol=1e-5):
        raise SystemExit("index_select's gradient is not the per-request sum of its rows")

    ids = torch.randint(0, model.config.vocab_size, (rows, args.tokens))
    adv, sel, itr = [], [], []
    for _ in range(args.repeats):
        adv.append(time_gather(gather_advanced, base, owner, upstream, args.inner))
        sel.append(time_gather(gather_select, base, owner, upstream, args.inner))
    for _ in range(max(1, args.repeats // 10)):
        itr.append(time_iteration(model, ids, 1))
    ratios = [s / a for a, s in zip(adv, sel, strict=True)]
    adv_s, sel_s, it_s = statistics.median(adv), statistics.median(sel), statistics.median(itr)
    result = {
        "benchmark": "determinism_cost",
        "model": "tiny llama" if args.tiny else "SmolLM2-135M (default)",
        "shapes": {"requests": n, "rows": rows, "d_model": d_model, "tokens_per_row": args.tokens},
        "threads": args.threads,
        "repeats": args.repeats,
        "gather_seconds": {"advanced_index": adv_s, "index_select": sel_s},
        "index_select_over_advanced_median_ratio": statistics.median(ratios),
        "z_iteration_seconds": it_s,
        "extra_seconds_per_iteration": sel_s - adv_s,
        "extra_fraction_of_z_iteration": (sel_s - adv_s) / it_s,
        "max_grad_difference": max_grad_diff,
        "load_average": os.getloadavg(),
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
