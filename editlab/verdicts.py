"""Verdicts on a study's claims by a rule written down before the results.

A claims file (YAML, beside a study's results JSONs) names each claim, the run it is about and its
parts: one metric compared with one baseline run, and what the claim asks of it ("better", or
"not_worse"). Each part is judged from what the study committed:

- ``cases``: a per-case metric of the final point (``RUN.cases.jsonl.gz``), as the mean per-case
  difference with its 95% paired bootstrap interval (editlab.paired). Fluency and token accuracy are
  per case only in runs that recorded them; otherwise the two means are reported and the part is
  not judged.
- ``probe``: one probe task's accuracy, example by example (``RUN.probes.jsonl.gz``), the same way.
- ``value``: one number per run, from the results JSON's ``summary`` or ``weight_norms_end`` (the
  edited matrices' norm growth): no interval, only which side of the baseline it is on.

A part is *better* when its interval excludes 0 on the claim's side (``value``: when the number is
on that side), *worse* when it excludes 0 on the other side, else *same*; *not judged* when there is
nothing per case to pair. The claim **holds** when every part gets what it asks, **does not hold**
when a part is worse or none gets what it asks, and **holds partly** otherwise. A claim whose run or
baseline has no results JSON yet waits; a part marked ``optional`` is left out until its baseline
has run.

    claims:
    - name: ECE (seed 001), specificity and fluency kept where MEMIT degrades
      run: ece_2000
      parts:
      - {kind: cases, metric: specificity_success, against: memit_2000, want: better}
      - {kind: value, metric: weight_norm/l8/rel_l1_growth, against: memit_2000, want: better, lower: true}
      beside: [memit_seq_2000]   # the same parts against these, reported and not judged
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from editlab.paired import (
    CASE_FILE_SUFFIX,
    PROBE_FILE_SUFFIX,
    PairedDifference,
    case_values,
    paired_difference,
    probe_values,
    read_case_records,
)

KINDS = ("cases", "probe", "value")
WANTS = ("better", "not_worse")
LABELS = {
    "efficacy_success": "efficacy success",
    "generalization_success": "paraphrase success",
    "specificity_success": "neighbourhood success",
    "specificity_token_accuracy": "neighbourhood token accuracy",
    "fluency": "fluency",
}


class ClaimsError(ValueError):
    pass


@dataclass(frozen=True)
class Part:
    kind: str  # cases | probe | value
    metric: str  # a case metric, a probe task, or a summary / weight_norms_end key
    against: str  # the baseline run
    want: str = "better"  # better | not_worse
    lower: bool = False  # lower is better (norm growth, perplexity)
    optional: bool = False  # left out while the baseline has not run

    def label(self) -> str:
        if self.kind == "probe":
            return f"{self.metric} accuracy"
        if self.metric.startswith("weight_norm/") and self.metric.endswith("/rel_l1_growth"):
            return f"layer {self.metric.split('/')[1].removeprefix('l')} L1 growth"
        return LABELS.get(self.metric, self.metric)


@dataclass(frozen=True)
class Claim:
    name: str
    run: str
    parts: list[Part]
    beside: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    part: Part
    status: str  # better | same | worse | not judged
    text: str  # the numbers behind it

    @property
    def met(self) -> bool:
        return self.status == "better" or (self.part.want == "not_worse" and self.status == "same")


def read_claims(path: Path) -> list[Claim]:
    """The claims of a claims file; every problem is one error naming the file and the claim."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    items = raw.get("claims") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not items:
        raise ClaimsError(f"{path}: a claims file is a mapping with a non-empty list 'claims'")
    claims = []
    for i, item in enumerate(items):
        where = f"{path}: claims[{i}]"
        if not isinstance(item, dict) or not {"name", "run", "parts"} <= set(item):
            raise ClaimsError(f"{where} needs a name, a run and parts")
        parts = []
        for j, spec in enumerate(item["parts"] or []):
            try:
                part = Part(**spec)
            except TypeError as exc:
                raise ClaimsError(f"{where} ({item['name']}): parts[{j}]: {exc}") from exc
            if part.kind not in KINDS or part.want not in WANTS:
                raise ClaimsError(f"{where} ({item['name']}): parts[{j}]: kind is one of {KINDS}, want one of {WANTS}")
            parts.append(part)
        if not parts:
            raise ClaimsError(f"{where} ({item['name']}): no parts")
        claims.append(Claim(str(item["name"]), str(item["run"]), parts, [str(b) for b in item.get("beside", [])]))
    return claims


def side(difference: float, lower: bool) -> float:
    """The difference signed so that positive is the claim's side."""
    return -difference if lower else difference


def status_of(d: PairedDifference, lower: bool) -> str:
    if not d.excludes_zero:
        return "same"
    return "better" if side(d.difference, lower) > 0 else "worse"


def interval_text(d: PairedDifference) -> str:
    return f"{d.mean_b:.3f} vs {d.mean_a:.3f}, {d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}] over {d.cases}"


def judge_part(root: Path, run: str, part: Part, against: str) -> Outcome:
    """``run`` against ``against`` on one part (see the module's rule)."""
    if part.kind == "value":
        a, b = (result_value(root, name, part.metric) for name in (against, run))
        if a is None or b is None:
            return Outcome(part, "not judged", f"{part.metric} missing from a results JSON")
        status = "same" if a == b else ("better" if side(b - a, part.lower) > 0 else "worse")
        return Outcome(part, status, f"{value_text(part.metric, b)} vs {value_text(part.metric, a)}")
    if part.kind == "probe":
        files = [root / f"{name}{PROBE_FILE_SUFFIX}" for name in (against, run)]
        if not all(f.is_file() for f in files):
            return Outcome(part, "not judged", "no per-example probe file")
        a, b = (probe_values(read_case_records(f), part.metric) for f in files)
        d = paired_difference(a, b, part.metric)
        return Outcome(part, status_of(d, part.lower), interval_text(d) + " examples")
    a, b = (read_case_records(root / f"{name}{CASE_FILE_SUFFIX}") for name in (against, run))
    # Fluency: only the cases generated from carry it. A run from before a metric was kept per case
    # (fluency, token accuracy) has none: its mean is reported instead.
    va, vb = (case_values(r, part.metric, only_present=True) for r in (a, b))
    if not va or not vb:
        ma, mb = (result_value(root, name, part.metric) for name in (against, run))
        return Outcome(part, "not judged", f"means {value_text(part.metric, mb)} vs {value_text(part.metric, ma)}, "
                       "no per-case values in both runs")  # fmt: skip
    d = paired_difference(va, vb, part.metric)
    return Outcome(part, status_of(d, part.lower), interval_text(d) + " cases")


def result_value(root: Path, run: str, key: str) -> float | None:
    record = json.loads((root / f"{run}.json").read_text())
    value = record.get("summary", {}).get(key, record.get("weight_norms_end", {}).get(key))
    return None if value is None else float(value)


def value_text(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:+.1f}%" if key.endswith("rel_l1_growth") else f"{value:.3f}"


def verdict(outcomes: list[Outcome]) -> str:
    if all(o.met for o in outcomes):
        return "holds"
    if any(o.status == "worse" for o in outcomes) or not any(o.met for o in outcomes):
        return "does not hold"
    return "holds partly"


def judge(root: Path, claim: Claim) -> tuple[str, list[Outcome], dict[str, list[Outcome]]]:
    """The claim's verdict, its parts' outcomes, and the same parts against each ``beside`` run
    (reported, not judged). "waits for ..." when a run it needs has no results JSON yet."""
    has = lambda name: (root / f"{name}.json").is_file()  # noqa: E731
    parts = [p for p in claim.parts if has(p.against) or not p.optional]
    missing = sorted({name for name in [claim.run, *(p.against for p in parts)] if not has(name)})
    if missing:
        return f"waits for {', '.join(missing)}", [], {}
    outcomes = [judge_part(root, claim.run, p, p.against) for p in parts]
    beside = {name: [judge_part(root, claim.run, p, name) for p in parts] for name in claim.beside if has(name)}
    return verdict(outcomes), outcomes, beside


def asks(part: Part) -> str:
    return part.want.replace("_", " ")


def verdict_lines(root: Path, claims: list[Claim]) -> list[str]:
    """One markdown item per claim: verdict, then each part's numbers and status."""
    lines = []
    for claim in claims:
        result, outcomes, beside = judge(root, claim)
        text = "; ".join(
            f"{o.part.label()} {claim.run} vs {o.part.against}: {o.text} ({o.status}, asks {asks(o.part)})"
            for o in outcomes
        )
        lines.append(f"- **{claim.name}**: {result}." + (f" {text}." if text else ""))
        for name, extra in beside.items():
            lines.append(
                f"  - beside {name}, not judged: "
                + "; ".join(f"{o.part.label()}: {o.text} ({o.status})" for o in extra)
            )
    return lines
