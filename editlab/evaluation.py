"""Per-case evaluation of edit requests: rewrite (efficacy), paraphrase (generalization) and
neighbourhood (specificity) prompts, each scored for target_new and target_true."""

from __future__ import annotations

import math

import torch

from editlab.metrics.functional import score_answers
from editlab.models.arch import ModelView
from editlab.types import EditRequest

FAMILIES = {"rewrite": "efficacy", "paraphrase": "generalization", "neighborhood": "specificity"}


def _prompts(req: EditRequest, family: str) -> list[str]:
    if family == "rewrite":
        return [req.rewrite_prompt]
    return req.paraphrase_prompts if family == "paraphrase" else req.neighborhood_prompts


def evaluate_cases(view: ModelView, tok, requests: list[EditRequest], batch_size: int = 32) -> list[dict]:
    """One record per request: for each prompt family, per-prompt NLL/greedy scores of the answers.

    Every (prompt, answer) pair of every request is scored in one batched pass.
    """
    prompts, answers, where = [], [], []
    for i, req in enumerate(requests):
        for family in FAMILIES:
            # Neighbourhood prompts keep their true answer; target_new is the competitor.
            right = req.locality_answer if family == "neighborhood" else req.target_new
            wrong = req.target_new if family == "neighborhood" else req.target_true
            for p, prompt in enumerate(_prompts(req, family)):
                for role, answer in (("expected", right), ("competitor", wrong)):
                    if answer is not None:
                        prompts.append(prompt)
                        answers.append(answer)
                        where.append((i, family, p, role))
    scores = score_answers(view, tok, prompts, answers, batch_size)
    cases = [{"case_id": r.case_id, **{f: [{} for _ in _prompts(r, f)] for f in FAMILIES}} for r in requests]
    for k, (i, family, p, role) in enumerate(where):
        cases[i][family][p][role] = {
            "nll": float(scores["nll"][k]),
            "exact": bool(scores["exact"][k]),
            "token_acc": float(scores["token_acc"][k]),
        }
    return cases


def case_flags(case: dict) -> dict[str, float]:
    """Per-case metric values: success (expected NLL < competitor NLL) and accuracy (greedy)."""
    out: dict[str, float] = {}
    for family, metric in FAMILIES.items():
        entries = case[family]
        if not entries:
            continue
        out[f"{metric}_accuracy"] = sum(e["expected"]["exact"] for e in entries) / len(entries)
        if all("competitor" in e for e in entries):
            wins = [e["expected"]["nll"] < e["competitor"]["nll"] for e in entries]
            out[f"{metric}_success"] = sum(wins) / len(wins)
    return out


def rewrite_probs(case: dict) -> dict[str, float]:
    """Per-token (geometric-mean) probabilities exp(-mean NLL) of target_new / target_true on the
    rewrite prompt."""
    entry = case["rewrite"][0]
    out = {}
    for role, name in (("expected", "prob_new"), ("competitor", "prob_true")):
        if role in entry:
            out[name] = math.exp(-entry[role]["nll"])
    return out


def aggregate(flags: list[dict[str, float]]) -> dict[str, float]:
    """Mean over cases of each per-case metric (cases first, as the CounterFact protocol does)."""
    names = sorted({k for f in flags for k in f})
    return {n: float(torch.tensor([f[n] for f in flags if n in f]).mean()) for n in names}
