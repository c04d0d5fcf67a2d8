"""Print a markdown table of a study's results JSONs, one column per run:

    python studies/table.py DIR [RUN ...] [--growth-layers 8] [--curve KEY ...] [--paired BASE]
    python studies/table.py DIR --verdicts [FILE]

Rows are the metrics any of the runs has (CounterFact's success, accuracy and magnitude rows,
zsRE's token accuracies, quality, each probe task's scores on all its examples), the L1 growth of
the edited matrices after the last step (the results JSON's ``weight_norms_end``;
``--growth-layers`` picks the layers), seconds per step (the mean, and the median of the steps'
records, which one step that waited does not move), and seconds per edit of z, keys, solve and
evaluation where the results JSONs have them (``seconds_per_edit``). The "before" column is the
first run's ``pre_*`` values.

``--paired BASE`` adds a table of every other run's per-case differences from run BASE at the final
point (success and accuracy rows; fluency on the cases both generated from, where the case files
carry it) with 95% paired bootstrap intervals, from the compact per-case
files ``editlab study`` keeps beside the results JSONs (``RUN.cases.jsonl.gz``); ``--paired pre``
compares every run with the unedited model's values of the same cases (what the stream cost). Where
the runs have per-example probe files (``RUN.probes.jsonl.gz``, written by ``editlab study --collect``),
a second table does the same for each probe task's accuracy over its examples.

``--verdicts [FILE]`` prints each claim of a claims file (default ``DIR/claims.yaml``) with its
verdict and the numbers behind it, by the rule of editlab.verdicts, fixed before the results.

``--curve KEY ...`` adds one table per metric against edits, a row per run, a column per
evaluation point of the results JSONs' ``curve`` (pre-edit, periodic, final); the 0-edit column of a
run that skipped its pre-edit evaluation is the first run's (the same model scored on the same cases).
"""

import argparse
import json
from pathlib import Path

from editlab.paired import (
    CASE_FILE_SUFFIX,
    PROBE_FILE_SUFFIX,
    case_values,
    paired_difference,
    probe_values,
    read_case_records,
)
from editlab.report import is_stream, l1_growth_by_layer
from editlab.verdicts import read_claims, verdict_lines

ROWS = [
    ("method", "method"),
    ("edits", "edits"),
    ("efficacy success", "efficacy_success"),
    ("efficacy (rewrite top-1) accuracy", "efficacy_accuracy"),
    ("efficacy token accuracy", "efficacy_token_accuracy"),
    ("efficacy magnitude", "efficacy_magnitude"),
    ("paraphrase (generalization) success", "generalization_success"),
    ("generalization accuracy", "generalization_accuracy"),
    ("generalization token accuracy", "generalization_token_accuracy"),
    ("neighbourhood (specificity) success", "specificity_success"),
    ("specificity accuracy", "specificity_accuracy"),
    ("specificity token accuracy", "specificity_token_accuracy"),
    ("specificity magnitude", "specificity_magnitude"),
    ("efficacy generated (exact)", "efficacy_generated_exact"),
    ("efficacy generated (starts with)", "efficacy_generated_prefix"),
    ("generalization generated (exact)", "generalization_generated_exact"),
    ("generalization generated (starts with)", "generalization_generated_prefix"),
    ("fluency (generation entropy)", "fluency"),
    ("ME-PPL-50 perplexity", "me_ppl50_perplexity"),
]
NOT_BEFORE = ("method", "edits", "seconds per step")  # rows with no pre-edit value
PER_EDIT = [  # the results JSON's seconds_per_edit: each stage's seconds over the run's edits
    ("seconds per edit: z", "seconds_z"),
    # z a step took from its parts (a journal replayed, a killed step resumed): the earlier sitting's seconds
    ("seconds per edit: z kept from an earlier sitting", "seconds_reused"),
    ("seconds per edit: keys", "seconds_keys"),
    ("seconds per edit: solve", "seconds_solve"),
    ("seconds per edit: evaluation", "seconds_evaluation"),
    ("CPU seconds per edit of the steps", "seconds_cpu"),  # the steps' work without waits (steps.jsonl)
]


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "—" if value is None else str(value)


def probe_rows(summaries: list[dict]) -> list[tuple[str, str]]:
    """One row per probe task and score any run has on every example (``probe/<task>/<score>``), in
    the order the summaries list them; the ``subset_`` scores (the 100 examples scored between
    points) belong to the curve tables, not to the end of the stream."""
    keys = dict.fromkeys(
        k for s in summaries for k in s if k.startswith("probe/") and not k.rsplit("/", 1)[-1].startswith("subset_")
    )
    return [(f"probe {task} {score}", k) for k in keys for _, task, score in [k.split("/")]]


def growth_rows(records: dict, layers: list[int] | None) -> list[tuple[str, list]]:
    """One row per edited layer found (or asked for): W's L1 norm growth after the last step, in %."""
    found = sorted({layer for r in records.values() for layer in l1_growth_by_layer(r.get("weight_norms_end", {}))})
    rows = []
    for layer in layers if layers is not None else found:
        key = f"weight_norm/l{layer}/rel_l1_growth"
        values = [r.get("weight_norms_end", {}).get(key) for r in records.values()]
        rows.append(
            (f"L1 growth of layer {layer}'s edited matrix", [None if v is None else f"{100 * v:+.1f}%" for v in values])
        )
    return rows


def median_step_seconds(steps: list[dict]) -> float | None:
    """The median of the steps' wall seconds: what a step costs, untouched by one step that waited
    (a process stopped or starved for a while inflates the mean, not the median)."""
    values = sorted(float(row["seconds"]) for row in steps if isinstance(row.get("seconds"), (int, float)))
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def curve_table(records: dict, key: str) -> list[str]:
    """``key`` against edits: a row per run, a column per evaluation point any run has."""
    points = {
        # immediate points score a step's own cases, not the stream's
        name: {int(row["edits"]): row.get(key) for row in r.get("curve") or [] if is_stream(row)}
        for name, r in records.items()
    }
    shared = next((p[0] for p in points.values() if p.get(0) is not None), None)
    edits = sorted({e for p in points.values() for e in p} | ({0} if shared is not None else set()))
    lines = [f"| {key} | " + " | ".join(f"{e:,} edits" for e in edits) + " |", "|---" + "|---:" * len(edits) + "|"]
    for name, p in points.items():
        row = [p.get(e, shared if e == 0 else None) for e in edits]
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in row) + " |")
    return lines


PAIRED_METRICS = [
    ("efficacy success", "efficacy_success"),
    ("paraphrase success", "generalization_success"),
    ("neighbourhood success", "specificity_success"),
    ("efficacy accuracy", "efficacy_accuracy"),
    ("generalization accuracy", "generalization_accuracy"),
    ("specificity accuracy", "specificity_accuracy"),
    ("efficacy token accuracy", "efficacy_token_accuracy"),  # zsRE's metric
    ("generalization token accuracy", "generalization_token_accuracy"),
    ("specificity token accuracy", "specificity_token_accuracy"),
]


def paired_table(root: Path, base: str, others: list[str]) -> list[str]:
    """Each run's mean per-case difference from ``base`` at the final point with its 95% paired
    bootstrap interval (10,000 resamples of the cases, seed 0); * where the interval excludes 0.
    ``base`` "pre": from the unedited model's values of the same cases (what the stream cost), read
    from the first run that scored the unedited model (every run edits the same cases from it)."""
    runs = {name: read_case_records(root / f"{name}{CASE_FILE_SUFFIX}") for name in others}
    if base == "pre":
        with_pre = [records for records in runs.values() if records and all("pre" in r for r in records)]
        if not with_pre:
            raise SystemExit(f"--paired pre: no run of {', '.join(others)} has pre-edit values in its case file")
        base_records, base_point = with_pre[0], "pre"
    else:
        base_records, base_point = read_case_records(root / f"{base}{CASE_FILE_SUFFIX}"), "post"
    # The metrics the cases carry: zsRE has no success rows; runs before per-case token accuracy have none.
    metrics = [(label, key) for label, key in PAIRED_METRICS if all(key in r[base_point] for r in base_records)]
    before = {key: case_values(base_records, key, point=base_point) for _, key in metrics}
    lines = [f"| metric | run | {base} | run | run − {base} | 95% interval | cases |"]
    lines.append("|---|---|---:|---:|---:|---|---:|")
    # Fluency: on the cases both runs generated from (runs since per-case fluency was recorded).
    base_fluency = case_values(base_records, "fluency", point=base_point, only_present=True)
    left_out = []
    for name, records in runs.items():
        present = [(label, key) for label, key in metrics if all(key in r["post"] for r in records)]
        # A run from before a metric was kept per case has none of it: said below the table, not paired.
        left_out += [f"{name}: {label}" for label, key in metrics if (label, key) not in present]
        diffs = [paired_difference(before[key], case_values(records, key), key) for _, key in present]
        labels = [label for label, _ in present]
        fluency = case_values(records, "fluency", only_present=True)
        if base_fluency and set(fluency) == set(base_fluency):
            diffs.append(paired_difference(base_fluency, fluency, "fluency"))
            labels.append("fluency (generation entropy)")
        for label, d in zip(labels, diffs, strict=True):
            mark = " *" if d.excludes_zero else ""
            lines.append(
                f"| {label} | {name} | {d.mean_a:.4f} | {d.mean_b:.4f} | {d.difference:+.3f}{mark} "
                f"| [{d.low:+.3f}, {d.high:+.3f}] | {d.cases} |"
            )
    if left_out:
        lines.append(f"\nNot paired (no per-case values in the run's case file): {'; '.join(left_out)}.")
    return lines


def paired_probe_table(root: Path, base: str, others: list[str]) -> list[str]:
    """As :func:`paired_table` for each probe task's accuracy, per example, from the per-example probe
    files (``RUN.probes.jsonl.gz``, ``editlab study --collect``); empty where a run has none."""
    files = {name: root / f"{name}{PROBE_FILE_SUFFIX}" for name in [base, *others] if name != "pre"}
    runs = {name: read_case_records(path) for name, path in files.items() if path.is_file() and name != base}
    if not runs or (base != "pre" and not files[base].is_file()):
        return []
    base_records = next(iter(runs.values())) if base == "pre" else read_case_records(files[base])
    point = "pre" if base == "pre" else "post"
    tasks = list(dict.fromkeys(r["task"] for r in base_records))
    lines = [f"| probe accuracy | run | {base} | run | run − {base} | 95% interval | examples |"]
    lines.append("|---|---|---:|---:|---:|---|---:|")
    for name, records in runs.items():
        for task in tasks:
            d = paired_difference(probe_values(base_records, task, point=point), probe_values(records, task), task)
            mark = " *" if d.excludes_zero else ""
            lines.append(
                f"| {task} | {name} | {d.mean_a:.4f} | {d.mean_b:.4f} | {d.difference:+.3f}{mark} "
                f"| [{d.low:+.3f}, {d.high:+.3f}] | {d.cases} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("runs", nargs="*", help="runs, in column order (default: every results JSON)")
    p.add_argument(
        "--growth-layers", type=int, nargs="*", help="layers of the growth rows (default: every edited layer)"
    )
    p.add_argument("--curve", nargs="*", default=[], metavar="KEY", help="curve tables of these metrics")
    p.add_argument(
        "--paired",
        metavar="BASE",
        help="a table of each run's per-case differences from run BASE at the final point, with 95%% paired "
        "bootstrap intervals (from DIR/RUN.cases.jsonl.gz); BASE 'pre': from the unedited model's values",
    )
    p.add_argument(
        "--verdicts",
        nargs="?",
        const="",
        metavar="FILE",
        help="each claim of FILE (default DIR/claims.yaml) with its verdict and numbers (editlab.verdicts)",
    )
    args = p.parse_args(argv)
    root = Path(args.dir)
    if args.verdicts is not None:
        claims = read_claims(Path(args.verdicts) if args.verdicts else root / "claims.yaml")
        print("\n".join(verdict_lines(root, claims)))
        return
    names = args.runs or sorted(q.stem for q in root.glob("*.json"))
    records = {n: json.loads((root / f"{n}.json").read_text()) for n in names}
    summaries = [r["summary"] for r in records.values()]
    pre = next((s for s in summaries if any(k.startswith("pre_") for k in s)), None)
    cols = (["before"] if pre else []) + names
    print("| | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for label, key in ROWS + probe_rows(summaries):
        if not any(key in s for s in summaries):
            continue
        before = [None if label in NOT_BEFORE else pre.get(f"pre_{key}")] if pre else []
        print(f"| {label} | " + " | ".join(cell(v) for v in before + [s.get(key) for s in summaries]) + " |")
    for label, values in growth_rows(records, args.growth_layers):
        print(f"| {label} | " + " | ".join(cell(v) for v in (["0"] if pre else []) + values) + " |")
    seconds = [s.get("seconds_per_step") for s in summaries]
    print("| seconds per step | " + " | ".join(cell(v) for v in ([None] if pre else []) + seconds) + " |")
    medians = [median_step_seconds(r.get("steps") or []) for r in records.values()]
    if any(v is not None for v in medians):
        print("| median seconds of a step | " + " | ".join(cell(v) for v in ([None] if pre else []) + medians) + " |")
    for label, key in PER_EDIT:
        values = [r.get("seconds_per_edit", {}).get(key) for r in records.values()]
        if any(v is not None for v in values):
            print(f"| {label} | " + " | ".join(cell(v) for v in ([None] if pre else []) + values) + " |")
    for key in args.curve:
        print()
        print("\n".join(curve_table(records, key)))
    if args.paired:
        print()
        others = [n for n in names if n != args.paired]
        print("\n".join(paired_table(root, args.paired, others)))
        probes = paired_probe_table(root, args.paired, others)
        if probes:
            print()
            print("\n".join(probes))
    print()
    for n, r in records.items():
        sitting = r.get("seconds_this_sitting")  # absent where the results came from the run directory alone
        took = "" if sitting is None else f", {sitting:.0f} s this sitting"
        print(f"- {n}: `{r['command']}` (commit {r['commit'][:12]}{took})")


if __name__ == "__main__":
    main()
