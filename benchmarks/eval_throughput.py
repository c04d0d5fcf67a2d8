"""Evaluation throughput: editlab's evaluation against the path it replaced, side by side.

One process, one model, the first --n CounterFact records, the evaluation settings of --config
(configs/memit_seq_smollm2.yaml: ME-PPL-50, generation from every generation prompt of the first
50 cases, 100 tokens including the prompt, top-k 5). Per part, interleaved A/B repeats (the order
alternates), medians reported with cases/s and the ratio:

- scoring: teacher-forced rewrite / paraphrase / neighbourhood prompts. ``reference_score_answers``
  is the scorer editlab used before (every (prompt, answer) pair its own row, batched in case
  order, each batch padded to its longest row); editlab's ``evaluate_cases`` runs each shared row
  once (target_new and target_true after the same prompt, repeated neighbourhood prompts) and
  batches the rows by length. The per-case records of the two must match: every success and
  accuracy flag and every token accuracy exactly, the NLLs to --nll-tolerance (a row run in a
  batch of other shapes and padding is not bit-identical in float32); the benchmark fails
  otherwise.
- me_ppl: ``reference_sequence_nll`` (full [B, S, V] logits, texts in file order) against
  editlab's ``sequence_nll`` (longest first, logits at the predicted positions only).
- generation: fluency/consistency texts. Unchanged and timed once: its texts depend on the
  seeded generator's draws and on logits that are bit-identical only in the same batch shapes, so
  any re-batching (by length, dropping finished rows, larger batches) can change a near-tied
  sample and with it the rest of a text. ``generation_waste`` counts the row-steps that re-batching
  could save, so the choice is measured.
- generated: the generation-based scores (``*_generated_exact`` / ``*_generated_prefix``, greedy
  continuations of the rewrite and paraphrase prompts; new, no earlier path), timed against
  editlab's teacher-forced scoring of the same cases, interleaved: their cost per case and the
  ratio. The totals add them as ``editlab_with_generated_seconds``.

The 2,000-case evaluation (--project-to) is projected from --n: the fixed parts (generation,
ME-PPL: they do not grow with the cases) plus the scoring, scaled two ways. ``linear``: scoring
seconds per case times the cases, which understates editlab's gain (more cases share more
neighbourhood rows). ``by_positions``: scoring seconds per forward position (padding included)
times the positions each path runs at --project-to (``forward_positions``, counted exactly from the
tokenised data); the matrix products, proportional to the positions, are ~88% of the scoring time.

    python -m benchmarks.eval_throughput --n 100 --threads 1 --out benchmarks/results/eval_throughput_smollm2.json
    python -m benchmarks.eval_throughput --n 100 --threads 1 --parts generated --out /tmp/generated_cost.json
    python -m benchmarks.eval_throughput --tiny --n 6 --generation-cases 2 --out /tmp/eval_throughput.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from editlab.data.sources import load_requests
from editlab.evaluation import (
    EvaluationConfig,
    Evaluator,
    case_pairs,
    case_records,
    editing_metrics,
    evaluate_cases,
    generated_metrics,
)
from editlab.metrics.perplexity import sequence_nll, token_nll
from editlab.metrics.probes import ProbeConfig
from editlab.models.arch import ModelView
from editlab.models.prompts import pad
from editlab.models.scoring import answer_rows, reduce_rows, shared_rows, token_nll_and_hits

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PARTS = ("scoring", "me_ppl", "generation", "generated")
# Keys of editing_metrics that are means of flags: equal flags give them exactly equal.
FLAG_METRICS = ("_success", "_accuracy", "_token_accuracy", "score")


# ----------------------------------------------------------------------------- the earlier path


@torch.no_grad()
def reference_score_answers(view: ModelView, tok, prompts: list[str], answers: list[str], batch_size: int = 32):
    """editlab's scorer before the shared, length-sorted rows: one row per pair, in order."""
    rows, t_row, t_pos, t_id = answer_rows(tok, prompts, answers)
    base, unembed, device = view.model.base_model, view.unembed(), view.device
    all_nll, all_hit = torch.zeros(len(t_row)), torch.zeros(len(t_row), dtype=torch.bool)
    for start in range(0, len(rows), batch_size):
        stop = min(start + batch_size, len(rows))
        batch = pad(rows[start:stop], tok.pad_token_id).to(device)
        hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        sel = ((t_row >= start) & (t_row < stop)).nonzero().squeeze(1)
        logits = unembed(hidden[(t_row[sel] - start).to(device), t_pos[sel].to(device)])  # [t, V]
        nll, hit = token_nll_and_hits(logits, t_id[sel].to(device))
        all_nll[sel], all_hit[sel] = nll.cpu(), hit.cpu()
    nll, exact, token_acc = reduce_rows(all_nll, all_hit, t_row, len(rows))
    return {"nll": nll, "exact": exact, "token_acc": token_acc}


def reference_evaluate_cases(view: ModelView, tok, requests, batch_size: int = 32) -> list[dict]:
    prompts, answers, where = case_pairs(requests)
    return case_records(requests, where, reference_score_answers(view, tok, prompts, answers, batch_size))


@torch.no_grad()
def reference_sequence_nll(model, tok, texts: list[str], batch_size: int = 8, max_length: int = 512):
    """editlab's ME-PPL before: texts in file order, full [B, S, V] logits."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    device = next(model.parameters()).device
    rows = [tok(t)["input_ids"][:max_length] for t in texts]
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = [r for r in rows[start : start + batch_size] if r]
        if not chunk:
            continue
        batch = pad(chunk, pad_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        s, n = token_nll(logits, batch.input_ids, batch.attention_mask)
        total, count = total + s, count + n
    return total, count


def problems_of(result: dict) -> list[list[str]]:
    """Every ``problems`` list in the result, however deep."""
    if isinstance(result, dict):
        own = [result["problems"]] if isinstance(result.get("problems"), list) else []
        return own + [p for v in result.values() if isinstance(v, dict) for p in problems_of(v)]
    return []


@torch.no_grad()
def float64_sequence_nll(model, tok, texts: list[str], max_length: int = 512) -> tuple[float, int]:
    """The ME-PPL sums with each text run alone (no padding) and its log-softmax in float64."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"][:max_length]], device=next(model.parameters()).device)
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()  # [S-1, V]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total, count


# ----------------------------------------------------------------------------- comparisons


def padded_positions(rows: list[list[int]], batch_size: int) -> int:
    """Positions a forward over ``rows`` in batches of ``batch_size`` runs, padding included."""
    return sum(
        max(map(len, rows[s : s + batch_size])) * len(rows[s : s + batch_size]) for s in range(0, len(rows), batch_size)
    )


def forward_positions(tok, requests, batch_size: int) -> dict[str, int]:
    """Positions each scoring path runs (the reference's rows in order; editlab's shared rows)."""
    prompts, answers, _ = case_pairs(requests)
    rows = answer_rows(tok, prompts, answers)[0]
    hosts, _ = shared_rows(rows)
    return {
        "pairs": len(rows),
        "tokens": sum(map(len, rows)),
        "reference": padded_positions(rows, batch_size),
        "editlab_rows": len(hosts),
        "editlab": padded_positions(hosts, batch_size),
    }


def compare_records(ref: list[dict], new: list[dict], tolerance: float) -> dict:
    """Flags and token accuracies must be equal, NLLs within ``tolerance``: the worst gap and the
    ``problems`` found (empty when the records agree)."""
    worst, flags, entries = 0.0, 0, 0
    problems = []
    for a, b in zip(ref, new, strict=True):
        if a["case_id"] != b["case_id"] or a.keys() != b.keys():
            problems.append(f"case records differ in layout: {a['case_id']} / {b['case_id']}")
            continue
        for family in ("rewrite", "paraphrase", "neighborhood"):
            for pa, pb in zip(a[family], b[family], strict=True):
                if pa.keys() != pb.keys():
                    problems.append(f"{a['case_id']} {family}: roles {sorted(pa)} / {sorted(pb)}")
                    continue
                for role in pa:
                    entries += 1
                    gap = abs(pa[role]["nll"] - pb[role]["nll"])
                    worst = max(worst, gap)
                    if gap > tolerance:
                        problems.append(f"{a['case_id']} {family} {role}: nll {pa[role]['nll']} / {pb[role]['nll']}")
                    if (pa[role]["exact"], pa[role]["token_acc"]) != (pb[role]["exact"], pb[role]["token_acc"]):
                        problems.append(f"{a['case_id']} {family} {role}: accuracy flags differ")
                    flags += 1
                if "competitor" in pa and "competitor" in pb:
                    win_a = pa["expected"]["nll"] < pa["competitor"]["nll"]
                    if win_a != (pb["expected"]["nll"] < pb["competitor"]["nll"]):
                        margin = pa["expected"]["nll"] - pa["competitor"]["nll"]
                        problems.append(f"{a['case_id']} {family}: success flag differs (margin {margin:.2e})")
    return {"entries": entries, "flags_compared": flags, "max_abs_nll_difference": worst, "problems": problems}


def compare_metrics(ref: dict, new: dict, tolerance: float) -> dict:
    """Means of flags exactly equal, the others within ``tolerance``; ``problems`` as above."""
    if ref.keys() != new.keys():
        return {"problems": [f"metric names differ: {sorted(ref.keys() ^ new.keys())}"]}
    gaps = {k: abs(ref[k] - new[k]) for k in ref}
    exact = [k for k in ref if k.endswith(FLAG_METRICS)]
    unequal = [k for k in exact if gaps[k] != 0.0]
    loose = [k for k in ref if k not in exact and gaps[k] > tolerance]
    return {
        "exactly_equal": sorted(exact),
        "max_abs_difference_others": max((gaps[k] for k in ref if k not in exact), default=0.0),
        "problems": [f"metric {k} differs: {ref[k]} / {new[k]}" for k in unequal + loose],
    }


def generation_waste(tok, prompts: list[str], cfg: EvaluationConfig) -> dict:
    """Row-steps the unchanged generation computes against those its texts need (prefill positions
    and decode steps), with its batches of ``cfg.batch_size`` left-padded prompts run to the
    batch's largest budget."""
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    need = sum(cfg.generated_length(n) for n in lengths)
    run = 0
    for s in range(0, len(lengths), cfg.batch_size):
        chunk = lengths[s : s + cfg.batch_size]
        steps = max(cfg.generated_length(n) - n for n in chunk)
        run += len(chunk) * (max(chunk) + steps)
    return {"row_positions_run": run, "row_positions_needed": need, "saving_bound": run / need}


# ----------------------------------------------------------------------------- timing


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def ab(repeats: int, reference, editlab) -> tuple[list[float], list[float], object, object]:
    """Interleaved repeats, the order alternating; seconds of each and the last outputs."""
    ref_s, new_s = [], []
    for r in range(repeats):
        order = [(reference, ref_s), (editlab, new_s)]
        for fn, times in order if r % 2 == 0 else order[::-1]:
            seconds, out = timed(fn)
            times.append(seconds)
            if fn is reference:
                ref_out = out
            else:
                new_out = out
    return ref_s, new_s, ref_out, new_out


def part(count: int, unit: str, ref_s: list[float], new_s: list[float]) -> dict:
    ref, new = statistics.median(ref_s), statistics.median(new_s)
    return {
        "reference_seconds": ref_s,
        "editlab_seconds": new_s,
        f"reference_{unit}_per_second": count / ref,
        f"editlab_{unit}_per_second": count / new,
        "speedup_median": ref / new,
        "speedup_per_repeat": [a / b for a, b in zip(ref_s, new_s, strict=True)],
    }


def totals(fixed: dict[str, float], scoring: dict[str, float]) -> dict[str, float]:
    """Seconds of each path (fixed parts + scoring) and the speedup."""
    ref, new = fixed["reference"] + scoring["reference"], fixed["editlab"] + scoring["editlab"]
    return {"reference_seconds": ref, "editlab_seconds": new, "speedup": ref / new}


def evaluation_config(path: Path, overrides: dict) -> EvaluationConfig:
    block = dict(yaml.safe_load(path.read_text())["model"].get("evaluation", {}))
    if block.get("me_ppl"):
        block["me_ppl"] = str((REPO / block["me_ppl"]).resolve())
    block.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(block.get("probes"), dict):
        block["probes"] = ProbeConfig(**block["probes"])
    return EvaluationConfig(**block)


def load(args):
    if args.tiny:
        from editlab.models.tiny import tiny_model

        return tiny_model("llama")
    from editlab.models.load import load_model_and_tokenizer

    return load_model_and_tokenizer(args.model)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama instead (tests)")
    ap.add_argument("--config", default=str(REPO / "configs" / "memit_seq_smollm2.yaml"), help="its evaluation block")
    ap.add_argument("--data", default=str(DATA / "multi_counterfact.json.gz"))
    ap.add_argument("--n", type=int, default=100, help="cases scored")
    ap.add_argument("--generation-cases", type=int, default=None, help="override the config's generation_cases")
    ap.add_argument("--batch-size", type=int, default=None, help="override the config's batch_size")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved A/B pairs of scoring and ME-PPL")
    ap.add_argument("--project-to", type=int, default=2000, help="cases of the projected evaluation")
    ap.add_argument("--nll-tolerance", type=float, default=1e-4, help="largest |NLL difference| allowed")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--parts",
        type=lambda v: set(v.split(",")),
        default=set(PARTS),
        help=f"comma list of {','.join(PARTS)} (default all); totals need scoring",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.parts - set(PARTS):
        ap.error(f"--parts: unknown {sorted(args.parts - set(PARTS))}; use {','.join(PARTS)}")
    return args


def run_scoring(args, view, tok, cfg, evaluator, requests) -> dict:
    ref_s, new_s, ref_cases, new_cases = ab(
        args.repeats,
        lambda: reference_evaluate_cases(view, tok, requests, cfg.batch_size),
        lambda: evaluator.evaluate(requests, quality=False)[0],
    )
    scoring = part(len(requests), "cases", ref_s, new_s)
    scoring["records"] = compare_records(ref_cases, new_cases, args.nll_tolerance)
    scoring["metrics"] = compare_metrics(editing_metrics(ref_cases), editing_metrics(new_cases), args.nll_tolerance)
    scoring["forward_positions"] = {
        f"n{len(requests)}": forward_positions(tok, requests, cfg.batch_size),
        f"n{args.project_to}": forward_positions(
            tok, load_requests(args.data, num_edits=args.project_to), cfg.batch_size
        ),
    }
    return scoring


def run_me_ppl(args, model, tok, cfg, texts: list[str]) -> dict:
    ref_s, new_s, ref_ppl, new_ppl = ab(
        args.repeats,
        lambda: reference_sequence_nll(model, tok, texts, cfg.batch_size),
        lambda: sequence_nll(model, tok, texts, cfg.batch_size),
    )
    exact = float64_sequence_nll(model, tok, texts)
    problems = []
    if not ref_ppl[1] == new_ppl[1] == exact[1]:
        problems.append(f"ME-PPL token counts differ: {ref_ppl[1]} / {new_ppl[1]} / {exact[1]}")
    gaps = {name: abs(v[0] - exact[0]) / exact[1] for name, v in (("reference", ref_ppl), ("editlab", new_ppl))}
    # The earlier path's log-softmax over the strided class dimension of [B, V, S] loses up to
    # ~1e-4 nats per token in float32; editlab's must be at least as close to float64.
    if gaps["editlab"] > max(gaps["reference"], args.nll_tolerance):
        problems.append(f"ME-PPL mean NLL further from float64 than before: {gaps}")
    return part(len(texts), "texts", ref_s, new_s) | {
        "problems": problems,
        "tokens_predicted": exact[1],
        "abs_mean_nll_difference_from_float64": gaps,
        "perplexity": {
            name: math.exp(v[0] / v[1])
            for name, v in (("reference", ref_ppl), ("editlab", new_ppl), ("float64", exact))
        },
    }


def run_generation(tok, cfg, evaluator, requests) -> dict:
    chosen = [r for r in requests if r.generation_prompts][: cfg.generation_cases or None]
    seconds, metrics = timed(evaluator.generation_metrics, requests)
    prompts = [p for r in chosen for p in cfg.generation_prompts_of(r)]
    return {
        "seconds": seconds,
        "texts": metrics.get("fluency_texts", 0),
        "fluency": metrics.get("fluency"),
        "generation_setting": metrics.get("generation_setting"),
        "note": "one code path (unchanged), timed once; it counts in both totals",
        "generation_waste": generation_waste(tok, prompts, cfg),
    }


def run_generated(args, view, tok, cfg, requests) -> dict:
    """The generation-based scores against editlab's teacher-forced scoring, interleaved."""
    tf_s, gen_s, _, metrics = ab(
        args.repeats,
        lambda: evaluate_cases(view, tok, requests, cfg.batch_size),
        lambda: generated_metrics(view, tok, requests, cfg.generated_margin, cfg.batch_size),
    )
    n = len(requests)
    return {
        "teacher_forced_seconds": tf_s,
        "generated_seconds": gen_s,
        "generated_seconds_per_case": statistics.median(gen_s) / n,
        "teacher_forced_seconds_per_case": statistics.median(tf_s) / n,
        "generated_over_teacher_forced_median": statistics.median(gen_s) / statistics.median(tf_s),
        "generated_over_teacher_forced_per_repeat": [g / t for g, t in zip(gen_s, tf_s, strict=True)],
        "prompts": sum(1 + len(r.paraphrase_prompts) for r in requests),
        "margin": cfg.generated_margin,
        "metrics": metrics,
    }


def run_totals(result: dict, n: int, target: int) -> dict:
    """The evaluation's seconds at --n and projected to --project-to (see the module docstring)."""
    scoring = result["scoring"]
    fixed = {"reference": 0.0, "editlab": 0.0}
    if "me_ppl" in result:
        for k in fixed:
            fixed[k] += statistics.median(result["me_ppl"][f"{k}_seconds"])
    if "generation" in result:
        for k in fixed:
            fixed[k] += result["generation"]["seconds"]
    here, there = scoring["forward_positions"][f"n{n}"], scoring["forward_positions"][f"n{target}"]
    scoring_seconds = {k: statistics.median(scoring[f"{k}_seconds"]) for k in ("reference", "editlab")}
    total = {
        "fixed_parts": sorted({"me_ppl", "generation"} & result.keys()),
        f"n{n}": totals(fixed, scoring_seconds),
        # Scoring time per case at --n times the cases: ignores that more cases share more rows.
        f"projected_n{target}_linear": totals(fixed, {k: v * target / n for k, v in scoring_seconds.items()}),
        # Scoring time per forward position at --n times the positions each path runs at --project-to.
        f"projected_n{target}_by_positions": totals(
            fixed, {k: v * there[k] / here[k] for k, v in scoring_seconds.items()}
        ),
    }
    if "generated" in result:
        # The generated scores are new: editlab's evaluation with them on, each prompt run once.
        per_case = result["generated"]["generated_seconds_per_case"]
        for key, cases in (
            (f"n{n}", n),
            (f"projected_n{target}_linear", target),
            (f"projected_n{target}_by_positions", target),
        ):
            total[key]["editlab_with_generated_seconds"] = total[key]["editlab_seconds"] + per_case * cases
    return total


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model, tok = load(args)
    view = ModelView.of(model)
    cfg = evaluation_config(
        Path(args.config), {"generation_cases": args.generation_cases, "batch_size": args.batch_size}
    )
    evaluator = Evaluator(cfg, view, tok, seed=args.seed, progress=False)
    requests = load_requests(args.data, num_edits=args.n)

    result: dict = {"benchmark": "eval_throughput"}
    if "scoring" in args.parts:
        result["scoring"] = run_scoring(args, view, tok, cfg, evaluator, requests)
    if "me_ppl" in args.parts and evaluator.me_ppl_texts is not None:
        result["me_ppl"] = run_me_ppl(args, model, tok, cfg, evaluator.me_ppl_texts)
    if "generation" in args.parts and cfg.fluency:
        result["generation"] = run_generation(tok, cfg, evaluator, requests)
    if "generated" in args.parts:
        result["generated"] = run_generated(args, view, tok, cfg, requests)
    if "scoring" in result:
        result["total"] = run_totals(result, len(requests), args.project_to)
    result |= {
        "model": "tiny llama (random)" if args.tiny else args.model,
        "config": args.config,
        "evaluation": {
            "batch_size": cfg.batch_size,
            "generation_cases": cfg.generation_cases,
            "me_ppl": cfg.me_ppl is not None,
        },
        "n": len(requests),
        "parts": sorted(args.parts),
        "repeats": args.repeats,
        "threads": args.threads,
        "nll_tolerance": args.nll_tolerance,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("total", {}), indent=2))
    # Written first, so a disagreement keeps its timings and says where it is.
    problems = [p for entry in problems_of(result) for p in entry]
    if problems:
        raise SystemExit(f"the paths disagree ({args.out}):\n  " + "\n  ".join(problems[:20]))
    return result


if __name__ == "__main__":
    main()
