"""studies/table.py: a study's results JSONs as one markdown table."""

from __future__ import annotations

import json
import runpy

from helpers import REPO


def write(path, name, summary, norms=None, per_edit=None, curve=None):
    record = {"command": f"editlab fit {name}", "commit": "c" * 40, "seconds_this_sitting": 1.0, "summary": summary}
    if curve is not None:
        record["curve"] = curve
    if norms is not None:
        record["weight_norms_end"] = norms
    if per_edit is not None:
        record["seconds_per_edit"] = per_edit
    (path / f"{name}.json").write_text(json.dumps(record))


def table(argv, capsys) -> list[str]:
    table_main = runpy.run_path(str(REPO / "studies" / "table.py"))["main"]
    table_main(argv)
    return capsys.readouterr().out.splitlines()


def test_rows_are_the_metrics_present_and_the_growth_of_each_edited_layer(tmp_path, capsys):
    write(tmp_path, "rome", {"method": "ROME", "efficacy_token_accuracy": 0.5, "pre_efficacy_token_accuracy": 0.25},
          {"weight_norm/l8/rel_l1_growth": 0.851, "weight_norm/l8/fro": 3.0})  # fmt: skip
    write(tmp_path, "memit", {"method": "MEMIT", "efficacy_token_accuracy": 0.75},
          {"weight_norm/l7/rel_l1_growth": 0.01, "weight_norm/l8/rel_l1_growth": 0.054},
          {"seconds_z": 4.5, "seconds_evaluation": 1.25})  # fmt: skip
    lines = table([str(tmp_path), "rome", "memit"], capsys)
    assert lines[0] == "| | before | rome | memit |"
    assert "| efficacy token accuracy | 0.250 | 0.500 | 0.750 |" in lines
    assert not any("efficacy success" in line for line in lines)  # no run has it
    assert "| L1 growth of layer 8's edited matrix | 0 | +85.1% | +5.4% |" in lines
    assert "| L1 growth of layer 7's edited matrix | 0 | — | +1.0% |" in lines
    assert "| seconds per edit: z | — | — | 4.500 |" in lines
    assert "| seconds per edit: evaluation | — | — | 1.250 |" in lines
    assert not any("per edit: keys" in line or "per edit: solve" in line for line in lines)  # no run has them
    only8 = table([str(tmp_path), "rome", "memit", "--growth-layers", "8"], capsys)
    assert not any("layer 7" in line for line in only8)


def test_curve_tables_put_each_runs_points_in_edit_columns_and_share_the_pre_edit_point(tmp_path, capsys):
    pre = {"step": 0, "edits": 0, "timing": "pre", "specificity_success": 0.7}
    write(tmp_path, "seq", {"method": "MEMIT_seq"}, curve=[
        pre,
        {"step": 5, "edits": 500, "timing": "immediate", "specificity_success": 0.1},  # a step's own cases: left out
        {"step": 5, "edits": 500, "timing": "periodic", "specificity_success": 0.64},
        {"step": 10, "edits": 1000, "timing": "final", "specificity_success": 0.6},
    ])  # fmt: skip
    ece = [{"step": 5, "edits": 500, "timing": "periodic", "specificity_success": 0.68}]
    write(tmp_path, "ece", {"method": "ECE"}, curve=ece)
    lines = table([str(tmp_path), "seq", "ece", "--curve", "specificity_success"], capsys)
    start = lines.index("| specificity_success | 0 edits | 500 edits | 1,000 edits |")
    assert lines[start + 2 : start + 4] == ["| seq | 0.700 | 0.640 | 0.600 |", "| ece | 0.700 | 0.680 | — |"]


def test_sweep_table_and_figure_order_each_series_by_its_sample_count(tmp_path, capsys):
    write(tmp_path, "memit_seq_c1000", {"efficacy_success": 0.9, "seconds_setup": 120.0},
          {"weight_norm/l7/rel_l1_growth": 0.5, "weight_norm/l8/rel_l1_growth": 0.0813})  # fmt: skip
    write(tmp_path, "memit_seq_c100", {"efficacy_success": 0.5, "me_ppl50_perplexity": 130.25})
    write(tmp_path, "alphaedit_c300", {"specificity_success": 0.7})
    write(tmp_path, "memit_seq_300", {"efficacy_success": 0.1})  # not a sweep point: left out
    sweep = runpy.run_path(str(REPO / "studies" / "sweep.py"))["main"]
    sweep([str(tmp_path), "--out", str(tmp_path / "fig.png")])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines[2:] if line.startswith("| ")]
    order = [row.split(" | ")[:2] for row in rows]
    assert order == [["| alphaedit", "300"], ["| memit_seq", "100"], ["| memit_seq", "1000"]]
    assert rows[1] == "| memit_seq | 100 | 0.500 | — | — | 130.2 | — | — |"
    assert rows[2].endswith("| 0.900 | — | — | — | +8.1 | 120 |")  # layer 8's growth, the last layer
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_median_step_row_is_not_moved_by_one_step_that_waited(tmp_path, capsys):
    write(tmp_path, "seq", {"method": "MEMIT_seq"})
    record = json.loads((tmp_path / "seq.json").read_text())
    record["steps"] = [{"step": i, "seconds": s} for i, s in enumerate([500.0, 6809.0, 520.0, 510.0], start=1)]
    (tmp_path / "seq.json").write_text(json.dumps(record))
    write(tmp_path, "old", {"method": "MEMIT"})  # a results JSON without steps
    lines = table([str(tmp_path), "seq", "old"], capsys)
    assert "| median seconds of a step | 515.0 | — |" in lines


def test_probe_rows_give_every_task_and_score_on_all_examples_with_the_pre_edit_value(tmp_path, capsys):
    write(tmp_path, "seq", {"method": "MEMIT_seq", "pre_probe/sst2/accuracy": 0.687, "probe/sst2/accuracy": 0.556,
                            "probe/sst2/subset_accuracy": 0.59, "probe/cola/mcc": 0.013})  # fmt: skip
    write(tmp_path, "ece", {"method": "ECE", "probe/sst2/accuracy": 0.6})
    lines = table([str(tmp_path), "seq", "ece"], capsys)
    assert "| probe sst2 accuracy | 0.687 | 0.556 | 0.600 |" in lines
    assert "| probe cola mcc | — | 0.013 | — |" in lines
    assert not any("subset" in line for line in lines)  # the 100-example scores are the curve's


def test_paired_table_gives_each_runs_per_case_difference_from_the_base_with_an_interval(tmp_path, capsys):
    from editlab.paired import write_case_values

    flags = {  # per case: efficacy, paraphrase, neighbourhood success (accuracy rows equal them here)
        "seq": [(1, 1, 0), (1, 1, 0), (1, 0, 1), (1, 1, 1)],
        "ece": [(1, 1, 1), (1, 1, 1), (1, 0, 1), (1, 1, 1)],
    }
    for name, rows in flags.items():
        write(tmp_path, name, {"method": name})
        records = []
        for i, (eff, par, hood) in enumerate(rows):
            post = {"efficacy_success": eff, "generalization_success": par, "specificity_success": hood}
            post |= {k.replace("success", "accuracy"): v for k, v in post.items()}
            pre = {k: 0 if k.startswith("efficacy") else 1 for k in post}  # unedited: no edit, every neighbour kept
            records.append({"case_id": str(i), "pre": pre, "post": post, "detail": {}})
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        write_case_values(tmp_path / f"{name}.jsonl", tmp_path / f"{name}.cases.jsonl.gz")
    lines = table([str(tmp_path), "seq", "ece", "--paired", "seq"], capsys)
    hood = next(line for line in lines if line.startswith("| neighbourhood success | ece |"))
    cells = [c.strip() for c in hood.strip("|").split("|")]
    assert cells[2:5] == ["0.5000", "1.0000", "+0.500"]  # two of four cases gained: +0.5
    low, high = (float(x) for x in cells[5].strip("[]").split(","))
    assert 0.0 <= low <= 0.5 <= high <= 1.0 and cells[6] == "4"
    same = next(line for line in lines if line.startswith("| efficacy success | ece |"))
    assert "| +0.000 | [+0.000, +0.000] | 4 |" in same
    assert not any(line.startswith("| efficacy success | seq |") for line in lines)  # the base is no row
    cost = table([str(tmp_path), "seq", "ece", "--paired", "pre"], capsys)
    assert any(line.startswith("| neighbourhood success | seq | 1.0000 | 0.5000 | -0.500 ") for line in cost)
    assert any(
        line.startswith("| efficacy success | ece | 0.0000 | 1.0000 | +1.000 * | [+1.000, +1.000] |") for line in cost
    )


def test_paired_table_names_the_metrics_a_runs_case_file_lacks(tmp_path, capsys):
    from editlab.paired import write_records

    keys = ("efficacy_success", "efficacy_accuracy")
    for name, extra in (("seq", {"efficacy_token_accuracy": 0.5}), ("old", {})):  # old: before token accuracy
        write(tmp_path, name, {"method": name})
        post = dict.fromkeys(keys, 1.0) | extra
        write_records([{"case_id": str(i), "post": post} for i in range(3)], tmp_path / f"{name}.cases.jsonl.gz")
    lines = table([str(tmp_path), "seq", "old", "--paired", "seq"], capsys)
    assert any(line.startswith("| efficacy success | old |") for line in lines)
    assert not any(line.startswith("| efficacy token accuracy |") for line in lines)
    assert "Not paired (no per-case values in the run's case file): old: efficacy token accuracy." in lines


def test_paired_probe_table_gives_each_tasks_accuracy_difference_per_example(tmp_path, capsys):
    from editlab.paired import write_case_values, write_records

    def probe_file(name, correct_post, correct_pre):
        rows = []
        for task, post, pre in zip(("sst2", "cola"), correct_post, correct_pre, strict=True):
            for i, (b, a) in enumerate(zip(post, pre, strict=True)):
                blocks = {"pre": {"prediction": a, "correct": a}, "post": {"prediction": b, "correct": b}}
                rows.append({"case_id": f"{task}/{i}", "task": task, "label": 1, **blocks})
        write_records(rows, tmp_path / f"{name}.probes.jsonl.gz")

    for name in ("seq", "eac"):
        write(tmp_path, name, {"method": name})
    pre = ([1, 1, 1, 1], [1, 0, 1, 0])
    probe_file("seq", ([1, 0, 0, 0], [1, 0, 1, 0]), pre)  # sst2 0.25, cola 0.5
    probe_file("eac", ([1, 1, 1, 0], [1, 0, 1, 0]), pre)  # sst2 0.75, cola 0.5
    for name in ("seq", "eac"):  # the case files the case table reads: one case, every metric
        post = {k: 1.0 for k in ("efficacy_success", "generalization_success", "specificity_success",
                                 "efficacy_accuracy", "generalization_accuracy", "specificity_accuracy")}  # fmt: skip
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"case_id": "0", "pre": post, "post": post}) + "\n")
        write_case_values(tmp_path / f"{name}.jsonl", tmp_path / f"{name}.cases.jsonl.gz")
    lines = table([str(tmp_path), "seq", "eac", "--paired", "seq"], capsys)
    assert "| probe accuracy | run | seq | run | run − seq | 95% interval | examples |" in lines
    sst2 = next(line for line in lines if line.startswith("| sst2 | eac |"))
    assert sst2.startswith("| sst2 | eac | 0.2500 | 0.7500 | +0.500 ") and sst2.endswith("| 4 |")
    assert any(line.startswith("| cola | eac | 0.5000 | 0.5000 | +0.000 | [+0.000, +0.000] | 4 |") for line in lines)
    cost = table([str(tmp_path), "seq", "eac", "--paired", "pre"], capsys)
    assert any(line.startswith("| sst2 | seq | 1.0000 | 0.2500 | -0.750 *") for line in cost)
    (tmp_path / "eac.probes.jsonl.gz").unlink()  # a run without its probe file: no probe row for it
    lines = table([str(tmp_path), "seq", "eac", "--paired", "seq"], capsys)
    assert not any(line.startswith("| probe accuracy") for line in lines)


def test_paired_table_compares_fluency_on_the_cases_both_runs_generated_from(tmp_path, capsys):
    from editlab.paired import write_case_values

    keys = ("efficacy_success", "generalization_success", "specificity_success",
            "efficacy_accuracy", "generalization_accuracy", "specificity_accuracy")  # fmt: skip
    for name, fluency in (("seq", [6.0, 5.0]), ("ece", [6.5, 5.5])):
        write(tmp_path, name, {"method": name})
        records = []
        for i in range(3):  # fluency on the first two cases only, as the evaluation generates
            post = dict.fromkeys(keys, 1.0) | ({"fluency": fluency[i]} if i < 2 else {})
            records.append({"case_id": str(i), "pre": dict.fromkeys(keys, 0.0), "post": post})
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        write_case_values(tmp_path / f"{name}.jsonl", tmp_path / f"{name}.cases.jsonl.gz")
    lines = table([str(tmp_path), "seq", "ece", "--paired", "seq"], capsys)
    row = next(line for line in lines if line.startswith("| fluency (generation entropy) | ece |"))
    assert "| 5.5000 | 6.0000 | +0.500 * | [+0.500, +0.500] | 2 |" in row
    cost = table([str(tmp_path), "seq", "ece", "--paired", "pre"], capsys)
    assert not any(line.startswith("| fluency") for line in cost)  # no pre-edit fluency in these files


def test_verdicts_print_each_claim_of_the_claims_file(tmp_path, capsys):
    from editlab.paired import write_records

    for name, value in (("base", 0.0), ("new", 1.0)):
        write(tmp_path, name, {"specificity_success": value})
        write_records([{"case_id": str(i), "post": {"specificity_success": value}} for i in range(20)],
                      tmp_path / f"{name}.cases.jsonl.gz")  # fmt: skip
    part = {"kind": "cases", "metric": "specificity_success", "against": "base"}
    claims = {"claims": [{"name": "new keeps specificity", "run": "new", "parts": [part]},
                         {"name": "later", "run": "later", "parts": [part]}]}  # fmt: skip
    (tmp_path / "claims.yaml").write_text(json.dumps(claims))  # JSON is YAML
    lines = table([str(tmp_path), "--verdicts"], capsys)
    assert lines[0].startswith("- **new keeps specificity**: holds. neighbourhood success new vs base: 1.000 vs 0.000")
    assert lines[1] == "- **later**: waits for later."
