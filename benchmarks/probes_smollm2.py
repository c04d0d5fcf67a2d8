"""The seeds' probe sets on an unedited model: each task's scores beside its chance level, the seconds
the full sets take, and the batched scorer beside the reference's loop in the same process.

Chance levels of a task (from its labels alone): the majority-class rate (the accuracy of always
answering the most frequent class), 1 / number of label words, the weighted F1 of that constant
answer, and MCC 0. A task is called *at chance* unless its accuracy exceeds the majority rate by
more than two standard errors of a chance-level accuracy, sqrt(c (1 - c) / n).

The side-by-side times :func:`editlab.metrics.probes.choice_logprobs` (rows shared by the single-token label
words, sorted by length, ``batch_size`` to a forward) against the loop of the seeds'
``glue_eval/*_eval.py`` (one forward per example and label word, batch 1) on the first
``--compare`` examples of ``--compare-tasks``, and reports the largest difference of their log-probs.

    python -m benchmarks.probes_smollm2 --threads 1 --out benchmarks/results/probes_smollm2_unedited.json
    python -m benchmarks.probes_smollm2 --tiny --limit 12 --compare 4 --out /tmp/probes.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections import Counter
from pathlib import Path

import torch

from editlab.metrics.probes import (
    SEED_TASKS,
    SEEDS_DIR,
    ProbeTask,
    choice_logprobs,
    load_seed_task,
    matthews_corrcoef,
    probe_details,
    weighted_f1,
)
from editlab.models.prompts import answer_ids

SCORE_NAMES = ("accuracy", "f1", "mcc")


def chance_levels(task: ProbeTask) -> dict:
    """What a model that ignores the prompt scores: the constant majority answer, uniform guessing."""
    labels = task.labels
    counts = Counter(labels)
    majority, top = max(sorted(counts.items()), key=lambda item: item[1])
    constant = [majority] * len(labels)
    return {
        "majority_class": task.label_words[majority],
        "majority_rate": top / len(labels),
        "uniform_rate": 1 / len(task.label_words),
        "constant_f1": weighted_f1(labels, constant),
        "constant_mcc": matthews_corrcoef(labels, constant),
    }


def above_chance(accuracy: float, chance: float, n: int) -> bool:
    return accuracy > chance + 2 * math.sqrt(chance * (1 - chance) / n)


@torch.no_grad()
def loop_logprobs(model, tok, task: ProbeTask) -> torch.Tensor:
    """[N, K] the reference's way: one forward of prompt + word per (example, word), batch 1."""
    rows = []
    for example in task.examples:
        ids = tok(task.prompt(example))["input_ids"]
        scores = []
        for word in task.label_words:
            wid = answer_ids(tok, word)
            logits = model(torch.tensor([ids + wid])).logits[0].float()  # [S, V]
            logp = logits.log_softmax(-1)
            scores.append(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(wid)) / len(wid))
        rows.append(scores)
    return torch.tensor(rows)


def side_by_side(model, tok, task: ProbeTask, batch_size: int) -> dict:
    prompts = [task.prompt(example) for example in task.examples]
    t0 = time.perf_counter()
    batched = choice_logprobs(model, tok, prompts, task.label_words, batch_size)
    t1 = time.perf_counter()
    loop = loop_logprobs(model, tok, task)
    t2 = time.perf_counter()
    return {
        "examples": len(prompts),
        "batched_seconds": t1 - t0,
        "loop_seconds": t2 - t1,
        "loop_over_batched": (t2 - t1) / (t1 - t0),
        "max_abs_logprob_difference": float((batched - loop).abs().max()),
    }


def tokenization_mismatches(tok, task: ProbeTask) -> int:
    """(example, word) pairs whose joint tokenisation (the reference scores ``prompt + " " + word``
    as one string) differs from editlab's ``tok(prompt) + tok(" " + word)``."""
    bad = 0
    for example in task.examples:
        prompt = task.prompt(example)
        ids = tok(prompt)["input_ids"]
        for word in task.label_words:
            bad += tok(prompt + " " + word)["input_ids"] != ids + answer_ids(tok, word)
    return bad


def load(tiny: bool, model: str):
    if tiny:
        from editlab.models.tiny import tiny_model

        return tiny_model("llama")
    from editlab.models.load import load_model_and_tokenizer

    return load_model_and_tokenizer(model)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead (tests)")
    p.add_argument("--seeds-dir", default=SEEDS_DIR)
    p.add_argument("--tasks", default=",".join(SEED_TASKS))
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: every test record)")
    p.add_argument("--compare", type=int, default=24, help="examples per task in the side-by-side; 0 skips it")
    p.add_argument("--compare-tasks", default="sst2,mmlu", help="tasks of the side-by-side")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model, tok = load(args.tiny, args.model)
    model.eval()

    tasks, total_seconds = {}, 0.0
    for name in args.tasks.split(","):
        task = load_seed_task(name, args.seeds_dir, args.limit)
        t0 = time.perf_counter()
        result = probe_details(model, tok, task, args.batch_size)
        seconds = time.perf_counter() - t0
        total_seconds += seconds
        chance = chance_levels(task)
        accuracy = result.accuracy
        predicted = Counter(result.predictions)
        tasks[name] = {
            "examples": len(task.examples),
            "label_words": task.label_words,
            "reported_scores": list(task.scores),
            **{score: result.score(score) for score in SCORE_NAMES},
            "chance": chance,
            "above_chance": above_chance(accuracy, chance["majority_rate"], len(task.examples)),
            "prediction_rates": {
                ("no answer (tie)" if k < 0 else task.label_words[k]): v / len(task.examples)
                for k, v in sorted(predicted.items())
            },
            "seconds": seconds,
            "tokenization_mismatches": tokenization_mismatches(tok, task),
        }
        print(f"{name}: {json.dumps(tasks[name])}", flush=True)

    compare = {}
    if args.compare > 0:
        for name in args.compare_tasks.split(","):
            task = load_seed_task(name, args.seeds_dir, args.compare)
            compare[name] = side_by_side(model, tok, task, args.batch_size)
    result = {
        "benchmark": "probes_smollm2",
        "model": "tiny llama (random)" if args.tiny else args.model,
        "unedited": True,
        "seeds_dir": args.seeds_dir,
        "rule": "zero-shot, the label word with the highest mean token log-prob (the reference's predictions_new)",
        "above_chance_rule": "accuracy > majority_rate + 2 * sqrt(majority_rate * (1 - majority_rate) / examples)",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "tasks": tasks,
        "seconds_all_tasks": total_seconds,
        "side_by_side": compare,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "tasks"}, indent=2))
    return result


if __name__ == "__main__":
    main()
