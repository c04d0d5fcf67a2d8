"""One-command GPU readiness check: SmolLM2 in bfloat16 and float32, MEMIT, AlphaEdit, ECE and NSE
on 100 CounterFact edits in one step each, timed by stage, with peak device memory beside
editlab's estimate. Exits non-zero when anything is off (a stage failing, non-finite weights,
bf16 efficacy more than --tolerance below fp32, peak memory above the estimate).

    python -m benchmarks.gpu_check --device cuda --data ../shared/data/multi_counterfact.json.gz
    python -m benchmarks.gpu_check --device cpu --tiny          # a tiny random model, seconds

Every method is built from its SmolLM2 config (``configs/<method>_smollm2.yaml``'s model.method,
z caches off) and edits the unedited model (weights restored in between) from the same covariance
and context templates; the CPU figures of benchmarks/results/pipeline_n100.json (float32, 1 thread)
are copied beside the GPU seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from benchmarks.pipeline import Clock, efficacy, spread
from editlab.data.sources import load_requests
from editlab.editing.context_templates import make_context_templates
from editlab.editing.keys import keys_and_outputs
from editlab.editing.methods.base import EditContext
from editlab.editing.rewind import OriginalWeights
from editlab.editing.solve import memit_delta, null_space_projection
from editlab.editing.stats import CovarianceConfig, accumulate_second_moments, read_corpus
from editlab.editing.targets import optimize_targets
from editlab.memory import GiB, plan_memory
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.load import EMBEDDED_DEFAULT, load_model_and_tokenizer, torch_dtype
from editlab.models.weights import read_weight, set_weight
from editlab.plan import instantiate_method

REPO = Path(__file__).resolve().parents[1]
METHODS = ("memit", "alphaedit", "ece", "nse")
DTYPES = ("bfloat16", "float32")
CPU_FIGURES = REPO / "benchmarks" / "results" / "pipeline_n100.json"


@dataclass
class MethodRun:
    seconds: dict[str, float] = field(default_factory=dict)
    efficacy: float = float("nan")
    peak_bytes: int | None = None  # device peak during the edit and its evaluation (CUDA only)
    estimate_bytes: int = 0
    finite: bool = True
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama instead of SmolLM2 (CPU smoke run)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "multi_counterfact.json.gz"))
    ap.add_argument("--n", type=int, default=None, help="edits in the one step (default 100; --tiny: 4)")
    ap.add_argument("--cov-corpus", default=str(REPO.parent / "shared" / "data" / "ME-PPL.json.gz"))
    ap.add_argument("--cov-samples", type=int, default=None, help="covariance texts (default 1000; --tiny: 20)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="bf16 efficacy may be at most this far below fp32's")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args(argv)
    args.n = args.n or (4 if args.tiny else 100)
    args.cov_samples = args.cov_samples or (20 if args.tiny else 1000)
    if set(args.methods.split(",")) - set(METHODS):
        ap.error(f"--methods: each of {METHODS}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu --tiny for the CPU smoke run)")
    return args


def load(args: argparse.Namespace, dtype: str):
    """The model in ``dtype`` on the device, its tokenizer and the edited layers."""
    if args.tiny:
        from editlab.models.tiny import tiny_model

        model, tok = tiny_model("llama", layers=4)
        return model.to(args.device, torch_dtype(dtype)), tok, [1, 2]
    model, tok = load_model_and_tokenizer(EMBEDDED_DEFAULT, dtype, args.device)
    return model, tok, [4, 5, 6, 7, 8]  # benchmarks/pipeline.py's layers (z at 8 of 30)


CONFIGS = {name: REPO / "configs" / f"{name}_smollm2.yaml" for name in METHODS}


def method_spec(name: str, layers: list[int], tiny: bool) -> dict:
    """``model.method`` of ``configs/<name>_smollm2.yaml`` (class_path and init_args), so the check
    edits with the settings a SmolLM2 run uses (NSE's upper_bound, ECE's neuron threshold, ...);
    z caches off (time the z computation, not a disk read). ``tiny``: the tiny model's layers and
    a shorter context."""
    spec = yaml.safe_load(CONFIGS[name].read_text())["model"]["method"]
    init = dict(spec.get("init_args", {}))
    init.pop("covariance", None)  # the check computes one covariance for all methods (--cov-samples)
    if "z_cache" in init:
        init["z_cache"] = False
    if tiny:
        init.update(layers=layers, context={"count": 2, "length": 5})
    elif list(init["layers"]) != layers:
        raise SystemExit(f"{CONFIGS[name]}: layers {init['layers']}, the check edits {layers}")
    return {"class_path": spec["class_path"], "init_args": init}


def make_method(name: str, layers: list[int], tiny: bool):
    return instantiate_method(method_spec(name, layers, tiny))


def edit(name: str, method, ctx: EditContext, requests, templates, cov, clock: Clock) -> None:
    """One step of ``method`` on the unedited model, its stages into ``clock``. MEMIT runs its stages
    one by one (z, keys, solve: the split of pipeline_n100.json); the others through ``apply``
    (z, and the spread: keys + solve, and their own stages)."""
    layers = method.edited_layers()
    if name == "memit":
        res = clock.time(
            "z", optimize_targets, ctx.view, ctx.tok, requests, templates, layers[-1], method.targets, progress=False
        )
        keys, solve = keys_and_outputs, memit_delta
        spread(ctx.view, ctx.tok, requests, templates, layers, res.z, cov, method.mom2_weight, clock, keys, solve)
        return
    method.templates, method.cov = templates, cov  # in place of setup: the shared statistics
    if name == "alphaedit":
        method.proj = {
            la: clock.time("projection", null_space_projection, cov[la], method.nullspace_threshold) for la in layers
        }
    else:
        method.original = OriginalWeights(ctx.view, layers)  # setup's W_0: the model is unedited here
    s = clock.time("apply", method.apply, ctx, requests).scalars
    clock.seconds["z"] = s["seconds_z"]
    clock.seconds["spread"] = s["seconds_solve"] + s["seconds_keys"]  # keys + solves (NSE: its passes)


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None  # no allocator statistics on the CPU
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def run_dtype(args: argparse.Namespace, dtype: str) -> dict:
    model, tok, layers = load(args, dtype)
    view = ModelView.of(model)
    requests = load_requests(args.data, num_edits=args.n)
    methods = {name: make_method(name, layers, args.tiny) for name in args.methods.split(",")}
    context = methods[next(iter(methods))].context  # the same in every config (a test checks)
    templates = make_context_templates(model, tok, context, 0)
    cov_cfg = CovarianceConfig(corpus=args.cov_corpus, num_samples=args.cov_samples, max_length=128, use_cache=False)
    texts, _ = read_corpus(cov_cfg)
    clock = Clock(args.device)
    moms = clock.time("covariance", accumulate_second_moments, view, tok, texts, layers, cov_cfg, progress=False)
    cov = {la: m.mean() for la, m in moms.items()}
    saved = {la: read_weight(view.ffn_out(la)).detach().clone() for la in layers}
    pre = efficacy(view, tok, requests)["efficacy_success"]
    n_params = sum(p.numel() for p in model.parameters())
    prompt = max(len(tok(r.rewrite_prompt)["input_ids"]) for r in requests) + 8
    runs: dict[str, MethodRun] = {}
    for name, method in methods.items():
        run = runs[name] = MethodRun()
        run.estimate_bytes = plan_memory(
            model.config, method, model.dtype.itemsize, n_params, len(requests), prompt
        ).device_total
        ctx = EditContext(model, tok, view, "gpu_check", model_fingerprint(model), 0, progress=False)
        mclock = Clock(args.device)
        peak_reset(args.device)
        try:
            edit(name, method, ctx, requests, templates, cov, mclock)
            run.finite = all(bool(torch.isfinite(read_weight(view.ffn_out(la))).all()) for la in layers)
            run.efficacy = mclock.time("evaluation", efficacy, view, tok, requests)["efficacy_success"]
        except Exception as err:  # a failing stage is a finding: record it, go on with the others
            run.error = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        run.peak_bytes = peak_bytes(args.device)
        run.seconds = mclock.seconds
        for la, w in saved.items():  # the next method edits the unedited model
            set_weight(view.ffn_out(la), w)
    del model, cov, moms
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "covariance_seconds": clock.seconds["covariance"],
        "covariance_texts": len(texts),
        "pre_efficacy": pre,
        "requests": len(requests),
        "methods": {k: vars(v) for k, v in runs.items()},
    }


def problems(report: dict, tolerance: float) -> list[str]:
    """Every reason to fail, one line each."""
    out = []
    for dtype, res in report["dtypes"].items():
        for name, run in res["methods"].items():
            where = f"{name} {dtype}"
            if run["error"]:
                out.append(f"{where}: {run['error']}")
                continue
            if not run["finite"]:
                out.append(f"{where}: non-finite edited weights")
            if not math.isfinite(run["efficacy"]):
                out.append(f"{where}: efficacy not measured")
            if run["peak_bytes"] is not None and run["peak_bytes"] > run["estimate_bytes"]:
                out.append(
                    f"{where}: peak {run['peak_bytes'] / GiB:.2f} GiB above the estimate "
                    f"{run['estimate_bytes'] / GiB:.2f}"
                )
    if set(DTYPES) <= set(report["dtypes"]):
        bf, fp = (report["dtypes"][d]["methods"] for d in DTYPES)
        for name in bf.keys() & fp.keys():
            gap = fp[name]["efficacy"] - bf[name]["efficacy"]
            if gap > tolerance:
                out.append(
                    f"{name}: bf16 efficacy {bf[name]['efficacy']:.3f} is {gap:.3f} below fp32's "
                    f"(tolerance {tolerance})"
                )
    return out


def cpu_figures() -> dict:
    """The stage seconds measured on the CPU (float32, 1 thread) by benchmarks/pipeline.py."""
    if not CPU_FIGURES.is_file():
        return {}
    data = json.loads(CPU_FIGURES.read_text())
    methods = {k: v["seconds"] for k, v in data.get("methods", {}).items()}
    return {
        "source": str(CPU_FIGURES.relative_to(REPO)),
        "covariance": data["covariance"]["seconds"],
        "methods": methods,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    report: dict = {
        "config": vars(args),
        "environment": {
            "torch": torch.__version__,
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        },
        "dtypes": {},
        "cpu_figures": cpu_figures(),
    }
    for dtype in DTYPES:
        report["dtypes"][dtype] = run_dtype(args, dtype)
    report["seconds"] = time.perf_counter() - t0
    report["problems"] = problems(report, args.tolerance)
    report["ok"] = not report["problems"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for dtype, res in report["dtypes"].items():
        for name, run in res["methods"].items():
            secs = ", ".join(f"{k} {v:.1f}s" for k, v in run["seconds"].items())
            peak = "" if run["peak_bytes"] is None else f"  peak {run['peak_bytes'] / GiB:.2f} GiB"
            print(
                f"{dtype:9s} {name:10s} efficacy {run['efficacy']:.3f}{peak}  "
                f"est {run['estimate_bytes'] / GiB:.2f} GiB  {secs}"
            )
    for line in report["problems"]:
        print(f"gpu_check: {line}", file=sys.stderr)
    print(out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
