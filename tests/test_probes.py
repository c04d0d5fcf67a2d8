"""Tests for editlab.probes: zero-shot label-word scoring, built-in task loaders, configuration."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from editlab.models.tiny import tiny_model
from editlab.probes import (
    SPECS,
    TASKS,
    ProbeConfig,
    ProbeTask,
    load_task,
    probe_accuracy,
    probe_details,
    run_probes,
)

SAMPLES = Path(__file__).resolve().parents[1] / "editlab" / "data" / "probes"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def gpt2_bos():
    # gpt2 has dropout (tests eval-mode handling) and a BOS-adding tokenizer (prompt-only specials).
    return tiny_model("gpt2", add_bos=True)


def slow_predictions(model, tok, task: ProbeTask) -> tuple[list[int], torch.Tensor]:
    """The obvious loop: one forward per (example, word), full logits, mean log-prob of the word tokens."""
    preds, table = [], []
    for example in task.examples:
        prompt_ids = tok(task.template.format(**example))["input_ids"]
        scores = []
        for word in task.label_words:
            word_ids = tok(" " + word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + word_ids])).logits[0]  # [S, V]
            logp = logits.float().log_softmax(-1)
            scores.append(sum(float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(word_ids)) / len(word_ids))
        preds.append(max(range(len(scores)), key=scores.__getitem__))
        table.append(scores)
    return preds, torch.tensor(table)


def write_json(path: Path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def sample_rows(name: str) -> list[dict]:
    return json.loads((SAMPLES / f"{name}.json").read_text())


# ------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("fixture", ["llama", "gpt2_bos"])
@pytest.mark.parametrize("name", ["sst2", "nli"])
def test_accuracy_equals_slow_loop(request, fixture, name):
    model, tok = request.getfixturevalue(fixture)
    task = load_task(name, "sample", num_examples=9, seed=3)
    details = probe_details(model, tok, task, batch_size=4)  # 4 rows cut (example, word) groups apart
    preds, table = slow_predictions(model, tok, task)
    assert details.logprobs.shape == (9, len(task.label_words))
    torch.testing.assert_close(details.logprobs, table, atol=1e-4, rtol=1e-4)
    assert details.predictions == preds
    expected = sum(p == y for p, y in zip(preds, task.labels, strict=True)) / len(preds)
    assert probe_accuracy(model, tok, task, batch_size=5) == pytest.approx(expected)


def test_multi_token_label_words(llama):
    model, tok = llama
    words = ["xylophone", "the", "Paris"]
    n_tokens = [len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in words]
    assert n_tokens[0] > 1 and n_tokens[1] == 1 and n_tokens[2] > 1  # mixed lengths in one batch
    examples = [{"city": c, "label": i % 3} for i, c in enumerate(["Rome", "Berlin", "Tokyo", "Lima", "Oslo"])]
    task = ProbeTask("toy", "The capital city is {city}. Say:", words, examples)
    details = probe_details(model, tok, task, batch_size=2)
    preds, table = slow_predictions(model, tok, task)
    torch.testing.assert_close(details.logprobs, table, atol=1e-4, rtol=1e-4)
    assert details.predictions == preds
    assert details.labels == [0, 1, 2, 0, 1]


def test_probe_keeps_training_mode_and_is_deterministic(gpt2_bos):
    model, tok = gpt2_bos
    task = load_task("rte", "sample", num_examples=6)
    reference = probe_details(model, tok, task).logprobs
    model.train()
    try:
        again = probe_details(model, tok, task).logprobs
        assert model.training, "the probe must hand the model back in the mode it came in"
    finally:
        model.eval()
    torch.testing.assert_close(again, reference)  # dropout was off while scoring


def test_run_probes_keys(llama):
    model, tok = llama
    tasks = ProbeConfig(tasks=["cola", "mmlu"], num_examples=4).load()
    out = run_probes(model, tok, tasks, batch_size=8)
    assert list(out) == ["probe/cola/accuracy", "probe/mmlu/accuracy"]
    assert all(0.0 <= v <= 1.0 for v in out.values())
    with pytest.raises(ValueError, match="repeat"):
        run_probes(model, tok, [tasks[0], tasks[0]])


# ------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("name", TASKS)
def test_sample_task_loads_with_valid_labels(name):
    spec = SPECS[name]
    rows = sample_rows(name)
    assert 12 <= len(rows) <= 20
    for row in rows:  # the hub's field layout
        assert set(spec.fields) | {spec.label_field} <= set(row)
    task = load_task(name, "sample")  # num_examples=100 > rows: all of them
    assert task.name == name and task.label_words == list(spec.label_words)
    assert len(task.examples) == len(rows)
    assert set(task.labels) == set(range(len(task.label_words)))  # every class present, none out of range
    for example in task.examples:
        prompt = task.prompt(example)
        assert prompt.endswith("Answer:") and "{" not in prompt


def test_seeded_subset_is_deterministic():
    first = load_task("mrpc", "sample", num_examples=5, seed=7)
    again = load_task("mrpc", "sample", num_examples=5, seed=7)
    longer = load_task("mrpc", "sample", num_examples=10, seed=7)
    other = load_task("mrpc", "sample", num_examples=5, seed=8)
    assert first.examples == again.examples
    assert longer.examples[:5] == first.examples  # a shorter take is a prefix of a longer one
    assert other.examples != first.examples
    everything = load_task("mrpc", "sample")
    assert all(e in everything.examples for e in first.examples)


def test_local_file_directory_and_label_spelling(tmp_path):
    rows = sample_rows("mmlu")[:6]
    rows[0] = {**rows[0], "answer": "C"}  # letters are accepted for MMLU
    write_json(tmp_path / "mmlu.json", rows)
    (tmp_path / "cola.jsonl").write_text("\n".join(json.dumps(r) for r in sample_rows("cola")[:4]) + "\n")
    task = load_task("mmlu", str(tmp_path / "mmlu.json"), num_examples=6)
    assert sorted(task.labels) == sorted([2] + [r["answer"] for r in rows[1:]])
    assert all("_" not in e["subject"] for e in task.examples)  # "high_school_x" is shown as words
    assert len(load_task("cola", str(tmp_path)).examples) == 4  # directory: {name}.jsonl
    config = ProbeConfig(tasks=["mmlu", "cola"], source=str(tmp_path), num_examples=3)
    assert [len(t.examples) for t in config.load()] == [3, 3]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_bad_examples_name_task_index_and_field(tmp_path):
    rows = sample_rows("sst2")[:5]
    missing = [dict(r) for r in rows]
    del missing[2]["sentence"]
    msg = error_of(load_task, "sst2", write_json(tmp_path / "a.json", missing))
    assert "'sst2'" in msg and "example 2" in msg and "'sentence'" in msg

    out_of_range = [dict(r) for r in rows]
    out_of_range[3]["label"] = 2
    msg = error_of(load_task, "sst2", write_json(tmp_path / "b.json", out_of_range), num_examples=1)
    assert "'sst2'" in msg and "example 3" in msg and "'label'" in msg  # checked even when not selected

    unlabelled = [dict(r) for r in rows]
    unlabelled[1]["label"] = -1
    assert "test split" in error_of(load_task, "sst2", write_json(tmp_path / "c.json", unlabelled))

    mmlu = sample_rows("mmlu")[:3]
    mmlu[1] = {**mmlu[1], "choices": mmlu[1]["choices"][:3]}
    msg = error_of(load_task, "mmlu", write_json(tmp_path / "d.json", mmlu))
    assert "'mmlu'" in msg and "example 1" in msg and "'choices'" in msg

    nli = [dict(r) for r in sample_rows("nli")[:3]]
    nli[0]["hypothesis"] = None
    msg = error_of(load_task, "nli", write_json(tmp_path / "e.json", nli))
    assert "example 0" in msg and "'hypothesis'" in msg

    assert "example 1" in error_of(load_task, "cola", write_json(tmp_path / "f.json", [rows[0], "text"]))
    assert "unknown probe task 'boolq'" in error_of(load_task, "boolq", "sample")
    msg = error_of(load_task, "rte", str(tmp_path / "absent.json"))
    assert "'rte'" in msg and "absent.json" in msg


def test_probe_task_validation():
    good = {"sentence": "fine", "label": 1}
    msg = error_of(ProbeTask, "mine", "Text: {sentence}\nAnswer:", ["no", "yes"], [good, {"label": 0}])
    assert "'mine'" in msg and "example 1" in msg and "'sentence'" in msg
    msg = error_of(ProbeTask, "mine", "Text: {sentence}\nAnswer:", ["no", "yes"], [good, {"sentence": "x", "label": 5}])
    assert "example 1" in msg and "'label'" in msg
    assert "'label'" in error_of(ProbeTask, "mine", "{sentence}:", ["no", "yes"], [{"sentence": "x", "label": True}])
    assert "whitespace" in error_of(ProbeTask, "mine", "{sentence}: ", ["no", "yes"], [good])
    assert "named fields" in error_of(ProbeTask, "mine", "{} is", ["no", "yes"], [good])
    assert "repeat" in error_of(ProbeTask, "mine", "{sentence}:", ["yes", "yes"], [good])
    assert "no examples" in error_of(ProbeTask, "mine", "{sentence}:", ["no", "yes"], [])


def test_hub_path_calls_load_dataset(monkeypatch):
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        name = {"mnli": "nli", "all": "mmlu"}.get(config, config)
        return sample_rows(name)  # a list reads like a datasets.Dataset: len() and rows by index

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    expected = {
        "sst2": ("nyu-mll/glue", "sst2", "validation"),
        "rte": ("nyu-mll/glue", "rte", "validation"),
        "mrpc": ("nyu-mll/glue", "mrpc", "validation"),
        "cola": ("nyu-mll/glue", "cola", "validation"),
        "nli": ("nyu-mll/glue", "mnli", "validation_matched"),
        "mmlu": ("cais/mmlu", "all", "validation"),
    }
    for name, call in expected.items():
        task = load_task(name, "hub", num_examples=4, seed=1)
        assert calls[-1] == call
        assert task.examples == load_task(name, "sample", num_examples=4, seed=1).examples  # same rows, same take
    assert len(calls) == len(expected)


def test_hub_rows_validated_only_where_selected(monkeypatch):
    rows = sample_rows("sst2")
    broken = [*rows, {"label": 0}]  # the last row lacks "sentence"
    fake = types.SimpleNamespace(load_dataset=lambda path, config, split: broken)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    order_has_last = [s for s in range(20) if len(broken) - 1 in load_order(len(broken), s, 3)]
    order_lacks_last = [s for s in range(20) if s not in order_has_last]
    assert load_task("sst2", "hub", num_examples=3, seed=order_lacks_last[0])
    msg = error_of(load_task, "sst2", "hub", num_examples=3, seed=order_has_last[0])
    assert "nyu-mll/glue/sst2:validation" in msg and f"example {len(broken) - 1}" in msg and "'sentence'" in msg


def load_order(n: int, seed: int, k: int) -> list[int]:
    from editlab.probes import seeded_order

    return seeded_order(n, seed)[:k]


def test_sample_and_local_paths_do_not_import_datasets(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("datasets.load_dataset called off the hub path")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=refuse))
    for name in TASKS:
        load_task(name, "sample", num_examples=2)


# ------------------------------------------------------------------------------ config


def test_probe_config_validation(tmp_path):
    assert not ProbeConfig().enabled
    config = ProbeConfig(tasks=["sst2", "nli"], every_n_steps=5)
    assert config.enabled and [config.due(s) for s in (0, 4, 5, 10)] == [False, False, True, True]
    assert not ProbeConfig(tasks=["sst2"]).due(5)  # 0 = only before and after the stream
    assert "unknown task" in error_of(ProbeConfig, tasks=["sst2", "glue"])
    assert "list of task names" in error_of(ProbeConfig, tasks="sst2")
    assert "repeats" in error_of(ProbeConfig, tasks=["rte", "rte"])
    assert "num_examples" in error_of(ProbeConfig, tasks=["rte"], num_examples=0)
    assert "every_n_steps" in error_of(ProbeConfig, tasks=["rte"], every_n_steps=-1)
    assert "batch_size" in error_of(ProbeConfig, tasks=["rte"], batch_size=0)
    msg = error_of(ProbeConfig, tasks=["rte"], source=str(tmp_path / "nowhere"))
    assert "'rte'" in msg and "nowhere" in msg
    msg = error_of(ProbeConfig, tasks=["rte"], source=str(tmp_path))  # directory without rte.json
    assert "rte.json" in msg
