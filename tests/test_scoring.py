"""Teacher-forced scoring with shared, length-sorted rows equals the obvious per-prompt computation,
and the throughput benchmark checks and reports what it claims."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
import torch

from editlab.evaluation import case_pairs, editing_metrics, evaluate_cases
from editlab.models.arch import ModelView
from editlab.models.scoring import shared_rows
from editlab.models.tiny import tiny_model
from editlab.types import EditRequest

# In the tiny tokenizer " the", " is", " and" and " of" are single tokens: their rows are the bare
# prompt, shared by both answers and read inside any multi-token answer's row of the same prompt.
HOOD = ["The Louvre is in", "Rome is the capital of"]


def requests() -> list[EditRequest]:
    return [
        EditRequest("0", "{} is in", "The Eiffel Tower", "Rome", "Paris", ["Where is the Eiffel Tower? In"], HOOD),
        # Same neighbourhood prompts and true answer as case 0: shared rows across cases.
        EditRequest("1", "{} plays the", "She", "the", "Paris", ["Her instrument is"], HOOD),
        # Both answers single tokens: one bare-prompt row for both.
        EditRequest("2", "{} is", "Water", "is", "and", [], ["Ice melts when it"]),
        # zsRE-like: no competitor; a neighbourhood answer of its own.
        EditRequest("3", "{} is the capital of", "Berlin", "Germany", None, ["Berlin is a city in"], HOOD, "Italy"),
    ]


def slow_scores(model, tok, prompt: str, answer: str) -> dict:
    """One pair alone: the full forward of prompt + answer, full-vocabulary logits."""
    ctx = tok(prompt)["input_ids"]
    ans = tok(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + ans])).logits[0]  # [S, V]
    at = [len(ctx) - 1 + j for j in range(len(ans))]
    nll = [-float(logits[p].double().log_softmax(-1)[a]) for p, a in zip(at, ans, strict=True)]
    hits = [int(logits[p].argmax()) == a for p, a in zip(at, ans, strict=True)]
    return {"nll": sum(nll) / len(nll), "exact": all(hits), "token_acc": sum(hits) / len(hits)}


def test_shared_rows_on_hand_built_rows():
    rows = [[1, 2], [1, 2, 3], [1, 2], [4], [1, 2, 4], [4, 5], [1, 2, 3]]
    hosts, host_of = shared_rows(rows)
    # [1, 2] is inside [1, 2, 3] (the next row in lexicographic order), [4] inside [4, 5].
    assert hosts == [[1, 2, 3], [1, 2, 4], [4, 5]]  # longest first, ties by content
    assert [hosts[h] for h in host_of] == [[1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 5], [1, 2, 4], [4, 5], [1, 2, 3]]


def test_shared_rows_equals_a_brute_force_search():
    rng = random.Random(0)
    for _ in range(200):
        rows = [[rng.randrange(3) for _ in range(rng.randrange(1, 5))] for _ in range(rng.randrange(1, 12))]
        hosts, host_of = shared_rows(rows)
        maximal = {tuple(r) for r in rows if not any(len(s) > len(r) and s[: len(r)] == r for s in rows)}
        assert sorted(map(tuple, hosts)) == sorted(maximal)  # each maximal row once, nothing else
        assert [len(h) for h in hosts] == sorted((len(h) for h in hosts), reverse=True)
        for row, h in zip(rows, host_of, strict=True):
            assert hosts[h][: len(row)] == row


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: absolute positions, padding must not shift them
def test_evaluate_cases_equals_the_slow_per_prompt_computation(arch, tiny_llama):
    model, tok = tiny_llama if arch == "llama" else tiny_model(arch)
    reqs = requests()
    cases = evaluate_cases(ModelView.of(model), tok, reqs, batch_size=3)  # several batches
    prompts, answers, where = case_pairs(reqs)
    assert len(where) == 2 * 11 + 4  # CounterFact cases: both answers; case 3: the expected one only
    for (i, family, p, role), prompt, answer in zip(where, prompts, answers, strict=True):
        got, want = cases[i][family][p][role], slow_scores(model, tok, prompt, answer)
        # Flags exactly; the NLL to float32 rounding (the slow one takes its log-softmax in float64).
        assert (got["exact"], got["token_acc"]) == (want["exact"], want["token_acc"]), (i, family, p, role)
        assert got["nll"] == pytest.approx(want["nll"], abs=1e-5), (i, family, p, role)
    assert "competitor" not in cases[3]["rewrite"][0]


def test_evaluate_cases_runs_each_shared_row_once(tiny_llama):
    """The forward sees fewer rows than there are pairs: the bare prompts of single-token answers
    and the neighbourhood prompts repeated across cases are run once, inside a longer row."""
    model, tok = tiny_llama
    seen = []
    hook = model.base_model.register_forward_hook(
        lambda _m, args, kwargs, _out: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        evaluate_cases(ModelView.of(model), tok, requests(), batch_size=4)
    finally:
        hook.remove()
    prompts, answers, _ = case_pairs(requests())
    distinct = {(p, a) for p, a in zip(prompts, answers, strict=True)}
    assert sum(s[0] for s in seen) < len(distinct) < len(prompts)
    widths = [s[1] for s in seen]
    assert widths == sorted(widths, reverse=True)  # batched by length, longest first


def test_editing_metrics_do_not_depend_on_the_batch_size(tiny_llama):
    model, tok = tiny_llama
    view = ModelView.of(model)
    one, many = (
        evaluate_cases(view, tok, requests(), batch_size=1),
        evaluate_cases(view, tok, requests(), batch_size=64),
    )
    a, b = editing_metrics(one), editing_metrics(many)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-5), key


# ----------------------------------------------------------------------------- the benchmark


def test_eval_throughput_benchmark_on_a_tiny_model(tmp_path: Path):
    from benchmarks import eval_throughput

    out = tmp_path / "eval_throughput.json"
    result = eval_throughput.main(
        ["--tiny", "--n", "4", "--generation-cases", "1", "--repeats", "2", "--project-to", "10", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    scoring = result["scoring"]
    assert len(scoring["reference_seconds"]) == len(scoring["editlab_seconds"]) == 2
    assert (
        scoring["records"]["entries"] == scoring["records"]["flags_compared"] == 4 * 26
    )  # CounterFact: 13 prompts x 2
    assert scoring["records"]["max_abs_nll_difference"] <= 1e-4
    positions = scoring["forward_positions"]["n4"]
    # The tiny tokenizer splits every answer: no row is shared here, but sorting still cuts padding.
    assert positions["editlab"] < positions["reference"] and positions["editlab_rows"] <= positions["pairs"]
    assert result["generation"]["texts"] == 10  # every generation prompt of the first case
    waste = result["generation"]["generation_waste"]
    assert waste["row_positions_run"] >= waste["row_positions_needed"] > 0
    me = result["me_ppl"]
    assert me["tokens_predicted"] > 0 and me["perplexity"]["editlab"] == pytest.approx(
        me["perplexity"]["float64"], rel=1e-4
    )
    # The projections: the fixed parts (generation, ME-PPL) plus the median scoring seconds scaled
    # by cases (linear) or by the forward positions each path runs at 10 cases.
    total, fixed = result["total"], result["generation"]["seconds"] + statistics.median(me["editlab_seconds"])
    scored = statistics.median(scoring["editlab_seconds"])
    assert total["n4"]["editlab_seconds"] == pytest.approx(fixed + scored)
    assert total["projected_n10_linear"]["editlab_seconds"] == pytest.approx(fixed + scored * 10 / 4)
    ratio = scoring["forward_positions"]["n10"]["editlab"] / positions["editlab"]
    assert total["projected_n10_by_positions"]["editlab_seconds"] == pytest.approx(fixed + scored * ratio)
    for key in ("n4", "projected_n10_linear", "projected_n10_by_positions"):
        entry = total[key]
        assert entry["speedup"] == pytest.approx(entry["reference_seconds"] / entry["editlab_seconds"])
    # The generated scores: timed against editlab's teacher-forced scoring, added to its totals.
    generated = result["generated"]
    assert len(generated["generated_seconds"]) == len(generated["teacher_forced_seconds"]) == 2
    assert generated["generated_over_teacher_forced_median"] == pytest.approx(
        statistics.median(generated["generated_seconds"]) / statistics.median(generated["teacher_forced_seconds"])
    )
    assert set(generated["metrics"]) >= {"efficacy_generated_exact", "generalization_generated_prefix"}
    assert generated["prompts"] == 4 * 3  # CounterFact: a rewrite and two paraphrase prompts per case
    extra = generated["generated_seconds_per_case"] * 10
    assert total["projected_n10_linear"]["editlab_with_generated_seconds"] == pytest.approx(
        total["projected_n10_linear"]["editlab_seconds"] + extra
    )


def test_eval_throughput_benchmark_runs_the_parts_asked_for(tmp_path: Path):
    from benchmarks import eval_throughput

    out = tmp_path / "generated.json"
    result = eval_throughput.main(["--tiny", "--n", "2", "--parts", "generated", "--repeats", "1", "--out", str(out)])
    assert {"scoring", "me_ppl", "generation", "total"}.isdisjoint(result) and "generated" in result
    with pytest.raises(SystemExit):
        eval_throughput.parse_args(["--parts", "scoring,fluency", "--out", str(out)])


def test_the_benchmark_reports_records_that_disagree():
    from benchmarks import eval_throughput

    entry = {
        "expected": {"nll": 1.0, "exact": True, "token_acc": 1.0},
        "competitor": {"nll": 2.0, "exact": False, "token_acc": 0.5},
    }
    case = {"case_id": "0", "rewrite": [entry], "paraphrase": [], "neighborhood": []}
    same = eval_throughput.compare_records([case], [case], 1e-4)
    assert same["max_abs_nll_difference"] == 0.0 and same["problems"] == []
    flipped = json.loads(json.dumps(case))
    flipped["rewrite"][0]["expected"]["exact"] = False
    assert eval_throughput.compare_records([case], [flipped], 1e-4)["problems"] == [
        "0 rewrite expected: accuracy flags differ"
    ]
    moved = json.loads(json.dumps(case))
    moved["rewrite"][0]["expected"]["nll"] = 2.5  # beyond the tolerance, and the success flag flips
    problems = eval_throughput.compare_records([case], [moved], 1e-4)["problems"]
    assert len(problems) == 2 and "nll 1.0 / 2.5" in problems[0] and "success flag differs" in problems[1]
    metrics = eval_throughput.compare_metrics(
        {"efficacy_success": 0.5, "efficacy_magnitude": 0.1},
        {"efficacy_success": 0.5, "efficacy_magnitude": 0.1 + 1e-6},
        1e-4,
    )
    assert metrics["problems"] == [] and metrics["exactly_equal"] == ["efficacy_success"]
    assert eval_throughput.compare_metrics({"efficacy_success": 0.5}, {"efficacy_success": 0.5 + 1e-9}, 1e-4)[
        "problems"
    ]
    # main writes its JSON first, then exits non-zero naming every problem found at any depth.
    result = {"scoring": {"records": {"problems": ["a"]}, "metrics": {"problems": []}}, "me_ppl": {"problems": ["b"]}}
    assert sorted(p for entry in eval_throughput.problems_of(result) for p in entry) == ["a", "b"]
