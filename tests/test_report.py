"""Run reports: markdown tables with the right numbers, valid PNG plots, comparisons, and the CLI's errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from editlab.report import (
    NORM_QUANTITIES,
    PLOT_COMPARE,
    PLOT_COMPARE_NORMS,
    PLOT_METRICS,
    PLOT_NORMS,
    PLOT_QUALITY,
    PLOT_STEPS,
    REPORT_IMAGES,
    RunDataError,
    comparison_keys,
    comparison_rows,
    layer_grid,
    log_report_images,
    plot_comparison,
    plot_norm_heatmaps,
    plot_steps,
    rate_family,
    report_main,
    series,
    tick_positions,
    with_shared_pre,
    write_comparison,
    write_run_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REASON = "reference files not supplied: attribute_snippets.json, idf.npy"

SUMMARY: dict[str, Any] = {
    "method": "MEMIT",
    "model": "smollm2-135m-instruct",
    "timing": "final",
    "edits": 100,
    "steps": 10,
    "efficacy_success": 0.98,
    "efficacy_accuracy": 0.9,
    "generalization_success": 0.75,
    "generalization_accuracy": 0.6125,
    "specificity_success": 0.8,
    "specificity_accuracy": 0.4,
    "score": 0.8333333,
    "fluency": 6.1,
    "consistency": None,
    "consistency_reason": REASON,
    "me_ppl50_perplexity": 25.3,
    "zsre_src_accuracy": 0.71,
    "pre_efficacy_success": 0.1,
    "pre_efficacy_accuracy": 0.05,
    "pre_specificity_success": 0.9,
    "pre_fluency": 6.2,
    "pre_me_ppl50_perplexity": 24.0,
    "pre_zsre_src_accuracy": 0.2,
    "seconds_total": 301.04849,
    "seconds_per_step": 30.1,
}

CONFIG: dict[str, Any] = {
    "seed_everything": 7,
    "model": {
        "model": "smollm2-135m-instruct",
        "seed": 0,
        "timing": ["immediate", "final"],
        "method": {
            "class_path": "editlab.editing.methods.memit.MEMIT",
            "init_args": {"layers": [4, 5, 6], "mom2_weight": 15000.0, "targets": {"lr": 0.5}, "text_field": None},
        },
    },
    "data": {"path": "../shared/data/multi_counterfact.json.gz", "num_edits": 100, "edits_per_step": 10},
}


def curve_rows(scale: float = 1.0) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"step": 0, "edits": 0, "timing": "pre", "efficacy_success": 0.1, "specificity_success": 0.9, "fluency": 6.2}
    ]
    for step in range(1, 6):
        edits = 20 * step
        rows.append({"step": step, "edits": edits, "timing": "immediate", "efficacy_success": 1.0})
        rows.append(
            {
                "step": step,
                "edits": edits,
                "timing": "final" if step == 5 else "periodic",
                "efficacy_success": min(1.0, 0.5 * scale + 0.1 * step),
                "efficacy_accuracy": 0.4 + 0.1 * step,
                "generalization_success": 0.3 + 0.05 * step,
                "specificity_success": 0.9 - 0.02 * step,
                "score": 0.6,
                "consistency": None,
                "fluency": 6.2 - 0.02 * step,
                "me_ppl50_perplexity": 24 + step,
            }
        )
    return rows


def step_rows(scale: float = 1.0) -> list[dict[str, Any]]:
    """Ten steps of 10 edits; norms of layers 4 and 5 as the methods and WeightNormTracker log them."""
    return [
        {
            "step": step,
            "edits": 10 * (step + 1),
            "seconds": 30.0 + step,
            "z_loss": 0.05 / (step + 1),
            "weight_norm/l4/rel_l1": 0.01 * (step + 1),
            "weight_norm/l4/rel_fro": 0.02 * (step + 1),
            "z_steps": 12,
            **{f"delta_norm/l{layer}": scale * (layer + step / 8) for layer in (4, 5)},
            **{f"weight_norm/l{layer}/rel_fro_growth": scale * layer * step / 100 for layer in (4, 5)},
            **{f"weight_norm/l{layer}/rel_fro_delta": scale * layer * step / 50 for layer in (4, 5)},
            **{f"weight_norm/l{layer}/fro": 100.0 + step for layer in (4, 5)},
        }
        for step in range(10)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_run(root: Path, name: str, *, full: bool = True, **summary: Any) -> Path:
    """A synthetic run directory; ``full=False`` leaves only summary.json."""
    run = root / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({**SUMMARY, **summary}))
    if full:
        (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
        write_jsonl(run / "curve.jsonl", curve_rows())
        write_jsonl(run / "steps.jsonl", step_rows())
    return run


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR follows the signature
    assert width >= 300 and height >= 200 and len(data) > 5000, f"{path} looks empty"


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_run_report_table_and_settings(tmp_path):
    path = write_run_report(make_run(tmp_path, "memit_run"))
    assert path == tmp_path / "memit_run" / "report.md"
    text = path.read_text()
    rows = table_rows(text)
    assert rows["metric"] == ["before edits", "after 100 edits"]
    assert rows["efficacy success"] == ["0.100", "0.980"]
    assert rows["efficacy accuracy"] == ["0.050", "0.900"]
    assert rows["generalization success"] == ["—", "0.750"]
    assert rows["generalization accuracy"] == ["—", "0.613"]  # 0.6125 rounds half to even
    assert rows["score"] == ["—", "0.833"]
    assert rows["fluency"] == ["6.200", "6.100"]
    assert rows["consistency"] == ["—", "—"]
    assert rows["ME-PPL-50 perplexity"] == ["24.000", "25.300"]
    assert rows["zsRE src accuracy"] == ["0.200", "0.710"]
    assert rows["seconds total (last sitting)"] == ["—", "301.048"]
    assert rows["seconds per step (every step)"] == ["—", "30.100"]
    assert REASON in text
    for line in (
        "model: smollm2-135m-instruct",
        "method: editlab.editing.methods.memit.MEMIT",
        "method.layers: [4, 5, 6]",
        "method.mom2_weight: 15000.0",
        "method.targets.lr: 0.5",
        "method.text_field: null",
        "data.path: ../shared/data/multi_counterfact.json.gz",
        "data.num_edits: 100",
        "data.edits_per_step: 10",
        'timing: ["immediate", "final"]',
        "seed: 7",
    ):
        assert f"\n{line}\n" in text, line


def test_run_report_plots_are_pngs(tmp_path):
    run = make_run(tmp_path, "run")
    text = write_run_report(run).read_text()
    for name in (PLOT_METRICS, PLOT_QUALITY, PLOT_NORMS, PLOT_STEPS):
        assert_png(run / name)
        assert f"]({name})" in text  # relative link, so the report renders wherever the dir is copied


def test_summary_only_run_gets_notes_instead_of_plots(tmp_path):
    run = make_run(tmp_path, "bare", full=False, consistency_reason=None, edits=None, fluency=None)
    text = write_run_report(run).read_text()
    assert not list(run.glob("*.png"))
    assert "No curve.jsonl in this run" in text and "No steps.jsonl in this run" in text
    assert "No config.yaml in this run" in text
    assert "\nmethod: MEMIT\n" in text and "\ntiming: final\n" in text  # settings fall back on summary.json
    rows = table_rows(text)
    assert rows["metric"] == ["before edits", "after edits"]
    assert rows["fluency"] == ["6.200", "—"]
    assert "consistency:" not in text


def test_stale_plots_are_removed_when_their_data_goes(tmp_path):
    run = make_run(tmp_path, "run")
    write_run_report(run)
    (run / "steps.jsonl").unlink()
    write_jsonl(run / "curve.jsonl", [{"step": 0, "edits": 0, "timing": "pre", "efficacy_success": 0.1}])
    text = write_run_report(run).read_text()
    assert (run / PLOT_METRICS).exists()
    assert not (run / PLOT_QUALITY).exists() and not (run / PLOT_STEPS).exists()
    assert "curve.jsonl holds no fluency or perplexity values" in text


def test_malformed_values_fail_loudly(tmp_path):
    run = make_run(tmp_path, "bad", full=False, efficacy_success="high")
    with pytest.raises(RunDataError, match="efficacy_success"):
        write_run_report(run)
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    (run / "curve.jsonl").write_text('{"edits": 0, "efficacy_success": 0.1}\n{"edits": 10,\n')
    with pytest.raises(RunDataError, match="curve.jsonl:2"):
        write_run_report(run)
    assert report_main([str(run)]) == 1


def test_comparison_has_one_column_per_run(tmp_path):
    runs = [
        make_run(tmp_path, "a", method="MEMIT"),
        make_run(tmp_path, "b", method="AlphaEdit", efficacy_success=0.5),
        make_run(tmp_path, "c", full=False, method="ROME", edits=30),
    ]
    write_jsonl(runs[1] / "curve.jsonl", curve_rows(scale=0.2))
    path = write_comparison(runs, tmp_path / "cmp")
    assert path == tmp_path / "cmp" / "report.md"
    text = path.read_text()
    after, before = text.split("## Metrics before editing")
    rows = table_rows(after)
    assert rows["metric"] == ["a (MEMIT)", "b (AlphaEdit)", "c (ROME)"]
    assert rows["efficacy success"] == ["0.980", "0.500", "0.980"]
    assert rows["edits"] == ["100", "100", "30"]
    assert all(len(cells) == 3 for cells in rows.values())
    assert table_rows(before)["efficacy success"] == ["0.100", "0.100", "0.100"]
    assert "No curve.jsonl data for: c (ROME)" in text
    assert_png(tmp_path / "cmp" / PLOT_COMPARE)
    assert_png(tmp_path / "cmp" / PLOT_COMPARE_NORMS)
    assert f"]({PLOT_COMPARE})" in text and f"]({PLOT_COMPARE_NORMS})" in text


def test_cli_single_run_and_comparison(tmp_path, capsys, monkeypatch):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", full=False)
    assert report_main([str(a)]) == 0
    assert capsys.readouterr().out.strip() == str(a / "report.md")
    monkeypatch.chdir(tmp_path)
    assert report_main([str(a), str(b)]) == 0
    assert capsys.readouterr().out.strip() == str(Path("report_compare") / "report.md")
    assert (tmp_path / "report_compare" / "report.md").is_file()
    assert report_main([str(a), str(b), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "report.md").is_file()


def test_cli_rejects_missing_dir_and_dir_without_summary(tmp_path, capsys):
    good, empty = make_run(tmp_path, "good", full=False), tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "nope"
    assert report_main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert report_main([str(good), str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "summary.json" in err
    assert not (tmp_path / "report_compare").exists()
    assert report_main([str(good), "--out", str(tmp_path / "x")]) == 2  # --out only for comparisons
    assert report_main([]) == 2  # argparse usage error becomes a code, not SystemExit


def test_reports_show_how_far_each_edited_matrix_moved_by_the_end(tmp_path):
    text = write_run_report(make_run(tmp_path, "one")).read_text()
    section = text.split("## Edited matrices at the end")[1].split("\n## ")[0]
    rows = table_rows(section)
    assert rows["layer 4 rel l1"] == ["0.100"] and rows["layer 4 rel fro"] == ["0.200"]  # the last step's values
    rome = make_run(tmp_path, "rome", method="ROME")
    last = [{"step": 0, "weight_norm/l8/rel_l1_growth": 3.17}, {"step": 1, "z_loss": 0.1}]  # last row has no norms
    write_jsonl(rome / "steps.jsonl", last)
    cmp = write_comparison([tmp_path / "one", rome], tmp_path / "cmp").read_text()
    rows = table_rows(cmp.split("## Edited matrices at the end")[1].split("\n## ")[0])
    assert rows["layer 4 rel l1"] == ["0.100", "—"]
    assert rows["layer 8 rel l1 growth"] == ["—", "3.170"]
    assert "Edited matrices" not in write_run_report(make_run(tmp_path, "bare", full=False)).read_text()


def test_token_accuracy_and_held_out_specificity_rows_appear_only_when_a_run_has_them(tmp_path):
    plain = make_run(tmp_path, "plain")
    na = make_run(tmp_path, "na", efficacy_token_accuracy=0.75, specificity_heldout_accuracy=0.25)
    rows = table_rows(write_comparison([plain, na], tmp_path / "cmp").read_text().split("## Metrics before")[0])
    assert rows["efficacy token accuracy"] == ["—", "0.750"]
    assert rows["specificity heldout accuracy"] == ["—", "0.250"]
    keys = list(rows)
    assert keys.index("efficacy accuracy") + 1 == keys.index("efficacy token accuracy")
    alone = table_rows(write_run_report(make_run(tmp_path, "bare")).read_text())
    assert "efficacy token accuracy" not in alone and "specificity heldout accuracy" not in alone


def test_magnitude_rows_sit_beside_success_and_the_generation_setting_is_shown(tmp_path):
    setting = "every generation prompt per case, 100 tokens including the prompt, top-k 5, seed 0"
    run = make_run(
        tmp_path,
        "mag",
        efficacy_magnitude=0.62,
        pre_efficacy_magnitude=-0.31,
        specificity_magnitude=0.05,
        generation_setting=setting,
    )
    text = write_run_report(run).read_text()
    rows = table_rows(text)
    keys = list(rows)
    assert rows["efficacy magnitude"] == ["-0.310", "0.620"]
    assert keys.index("efficacy success") + 1 == keys.index("efficacy magnitude")
    assert keys.index("specificity success") + 1 == keys.index("specificity magnitude")
    assert "generalization magnitude" not in rows  # absent from this run: no row
    assert f"\ngeneration: {setting}\n" in text
    # A probability difference may be negative: its own panel, not a [0, 1] rate axis.
    assert rate_family("efficacy_magnitude") == rate_family("specificity_heldout_magnitude") == "magnitude"
    assert rate_family("efficacy_success") == "efficacy"


# ---------------------------------------------------------------------------------------------------------------------
# Layer x step heatmaps of the edited matrices


def expected_grid(rows: list[dict[str, Any]], key: str, layers: list[int]) -> np.ndarray:
    """The grid written out from the rows, nan where a row lacks a layer's key."""
    return np.array([[row.get(key.format(layer=layer), np.nan) for row in rows] for layer in layers], dtype=float)


def heatmap_axes(figure) -> list:
    return [ax for ax in figure.axes if ax.images]


def test_layer_grid_equals_the_per_layer_values_of_steps_jsonl():
    rows = step_rows()
    del rows[3]["delta_norm/l5"]  # a step that did not log layer 5: nan, not a shifted column
    rows[4]["delta_norm/l4"] = None  # a null value: also nan
    rows.insert(5, {"step": 99, "edits": 55, "seconds": 1.0})  # a row without norms adds no column
    grid = layer_grid(rows, NORM_QUANTITIES[0].pattern)
    assert grid.layers == [4, 5]
    assert grid.edits == [float(10 * (step + 1)) for step in range(10)]
    kept = [row for row in rows if "delta_norm/l4" in row]
    expected = expected_grid(kept, "delta_norm/l{layer}", [4, 5])
    expected[0, 4] = np.nan
    np.testing.assert_array_equal(grid.values, expected)
    assert np.isnan(grid.values[1, 3]) and np.isnan(grid.values[0, 4]) and np.isfinite(grid.values).sum() == 18

    growth = layer_grid(rows, NORM_QUANTITIES[1].pattern)
    np.testing.assert_array_equal(growth.values, expected_grid(kept, "weight_norm/l{layer}/rel_fro_growth", [4, 5]))
    # A later row at the same edit count replaces the earlier one (the latest record of that state).
    again = [*rows, {"step": 10, "edits": 100, "delta_norm/l4": -1.0}]
    assert layer_grid(again, NORM_QUANTITIES[0].pattern).values[0, -1] == -1.0
    assert layer_grid([{"step": 0, "edits": 1, "z_loss": 0.1}], NORM_QUANTITIES[0].pattern) is None
    with pytest.raises(RunDataError, match="delta_norm/l4"):
        layer_grid([{"edits": 1, "delta_norm/l4": "big"}], NORM_QUANTITIES[0].pattern)


def test_tick_positions_label_the_last_column_at_an_even_stride():
    assert tick_positions(0) == []
    assert tick_positions(3) == [0, 1, 2]
    assert tick_positions(10, most=8) == [1, 3, 5, 7, 9]
    assert tick_positions(100) == list(range(9, 100, 10))
    for count in range(1, 60):
        ticks = tick_positions(count, most=7)
        assert ticks[-1] == count - 1 and len(ticks) <= 7 and len(set(np.diff(ticks))) <= 1, count


def test_norm_heatmap_of_one_run_shows_each_quantity_with_its_colour_bar():
    rows = step_rows()
    figure = plot_norm_heatmaps([("run", rows)])
    axes = heatmap_axes(figure)
    assert len(axes) == len(NORM_QUANTITIES)
    assert [sub._suptitle.get_text() for sub in figure.subfigs] == [q.title for q in NORM_QUANTITIES]
    keys = ["delta_norm/l{layer}", "weight_norm/l{layer}/rel_fro_growth", "weight_norm/l{layer}/rel_fro_delta"]
    for ax, quantity, key in zip(axes, NORM_QUANTITIES, keys, strict=True):
        image = ax.images[0]
        expected = expected_grid(rows, key, [4, 5])
        assert image.get_array().shape == (2, 10)  # layers x steps
        np.testing.assert_array_equal(image.get_array().filled(np.nan), expected)
        assert image.get_clim() == (expected.min(), expected.max())
        assert image.colorbar.ax.get_ylabel() == quantity.unit
        assert [t.get_text() for t in ax.get_yticklabels()] == ["4", "5"]
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(10 * (s + 1)) for s in range(10)]
        assert ax.get_xlabel() == "edits" and ax.get_ylabel() == "layer"
    assert plot_norm_heatmaps([("run", [{"step": 0, "edits": 1, "z_loss": 0.1}])]) is None
    assert plot_norm_heatmaps([("run", None)]) is None


def test_norm_heatmaps_of_several_runs_share_one_colour_scale_per_quantity():
    small, large = step_rows(), step_rows(scale=3.0)
    partial = [{key: value for key, value in row.items() if not key.startswith("weight_norm/")} for row in step_rows()]
    runs = [("a (MEMIT)", small), ("none (ROME)", None), ("b (ECE)", large), ("c (FT)", partial)]
    figure = plot_norm_heatmaps(runs)
    # One row per run that logged norms (the run without steps.jsonl has none), one column per quantity.
    for sub in figure.subfigs:
        assert [ax.get_title() for ax in sub.axes if not ax.get_label() == "<colorbar>"] == [
            "a (MEMIT)",
            "b (ECE)",
            "c (FT)",
        ]
    columns = [[ax for ax in sub.axes if ax.images] for sub in figure.subfigs]
    assert [len(column) for column in columns] == [3, 2, 2]  # c logged ‖ΔW‖ only: "not logged" elsewhere
    keys = ["delta_norm/l{layer}", "weight_norm/l{layer}/rel_fro_growth", "weight_norm/l{layer}/rel_fro_delta"]
    for column, key in zip(columns, keys, strict=True):
        values = np.concatenate([expected_grid(rows, key, [4, 5]).ravel() for rows in (small, large)])
        for ax in column:
            assert ax.images[0].get_clim() == (values.min(), values.max())
    np.testing.assert_array_equal(
        columns[0][1].images[0].get_array().filled(np.nan), expected_grid(large, "delta_norm/l{layer}", [4, 5])
    )
    assert "not logged" in [text.get_text() for ax in figure.subfigs[1].axes for text in ax.texts]


def test_steps_plot_leaves_the_matrix_norms_to_the_heatmaps():
    figure = plot_steps(step_rows())
    labels = {line.get_label() for ax in figure.axes for line in ax.get_lines()}
    assert {"z_loss", "seconds", "z_steps"} <= labels
    assert not any(label.startswith(("weight_norm/", "delta_norm/")) for label in labels)


# ---------------------------------------------------------------------------------------------------------------------
# Comparison curves


def test_comparison_rows_are_the_stream_points_or_the_summary_values():
    curve = curve_rows()
    rows = comparison_rows(curve, SUMMARY)
    assert [(row["edits"], row["timing"]) for row in rows] == [(0, "pre")] + [
        (20 * step, "final" if step == 5 else "periodic") for step in range(1, 6)
    ]
    alone = comparison_rows(None, SUMMARY)
    assert [(row["edits"], row["timing"]) for row in alone] == [(0, "pre"), (SUMMARY["edits"], "final")]
    assert alone[0]["efficacy_success"] == SUMMARY["pre_efficacy_success"]
    assert alone[1]["efficacy_success"] == SUMMARY["efficacy_success"]
    no_pre = {key: value for key, value in SUMMARY.items() if not key.startswith("pre_")}
    assert [row["timing"] for row in comparison_rows([], no_pre)] == ["final"]
    assert comparison_rows(None, {**no_pre, "timing": "immediate"}) == []  # immediate values are not joined


def test_comparison_keys_fall_back_to_token_accuracy_and_prefer_the_probe_subset():
    counterfact = comparison_rows(curve_rows(), SUMMARY)
    assert comparison_keys([counterfact]) == [
        "efficacy_success",
        "generalization_success",
        "specificity_success",
        "fluency",
        "me_ppl50_perplexity",
    ]
    zsre = [
        {
            "edits": 10,
            "timing": "final",
            "efficacy_token_accuracy": 0.9,
            "generalization_token_accuracy": 0.7,
            "specificity_token_accuracy": 0.3,
            "probe/sst2/accuracy": 0.8,
            "probe/sst2/subset_accuracy": 0.75,
            "probe/sst2/f1": 0.7,
            "probe/cola/accuracy": 0.6,
        }
    ]
    assert comparison_keys([zsre]) == [
        "efficacy_token_accuracy",
        "generalization_token_accuracy",
        "specificity_token_accuracy",
        "probe/cola/accuracy",
        "probe/sst2/subset_accuracy",
    ]
    # A panel shows the first key some run has: a zsRE run beside a CounterFact one has no success rate.
    assert comparison_keys([zsre, counterfact])[:3] == [
        "efficacy_success",
        "generalization_success",
        "specificity_success",
    ]


def test_comparison_figure_has_one_line_per_run_and_markers_for_a_single_point():
    stream = comparison_rows(curve_rows(), SUMMARY)
    final_only = [row for row in comparison_rows(curve_rows(scale=0.2), SUMMARY) if row["timing"] == "final"]
    runs = [("a (MEMIT)", stream), ("b (ECE)", final_only), ("c (ROME)", [])]
    figure = plot_comparison(runs)
    keys = comparison_keys([rows for _, rows in runs])
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [
        "efficacy success",
        "generalization success",
        "specificity success",
        "fluency",
        "ME-PPL-50 perplexity",
    ]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["a (MEMIT)", "b (ECE)"]
    for ax, key in zip(axes, keys, strict=True):
        assert ax.get_legend() is None  # one legend for the figure
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"a (MEMIT)", "b (ECE)"}
        xs = [row["edits"] for row in stream if row.get(key) is not None]
        assert list(lines["a (MEMIT)"].get_xdata()) == xs
        assert list(lines["a (MEMIT)"].get_ydata()) == [row[key] for row in stream if row.get(key) is not None]
        assert lines["a (MEMIT)"].get_linestyle() == "-"
        assert lines["b (ECE)"].get_linestyle() == "None" and lines["b (ECE)"].get_marker() == "o"
        assert list(lines["b (ECE)"].get_ydata()) == [final_only[0][key]]
        assert (ax.get_ylim() == (-0.02, 1.02)) == key.endswith("_success")  # rates on [0, 1], the rest free
        assert xs[0] == (0 if key in curve_rows()[0] else 20)  # the pre point at 0 edits where the run has one
    assert plot_comparison([("a", []), ("b", [])]) is None


# ---------------------------------------------------------------------------------------------------------------------
# Plots to W&B


class ImageLogger:
    """Stands in for WandbLogger: records log_image calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def log_image(self, key: str, images: list[Any], step: int | None = None) -> None:
        self.calls.append({"key": key, "images": images, "step": step})


class MetricsOnlyLogger:  # as the CSV logger: no log_image
    def log_metrics(self, metrics, step=None) -> None:
        raise AssertionError("log_report_images must not log metrics")


def test_report_plots_go_to_loggers_that_take_images(tmp_path):
    run = make_run(tmp_path, "run")
    write_run_report(run)
    image_logger = ImageLogger()
    keys = log_report_images([MetricsOnlyLogger(), image_logger], run, step=10)
    assert keys == list(REPORT_IMAGES)
    assert [call["key"] for call in image_logger.calls] == list(REPORT_IMAGES)
    for call in image_logger.calls:
        assert call["images"] == [str(run / REPORT_IMAGES[call["key"]])] and call["step"] == 10
    assert log_report_images([MetricsOnlyLogger()], run, step=10) == []
    # Only the plots the report wrote: a run without steps.jsonl has no norms or steps plot to log.
    (run / "steps.jsonl").unlink()
    write_run_report(run)
    image_logger = ImageLogger()
    assert log_report_images([image_logger], run) == ["report/metrics", "report/quality"]


def test_a_study_results_json_compares_like_its_run_directory(tmp_path, capsys):
    run = make_run(tmp_path, "alpha", method="AlphaEdit")
    record = {  # what editlab study keeps of the run
        "name": "alpha",
        "command": "editlab fit ...",
        "summary": {**SUMMARY, "method": "AlphaEdit"},
        "curve": curve_rows(),
        "steps": step_rows(),
    }
    (tmp_path / "alpha.json").write_text(json.dumps(record))
    other = make_run(tmp_path, "other", method="MEMIT")
    from_dir = write_comparison([run, other], tmp_path / "from_dir").read_text()
    from_json = write_comparison([tmp_path / "alpha.json", other], tmp_path / "from_json").read_text()
    strip = lambda text: "\n".join(line for line in text.splitlines() if not line.startswith("- alpha"))  # noqa: E731
    assert strip(from_json) == strip(from_dir)  # same tables and figure captions; only the run's path differs
    assert (tmp_path / "from_json" / PLOT_COMPARE).read_bytes() == (tmp_path / "from_dir" / PLOT_COMPARE).read_bytes()
    assert_png(tmp_path / "from_json" / PLOT_COMPARE_NORMS)
    assert report_main([str(tmp_path / "alpha.json")]) == 2  # one run reports from its directory
    assert "compared with other runs" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"summary": {}, "curve": {"edits": 3}}))
    assert report_main([str(tmp_path / "bad.json"), str(other), "--out", str(tmp_path / "x")]) == 1
    assert "bad.json: curve must be a list of JSON objects" in capsys.readouterr().err


def test_runs_without_a_pre_edit_point_start_at_the_shared_one(tmp_path):
    """A study evaluates the unedited model once per slice: with ``shared_pre`` the runs that skip
    the pre-edit evaluation start their curves at that run's point; a run with its own keeps it."""
    pre = {"edits": 0, "timing": "pre", "efficacy_success": 0.1}
    mine = {"edits": 0, "timing": "pre", "efficacy_success": 0.2}
    later = {"edits": 20, "timing": "final", "efficacy_success": 0.9}
    points, given = with_shared_pre([[later], [mine, later]], pre)
    assert points == [[pre, later], [mine, later]] and given == [0]
    assert series(points[0], "efficacy_success", "x")[0] == [0, 20]

    def record(name: str, curve: list[dict]) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"name": name, "summary": {**SUMMARY, "method": "MEMIT"}, "curve": curve}))
        return path

    carrier, skipper = record("carrier", curve_rows()), record("skipper", curve_rows()[1:])
    text = write_comparison([carrier, skipper], tmp_path / "cmp", shared_pre=carrier).read_text()
    assert (
        "skipper (MEMIT): no pre-edit evaluation of their own" in text and "start at carrier's pre-edit point" in text
    )
    plain = write_comparison([carrier, skipper], tmp_path / "plain").read_text()
    assert "no pre-edit evaluation" not in plain
    assert (tmp_path / "cmp" / PLOT_COMPARE).read_bytes() != (tmp_path / "plain" / PLOT_COMPARE).read_bytes()
    with pytest.raises(RunDataError, match="skipper.json: no pre-edit point to share"):
        write_comparison([carrier, skipper], tmp_path / "bad", shared_pre=skipper)
