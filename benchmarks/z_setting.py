"""z settings (Adam lr, step budget) side by side: steps taken, seconds, z quality and efficacy.

For long studies z dominates the time of a step (SmolLM2, MEMIT_seq: ~22 of 25 steps taken on
average). This benchmark asks whether another (lr, steps) reaches the same efficacy in fewer steps.
Only lr and steps may change: the context templates, the loss and the stop rule (loss <
early_stop_loss) stay the config's.

One process, one model (unedited), the first --n records of the data file as one step. The method
is the config's MEMIT (configs/memit_seq_smollm2.yaml: layers, λ, z options, context templates and
covariance, read through the same cache the runs use) with the sequential cache off. For every
--settings entry, z comes from MEMIT.compute_targets, the code the runs call, with only lr and steps
replaced; timed are its wall seconds and this process's CPU seconds (one thread: the CPU seconds
are the work, the wall seconds also hold what other processes took from the cores). With
--repeats R the settings run R times, every other round in reverse order (A B C, C B A, ...), so
no setting always runs first or last under a changing load; z must come out bit for bit the same
each time (``z_identical_across_repeats``). The load average before and after each run is
recorded.

Per setting: the gradient updates each request took (early stop; MEMIT's steps count, z_steps in
steps.jsonl) as mean, median, histogram and the fraction that converged (final loss below
early_stop_loss) or used the whole budget; forwards and row-forwards (hardware-independent work);
the final target NLL (mean, fraction below --nll-bound); how many shifts ‖z − h‖ end on the
clamp (clamp_norm_factor·‖h‖; the final state, not every step). Then MEMIT's update (λC + KKᵀ, no
past steps) towards each setting's z is written on the unedited weights in turn, all prompt
families scored (efficacy success and accuracy on the rewrite prompts, generalization: paraphrase
prompts, specificity: neighbourhood prompts) and the weights put back.

The first setting is the reference (today's lr 0.5, 25 steps). "recommended" is the setting with
the fewest CPU seconds whose efficacy success and accuracy are at most --efficacy-tolerance points
below the reference's and whose paraphrase success is at most --paraphrase-tolerance points below
(null: none but the reference qualifies, or the reference is the fastest).

    python -m benchmarks.z_setting --n 30 --settings lr=0.5,steps=25 lr=1.0,steps=25 lr=1.0,steps=15 \\
        lr=2.0,steps=15 --out benchmarks/results/z_setting_smollm2.json
    python -m benchmarks.z_setting --config /tmp/tiny.yaml --n 4 --out /tmp/z_setting.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.ece_z import points, quality, scored_then_restored, sync, work_per_instance
from editlab.data.sources import load_requests
from editlab.editing.context_templates import ContextTemplates
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.memit import MEMIT
from editlab.editing.stats import CovarianceConfig
from editlab.editing.targets import TargetConfig, TargetResult
from editlab.keyed_cache import cache_root
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.load import load_model_and_tokenizer
from editlab.models.weights import read_weight

REPO = Path(__file__).resolve().parents[1]
SETTABLE = {"lr": float, "steps": int}  # the only z options a setting may change
DEFAULT_SETTINGS = ["lr=0.5,steps=25", "lr=1.0,steps=25", "lr=1.0,steps=15", "lr=2.0,steps=15"]
METRICS = (
    "efficacy_success",
    "efficacy_accuracy",
    "efficacy_token_accuracy",
    "generalization_success",
    "generalization_accuracy",
    "specificity_success",
)
AT_CLAMP = 1 - 1e-4  # ‖z − h‖ / (clamp·‖h‖) above this: the clamp's projection set the norm


def parse_setting(text: str) -> dict:
    """'lr=1.0,steps=15' -> {'lr': 1.0, 'steps': 15}; only lr and steps, each at most once."""
    out: dict = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in SETTABLE:
            raise ValueError(f"{part.strip()!r}: a setting is KEY=VALUE with KEY in {sorted(SETTABLE)}")
        if key in out:
            raise ValueError(f"{text!r} gives {key} twice")
        try:
            out[key] = SETTABLE[key](value)
        except ValueError as err:
            raise ValueError(f"{part.strip()!r}: {err}") from err
    return out


def setting_label(cfg: TargetConfig) -> str:
    return f"lr={cfg.lr:g},steps={cfg.steps}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "memit_seq_smollm2.yaml"), help="editlab fit config")
    ap.add_argument("--model", default=None, help="override the config's model.model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "multi_counterfact.json.gz"))
    ap.add_argument("--n", type=int, default=30, help="requests, all in one step")
    ap.add_argument("--offset", type=int, default=0, help="first record of the data file")
    ap.add_argument(
        "--settings", nargs="+", default=DEFAULT_SETTINGS, help="lr=X,steps=Y ...; the first is the reference"
    )
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds, every other one in reverse order")
    ap.add_argument("--nll-bound", type=float, default=None, help="success: NLL below this (default early_stop_loss)")
    ap.add_argument("--efficacy-tolerance", type=float, default=1.0, help="points of efficacy a setting may lose")
    ap.add_argument("--paraphrase-tolerance", type=float, default=0.0, help="points of paraphrase success it may lose")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; default 1 on CPU (as the studies run), torch's own choice on GPU",
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "z_setting_smollm2.json"))
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        ap.error("--n and --repeats must be >= 1")
    try:
        args.settings = [parse_setting(s) for s in args.settings]
    except ValueError as err:
        ap.error(f"--settings: {err}")
    return args


def method_from_config(path: Path) -> tuple[dict, MEMIT]:
    """The config's model block and its MEMIT, sequential cache off (one step on the unedited model)."""
    block = yaml.safe_load(path.read_text())["model"]
    method = block["method"]
    if method["class_path"].rsplit(".", 1)[-1] != "MEMIT":
        raise SystemExit(f"{path}: model.method is {method['class_path']}, this benchmark runs MEMIT")
    init = dict(method.get("init_args", {}))
    cov = dict(init.get("covariance", {}))
    corpus = cov.get("corpus")
    # The configs name the corpus relative to the repository root, where runs start.
    if corpus and not os.path.exists(corpus) and (REPO / corpus).exists():
        cov["corpus"] = str(REPO / corpus)
    if init.get("eac") is not None:
        raise SystemExit(f"{path}: MEMIT with eac has its own z stages; use a plain MEMIT config")
    memit = MEMIT(
        layers=list(init["layers"]),
        mom2_weight=float(init.get("mom2_weight", 15000.0)),
        sequential=False,
        targets=TargetConfig(**init.get("targets", {})),
        context=ContextTemplates(**init.get("context", {})),
        covariance=CovarianceConfig(**cov),
    )
    return block, memit


def updates_summary(res: TargetResult, cfg: TargetConfig) -> dict:
    """How many gradient updates each request took before the stop rule (or the budget) ended it."""
    upd = res.steps.float().cpu()  # [n]
    counts = torch.bincount(upd.long(), minlength=cfg.steps)
    return {
        "updates_median": float(upd.median()),
        "updates_histogram": {str(k): int(c) for k, c in enumerate(counts.tolist()) if c},
        "fraction_converged": float((res.loss.float().cpu() < cfg.early_stop_loss).float().mean()),
        # The last of `steps` forwards only measures, so steps − 1 updates is the whole budget.
        "fraction_used_budget": float((upd >= cfg.steps - 1).float().mean()),
    }


def clamp_summary(res: TargetResult, cfg: TargetConfig) -> dict:
    """Final shift norms against the clamp radius clamp_norm_factor·‖h‖."""
    ratio = (res.z - res.h).float().norm(dim=1) / (cfg.clamp_norm_factor * res.h.float().norm(dim=1))  # [n]
    ratio = ratio.cpu()
    return {
        "shift_over_clamp_mean": float(ratio.mean()),
        "shift_over_clamp_max": float(ratio.max()),
        "fraction_at_clamp": float((ratio > AT_CLAMP).float().mean()),
    }


def timed_targets(method: MEMIT, ctx: EditContext, requests, cfg: TargetConfig, device: str) -> tuple:
    """(TargetResult, wall seconds, CPU seconds, load averages before and after) of one z run."""
    method.targets = cfg
    load_before = os.getloadavg()
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    res = method.compute_targets(ctx, requests)
    sync(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return res, wall, cpu, [round(x, 2) for x in load_before], [round(x, 2) for x in os.getloadavg()]


def median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


def qualifies(reference: dict, entry: dict, eff_tol: float, para_tol: float) -> bool:
    eff = max(points(reference[k] - entry[k]) for k in ("efficacy_success", "efficacy_accuracy"))
    para = points(reference["generalization_success"] - entry["generalization_success"])
    return eff <= eff_tol and para <= para_tol


def recommend(entries: list[dict], eff_tol: float, para_tol: float) -> dict | None:
    """The setting with the fewest CPU seconds among those at the reference's efficacy (see the
    module docstring); None when that is the reference itself."""
    reference = entries[0]
    equal = [e for e in entries if qualifies(reference, e, eff_tol, para_tol)]
    best = min(equal, key=lambda e: e["cpu_seconds"])  # the reference always qualifies
    if best is reference:
        return None
    return {
        "setting": best["setting"],
        "lr": best["lr"],
        "steps": best["steps"],
        "cpu_speedup": best["cpu_speedup"],
        "wall_speedup": best["wall_speedup"],
        "row_forward_ratio": best["row_forward_ratio"],
        "options": f"--model.method.init_args.targets.lr {best['lr']:g} "
        f"--model.method.init_args.targets.steps {best['steps']}",
    }


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    block, method = method_from_config(Path(args.config))
    model_id = args.model or block.get("model", "smollm2-135m-instruct")
    base = method.targets
    configs = [dataclasses.replace(base, **s) for s in args.settings]
    labels = [setting_label(c) for c in configs]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--settings: a setting is given twice ({labels})")
    bound = base.early_stop_loss if args.nll_bound is None else args.nll_bound

    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(model_id, block.get("dtype", "float32"), args.device)
    view = ModelView.of(model)
    requests = load_requests(args.data, num_edits=args.n, offset=args.offset)
    ctx = EditContext(model, tok, view, model_id, model_fingerprint(model), int(block.get("seed", 0)), progress=False)
    seconds_load = time.perf_counter() - t0
    method.setup(ctx)  # context templates and covariance, as a run's setup (the cache the runs fill)
    seconds_setup = time.perf_counter() - t0 - seconds_load
    original = {layer: read_weight(view.ffn_out(layer)).detach().clone() for layer in method.layers}
    pre = scored_then_restored(view, tok, method.layers, requests, lambda: None, keys=METRICS)

    # Warm-up (allocator, kernels, lazy imports) so no timed run pays first-call costs.
    timed_targets(method, ctx, requests[:2], dataclasses.replace(base, steps=2), args.device)

    runs: dict[str, list[dict]] = {label: [] for label in labels}
    results: dict[str, TargetResult] = {}
    identical = {label: True for label in labels}
    order = list(range(len(configs)))
    for r in range(args.repeats):
        for i in order if r % 2 == 0 else order[::-1]:
            res, wall, cpu, before, after = timed_targets(method, ctx, requests, configs[i], args.device)
            runs[labels[i]].append({"round": r, "wall_seconds": wall, "cpu_seconds": cpu, "load_before": before})
            runs[labels[i]][-1]["load_after"] = after
            if labels[i] in results:
                identical[labels[i]] &= bool(torch.equal(results[labels[i]].z, res.z))
            else:
                results[labels[i]] = res
    method.targets = base

    rows = len(method.templates) + 1  # rewrite rows (one per context template) + the KL row
    entries = []
    for cfg, label in zip(configs, labels, strict=True):
        res = results[label]
        scores = scored_then_restored(
            view, tok, method.layers, requests, lambda res=res: method.spread(ctx, requests, res), keys=METRICS
        )
        wall = [run["wall_seconds"] for run in runs[label]]
        cpu = [run["cpu_seconds"] for run in runs[label]]
        entries.append(
            {
                "setting": label,
                "lr": cfg.lr,
                "steps": cfg.steps,
                "wall_seconds": median(wall),
                "cpu_seconds": median(cpu),
                "runs": runs[label],
                **work_per_instance(res, rows),
                **quality(res, bound),
                **updates_summary(res, cfg),
                **clamp_summary(res, cfg),
                **scores,
            }
        )
    restored = all(torch.equal(read_weight(view.ffn_out(layer)), w) for layer, w in original.items())
    if not restored:
        raise RuntimeError("the weights differ from the unedited ones after scoring: the comparison is void")

    ref = entries[0]
    for e in entries:
        e["wall_speedup"] = ref["wall_seconds"] / e["wall_seconds"]
        e["cpu_speedup"] = ref["cpu_seconds"] / e["cpu_seconds"]
        e["row_forward_ratio"] = ref["row_forwards"] / e["row_forwards"]
        e["gap_points"] = {k: points(ref[k] - e[k]) for k in METRICS}  # > 0: below the reference
        e["at_reference_efficacy"] = qualifies(ref, e, args.efficacy_tolerance, args.paraphrase_tolerance)

    result = {
        "command": "python -m benchmarks.z_setting " + shlex.join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "settings")}
        | {
            "settings": labels,
            "model": model_id,
            "layers": method.layers,
            "mom2_weight": method.mom2_weight,
            "targets": dataclasses.asdict(base),
            "context": dataclasses.asdict(method.context),
            "covariance": dataclasses.asdict(method.covariance),
            "templates": method.templates,
            "nll_bound": bound,
            "reference_is_config": setting_label(base) == labels[0],
        },
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cache_root": str(cache_root()),
            "seconds_load": seconds_load,
            "seconds_setup": seconds_setup,
            "note": "wall seconds include what other processes took from the cores (load averages per run); "
            "CPU seconds are this process's own, at one thread the work of z",
        },
        "requests": len(requests),
        "pre": pre,
        "settings": entries,
        "z_identical_across_repeats": identical,
        "weights_restored": restored,
        "recommended": recommend(entries, args.efficacy_tolerance, args.paraphrase_tolerance),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(requests)} requests; pre efficacy {pre['efficacy_success']:.3f}")
    for e in entries:
        print(
            f"{e['setting']:>17}: {e['cpu_seconds']:8.1f} CPU s ({e['cpu_speedup']:.2f}x) {e['wall_seconds']:8.1f} s  "
            f"updates {e['updates_mean']:5.1f}  converged {e['fraction_converged']:.2f}  NLL {e['nll_mean']:.3f}  "
            f"clamp {e['fraction_at_clamp']:.2f}  efficacy {e['efficacy_success']:.3f} / "
            f"{e['efficacy_accuracy']:.3f}  paraphrase {e['generalization_success']:.3f}"
        )
    best = result["recommended"]
    print(
        "recommended: "
        + (f"{best['setting']} ({best['cpu_speedup']:.2f}x)" if best else "the reference")
        + f" -> {out}"
    )
    return result


if __name__ == "__main__":
    main()
