"""ECE's two-step z (shared per cluster, then per instance) against per-instance z, side by side.

All run in one process on the same model, requests and context templates, and with the same
early-stop rule (loss < early_stop_loss). Per-instance z runs --steps rounds; each --splits entry
S+I runs ECE's two-step z with S shared rounds (over the anchors) then I per-instance rounds, so
20+5 against 25 is the paper's same-budget comparison (25 forwards and 24 updates per request
each), and a list of splits maps the speed/efficacy frontier. The clustering (keys, attribution,
k-means under Jaccard) is computed once and shared by every split. Reported: seconds of each (ECE
also with its attribution + clustering overhead), the ratio, and the z quality each reaches: the
final target NLL with z injected at the z layer (TargetResult.nll, averaged over the context
templates), its mean, and the fraction of requests with NLL < --nll-bound; and the efficacy each z
gives once written: ECE's own neuron-restricted update (eq. 14, 19; λ and the covariance of
configs/ece_smollm2.yaml) applied to the unedited model with each set of z in turn, then the
rewrite prompts scored (efficacy success: P(target_new) > P(target_true); accuracy: every target
token greedy), the weights restored in between. "fastest_at_equal_efficacy" names the fastest
split whose efficacy success and accuracy are both within --efficacy-tolerance points of
per-instance z's (null: no split is at equal efficacy).

    python -m benchmarks.ece_z --n 30                 # SmolLM2-135M-Instruct, CounterFact, one step
    python -m benchmarks.ece_z --n 100 --splits 20+5,15+10,10+15,5+20 --out benchmarks/results/ece_z_n100.json
    python -m benchmarks.ece_z --n 4 --out /tmp/ece_z.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from editlab.data.sources import load_requests
from editlab.editing.cluster import optimize_cluster_targets
from editlab.editing.context_templates import ContextTemplates, make_context_templates
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.ece import ECE, ECETargets
from editlab.editing.neurons import ActivationScore, ResidualSensitivity, WeightImportance
from editlab.editing.stats import CovarianceConfig, second_moments, statistics_cache
from editlab.editing.targets import TargetConfig, TargetResult, optimize_targets
from editlab.evaluation import editing_metrics, evaluate_cases
from editlab.keyed_cache import cache_root
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.load import load_model_and_tokenizer
from editlab.models.weights import read_weight, set_weight

REPO = Path(__file__).resolve().parents[1]
ATTRIBUTIONS = {"AS": ActivationScore, "WI": WeightImportance, "RS": ResidualSensitivity}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="hub id, local dir or the embedded default")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "multi_counterfact.json.gz"))
    ap.add_argument("--n", type=int, default=30, help="requests, all in one step")
    ap.add_argument("--offset", type=int, default=0, help="first record of the data file")
    ap.add_argument("--seed", type=int, default=0, help="seeds the context templates and the clustering")
    ap.add_argument("--layers", default="4,5,6,7,8", help="edited layers; z is optimised at the last one")
    ap.add_argument("--neurons", default="WI", choices=sorted(ATTRIBUTIONS), help="attribution of the neuron sets")
    ap.add_argument("--threshold", type=float, default=0.8, help="p of the neuron selection")
    ap.add_argument("--clusters", type=int, default=None, help="k; default ceil(sqrt(n / 2))")
    ap.add_argument("--steps", type=int, default=25, help="rounds of per-instance z")
    ap.add_argument(
        "--splits",
        default="20+5",
        help="comma list of ECE splits SHARED+INSTANCE (rounds over the anchors, then over every request)",
    )
    ap.add_argument(
        "--efficacy-tolerance",
        type=float,
        default=2.0,
        help="points of efficacy success and accuracy a split may lose and still count as equal efficacy",
    )
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--early-stop-loss", type=float, default=5e-2, help="the same rule for both")
    ap.add_argument("--nll-bound", type=float, default=None, help="success: NLL below this (default early-stop-loss)")
    ap.add_argument("--context-count", type=int, default=5)
    ap.add_argument("--context-length", type=int, default=10)
    ap.add_argument("--mom2-weight", type=float, default=2000.0, help="λ of the update used for efficacy")
    ap.add_argument("--cov-corpus", default=str(REPO.parent / "shared" / "data" / "ME-PPL.json.gz"))
    ap.add_argument("--cov-samples", type=int, default=2000)
    ap.add_argument("--cov-max-length", type=int, default=128)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; default 1 on CPU (on a shared machine OpenMP threads spin-waiting for cores made "
        "each step ~80x slower), torch's own choice on GPU",
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ece_z.json"))
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n={args.n} must be >= 1")
    if args.steps < 1:
        ap.error(f"--steps={args.steps} must be >= 1")
    try:
        args.splits = parse_splits(args.splits)
    except ValueError as err:
        ap.error(f"--splits: {err}")
    return args


def parse_splits(text: str) -> list[tuple[int, int]]:
    """'20+5,10+15' -> [(20, 5), (10, 15)]; each part non-negative with a positive sum, no repeats."""
    splits = []
    for part in text.split(","):
        fields = part.strip().split("+")
        if len(fields) != 2 or not all(f.strip().isdigit() for f in fields):
            raise ValueError(f"{part.strip()!r} is not SHARED+INSTANCE, e.g. 20+5")
        shared, instance = (int(f) for f in fields)
        if shared + instance < 1:
            raise ValueError(f"{part.strip()!r} has no rounds")
        if (shared, instance) in splits:
            raise ValueError(f"{part.strip()!r} is given twice")
        splits.append((shared, instance))
    return splits


def quality(res: TargetResult, bound: float) -> dict:
    nll = res.nll.float().cpu()
    return {
        "nll_mean": float(nll.mean()),
        "nll_median": float(nll.median()),
        "p_target_mean": float((-nll).exp().mean()),  # exp(−mean token NLL), averaged over requests
        "fraction_nll_below_bound": float((nll < bound).float().mean()),
        "loss_mean": float(res.loss.float().mean()),
        "updates_mean": float(res.steps.float().mean()),
        "updates_max": float(res.steps.float().max()),
    }


def work_per_instance(res: TargetResult, rows_per_request: int) -> dict:
    """Forward passes and row-forwards of optimize_targets: a request with u updates was in u + 1
    forwards (the last one found it converged or was the measuring one)."""
    fwd = res.steps.float().cpu() + 1  # [n]
    return {"forward_passes": int(fwd.max()), "row_forwards": int(fwd.sum()) * rows_per_request}


def work_two_step(res, shared_steps: int, instance_steps: int, rows_per_request: int) -> dict:
    """The same count for the two-step optimisation: phase 1 over the anchors (each forward is
    followed by an update unless the anchor converged, or, without phase 2, unless it is the last),
    the no-grad KL reference of phase 2 (one row per request), phase 2 over every request."""
    anchor = res.is_anchor.cpu()
    upd1 = res.shared_updates.float().cpu()[anchor]  # [k]
    fwd1 = (upd1 + 1).clamp_max(shared_steps) if instance_steps > 0 else upd1 + 1
    fwd1 = fwd1 if shared_steps > 0 else torch.zeros(0)
    fwd2 = res.instance_updates.float().cpu() + 1 if instance_steps > 0 else torch.zeros(0)
    kl_ref = len(anchor) if instance_steps > 0 and shared_steps > 0 else 0
    return {
        "forward_passes": int(fwd1.max() if len(fwd1) else 0) + int(kl_ref > 0) + int(fwd2.max() if len(fwd2) else 0),
        "row_forwards": int(fwd1.sum() + fwd2.sum()) * rows_per_request + kl_ref,
    }


EFFICACY_KEYS = ("efficacy_success", "efficacy_accuracy", "efficacy_token_accuracy")


def scored_then_restored(
    view, tok, layers: list[int], requests, write: Callable[[], object], keys=EFFICACY_KEYS
) -> dict:
    """Run ``write`` (an update of the FFN out-projections of ``layers``) on the current weights,
    score the requests' prompts (editing_metrics; ``keys`` of it, None: all), put the weights back."""
    saved = {layer: read_weight(view.ffn_out(layer)).detach().clone() for layer in layers}
    try:
        write()
        metrics = editing_metrics(evaluate_cases(view, tok, requests))
    finally:
        for layer, weight in saved.items():
            set_weight(view.ffn_out(layer), weight)
    return dict(metrics) if keys is None else {k: metrics[k] for k in keys}


def efficacy_after_update(ece: ECE, ctx: EditContext, requests, res: TargetResult, plan) -> dict:
    """Write ECE's update towards res.z on the current (unedited) weights, score the rewrite prompts,
    put the weights back. Efficacy only: the benchmark compares z, not the stream."""
    targets = ECETargets(res, plan)
    return scored_then_restored(ctx.view, ctx.tok, ece.layers, requests, lambda: ece.spread(ctx, requests, targets))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_split(view, tok, requests, templates, z_layer, cfg, plan, shared: int, instance: int, device: str):
    """One timed two-step z over the given clustering: (TargetResult, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    res = optimize_cluster_targets(
        view,
        tok,
        requests,
        templates,
        z_layer,
        cfg,
        plan.clustering.clusters,
        plan.clustering.anchors,
        shared,
        instance,
        progress=False,
    )
    sync(device)
    return res, time.perf_counter() - t0


def points(fraction_gap: float) -> float:
    """A gap between two efficacies in points, rounded to 1e-3: they are fractions of n requests
    held in float32, so 0.97 - 0.95 reads 2.000004 points and would fail a 2-point tolerance."""
    return round(100 * fraction_gap, 3)


def efficacy_gaps(reference: dict, other: dict) -> dict[str, float]:
    """Points of efficacy success and accuracy that ``other`` is below ``reference``."""
    return {k: points(reference[k] - other[k]) for k in ("efficacy_success", "efficacy_accuracy")}


def fastest_at_equal_efficacy(per_instance: dict, splits: list[dict], tolerance_points: float) -> dict | None:
    """The fastest split whose efficacy success and accuracy are both at most tolerance_points
    below per-instance z's; None when none is."""
    equal = [s for s in splits if max(efficacy_gaps(per_instance, s).values()) <= tolerance_points]
    if not equal:
        return None
    best = min(equal, key=lambda s: s["seconds"])
    return {"split": f"{best['shared_steps']}+{best['instance_steps']}", "speedup": best["speedup"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    bound = args.early_stop_loss if args.nll_bound is None else args.nll_bound
    layers = [int(x) for x in args.layers.split(",")]
    t_load = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model, args.dtype, args.device)
    view = ModelView.of(model)
    view.check_layers(layers)
    requests = load_requests(args.data, num_edits=args.n, offset=args.offset)
    templates = make_context_templates(model, tok, ContextTemplates(args.context_count, args.context_length), args.seed)
    seconds_load = time.perf_counter() - t_load
    cfg = TargetConfig(lr=args.lr, steps=args.steps, early_stop_loss=args.early_stop_loss)
    first_shared, first_instance = args.splits[0]
    # The ECE object supplies the clustering (locate) and the update (spread); neither reads the split.
    ece = ECE(
        layers=layers,
        neurons=ATTRIBUTIONS[args.neurons](threshold=args.threshold),
        z_mode="two_step",
        clusters=args.clusters,
        shared_steps=first_shared,
        instance_steps=first_instance,
        targets=cfg,
        mom2_weight=args.mom2_weight,
        covariance=CovarianceConfig(
            corpus=args.cov_corpus, num_samples=args.cov_samples, max_length=args.cov_max_length
        ),
    )
    ece.templates = templates
    fingerprint = model_fingerprint(model)
    ece.cov = second_moments(
        view, tok, args.model, fingerprint, layers, ece.covariance, statistics_cache(cache_root()), progress=False
    )
    ctx = EditContext(model, tok, view, args.model, fingerprint, args.seed, progress=False)
    z_layer = layers[-1]
    rows = len(templates) + 1  # rewrite rows (one per context template) + the KL row

    # Warm-up (allocator, kernels, lazy imports) so no timed run pays first-call costs.
    optimize_targets(view, tok, requests[:2], templates, z_layer, TargetConfig(lr=args.lr, steps=2), progress=False)

    sync(args.device)
    t0 = time.perf_counter()
    per_instance = optimize_targets(view, tok, requests, templates, z_layer, cfg, progress=False)
    sync(args.device)
    t1 = time.perf_counter()
    plan = ece.locate(ctx, requests)
    sync(args.device)
    t2 = time.perf_counter()
    sec_inst, sec_locate = t1 - t0, t2 - t1
    pre = editing_metrics(evaluate_cases(view, tok, requests))
    work_inst = work_per_instance(per_instance, rows)
    inst = {
        "steps": args.steps,
        "seconds": sec_inst,
        **work_inst,
        **quality(per_instance, bound),
        **efficacy_after_update(ece, ctx, requests, per_instance, plan),
    }

    entries = []
    for shared, instance in args.splits:
        two_step, sec_two = run_split(view, tok, requests, templates, z_layer, cfg, plan, shared, instance, args.device)
        work_two = work_two_step(two_step, shared, instance, rows)
        anchor = two_step.is_anchor.cpu()
        # How far ECE's z lands from the per-instance z, relative to the per-instance shift ‖z − h‖.
        gap = (two_step.z - per_instance.z).norm(dim=1) / (per_instance.z - per_instance.h).norm(dim=1).clamp_min(1e-12)
        eff = efficacy_after_update(ece, ctx, requests, two_step, plan)
        entries.append(
            {
                "shared_steps": shared,
                "instance_steps": instance,
                "seconds": sec_two,
                "seconds_shared": two_step.seconds_shared,
                "seconds_instance": two_step.seconds_instance,
                "seconds_with_locate": sec_two + sec_locate,
                "shared_updates_mean": float(two_step.shared_updates.float().mean()),
                "instance_updates_mean": float(two_step.instance_updates.float().mean()),
                **work_two,
                **quality(two_step, bound),
                "nll_mean_anchors": float(two_step.nll.float().cpu()[anchor].mean()),
                "nll_mean_members": float(two_step.nll.float().cpu()[~anchor].mean()) if (~anchor).any() else None,
                **eff,
                "speedup": sec_inst / sec_two if sec_two > 0 else math.inf,
                "speedup_with_locate": sec_inst / (sec_two + sec_locate) if sec_two + sec_locate > 0 else math.inf,
                # Hardware-independent: rows pushed through the model. Wall-clock follows it only
                # where a forward's cost grows with its rows (large batches, big models); small
                # batches on a latency-bound device cost about the same per forward whatever the rows.
                "row_forward_ratio": work_inst["row_forwards"] / max(work_two["row_forwards"], 1),
                "efficacy_gap_points": efficacy_gaps(inst, eff),
                "z_relative_gap_mean": float(gap.mean()),
            }
        )

    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"}
        | {"splits": [f"{a}+{b}" for a, b in args.splits], "nll_bound": bound, "z_layer": z_layer},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "machine": platform.machine(),
            "seconds_load": seconds_load,
        },
        "requests": len(requests),
        "clusters": len(plan.clustering.clusters),
        "cluster_sizes": [len(c) for c in plan.clustering.clusters],
        "cluster_attribution": plan.cluster_attribution,
        "seconds_locate": sec_locate,  # keys at every layer, attribution, clustering: once for all splits
        "pre_efficacy_success": pre["efficacy_success"],
        "pre_efficacy_accuracy": pre["efficacy_accuracy"],
        "per_instance": inst,
        "ece_two_step": entries,
        "fastest_at_equal_efficacy": fastest_at_equal_efficacy(inst, entries, args.efficacy_tolerance),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sizes = result["cluster_sizes"]
    print(f"{len(requests)} requests, {len(sizes)} clusters {sizes}, locate {sec_locate:.2f} s")
    print(
        f"per-instance {args.steps:>2} steps: {sec_inst:8.2f} s  NLL {inst['nll_mean']:.3f}  "
        f"efficacy {inst['efficacy_success']:.3f} / {inst['efficacy_accuracy']:.3f}"
    )
    for e in entries:
        print(
            f"ECE {e['shared_steps']:>2}+{e['instance_steps']:<2}       {e['seconds']:8.2f} s  "
            f"NLL {e['nll_mean']:.3f}  "
            f"efficacy {e['efficacy_success']:.3f} / {e['efficacy_accuracy']:.3f}  speedup {e['speedup']:.2f}x "
            f"({e['speedup_with_locate']:.2f}x with locate)"
        )
    best = result["fastest_at_equal_efficacy"]
    print(
        f"fastest split within {args.efficacy_tolerance:g} points of per-instance efficacy: "
        + (f"{best['split']} at {best['speedup']:.2f}x" if best else "none")
        + f" -> {out}"
    )
    return result


if __name__ == "__main__":
    main()
