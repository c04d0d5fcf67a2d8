"""A one-parameter sweep of a study as a table and a plot: runs named ``<series>_c<N>`` (the
covariance sample count N of the stats_samples study), one line per series:

    python studies/sweep.py studies/stats_samples --out studies/stats_samples/samples.png

The table has one row per run (series, N, efficacy, generalization, specificity success, ME-PPL-50,
the L1 growth of the last edited layer's matrix after the last step, and the seconds of set-up, i.e.
the statistics, the context templates and any projector, recomputed in every sitting of a resumed
run); the figure one panel per column but the series, N on a log axis. The stream's seconds are
left out: z and the solve do not depend on N, and a run resumed across sittings on a shared machine
has no comparable total. Runs without a results JSON are absent. Other results JSONs of the
directory (not ``_c<N>``) are ignored.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from editlab.report import last_layer_l1_growth

NAME = re.compile(r"(?P<series>.+)_c(?P<n>\d+)")
LAST_GROWTH = "last_layer_l1_growth_percent"  # the last edited layer's L1 growth, in %
COLUMNS = [  # (header, key of a point's values, format)
    ("efficacy success", "efficacy_success", ".3f"),
    ("generalization success", "generalization_success", ".3f"),
    ("specificity success", "specificity_success", ".3f"),
    ("ME-PPL-50", "me_ppl50_perplexity", ".1f"),
    ("L1 growth of the last edited layer (%)", LAST_GROWTH, "+.1f"),
    ("seconds of set-up", "seconds_setup", ".0f"),
]


def point_values(record: dict) -> dict:
    """A results JSON's summary plus the L1 growth (%) of its highest edited layer at the end."""
    growth = last_layer_l1_growth(record.get("weight_norms_end", {}))
    return {**record["summary"], **({} if growth is None else {LAST_GROWTH: 100 * growth})}


def sweep_points(directory: Path) -> dict[str, list[tuple[int, dict]]]:
    """series -> [(N, summary)] sorted by N, from ``<series>_c<N>.json`` results files."""
    points: dict[str, list[tuple[int, dict]]] = {}
    for path in sorted(directory.glob("*.json")):
        match = NAME.fullmatch(path.stem)
        if match is None:
            continue
        values = point_values(json.loads(path.read_text()))
        points.setdefault(match["series"], []).append((int(match["n"]), values))
    for rows in points.values():
        rows.sort(key=lambda row: row[0])
    return points


def cell(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(points: dict[str, list[tuple[int, dict]]]) -> list[str]:
    lines = ["| run | N | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for series, rows in points.items():
        for n, summary in rows:
            lines.append(f"| {series} | {n} | " + " | ".join(cell(summary.get(k), f) for _, k, f in COLUMNS) + " |")
    return lines


def plot(points: dict[str, list[tuple[int, dict]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (header, key, _) in zip(axes.flat, COLUMNS, strict=True):
        for series, rows in points.items():
            present = [(n, s[key]) for n, s in rows if s.get(key) is not None]
            if present:
                ax.plot([n for n, _ in present], [v for _, v in present], marker="o", label=series)
        ax.set_xscale("log")
        ax.set_xlabel("covariance texts N")
        ax.set_title(header)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="the study's results directory (studies/<name>)")
    parser.add_argument("--out", type=Path, help="write the figure here (PNG)")
    args = parser.parse_args(argv)
    points = sweep_points(args.dir)
    if not points:
        raise SystemExit(f"studies/sweep.py: no <series>_c<N>.json results in {args.dir}")
    print("\n".join(table(points)))
    if args.out is not None:
        plot(points, args.out)


if __name__ == "__main__":
    main()
