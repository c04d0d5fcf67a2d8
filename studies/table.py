"""Print a markdown table of a study's results JSONs (one column per run): python studies/table.py DIR [RUN ...]."""

import json
import sys
from pathlib import Path

ROWS = [
    ("method", "method"),
    ("edits", "edits"),
    ("efficacy success", "efficacy_success"),
    ("efficacy (rewrite top-1) accuracy", "efficacy_accuracy"),
    ("efficacy magnitude", "efficacy_magnitude"),
    ("paraphrase (generalization) success", "generalization_success"),
    ("generalization accuracy", "generalization_accuracy"),
    ("neighbourhood (specificity) success", "specificity_success"),
    ("specificity accuracy", "specificity_accuracy"),
    ("specificity magnitude", "specificity_magnitude"),
    ("fluency (generation entropy)", "fluency"),
    ("ME-PPL-50 perplexity", "me_ppl50_perplexity"),
    ("seconds per step", "seconds_per_step"),
]


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "—" if value is None else str(value)


def main(argv: list[str]) -> None:
    root = Path(argv[0])
    names = argv[1:] or sorted(p.stem for p in root.glob("*.json"))
    records = {n: json.loads((root / f"{n}.json").read_text()) for n in names}
    pre = next((r["summary"] for r in records.values() if "pre_efficacy_success" in r["summary"]), None)
    cols = (["before"] if pre else []) + names
    print("| | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for label, key in ROWS:
        values = ([pre.get(f"pre_{key}")] if pre else []) + [records[n]["summary"].get(key) for n in names]
        if label in ("method", "edits", "seconds per step") and pre:
            values[0] = None
        print(f"| {label} | " + " | ".join(cell(v) for v in values) + " |")
    print()
    for n in names:
        r = records[n]
        print(f"- {n}: `{r['command']}` (commit {r['commit'][:12]}, {r['seconds_this_sitting']:.0f} s this sitting)")


if __name__ == "__main__":
    main(sys.argv[1:])
