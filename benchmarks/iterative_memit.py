"""Iterative MEMIT against one-pass MEMIT on one batch of CounterFact edits (seed 004, table 1).

One run of IterativeEditing around MEMIT with the settings of configs/iter_memit_smollm2.yaml:
its first iteration is exactly one-pass MEMIT (tests/test_iterative.py::test_one_iteration_is_memit),
so every later iteration is compared with it. Per iteration: p(θ_k, h̄_k), p(θ_{k+1}, ĥ_k), Δp_k,
and the batch's efficacy / generalization / specificity accuracy (the answer is the greedy
continuation, every token teacher-forced: the paper's "accuracy"); where the stop rule
|Δp_k| ≤ ε fired. By default it runs all max_iterations (ε still reported) so the rule's choice can
be compared with later iterations; --stop applies it.

--neighbors W runs neighbour-assisted iterative MEMIT (section 3.2, weight W) instead. Either way
the neighbourhood prompts neighbour-assisted editing would train on (chosen on the unedited
model, so the same in both runs) are listed, and specificity is also reported without them
("held-out"): they are test prompts, and the paper removed them from its evaluation. Two runs,
one plain and one --neighbors, on the same --n therefore compare specificity on the same prompts.

    python benchmarks/iterative_memit.py --n 20 --out benchmarks/results/iterative_memit_smollm2.json
    python benchmarks/iterative_memit.py --n 20 --mom2-weight 15000 --max-iterations 5 \
        --out benchmarks/results/iterative_memit_smollm2_lambda15000.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from editlab.data.sources import load_requests
from editlab.editing.context_templates import ContextTemplates
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.iterative import IterativeEditing, NeighborAssist, neighbor_rows, should_stop
from editlab.editing.methods.memit import MEMIT
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import TargetConfig
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.load import load_model_and_tokenizer
from editlab.models.scoring import score_answers

REPO = Path(__file__).resolve().parents[1]


def held_out(reqs, used: list[list[str]]) -> list[tuple[str, str]]:
    """(neighbourhood prompt, target_true) of every request, less the prompts in ``used[i]``."""
    return [(p, r.target_true) for r, u in zip(reqs, used, strict=True) for p in r.neighborhood_prompts if p not in u]


def accuracies(view, tok, reqs, used: list[list[str]]) -> dict[str, float]:
    """Prompt accuracies on the batch; ``used``: per request, the neighbour prompts NA trains on."""

    def acc(pairs):
        if not pairs:
            return float("nan")
        return float(score_answers(view, tok, [p for p, _ in pairs], [a for _, a in pairs])["exact"].float().mean())

    return {
        "efficacy_acc": acc([(r.rewrite_prompt, r.target_new) for r in reqs]),
        "generalization_acc": acc([(p, r.target_new) for r in reqs for p in r.paraphrase_prompts]),
        "specificity_acc": acc(held_out(reqs, [[] for _ in reqs])),
        "specificity_heldout_acc": acc(held_out(reqs, used)),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="CounterFact records (the first n), one batch")
    ap.add_argument("--max-iterations", type=int, default=10)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--stop", action="store_true", help="stop at the rule instead of running every iteration")
    ap.add_argument("--mom2-weight", type=float, default=2000.0, help="λ (the config's 2000; 15000 under-edits here)")
    ap.add_argument("--neighbors", type=float, default=None, help="neighbour-assisted, with this weight (paper: 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    view = ModelView.of(model)
    ctx = EditContext(model, tok, view, "smollm2-135m-instruct", model_fingerprint(model), seed=0, progress=False)
    reqs = load_requests(str(REPO.parent / "shared" / "data" / "multi_counterfact.json.gz"), num_edits=args.n)
    memit = MEMIT(  # configs/iter_memit_smollm2.yaml
        layers=[4, 5, 6, 7, 8],
        mom2_weight=args.mom2_weight,
        targets=TargetConfig(lr=0.5, steps=25),
        context=ContextTemplates(count=5, length=10),
        covariance=CovarianceConfig(
            corpus=str(REPO.parent / "shared" / "data" / "ME-PPL.json.gz"), num_samples=2000, max_length=128
        ),
    )
    # ε = 0 fires only when an iteration changes nothing at all: otherwise every iteration runs.
    eps = args.epsilon if args.stop else 0.0
    nb = NeighborAssist(weight=args.neighbors) if args.neighbors is not None else None
    it = IterativeEditing(memit, epsilon=eps, max_iterations=args.max_iterations, neighbors=nb)
    it.setup(ctx)
    # Chosen on the unedited model exactly as apply() will choose them (NeighborAssist's count).
    _, used = neighbor_rows(view, tok, reqs, nb or NeighborAssist())
    per_iter: list[dict] = []
    real = it.efficacy_accuracy

    def measured(c, r):  # called once after every spread: record all three accuracies there
        per_iter.append(accuracies(view, tok, r, used))
        return real(c, r)

    it.efficacy_accuracy = measured
    before = accuracies(view, tok, reqs, used)
    t0 = time.perf_counter()
    res = it.apply(ctx, reqs)
    seconds = time.perf_counter() - t0
    rows = []
    fired = None
    for rec, acc in zip(res.details["iterations"], per_iter, strict=True):
        if fired is None and should_stop(rec["delta_p"], args.epsilon):
            fired = rec["iteration"]
        rows.append({k: rec[k] for k in ("iteration", "p_ideal", "p_after", "delta_p", "z_nll", "seconds")} | acc)
    out = {
        "n": args.n,
        "mom2_weight": args.mom2_weight,
        "epsilon": args.epsilon,
        "neighbors": args.neighbors,
        "neighbor_missing": sum(not u for u in used),
        "neighbor_prompts_held_out": sum(len(u) for u in used),
        "stop_rule_fired_at": fired,
        "p_before": res.scalars["iter_p_before"],
        "before": before,
        "iterations": rows,
        "seconds": seconds,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
    }
    print(f"before: {before}  p={out['p_before']:.2f}")
    for r in rows:
        print(
            f"k={r['iteration']:2d} p_ideal={r['p_ideal']:8.3f} p_after={r['p_after']:9.3f} Δp={r['delta_p']:9.3f} "
            f"eff={r['efficacy_acc']:.2f} gen={r['generalization_acc']:.2f} spec={r['specificity_acc']:.3f} "
            f"spec_heldout={r['specificity_heldout_acc']:.3f} "
            f"({r['seconds']:.0f} s)"
        )
    print(f"stop rule |Δp| <= {args.epsilon} fired at iteration {fired}; {seconds:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
