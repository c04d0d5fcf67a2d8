"""Evaluation of an edit stream.

Editing metrics per case: rewrite (efficacy), paraphrase (generalization) and neighbourhood
(specificity) prompts, each answer teacher-forced; aggregated by torchmetrics classes (mean per
case, then over cases). Quality metrics on the model itself: fluency and consistency of seeded
generations, perplexity on ME-PPL-50, general-ability probes.

By default the generation is the reference's (``eval_utils_counterfact.test_generation``): every
generation prompt of an evaluated case, texts of 100 tokens counting the prompt, top-k 5, not
stopped at EOS, cleaned as ``generate_fast`` cleans them; fluency is the mean over a case's texts,
consistency is scored on the case's texts joined with spaces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from editlab.data.sources import DataError, check_tokenization
from editlab.metrics.editing import (
    CaseMean,
    PromptAccuracy,
    PromptMagnitude,
    PromptSuccess,
    TokenAccuracy,
    harmonic_mean,
)
from editlab.metrics.generated import DEFAULT_MARGIN, generated_answers
from editlab.metrics.generation import Consistency, Fluency, case_fluency, consistency_reference, generate_text
from editlab.metrics.perplexity import Perplexity, load_me_ppl, sequence_nll
from editlab.metrics.probes import ProbeConfig, probe_cache
from editlab.models.arch import ModelView
from editlab.models.prompts import check_context_length
from editlab.models.scoring import score_answers
from editlab.types import EditRequest, Parts, through_parts

FAMILIES = {"rewrite": "efficacy", "paraphrase": "generalization", "neighborhood": "specificity"}
CASE_FLUENCY = "fluency_by_case"  # generation_metrics' per-case fluency, taken out of the point's metrics
# Families scored by greedy generation too (``*_generated_exact`` / ``*_generated_prefix``).
GENERATED_FAMILIES = {"rewrite": "efficacy", "paraphrase": "generalization"}


def _prompts(req: EditRequest, family: str) -> list[str]:
    if family == "rewrite":
        return [req.rewrite_prompt]
    return req.paraphrase_prompts if family == "paraphrase" else req.neighborhood_prompts


Pair = tuple[int, str, int, str]  # (request index, family, prompt index, role)


def case_pairs(requests: list[EditRequest]) -> tuple[list[str], list[str], list[Pair]]:
    """Every (prompt, answer) pair of every request, and where each belongs in the records."""
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
    return prompts, answers, where


def case_records(requests: list[EditRequest], where: list[Pair], scores: dict[str, torch.Tensor]) -> list[dict]:
    """One record per request from the pair scores (``score_answers``' output, in ``where``'s order)."""
    cases = [{"case_id": r.case_id, **{f: [{} for _ in _prompts(r, f)] for f in FAMILIES}} for r in requests]
    for k, (i, family, p, role) in enumerate(where):
        cases[i][family][p][role] = {
            "nll": float(scores["nll"][k]),
            "exact": bool(scores["exact"][k]),
            "token_acc": float(scores["token_acc"][k]),
        }
    return cases


def evaluate_cases(view: ModelView, tok, requests: list[EditRequest], batch_size: int = 32) -> list[dict]:
    """One record per request: for each prompt family, per-prompt NLL/greedy scores of the answers.

    Every (prompt, answer) pair of every request is scored in one batched pass (``score_answers``:
    shared prompts run once, rows batched by length).
    """
    prompts, answers, where = case_pairs(requests)
    return case_records(requests, where, score_answers(view, tok, prompts, answers, batch_size))


@dataclass
class EvaluationConfig:
    """When and what to evaluate.

    Args:
        timing: ``immediate`` (each step's requests right after that step), ``periodic`` (every
            ``every_n_steps`` steps, all edits so far) or ``final`` (after the stream).
        every_n_steps: period of ``periodic`` evaluation.
        batch_size: prompts per forward.
        fluency: generate from the generation prompts and report fluency (and consistency).
        generation_cases: at most this many edited cases (the first ones) are generated from;
            None uses all (the reference generates for every case).
        generation_prompts_per_case: generation prompts used per case; None (the reference) uses
            all of them (CounterFact has 10 per case); 1 was editlab's earlier setting.
        max_new_tokens: length of each generated text in tokens. With
            ``max_length_includes_prompt`` it counts the prompt's tokens too (the reference's
            ``max_out_len=100``: a 12-token prompt gets 88 new tokens).
        max_length_includes_prompt: ``max_new_tokens`` counts the prompt (the reference); False
            counts new tokens only (editlab's earlier setting).
        stop_at_eos: stop a text at its first EOS token. False (the reference) samples on to the
            full length; EOS tokens are dropped from the text either way.
        clean_texts: NFKD-normalise each text and turn its blank lines into spaces before scoring
            (the reference's ``generate_fast``); False scores the decoded text as is.
        top_k: top-k sampling of the generation (seeded by the module's seed).
        me_ppl: path of ME-PPL_50.json for the collapse perplexity; None leaves it out.
        consistency_reference: directory with ``attribute_snippets.json``, ``idf.npy`` and
            ``tfidf_vocab.json``; without them consistency is absent and the summary says why.
        probes: general-ability probe tasks.
        generated: with the quality metrics (pre, final and periodic points), greedy generation
            from the rewrite and paraphrase prompts scored against target_new:
            ``efficacy_generated_{exact,prefix}``, ``generalization_generated_{exact,prefix}``
            (editlab.metrics.generated; zsRE's src and rephrase prompts too).
        generated_margin: new tokens allowed beyond the answer's own token count.
        pre: evaluate the unedited model first (the summary's ``pre_*`` values and each case's
            "pre"). False skips it, for a study whose runs share one data slice and model: the
            before column then comes from one run, and each other run saves that time (on
            SmolLM2, 100 CounterFact cases: ~110 s of scoring, benchmarks/eval_throughput.py).
    """

    timing: Literal["immediate", "periodic", "final"] = "final"
    every_n_steps: int = 10
    batch_size: int = 32
    fluency: bool = True
    generation_cases: int | None = 100
    generation_prompts_per_case: int | None = None
    max_new_tokens: int = 100
    max_length_includes_prompt: bool = True
    stop_at_eos: bool = False
    clean_texts: bool = True
    top_k: int = 5
    me_ppl: str | None = None
    consistency_reference: str | None = None
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    generated: bool = True
    generated_margin: int = DEFAULT_MARGIN
    pre: bool = True

    def __post_init__(self) -> None:
        if self.timing not in ("immediate", "periodic", "final"):
            raise ValueError(f"option evaluation.timing={self.timing!r}: use immediate, periodic or final")
        if self.every_n_steps < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"invalid evaluation options: {self}")
        if self.generated_margin < 0:
            raise ValueError(f"option evaluation.generated_margin={self.generated_margin}: use 0 or more tokens")
        if self.generation_prompts_per_case is not None and self.generation_prompts_per_case < 1:
            raise ValueError(
                f"option evaluation.generation_prompts_per_case={self.generation_prompts_per_case}: "
                "use a positive count, or null for every generation prompt"
            )

    def generation_prompts_of(self, req: EditRequest) -> list[str]:
        """The generation prompts of ``req`` that are generated from."""
        return req.generation_prompts[: self.generation_prompts_per_case]

    def generated_length(self, prompt_tokens: int) -> int:
        """Tokens of the text generated from a prompt of ``prompt_tokens`` tokens, prompt included
        (what the model's context must hold)."""
        if self.max_length_includes_prompt:
            return max(prompt_tokens, self.max_new_tokens)
        return prompt_tokens + self.max_new_tokens

    def generation_setting(self, seed: int) -> str:
        """One line saying how the texts were generated, for the results."""
        per_case = self.generation_prompts_per_case
        prompts = "every generation prompt" if per_case is None else f"at most {per_case} generation prompt(s)"
        length = "including" if self.max_length_includes_prompt else "after"
        eos = "stopped at EOS" if self.stop_at_eos else "not stopped at EOS"
        clean = ", NFKD + blank lines cleaned" if self.clean_texts else ""
        return (
            f"{prompts} per case, {self.max_new_tokens} tokens {length} the prompt, top-k {self.top_k}, "
            f"seed {seed}, {eos}{clean}"
        )


StepEvaluation = Literal["none", "batch", "so_far"]
FinalEvaluation = Literal["all", "immediate", "last_point"]


@dataclass(frozen=True)
class EvaluationSchedule:
    """When the stream is evaluated (``EvaluationConfig.timing``); the module asks after each step
    and once after the stream."""

    timing: Literal["immediate", "periodic", "final"]
    every_n_steps: int
    probes: ProbeConfig

    @classmethod
    def of(cls, cfg: EvaluationConfig) -> EvaluationSchedule:
        return cls(cfg.timing, cfg.every_n_steps, cfg.probes)

    def after_step(self, steps_done: int) -> StepEvaluation:
        """``batch``: the step's own requests (immediate); ``so_far``: every request edited so far
        with the quality metrics (periodic); ``none``."""
        if self.timing == "immediate":
            return "batch"
        if self.timing == "periodic" and steps_done % self.every_n_steps == 0:
            return "so_far"
        return "none"

    def probes_after_step(self, steps_done: int) -> bool:
        """The in-stream probes, when due and not already run by this step's ``so_far`` point."""
        return self.probes.due(steps_done) and self.after_step(steps_done) != "so_far"

    def at_end(self, last: Mapping | None, steps_done: int) -> FinalEvaluation:
        """After the stream (``last``: the curve's last point, None without one):
        ``all``: evaluate every edited request with the quality metrics;
        ``immediate``: each case's record from right after its step, quality on the final model;
        ``last_point``: the periodic point of the last step already is the final evaluation."""
        if (
            self.timing == "final"
            or last is None
            or (self.timing == "periodic" and last["step"] != steps_done)
            or last["timing"] == "pre"
        ):
            return "all"
        return "immediate" if self.timing == "immediate" else "last_point"


def check_requests_fit(requests: list[EditRequest], tok, model_config, cfg: EvaluationConfig) -> None:
    """Every prompt evaluation will run fits the model's context, checked before the first edit
    (with the answers' tokenisation, data.sources.check_tokenization): a prompt too long would
    fail after hours of editing. Raises DataError naming the case and field."""
    check_tokenization(requests, tok)
    for req in requests:
        for field_name, prompts in (
            ("prompt", [req.rewrite_prompt]),
            ("paraphrase_prompts", req.paraphrase_prompts),
            ("neighborhood_prompts", req.neighborhood_prompts),
        ):
            for prompt in prompts:
                n = len(tok(prompt)["input_ids"]) + 64  # room for a prefix and the answer
                _check_length(model_config, n, f"case {req.case_id}: field {field_name!r}")
        if cfg.fluency:  # generated from: the prompt and its continuation must fit
            for prompt in cfg.generation_prompts_of(req):
                n = cfg.generated_length(len(tok(prompt)["input_ids"]))
                _check_length(model_config, n, f"case {req.case_id}: field 'generation_prompts' (+ max_new_tokens)")


def _check_length(model_config, n_tokens: int, what: str) -> None:
    try:
        check_context_length(model_config, n_tokens, what)
    except ValueError as err:
        raise DataError(str(err)) from None


def _prompt_table(cases: list[dict], family: str) -> dict[str, torch.Tensor]:
    """Flatten one prompt family of whole cases into per-prompt tensors with case indices."""
    nll_e, nll_c, exact, tacc, index, has_comp = [], [], [], [], [], []
    for i, case in enumerate(cases):
        for entry in case[family]:
            nll_e.append(entry["expected"]["nll"])
            exact.append(entry["expected"]["exact"])
            tacc.append(entry["expected"]["token_acc"])
            has_comp.append("competitor" in entry)
            nll_c.append(entry["competitor"]["nll"] if "competitor" in entry else float("nan"))
            index.append(i)
    t = torch.tensor
    return {
        "nll_expected": t(nll_e, dtype=torch.float64),
        "nll_competitor": t(nll_c, dtype=torch.float64),
        "exact": t(exact, dtype=torch.bool),
        "token_acc": t(tacc, dtype=torch.float64),
        "case_index": t(index, dtype=torch.long),
        "has_competitor": t(has_comp, dtype=torch.bool),
    }


def editing_metrics(cases: list[dict]) -> dict[str, float]:
    """Efficacy / generalization / specificity: success (NLL comparison) and magnitude
    (probability difference) when the case has a competing answer, accuracy (all tokens greedy)
    and token accuracy.

    The score is the harmonic mean of the three success rates (CounterFact) or of the three
    token accuracies (zsRE, which has no competing answer)."""
    out: dict[str, float] = {}
    for family, metric in FAMILIES.items():
        table = _prompt_table(cases, family)
        if len(table["case_index"]) == 0:
            continue
        idx = table["case_index"]
        acc, tacc = PromptAccuracy(), TokenAccuracy()
        acc.update(table["exact"], idx)
        tacc.update(table["token_acc"], idx)
        out[f"{metric}_accuracy"] = float(acc.compute())
        out[f"{metric}_token_accuracy"] = float(tacc.compute())
        if bool(table["has_competitor"].all()):
            succ, mag = PromptSuccess(), PromptMagnitude()
            succ.update(table["nll_expected"], table["nll_competitor"], idx)
            mag.update(table["nll_expected"], table["nll_competitor"], idx)
            out[f"{metric}_success"] = float(succ.compute())
            out[f"{metric}_magnitude"] = float(mag.compute())
    parts = ["efficacy", "generalization", "specificity"]
    if all(f"{p}_success" in out for p in parts):
        out["score"] = harmonic_mean([out[f"{p}_success"] for p in parts])
    elif all(f"{p}_token_accuracy" in out for p in parts):
        out["score"] = harmonic_mean([out[f"{p}_token_accuracy"] for p in parts])
    return out


def held_out_specificity(
    cases: list[dict], requests: list[EditRequest], trained_on: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """``specificity_heldout_*``: specificity without the neighbourhood prompts an edit trained on
    (neighbour-assisted editing puts some in the z loss; seed 004 removed them from evaluation).
    ``cases`` are evaluate_cases' records of ``requests``; ``trained_on``: case id → prompts."""
    kept = []
    for case, req in zip(cases, requests, strict=True):
        skip = set(trained_on.get(req.case_id, ()))
        hood = [e for e, p in zip(case["neighborhood"], req.neighborhood_prompts, strict=True) if p not in skip]
        kept.append({**case, "neighborhood": hood})
    return {
        key.replace("specificity", "specificity_heldout", 1): value
        for key, value in editing_metrics(kept).items()
        if key.startswith("specificity_")
    }


def case_summary(case: dict) -> dict[str, float]:
    """What cases.jsonl shows per case: rewrite probabilities and per-case metric values (with the
    case's fluency where it was generated from)."""
    return {**rewrite_probs(case), **case_flags(case), **({"fluency": case["fluency"]} if "fluency" in case else {})}


def generated_metric_names() -> set[str]:
    return {f"{m}_generated_{kind}" for m in GENERATED_FAMILIES.values() for kind in ("exact", "prefix")}


def generated_metrics(
    view: ModelView, tok, requests: list[EditRequest], margin: int = DEFAULT_MARGIN, batch_size: int = 32
) -> dict:
    """``efficacy_generated_{exact,prefix}`` and ``generalization_generated_{exact,prefix}``: greedy
    continuations of the rewrite and paraphrase prompts matched against target_new
    (``editlab.metrics.generated``), averaged per case, then over cases; and ``generated_setting``."""
    prompts, answers, owner, family_of = [], [], [], []
    for i, req in enumerate(requests):
        for family in GENERATED_FAMILIES:
            for prompt in _prompts(req, family):
                prompts.append(prompt)
                answers.append(req.target_new)
                owner.append(i)
                family_of.append(family)
    if not prompts:
        return {}
    said = generated_answers(view.model, tok, prompts, answers, margin, batch_size)
    out: dict = {}
    for family, metric in GENERATED_FAMILIES.items():
        mine = [k for k, f in enumerate(family_of) if f == family]
        if not mine:
            continue
        for kind in ("exact", "prefix"):
            mean = CaseMean()
            mean.update(torch.tensor([said[kind][k] for k in mine]), torch.tensor([owner[k] for k in mine]))
            out[f"{metric}_generated_{kind}"] = float(mean.compute())
    out["generated_setting"] = (
        f"greedy, answer tokens + {margin}, stopped at EOS or a line break, SQuAD normalisation; "
        "exact: cut at a clause boundary; prefix: starts with the answer"
    )
    return out


class Evaluator:
    """Runs the configured metrics on the current model. Reference data (ME-PPL-50, the
    consistency files) is read once at construction, before the first edit."""

    def __init__(
        self,
        cfg: EvaluationConfig,
        view: ModelView,
        tok,
        seed: int = 0,
        progress: bool = True,
        cache_root: Path | None = None,
    ) -> None:
        """``cache_root``: of the keyed disk caches (probe scores with ``probes.cache``); None: no cache."""
        self.cfg, self.view, self.tok, self.seed, self.progress = cfg, view, tok, seed, progress
        use_cache = cache_root is not None and cfg.probes.enabled and cfg.probes.cache
        self.probe_cache = probe_cache(cache_root) if use_cache else None
        self.me_ppl_texts = load_me_ppl(cfg.me_ppl) if cfg.me_ppl else None
        self.reference, reason = consistency_reference(cfg.consistency_reference)
        self.consistency_reason = None if self.reference is not None else reason
        self.probe_suite = cfg.probes.suite() if cfg.probes.enabled else None
        self.quality_keys = (
            {"fluency", "consistency", "me_ppl50_perplexity"}
            | (self.probe_suite.metric_names() if self.probe_suite else set())
            | (generated_metric_names() if cfg.generated else set())
        )

    def evaluate(
        self, requests: list[EditRequest], quality: bool, final: bool = True, parts: Parts | None = None
    ) -> tuple[list[dict], dict]:
        """``final``: a point before or after the stream (probes on every loaded example), not one
        during it (probes on their intermediate subset). ``parts``: the point's finished parts,
        kept as each one finishes and taken from there when present (a resumed point)."""
        cases = through_parts(
            parts, "cases", lambda: evaluate_cases(self.view, self.tok, requests, self.cfg.batch_size)
        )
        metrics = self.summarise_cases(cases)
        if quality:
            by_case: dict[str, float] = {}
            metrics.update(self.quality(requests, final, parts, by_case))
            # Each generated case carries its own fluency (cases.jsonl's pre/post blocks): two runs'
            # fluency can then be compared case by case (editlab.paired).
            cases = [
                {**case, "fluency": by_case[case["case_id"]]} if case["case_id"] in by_case else case for case in cases
            ]
        return cases, metrics

    def summarise_cases(self, cases: list[dict]) -> dict[str, float]:
        return editing_metrics(cases)

    def settings_digest(self) -> str:
        """Identity of what this evaluator computes: its options and the generation seed."""
        blob = json.dumps({"options": dataclasses.asdict(self.cfg), "seed": self.seed}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    case_summary = staticmethod(case_summary)

    def quality(
        self,
        requests: list[EditRequest],
        final: bool = True,
        parts: Parts | None = None,
        fluency_by_case: dict[str, float] | None = None,
    ) -> dict:
        """The quality metrics, each part through ``parts`` (see :meth:`evaluate`); ``fluency_by_case``
        receives each generated case's own fluency (case id -> mean over its texts)."""
        out: dict = {}
        if self.cfg.generated:
            out.update(
                through_parts(
                    parts,
                    "generated",
                    lambda: generated_metrics(
                        self.view, self.tok, requests, self.cfg.generated_margin, self.cfg.batch_size
                    ),
                )
            )
        if self.cfg.fluency:
            generation = dict(through_parts(parts, "generation", lambda: self.generation_metrics(requests)))
            by_case = generation.pop(CASE_FLUENCY, {})  # per case, not a metric of the point
            if fluency_by_case is not None:
                fluency_by_case.update(by_case)
            out.update(generation)
        if self.me_ppl_texts is not None:
            out["me_ppl50_perplexity"] = through_parts(parts, "me_ppl50", self.me_ppl)
        if self.probe_suite is not None:
            out.update(through_parts(parts, "probes", lambda: self.probes(final)))
            out["probe_setting"] = self.probe_suite.setting
        return out

    def me_ppl(self) -> float:
        """Perplexity of the model on the ME-PPL-50 texts."""
        ppl = Perplexity()
        ppl.update(*sequence_nll(self.view.model, self.tok, self.me_ppl_texts, self.cfg.batch_size))
        return float(ppl.compute())

    def probes(self, final: bool = True) -> dict[str, float]:
        """The probe scores: every loaded example when ``final``, else the intermediate subset."""
        if self.probe_suite is None:
            return {}
        return self.probe_suite.run(self.view.model, self.tok, full=final, cache=self.probe_cache)

    def generation_metrics(self, requests: list[EditRequest]) -> dict:
        cfg = self.cfg
        chosen = [r for r in requests if r.generation_prompts][: cfg.generation_cases or None]
        if not chosen:
            return {"fluency_reason": "no request has generation prompts"}
        # All prompts of all chosen cases in one list: generate_text pads them into batches.
        prompts = [p for r in chosen for p in cfg.generation_prompts_of(r)]
        owner = [i for i, r in enumerate(chosen) for _ in cfg.generation_prompts_of(r)]
        if self.progress:
            print(f"[editlab] generating {len(prompts)} texts for fluency", file=sys.stderr)
        texts = generate_text(
            self.view.model,
            self.tok,
            prompts,
            cfg.max_new_tokens,
            cfg.top_k,
            self.seed,
            batch_size=cfg.batch_size,
            max_length_includes_prompt=cfg.max_length_includes_prompt,
            stop_at_eos=cfg.stop_at_eos,
            clean=cfg.clean_texts,
        )
        means = case_fluency(texts, owner)  # [C] in chosen's order: owner labels are 0..C-1
        flu = Fluency()
        flu.update_case_means(means)
        by_case = means.tolist()
        out: dict = {
            "fluency": float(flu.compute()),
            "fluency_cases": len(chosen),
            "fluency_texts": len(texts),
            "generation_setting": cfg.generation_setting(self.seed),
            CASE_FLUENCY: {r.case_id: v for r, v in zip(chosen, by_case, strict=True)},
        }
        if self.reference is None:
            out["consistency_reason"] = self.consistency_reason
            return out
        per_case = [[t for t, o in zip(texts, owner, strict=True) if o == i] for i in range(len(chosen))]
        known = [(g, r) for g, r in zip(per_case, chosen, strict=True) if r.relation_id and r.target_new_id]
        if not known:
            out["consistency_reason"] = "no request carries relation_id and target_new id"
            return out
        cons = Consistency(self.reference)
        cons.update([g for g, _ in known], [r.relation_id for _, r in known], [r.target_new_id for _, r in known])
        out["consistency"] = float(cons.compute())
        return out


def case_flags(case: dict) -> dict[str, float]:
    """Per-case metric values: success (expected NLL < competitor NLL), magnitude (probability
    difference), accuracy (greedy) and token accuracy (zsRE's metric), each the mean over the
    case's prompts, as editing_metrics averages them before averaging over cases."""
    out: dict[str, float] = {}
    for family, metric in FAMILIES.items():
        entries = case[family]
        if not entries:
            continue
        out[f"{metric}_accuracy"] = sum(e["expected"]["exact"] for e in entries) / len(entries)
        out[f"{metric}_token_accuracy"] = sum(e["expected"]["token_acc"] for e in entries) / len(entries)
        if all("competitor" in e for e in entries):
            wins = [e["expected"]["nll"] < e["competitor"]["nll"] for e in entries]
            out[f"{metric}_success"] = sum(wins) / len(wins)
            gaps = [math.exp(-e["expected"]["nll"]) - math.exp(-e["competitor"]["nll"]) for e in entries]
            out[f"{metric}_magnitude"] = sum(gaps) / len(gaps)
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
