"""Markdown + PNG reports of editlab run directories (``editlab report``).

A run directory always holds ``summary.json``; ``curve.jsonl`` (evaluation points against edits),
``steps.jsonl`` (one row per edit step) and ``config.yaml`` (the resolved config) are optional.
A comparison also takes a study's results JSON (``editlab study`` keeps a finished run's summary,
curve and steps in it) in place of a run directory: a study's committed results redraw its figures
after the run directories are gone.

- :func:`write_run_report` turns one run into ``report.md`` + ``plot_*.png`` inside the run directory.
- :func:`write_comparison` puts several runs side by side in ``out_dir/report.md`` + ``compare_metrics.png``
  (edit metrics, fluency, perplexity and probes against edits, one line per run) + ``compare_norms.png``
  (layer x step heatmaps of the edited matrices, one row per run, one colour scale per quantity).
- :func:`log_report_images` hands a run's plots to the loggers that take images (W&B).
- :func:`report_main` is the command line: ``editlab report RUN [RUN ...] [--out DIR]``.

Absent files and absent or null values are expected (a run stopped early, a metric disabled) and show
as "—" or as a note in place of a plot. Malformed content (bad JSON, a string where a number belongs)
raises :class:`RunDataError` naming the file: a report silently built on broken data would mislead.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from editlab.rundir import CONFIG, CURVE, REPORT, STEPS, SUMMARY

if TYPE_CHECKING:  # matplotlib is imported lazily: importing editlab must not pull in a plotting backend
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "RunDataError",
    "load_config",
    "load_jsonl",
    "load_run",
    "load_summary",
    "log_report_images",
    "render_run_report",
    "report_main",
    "write_comparison",
    "write_run_report",
]

PLOT_METRICS = "plot_metrics.png"
PLOT_QUALITY = "plot_quality.png"
PLOT_STEPS = "plot_steps.png"
PLOT_NORMS = "plot_norms.png"
PLOT_COMPARE = "compare_metrics.png"
PLOT_COMPARE_NORMS = "compare_norms.png"
DEFAULT_COMPARE_DIR = "report_compare"

MISSING = "—"
DPI = 100

# Table rows always shown (as "—" when absent) so that every report has the same shape.
CORE_ROWS = (
    "efficacy_success",
    "efficacy_accuracy",
    "generalization_success",
    "generalization_accuracy",
    "specificity_success",
    "specificity_accuracy",
    "score",
    "fluency",
    "consistency",
    "me_ppl50_perplexity",
)
# Rows shown after a core row when some run has them: the magnitude (probability difference) beside
# its success rate, token accuracy (zsRE's usual measure) and the held-out specificity of
# neighbour-assisted runs.
ROWS_AFTER = {
    "efficacy_success": ("efficacy_magnitude",),
    "efficacy_accuracy": ("efficacy_token_accuracy",),
    "generalization_success": ("generalization_magnitude",),
    "generalization_accuracy": ("generalization_token_accuracy",),
    "specificity_success": ("specificity_magnitude",),
    "specificity_accuracy": (
        "specificity_token_accuracy",
        "specificity_heldout_success",
        "specificity_heldout_magnitude",
        "specificity_heldout_accuracy",
        "specificity_heldout_token_accuracy",
    ),
}
SECONDS_ROWS = ("seconds_total", "seconds_per_step")
ZSRE_KEY = re.compile(r"zsre_\w*accuracy")
LABELS = {
    "me_ppl50_perplexity": "ME-PPL-50 perplexity",
    # The run clock's seconds cover the last sitting only (editlab.lightning.recorder.RunClock): a run
    # resumed for its last evaluation would otherwise read as a run that took minutes.
    "seconds_total": "seconds total (last sitting)",
    "seconds_setup": "seconds setup (last sitting)",
    "seconds_editing": "seconds editing (last sitting)",
    "seconds_evaluation": "seconds evaluation (every point)",
    "seconds_per_step": "seconds per step (every step)",
}

# Curve families plotted on [0, 1] axes, in panel order; "overall" gathers the single-valued rates.
# "magnitude" (probability differences, in [-1, 1]) has its own panel: pre-edit efficacy magnitudes
# are negative and would fall off a [0, 1] axis.
RATE_FAMILIES = ("efficacy", "generalization", "specificity", "overall", "zsre", "magnitude")
# Comparison panels, in order: per family the first key some run has (CounterFact's success rate;
# zsRE, which has no competing answer, has token accuracy only), then fluency, every perplexity and
# one accuracy panel per probe task.
COMPARE_FAMILIES = (
    ("efficacy_success", "efficacy_token_accuracy"),
    ("generalization_success", "generalization_token_accuracy"),
    ("specificity_success", "specificity_token_accuracy"),
)
PROBE_ACCURACY = re.compile(r"probe/([^/]+)/(?:subset_)?accuracy")
POINT_KEYS = frozenset({"step", "edits", "timing"})  # coordinates of a curve/steps row, not metrics
CURVE_FIELD, STEPS_FIELD = "curve", "steps"  # a study results JSON's copies of curve.jsonl and steps.jsonl


class RunDataError(ValueError):
    """A run file exists but its content is not what the editing module writes."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json as a dict; FileNotFoundError if absent (every finished run writes one)."""
    path = Path(run_dir) / SUMMARY
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunDataError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise RunDataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_jsonl(path: Path) -> list[dict[str, Any]] | None:
    """Rows of a JSON-lines file, or None when the file does not exist. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return None
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunDataError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise RunDataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_config(run_dir: Path) -> dict[str, Any] | None:
    """config.yaml as a dict, or None when the run has none."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RunDataError(f"{path}: invalid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunDataError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class RunFiles:
    """What a report reads of one run, from its directory or from a study's results JSON."""

    name: str
    summary: dict[str, Any]
    config: dict[str, Any] | None
    curve: list[dict[str, Any]] | None
    steps: list[dict[str, Any]] | None


def load_results_json(path: Path) -> RunFiles:
    """A study's results JSON (``editlab study``): its summary, curve and steps; no config."""
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDataError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("summary"), dict):
        raise RunDataError(f"{path}: not a study results JSON (no summary object)")
    rows = {}
    for key in (CURVE_FIELD, STEPS_FIELD):
        value = record.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(r, dict) for r in value)):
            raise RunDataError(f"{path}: {key} must be a list of JSON objects")
        rows[key] = value
    return RunFiles(path.stem, record["summary"], None, rows[CURVE_FIELD], rows[STEPS_FIELD])


def load_run(path: Path) -> RunFiles:
    """A run directory's files, or a study results JSON's copy of them (a ``.json`` file)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return load_results_json(path)
    summary, config = load_summary(path), load_config(path)
    return RunFiles(path.name, summary, config, load_jsonl(path / CURVE), load_jsonl(path / STEPS))


# ---------------------------------------------------------------------------------------------------------------------
# Values and tables


def as_number(value: Any, where: str) -> float | None:
    """None for a missing/null value, a float otherwise. bool is refused although it is an int in Python."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunDataError(f"{where}: expected a number or null, got {value!r}")
    return float(value)


def fmt(value: float | None) -> str:
    """Three decimals, "—" when missing; nan/inf print as such rather than hiding a broken metric."""
    return MISSING if value is None else f"{value:.3f}"


def fmt_count(value: float | None) -> str:
    return MISSING if value is None else str(int(value)) if float(value).is_integer() else f"{value:g}"


def label(key: str) -> str:
    return LABELS.get(key) or key.replace("zsre", "zsRE").replace("_", " ")


def summary_value(summary: Mapping[str, Any], key: str) -> float | None:
    return as_number(summary.get(key), f"{SUMMARY} {key!r}")


def metric_keys(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Table rows: the fixed core (with ROWS_AFTER's rows some summary has), then zsRE accuracies and
    further ``seconds_*`` found in any summary."""
    present: set[str] = set()
    for summary in summaries:
        present.update(key.removeprefix("pre_") for key in summary)
    zsre = sorted(key for key in present if ZSRE_KEY.fullmatch(key))
    seconds = sorted(key for key in present if key.startswith("seconds_") and key not in SECONDS_ROWS)
    core = [row for key in CORE_ROWS for row in (key, *(k for k in ROWS_AFTER.get(key, ()) if k in present))]
    return [*core, *zsre, *SECONDS_ROWS, *seconds]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """GitHub table, first column left-aligned, value columns right-aligned; pipes in cells escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    rule = "| --- | " + " | ".join("---:" for _ in header[1:]) + " |"
    return [line(header), rule, *(line(row) for row in rows)]


def run_metrics_table(summary: Mapping[str, Any]) -> list[str]:
    edits = summary_value(summary, "edits")
    after = f"after {fmt_count(edits)} edits" if edits is not None else "after edits"
    rows = [
        [label(key), fmt(summary_value(summary, f"pre_{key}")), fmt(summary_value(summary, key))]
        for key in metric_keys([summary])
    ]
    return markdown_table(["metric", "before edits", after], rows)


WEIGHT_NORM = re.compile(r"weight_norm/l(\d+)/(rel_\w+)")
L1_GROWTH = re.compile(r"weight_norm/l(\d+)/rel_l1_growth")


def l1_growth_by_layer(row: Mapping[str, Any]) -> dict[int, float]:
    """layer -> relative L1 growth of its edited matrix, ‖W‖₁/‖W₀‖₁ − 1, from a steps row or a
    results JSON's ``weight_norms_end`` (its ``weight_norm/l<i>/rel_l1_growth`` values)."""
    return {int(m.group(1)): float(v) for k, v in row.items() if (m := L1_GROWTH.fullmatch(k))}


def last_layer_l1_growth(row: Mapping[str, Any]) -> float | None:
    """The highest edited layer's relative L1 growth in ``row`` (:func:`l1_growth_by_layer`), None without one."""
    growth = l1_growth_by_layer(row)
    return growth[max(growth)] if growth else None


def final_weight_norms(steps: Sequence[Mapping[str, Any]] | None) -> dict[str, float]:
    """The relative weight-norm values (``weight_norm/l{layer}/rel_*``) of the last step that
    logged them: how far each edited matrix moved from W_0 by the end of the stream."""
    for row in reversed(steps or []):
        found = {key: as_number(value, f"{STEPS} {key!r}") for key, value in row.items() if WEIGHT_NORM.fullmatch(key)}
        if found:
            return {key: value for key, value in found.items() if value is not None}
    return {}


def weight_norm_section(norms: Sequence[Mapping[str, float]], header: Sequence[str]) -> list[str]:
    """One row per (layer, quantity) present in any run: the EAC paper's "+317%" is rel_l1_growth."""
    keys = sorted({k for n in norms for k in n}, key=lambda k: (int(WEIGHT_NORM.fullmatch(k)[1]), k))
    if not keys:
        return []
    rows = [
        [
            f"layer {WEIGHT_NORM.fullmatch(k)[1]} {WEIGHT_NORM.fullmatch(k)[2].replace('_', ' ')}",
            *(fmt(n.get(k)) for n in norms),
        ]
        for k in keys
    ]
    note = "Relative to W_0: growth = ‖W_t‖/‖W_0‖ − 1, delta = ‖W_t − W_0‖/‖W_0‖ (L1 and Frobenius)."
    return ["## Edited matrices at the end", "", note, "", *markdown_table(header, rows), ""]


# ---------------------------------------------------------------------------------------------------------------------
# Run settings


def submapping(tree: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    value = (tree or {}).get(key)
    return value if isinstance(value, Mapping) else {}


def first_set(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def find_key(tree: Any, key: str) -> Any:
    """First non-null value under ``key`` anywhere in nested mappings (depth first), else None.

    Used for the evaluation timing, whose place in the config belongs to the editing module and may move.
    """
    if not isinstance(tree, Mapping):
        return None
    if tree.get(key) is not None:
        return tree[key]
    return first_set(*(find_key(value, key) for value in tree.values()))


def flatten(tree: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """Nested mapping -> dotted ``(key, value)`` pairs; lists stay whole (they are single settings)."""
    pairs: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            pairs.extend(flatten(value, f"{prefix}{key}."))
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def render(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def method_name(summary: Mapping[str, Any], config: Mapping[str, Any] | None) -> str | None:
    class_path = submapping(submapping(config, "model"), "method").get("class_path")
    return first_set(summary.get("method"), class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else None)


def run_settings(config: Mapping[str, Any] | None, summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(key, value)`` settings: config.yaml first, summary.json filling in what a run without config lacks.

    Top-level settings that are missing are skipped; nulls inside the method's init_args are kept because
    there null is a chosen value (e.g. ``text_field: null``).
    """
    model = submapping(config, "model")
    data = submapping(config, "data")
    method = submapping(model, "method")
    optional = [
        ("model", first_set(model.get("model"), summary.get("model"))),
        ("method", first_set(method.get("class_path"), summary.get("method"))),
    ]
    init_args = submapping(method, "init_args")
    tail = [
        *((f"data.{key}", data.get(key)) for key in ("path", "num_edits", "edits_per_step")),
        ("timing", first_set(find_key(model, "timing"), summary.get("timing"))),
        ("seed", first_set((config or {}).get("seed_everything"), model.get("seed"))),
    ]
    head = [(key, value) for key, value in optional if value is not None]
    return [*head, *flatten(init_args, "method."), *((key, value) for key, value in tail if value is not None)]


def settings_section(config: Mapping[str, Any] | None, summary: Mapping[str, Any]) -> list[str]:
    lines = ["## Run settings", ""]
    if config is None:
        lines += [f"_No {CONFIG} in this run: settings below come from {SUMMARY} only._", ""]
    settings = run_settings(config, summary)
    if settings:
        # A code block: values such as paths with underscores must not be read as markdown.
        lines += ["```text", *(f"{key}: {render(value)}" for key, value in settings), "```", ""]
    else:
        lines += ["_No settings recorded._", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Series


def x_of(row: Mapping[str, Any], where: str) -> float:
    edits = as_number(row.get("edits"), f"{where} 'edits'")
    if edits is None:
        raise RunDataError(f"{where}: no 'edits' count, cannot place the point")
    return edits


def series(
    rows: Sequence[Mapping[str, Any]], key: str, source: str, keep: Any = None
) -> tuple[list[float], list[float]]:
    """``(edits, values)`` of one key, sorted by edits, nulls dropped; ``keep(row)`` filters rows.

    A later row at the same edit count replaces an earlier one (the latest evaluation of that state).
    """
    points: dict[float, float] = {}
    for index, row in enumerate(rows):
        if keep is not None and not keep(row):
            continue
        where = f"{source} row {index + 1}"
        value = as_number(row.get(key), f"{where} {key!r}")
        if value is not None:
            points[x_of(row, where)] = value
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def is_immediate(row: Mapping[str, Any]) -> bool:
    return row.get("timing") == "immediate"


def is_stream(row: Mapping[str, Any]) -> bool:
    return not is_immediate(row)


def numeric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys holding a number in at least one row, in first-seen order, coordinates excluded."""
    keys: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in POINT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                keys.setdefault(key, None)
    return list(keys)


def rate_family(key: str) -> str | None:
    """Panel of a [0, 1] metric; None for keys that are not rates (quality, seconds, unknown)."""
    head = key.split("_", 1)[0]
    if key.endswith("_magnitude"):
        return "magnitude"
    if head in ("efficacy", "generalization", "specificity") or ZSRE_KEY.fullmatch(key):
        return head
    if key in ("score", "consistency"):
        return "overall"
    return None


def is_quality(key: str) -> bool:
    return key == "fluency" or key.endswith("perplexity")


def is_rate(key: str) -> bool:
    """A value in [0, 1] (success rates, accuracies, probe accuracies); magnitudes are in [-1, 1]."""
    return (rate_family(key) not in (None, "magnitude")) or PROBE_ACCURACY.fullmatch(key) is not None


def comparison_rows(curve: Sequence[Mapping[str, Any]] | None, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The points a run adds to the comparison curves: its pre/periodic/final evaluations from
    curve.jsonl; for a run without curve.jsonl rows, the same two points summary.json holds (the
    ``pre_*`` values at 0 edits and the final ones at its edit count). Immediate points are left
    out: they may score other cases than the rest (see :func:`draw_curve_metric`)."""
    if curve:
        return [dict(row) for row in curve if is_stream(row)]
    rows: list[dict[str, Any]] = []
    pre = {key.removeprefix("pre_"): value for key, value in summary.items() if key.startswith("pre_")}
    if pre:
        rows.append({**pre, "edits": 0, "timing": "pre"})
    if summary.get("edits") is not None:
        final = {key: value for key, value in summary.items() if not key.startswith("pre_")}
        rows.append({**final, "timing": summary.get("timing") or "final"})
    return [row for row in rows if is_stream(row)]


def pre_point(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The pre-edit point of a run's :func:`comparison_rows`, None when it skipped that evaluation."""
    return next((dict(row) for row in rows if row.get("timing") == "pre"), None)


def with_shared_pre(
    points: Sequence[Sequence[Mapping[str, Any]]], pre: Mapping[str, Any]
) -> tuple[list[list[dict[str, Any]]], list[int]]:
    """Each run's points with ``pre`` (another run's pre-edit point on the same records) put first
    where the run has none of its own (``evaluation.pre false``: a study evaluates the unedited model
    once for all its runs); the indices of the runs given it."""
    out, given = [], []
    for index, rows in enumerate(points):
        rows = [dict(row) for row in rows]
        if pre_point(rows) is None:
            rows.insert(0, dict(pre))
            given.append(index)
        out.append(rows)
    return out, given


def comparison_keys(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """The comparison figure's panels (see COMPARE_FAMILIES), keys some run has a point of. A probe
    task's panel is its ``subset_accuracy`` when logged: the same examples at every point, where the
    plain accuracy switches between the subset (during the stream) and the full set (before, after)."""
    present = {key for rows in runs for key in numeric_keys(rows)}
    keys = [next((key for key in family if key in present), None) for family in COMPARE_FAMILIES]
    keys += ["fluency"] if "fluency" in present else []
    keys += sorted(key for key in present if key.endswith("perplexity"))
    for task in sorted({match[1] for key in present if (match := PROBE_ACCURACY.fullmatch(key))}):
        subset = f"probe/{task}/subset_accuracy"
        keys.append(subset if subset in present else f"probe/{task}/accuracy")
    return [key for key in keys if key is not None]


# ---------------------------------------------------------------------------------------------------------------------
# Edited matrices per layer and step


@dataclass(frozen=True)
class NormQuantity:
    pattern: re.Pattern[str]  # a steps.jsonl key; its one group is the layer
    title: str
    unit: str  # the colour bar's label


NORM_QUANTITIES = (
    NormQuantity(re.compile(r"delta_norm/l(\d+)"), "each step's update", r"$\Vert\Delta W\Vert_F$"),
    NormQuantity(
        re.compile(r"weight_norm/l(\d+)/rel_fro_growth"),
        "norm growth",
        r"$\Vert W_t\Vert_F \,/\, \Vert W_0\Vert_F - 1$",
    ),
    NormQuantity(
        re.compile(r"weight_norm/l(\d+)/rel_fro_delta"),
        "accumulated change",
        r"$\Vert W_t - W_0\Vert_F \,/\, \Vert W_0\Vert_F$",
    ),
)


@dataclass(frozen=True)
class LayerGrid:
    """One quantity of the edited matrices: a row per layer (ascending), a column per step."""

    layers: list[int]
    edits: list[float]  # edits done after each column's step
    values: np.ndarray  # [len(layers), len(edits)]; nan where a step did not log that layer


def layer_grid(rows: Sequence[Mapping[str, Any]] | None, pattern: re.Pattern[str]) -> LayerGrid | None:
    """The values of ``pattern``'s keys in steps.jsonl as a layer x step grid; None when no row has one.

    Rows without such a key (or with nulls only) add no column; a later row at the same edit count
    replaces an earlier one, as in :func:`series`.
    """
    columns: dict[float, dict[int, float]] = {}
    for index, row in enumerate(rows or []):
        where = f"{STEPS} row {index + 1}"
        found = {}
        for key, value in row.items():
            match = pattern.fullmatch(key)
            number = None if match is None else as_number(value, f"{where} {key!r}")
            if number is not None:
                found[int(match[1])] = number
        if found:
            columns[x_of(row, where)] = found
    if not columns:
        return None
    edits = sorted(columns)
    layers = sorted({layer for column in columns.values() for layer in column})
    values = np.array([[columns[x].get(layer, np.nan) for x in edits] for layer in layers], dtype=float)
    return LayerGrid(layers, edits, values)


def value_range(grids: Sequence[LayerGrid]) -> tuple[float, float]:
    """Smallest and largest finite value of the grids: one colour scale for all runs of a quantity."""
    finite = np.concatenate([grid.values[np.isfinite(grid.values)] for grid in grids])
    if finite.size == 0:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


def tick_positions(count: int, most: int = 10) -> list[int]:
    """At most ``most`` indices of ``count`` columns at an even stride, counted back from the last
    column: the last step's edit count (the stream's total) is always labelled, and the others are
    multiples of the stride's edits when the steps are equal."""
    stride = max(1, math.ceil(count / most))
    return list(range((count - 1) % stride, count, stride))


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def blank_figure(width: float, height: float) -> Figure:
    import matplotlib

    matplotlib.use("Agg")  # reports are written on headless machines (cluster nodes, CI)
    from matplotlib.figure import Figure

    # Figure rather than pyplot: no global figure registry to leak into when many reports are written.
    return Figure(figsize=(width, height), layout="constrained")


def new_figure(panels: int) -> tuple[Figure, list[Axes]]:
    """A figure with ``panels`` axes on a grid of at most three columns; unused cells hidden."""
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    figure = blank_figure(4.8 * cols, 3.4 * rows)
    axes = list(figure.subplots(rows, cols, squeeze=False).ravel())
    for unused in axes[panels:]:
        unused.set_visible(False)
    return figure, axes[:panels]


def style_axes(ax: Axes, title: str, *, rate: bool, signed: bool = False, legend: bool = True) -> None:
    """``rate``: y on [0, 1]; with ``signed`` on [-1, 1] (probability differences). ``legend``: False
    when the figure has one legend for all panels."""
    ax.set_title(title)
    ax.set_xlabel("edits")
    ax.grid(alpha=0.3)
    if rate:
        ax.set_ylim(-1.02 if signed else -0.02, 1.02)
    if legend and ax.get_legend() is None and ax.get_legend_handles_labels()[0]:  # keep one drawn (twin axes)
        ax.legend(fontsize="small")


def draw_curve_metric(ax: Axes, rows: Sequence[Mapping[str, Any]], key: str, color: str) -> bool:
    """One metric: a solid line over pre/periodic/final points, a dashed one over immediate points.

    Immediate points are taken right after a step and may score a different set of cases (e.g. the
    batch just edited) than periodic/final ones, so joining them into one line would zig-zag.
    """
    drawn = False
    for keep, style, suffix in ((is_stream, "-o", ""), (is_immediate, "--x", " (immediate)")):
        xs, ys = series(rows, key, CURVE, keep)
        if xs:
            ax.plot(xs, ys, style, color=color, markersize=4, label=f"{key}{suffix}")
            drawn = True
    return drawn


def plot_curve(rows: Sequence[Mapping[str, Any]] | None, *, quality: bool) -> Figure | None:
    """Rates (one panel per family, y in [0, 1]) or quality metrics (one panel each, free y), or None."""
    if not rows:
        return None
    keys = numeric_keys(rows)
    if quality:
        groups = {key: [key] for key in keys if is_quality(key)}
    else:
        groups = {family: [key for key in keys if rate_family(key) == family] for family in RATE_FAMILIES}
    groups = {name: members for name, members in groups.items() if any(series(rows, k, CURVE)[0] for k in members)}
    if not groups:
        return None
    figure, axes = new_figure(len(groups))
    for ax, (name, members) in zip(axes, groups.items(), strict=True):
        for index, key in enumerate(sorted(members)):
            draw_curve_metric(ax, rows, key, f"C{index % 10}")
        style_axes(ax, label(name) if quality else name, rate=not quality, signed=name == "magnitude")
    return figure


def step_groups(keys: Sequence[str]) -> dict[str, list[str]]:
    """Panels of the steps plot: z_loss (left axis) with seconds (right axis), the rest. The norms of
    the edited matrices (``weight_norm/*``, ``delta_norm/*``: one line per layer and quantity) are the
    heatmaps of :func:`plot_norm_heatmaps`; the absolute ones (``/l1``, ``/fro``) stay in steps.jsonl."""
    matrices = [key for key in keys if key.startswith(("weight_norm/", "delta_norm/"))]
    loss = [key for key in keys if key == "z_loss"]
    seconds = [key for key in keys if key == "seconds" or key.startswith("seconds_")]
    rest = [key for key in keys if key not in {*matrices, *loss, *seconds}]
    groups = {
        "z_loss and seconds": loss + seconds,
        "other step statistics": rest,
    }
    return {name: members for name, members in groups.items() if members}


def draw_lines(ax: Axes, rows: Sequence[Mapping[str, Any]], keys: Sequence[str], first_color: int = 0) -> None:
    for index, key in enumerate(keys):
        xs, ys = series(rows, key, STEPS)
        if xs:
            ax.plot(xs, ys, "-o", color=f"C{(first_color + index) % 10}", markersize=3, label=key)


def draw_loss_and_seconds(ax: Axes, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """z_loss and step seconds differ by orders of magnitude: seconds get their own (right) y axis."""
    loss = [key for key in keys if key == "z_loss"]
    seconds = [key for key in keys if key not in loss]
    draw_lines(ax, rows, loss)
    if loss:
        ax.set_ylabel("z_loss")
    if not seconds:
        return
    right = ax.twinx() if loss else ax
    draw_lines(right, rows, seconds, first_color=len(loss))
    right.set_ylabel("seconds")
    if right is not ax:  # one legend for the lines of both axes
        handles = [h for axis in (ax, right) for h in axis.get_legend_handles_labels()[0]]
        ax.legend(handles, [h.get_label() for h in handles], fontsize="small")


def plot_steps(rows: Sequence[Mapping[str, Any]] | None) -> Figure | None:
    if not rows:
        return None
    groups = step_groups(numeric_keys(rows))
    if not groups:
        return None
    figure, axes = new_figure(len(groups))
    for ax, (name, keys) in zip(axes, groups.items(), strict=True):
        if name == "z_loss and seconds":
            draw_loss_and_seconds(ax, rows, keys)
        else:
            draw_lines(ax, rows, keys)
        style_axes(ax, name, rate=False)
    return figure


def plot_comparison(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> Figure | None:
    """One panel per :func:`comparison_keys` metric, one line per run over its ``rows`` (see
    :func:`comparison_rows`), one legend for the figure. A run with one point (evaluated once, at
    the end) is a marker: there is no line to draw. A run keeps its colour in every panel."""
    keys = comparison_keys([rows for _, rows in runs])
    if not keys:
        return None
    figure, axes = new_figure(len(keys))
    handles: dict[str, Any] = {}
    for ax, key in zip(axes, keys, strict=True):
        for index, (name, rows) in enumerate(runs):
            xs, ys = series(rows, key, CURVE)
            if xs:
                style, size = ("-o", 4) if len(xs) > 1 else ("o", 7)
                (line,) = ax.plot(xs, ys, style, color=f"C{index % 10}", markersize=size, label=name)
                handles.setdefault(name, line)
        style_axes(ax, label(key), rate=is_rate(key), legend=False)
    names = [name for name, _ in runs if name in handles]  # the runs' order, not the panels'
    figure.legend([handles[name] for name in names], names, loc="outside lower center", ncols=min(3, len(names)))
    return figure


def draw_heatmap(ax: Axes, grid: LayerGrid, vmin: float, vmax: float) -> Any:
    """``grid`` as an image: layers upwards, steps to the right labelled with the edits done."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")  # a layer a step did not log: grey
    image = ax.imshow(
        grid.values, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax
    )
    rows = tick_positions(len(grid.layers), 12)
    ax.set_yticks(rows, labels=[str(grid.layers[i]) for i in rows])
    columns = tick_positions(len(grid.edits))
    ax.set_xticks(columns, labels=[fmt_count(grid.edits[i]) for i in columns])
    ax.set_xlabel("edits")
    return image


def plot_norm_heatmaps(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]] | None]]) -> Figure | None:
    """Layer x step heatmaps of the edited matrices (:data:`NORM_QUANTITIES`, Frobenius norms): a
    column per quantity some run logged, a row per run that logged any, one colour bar per column so
    that the runs of a column read on one scale. None when no run logged any."""
    grids = [(name, [layer_grid(rows, q.pattern) for q in NORM_QUANTITIES]) for name, rows in runs]
    grids = [(name, row) for name, row in grids if any(grid is not None for grid in row)]
    columns = [j for j in range(len(NORM_QUANTITIES)) if any(row[j] is not None for _, row in grids)]
    if not columns:
        return None
    layers = max(len(grid.layers) for _, row in grids for grid in row if grid is not None)
    figure = blank_figure(4.8 * len(columns), 0.4 + len(grids) * max(2.0, 0.3 * layers + 1.2))
    # A subfigure per quantity: its colour bar spans exactly its own column of runs.
    for subfigure, j in zip(figure.subfigures(1, len(columns), squeeze=False)[0], columns, strict=True):
        quantity = NORM_QUANTITIES[j]
        subfigure.suptitle(quantity.title)
        vmin, vmax = value_range([row[j] for _, row in grids if row[j] is not None])
        axes = list(subfigure.subplots(len(grids), 1, squeeze=False)[:, 0])
        image = None
        for ax, (name, row) in zip(axes, grids, strict=True):
            if len(grids) > 1:
                ax.set_title(name, fontsize="medium")
            if row[j] is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
                continue
            image = draw_heatmap(ax, row[j], vmin, vmax)
            ax.set_ylabel("layer")
        subfigure.colorbar(image, ax=axes, label=quantity.unit)
    return figure


def embed(figure: Figure | None, path: Path, title: str, absent: str) -> list[str]:
    """Save the figure and return its markdown link, or remove a stale file and return the note."""
    if figure is None:
        path.unlink(missing_ok=True)  # a plot from an earlier report would contradict this one
        return [f"_{absent}_", ""]
    figure.savefig(path, dpi=DPI)
    return [f"![{title}]({path.name})", ""]


def absence(rows: Sequence[Any] | None, filename: str, what: str) -> str:
    if rows is None:
        return f"No {filename} in this run: {what} not plotted."
    if not rows:
        return f"{filename} is empty: {what} not plotted."
    return f"{filename} holds no {what}: not plotted."


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def headline(summary: Mapping[str, Any], config: Mapping[str, Any] | None) -> str:
    method = method_name(summary, config)
    model = first_set(summary.get("model"), submapping(config, "model").get("model"))
    edits, steps = summary_value(summary, "edits"), summary_value(summary, "steps")
    who = " on ".join(f"**{name}**" for name in (method, model) if name)
    what = None if edits is None else f"{fmt_count(edits)} edits"
    if what and steps is not None:
        what += f" in {fmt_count(steps)} steps"
    return ": ".join(part for part in (who, what) if part) or "No method, model or edit count recorded."


def reason_lines(reason: Any) -> list[str]:
    return [] if reason is None else [f"consistency: {render(reason)}", ""]


def generation_lines(summary: Mapping[str, Any]) -> list[str]:
    """How the fluency texts were generated (``generation_setting``), when the run says."""
    setting = summary.get("generation_setting")
    return [] if setting is None else [f"generation: {render(setting)}", ""]


def write_run_report(run_dir: Path) -> Path:
    """Write ``report.md`` (+ plots) into ``run_dir`` from its files and return its path."""
    run = load_run(run_dir)
    return render_run_report(Path(run_dir), run.summary, run.config, run.curve, run.steps)


def render_run_report(
    run_dir: Path,
    summary: Mapping[str, Any],
    config: Mapping[str, Any] | None,
    curve: Sequence[Mapping[str, Any]] | None,
    steps: Sequence[Mapping[str, Any]] | None,
) -> Path:
    """Write ``report.md`` (+ plots) of one run's data into ``run_dir`` and return its path (a run
    renders its own records; :func:`write_run_report` reads a finished run's files)."""
    run_dir = Path(run_dir)
    lines = [f"# editlab run report: {run_dir.name}", "", headline(summary, config), ""]
    lines += settings_section(config, summary)
    lines += ["## Metrics", "", *run_metrics_table(summary), ""]
    lines += weight_norm_section([final_weight_norms(steps)], ["matrix", "value"])
    lines += generation_lines(summary)
    lines += reason_lines(summary.get("consistency_reason"))
    lines += ["## Plots", ""]
    lines += embed(
        plot_curve(curve, quality=False),
        run_dir / PLOT_METRICS,
        "rates against edits",
        absence(curve, CURVE, "rate metrics (efficacy, generalization, specificity, score)"),
    )
    lines += embed(
        plot_curve(curve, quality=True),
        run_dir / PLOT_QUALITY,
        "fluency and perplexity against edits",
        absence(curve, CURVE, "fluency or perplexity values"),
    )
    lines += embed(
        plot_norm_heatmaps([(run_dir.name, steps)]),
        run_dir / PLOT_NORMS,
        "edited matrices per layer and step",
        absence(steps, STEPS, "norms of the edited matrices (delta_norm/*, weight_norm/*)"),
    )
    lines += embed(
        plot_steps(steps),
        run_dir / PLOT_STEPS,
        "step statistics against edits",
        absence(steps, STEPS, "step statistics"),
    )
    path = run_dir / REPORT
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def run_labels(names: Sequence[str], methods: Sequence[str | None]) -> list[str]:
    """``name (METHOD)`` per run; a position suffix when two runs would otherwise read the same."""
    labels = [f"{n} ({m})" if m else n for n, m in zip(names, methods, strict=True)]
    return [f"{text} [{i + 1}]" if labels.count(text) > 1 else text for i, text in enumerate(labels)]


def comparison_tables(summaries: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    keys = metric_keys(summaries)
    header = ["metric", *labels]
    rows = [
        ["model", *(render(s["model"]) if s.get("model") is not None else MISSING for s in summaries)],
        ["edits", *(fmt_count(summary_value(s, "edits")) for s in summaries)],
        ["steps", *(fmt_count(summary_value(s, "steps")) for s in summaries)],
        *([label(key), *(fmt(summary_value(s, key)) for s in summaries)] for key in keys),
    ]
    lines = ["## Metrics after editing", "", *markdown_table(header, rows), ""]
    before = [[label(key), *(fmt(summary_value(s, f"pre_{key}")) for s in summaries)] for key in keys]
    before = [row for row in before if any(cell != MISSING for cell in row[1:])]  # e.g. seconds: never measured
    if before:
        lines += ["## Metrics before editing", "", *markdown_table(header, before), ""]
    return lines


def write_comparison(run_dirs: Sequence[Path], out_dir: Path, shared_pre: Path | None = None) -> Path:
    """Write ``out_dir/report.md`` (+ ``compare_metrics.png``) comparing the runs (run directories or
    study results JSONs, see :func:`load_run`); return its path. ``shared_pre``: a run (directory or
    results JSON) whose pre-edit point starts the curves of the runs that have none; the caller
    vouches that it evaluated the same records with the same settings."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("write_comparison needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    summaries = [run.summary for run in runs]
    curves = [run.curve for run in runs]
    steps = [run.steps for run in runs]
    labels = run_labels([run.name for run in runs], [method_name(run.summary, run.config) for run in runs])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    lines = [f"# editlab comparison of {len(run_dirs)} runs", "", "## Runs", ""]
    lines += [f"- {name}: `{d}`" for name, d in zip(labels, run_dirs, strict=True)] + [""]
    lines += comparison_tables(summaries, labels)
    lines += weight_norm_section([final_weight_norms(rows) for rows in steps], ["matrix", *labels])
    reasons = [(name, s.get("consistency_reason")) for name, s in zip(labels, summaries, strict=True)]
    lines += [f"- {name} consistency: {render(reason)}" for name, reason in reasons if reason is not None]
    lines += ([""] if any(reason is not None for _, reason in reasons) else []) + ["## Curves", ""]
    without = [name for name, rows in zip(labels, curves, strict=True) if not rows]
    if without:
        lines += [f"_No {CURVE} data for: {', '.join(without)}; their points are the values of {SUMMARY}._", ""]
    points = [comparison_rows(rows, s) for rows, s in zip(curves, summaries, strict=True)]
    if shared_pre is not None:
        source = load_run(shared_pre)
        pre = pre_point(comparison_rows(source.curve, source.summary))
        if pre is None:
            raise RunDataError(f"{shared_pre}: no pre-edit point to share with the other runs")
        points, given = with_shared_pre(points, pre)
        if given:
            names = ", ".join(labels[i] for i in given)
            lines += [
                f"_{names}: no pre-edit evaluation of their own (`evaluation.pre false`); their curves start at "
                f"{source.name}'s pre-edit point, the same records' unedited scores._",
                "",
            ]
    lines += embed(
        plot_comparison(list(zip(labels, points, strict=True))),
        out_dir / PLOT_COMPARE,
        "edit metrics, fluency, perplexity and probes against edits",
        "No run has evaluation points: comparison curves not plotted.",
    )
    lines += embed(
        plot_norm_heatmaps(list(zip(labels, steps, strict=True))),
        out_dir / PLOT_COMPARE_NORMS,
        "edited matrices per layer and step",
        f"No run has norms of the edited matrices in {STEPS}: heatmaps not plotted.",
    )
    path = out_dir / REPORT
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


# Run plots handed to image-taking loggers, by the key they are logged under.
REPORT_IMAGES = {
    "report/metrics": PLOT_METRICS,
    "report/quality": PLOT_QUALITY,
    "report/norms": PLOT_NORMS,
    "report/steps": PLOT_STEPS,
}


def log_report_images(loggers: Sequence[Any], run_dir: Path, step: int | None = None) -> list[str]:
    """Give the plots :func:`write_run_report` left in ``run_dir`` to every logger with ``log_image``
    (W&B's WandbLogger; the CSV logger has none, so a run without W&B logs nothing). Returns the keys
    logged, or [] when no logger takes images."""
    images = {key: Path(run_dir) / name for key, name in REPORT_IMAGES.items() if (Path(run_dir) / name).is_file()}
    takers = [logger for logger in loggers if callable(getattr(logger, "log_image", None))]
    for logger in takers:
        for key, path in images.items():
            logger.log_image(key=key, images=[str(path)], step=step)
    return list(images) if takers else []


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="editlab report",
        description="Write report.md with plots for one run directory, or a side-by-side comparison of several.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="run directories (with summary.json); a comparison also takes study results JSONs",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory of a comparison (default: ./{DEFAULT_COMPARE_DIR}); one run reports into its own dir",
    )
    return parser


def run_dir_problem(path: Path, single: bool) -> str | None:
    if not path.exists():
        return f"run directory not found: {path}"
    if path.is_file() and path.suffix == ".json":
        alone = "a study results JSON is compared with other runs; a run reports alone from its directory"
        return alone if single else None
    if not path.is_dir():
        return f"not a directory: {path}"
    if not (path / SUMMARY).is_file():
        return f"no {SUMMARY} in {path}: not an editlab run directory, or the run has not finished"
    return None


def report_main(argv: list[str] | None = None) -> int:
    """``editlab report``; returns the exit code (2: bad arguments or run dirs, 1: malformed run files)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help / usage errors; callers expect a code
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    single = len(args.run_dirs) == 1
    problems = [problem for path in args.run_dirs if (problem := run_dir_problem(path, single))]
    if len(args.run_dirs) == 1 and args.out is not None:
        problems.append("--out applies to comparisons of several runs; one run reports into its own directory")
    for problem in problems:
        print(f"editlab report: error: {problem}", file=sys.stderr)
    if problems:
        return 2
    try:
        if len(args.run_dirs) == 1:
            path = write_run_report(args.run_dirs[0])
        else:
            path = write_comparison(args.run_dirs, args.out or Path(DEFAULT_COMPARE_DIR))
    except RunDataError as exc:
        print(f"editlab report: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
