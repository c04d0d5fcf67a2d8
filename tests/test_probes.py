"""Tests for editlab.metrics.probes: zero-shot label-word scoring, built-in task loaders, configuration."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from editlab.data.sources import DataError
from editlab.metrics.probes import (
    FEW_SHOT_POOL,
    NO_ANSWER,
    SEED_TASKS,
    SPECS,
    TASKS,
    ProbeConfig,
    ProbeSuite,
    ProbeTask,
    choice_logprobs,
    load_seed_task,
    load_task,
    matthews_corrcoef,
    predict,
    probe_accuracy,
    probe_cache,
    probe_cache_key,
    probe_details,
    run_probes,
    weighted_f1,
)
from editlab.models.tiny import tiny_model

from helpers import SHARED_DATA

SEEDS_DATA = SHARED_DATA / "probes"

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
    from editlab.metrics.probes import seeded_order

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


# ------------------------------------------------------------------------------ scores (F1, MCC)


def slow_weighted_f1(labels: list[int], predictions: list[int]) -> float:
    """Per class: TP, FP, FN counted one example at a time; F1 = 2TP / (2TP + FP + FN) (0 if no
    TP); averaged with each class's number of true examples as weight."""
    total = 0.0
    for c in set(labels) | set(predictions):
        tp = fp = fn = 0
        for y, p in zip(labels, predictions, strict=True):
            tp += y == c and p == c
            fp += y != c and p == c
            fn += y == c and p != c
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        total += f1 * sum(y == c for y in labels)
    return total / len(labels)


def slow_mcc(labels: list[int], predictions: list[int]) -> float:
    """Gorodkin's R_K as a Pearson correlation of one-hot codes: the covariance of the true and the
    predicted one-hot vectors summed over classes, over the square root of their variances."""
    classes = sorted(set(labels) | set(predictions))
    n = len(labels)

    def cov(a: list[int], b: list[int]) -> float:
        out = 0.0
        for c in classes:
            xa = [float(v == c) for v in a]
            xb = [float(v == c) for v in b]
            ma, mb = sum(xa) / n, sum(xb) / n
            out += sum((u - ma) * (w - mb) for u, w in zip(xa, xb, strict=True)) / n
        return out

    den = (cov(labels, labels) * cov(predictions, predictions)) ** 0.5
    return cov(labels, predictions) / den if den else 0.0


def test_f1_and_mcc_on_hand_computed_cases():
    # labels 1 1 0 0, predictions 1 0 0 0: TP=1 FN=1 TN=2 FP=0.
    # F1(class 0) = 2*2/(2*2+1+0) = 0.8, F1(class 1) = 2/(2+0+1) = 2/3; weighted: (2*0.8 + 2*2/3)/4.
    assert weighted_f1([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx((1.6 + 4 / 3) / 4)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / sqrt(1*2*2*3).
    assert matthews_corrcoef([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(2 / 12**0.5)
    # A 4-choice tie is no answer (-1): class 0 recall 1/2 (F1 2/3), class 1 F1 1, class -1 weighs 0.
    assert weighted_f1([0, 0, 1, 1], [0, NO_ANSWER, 1, 1]) == pytest.approx((2 * 2 / 3 + 2 * 1) / 4)
    # Three classes: true counts (2, 1, 1), predicted (1, 1, 2), 2 right of 4:
    # (2*4 - (2*1 + 1*1 + 1*2)) / sqrt((16 - 6) * (16 - 6)) = 3/10.
    assert matthews_corrcoef([0, 1, 2, 0], [0, 2, 2, 1]) == pytest.approx(0.3)
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # a constant answer: 0, as sklearn
    # The constant answer on a balanced binary set: F1 2/3 for the predicted class, 0 for the other.
    assert weighted_f1([0, 1, 0, 1], [1, 1, 1, 1]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="as many predictions"):
        weighted_f1([0, 1], [0])


def test_f1_and_mcc_equal_slow_versions_on_random_cases():
    rng = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 30, (1,), generator=rng))
        k = 2 if trial % 2 else 4
        labels = torch.randint(0, k, (n,), generator=rng).tolist()
        predictions = torch.randint(-1 if k == 4 else 0, k, (n,), generator=rng).tolist()
        assert weighted_f1(labels, predictions) == pytest.approx(slow_weighted_f1(labels, predictions), abs=1e-12)
        assert matthews_corrcoef(labels, predictions) == pytest.approx(slow_mcc(labels, predictions), abs=1e-12)


def test_ties_are_class_0_for_two_words_and_no_answer_for_four():
    scores = torch.tensor([[-1.0, -1.0], [-2.0, -1.0], [-0.5, -3.0]])
    assert predict(scores, ties_invalid=False) == [0, 1, 0]  # the reference: 1 only if strictly better
    four = torch.tensor([[-1.0, -1.0, -2.0, -3.0], [-3.0, -2.0, -1.0, -1.5], [-1.0, -1.0, -1.0, -1.0]])
    assert predict(four, ties_invalid=True) == [NO_ANSWER, 2, NO_ANSWER]
    assert predict(four, ties_invalid=False) == [0, 2, 0]


# ------------------------------------------------------------------------------ the seeds' sets


def reference_prompt(name: str, row: dict) -> str:
    """The seeds' glue_eval ``_create_prompt`` with 0 few-shot examples, written out per task."""
    if name == "sst2":
        return "Review :" + row["sentence"] + "\nSentiment :"
    if name == "mrpc":
        prompt = "Sentence 1: " + row["sentence1"] + "\n" + "Sentence 2: " + row["sentence2"] + "\n"
        return "Are the sentences paraphrases of each other.\n" + prompt + "Answer:"
    if name == "cola":
        return "Is this sentence linguistically acceptable?\n" + "Sentence: " + row["sentence"] + "\n" + "Answer: "
    if name == "rte":
        return row["sentence1"] + "\n" + "question: " + row["sentence2"] + " True or False?" + "\n" + "answer:"
    if name == "mmlu":
        options = "".join(f"({letter}) {choice}\n" for letter, choice in zip("ABCD", row["choices"], strict=True))
        return "Question: " + row["question"] + "\n" + options + "Answer:"
    if name == "nli":
        return row["sentence1"] + " entails the " + row["sentence2"] + " " + "True or False? Answer:"
    if name == "sentiment_analysis":
        prefix = (
            "For each snippet of text,label the sentiment of the text as positive or negative."
            "The answer should be exact 'positive' or 'negative'. text:"
        )
        return prefix + " " + row["sentence"] + " " + "answer:"
    assert name == "dialogue"
    options = "".join(f"({letter}){option}\n" for letter, option in zip("ABCD", row["options"], strict=True))
    return "Q: Given the following: " + row["article"] + "\nWhich choice is correct?\n" + options + "Answer:"


# The reference's label -> word: the word its answer_new picks for the true class.
REFERENCE_WORD = {
    "sst2": lambda row: "positive" if row["label"] == 1 else "negative",
    "mrpc": lambda row: "Yes" if row["label"] == 1 else "No",
    "cola": lambda row: "Yes" if row["label"] == 1 else "No",
    "rte": lambda row: "True" if row["label"] == 1 else "False",  # GLUE's 1 = not_entailment, as released
    "mmlu": lambda row: "ABCD"[row["answer"]],
    "nli": lambda row: "True" if row["label"] == "entailment" else "False",
    "sentiment_analysis": lambda row: "positive" if int(row["label"]) == 1 else "negative",
    "dialogue": lambda row: row["answers"],
}


def seed_rows(name: str) -> list:
    import gzip

    with gzip.open(SEEDS_DATA / f"{name}.json.gz", "rt") as f:
        return json.load(f)


@pytest.mark.parametrize("name", SEED_TASKS)
def test_seed_prompts_and_labels_are_the_references(name):
    rows = seed_rows(name)
    task = load_seed_task(name, str(SEEDS_DATA))
    assert len(task.examples) == len(rows) - FEW_SHOT_POOL  # the first 10 are the few-shot pool
    for i in (0, 1, len(task.examples) - 1):
        row = rows[FEW_SHOT_POOL + i]
        assert task.prompt(task.examples[i]) == reference_prompt(name, row)
        assert task.label_words[task.labels[i]] == REFERENCE_WORD[name](row)
    assert task.scores == (("accuracy", "f1", "mcc") if name == "cola" else ("accuracy", "f1"))
    assert task.ties_invalid == (name in ("mmlu", "dialogue"))


def write_seeds(directory: Path, name: str, rows: list) -> Path:
    import gzip

    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / f"{name}.json.gz", "wt") as f:
        json.dump(rows, f)
    return directory


def test_seed_subsets_are_fixed_and_the_full_set_follows_them(tmp_path):
    directory = str(SEEDS_DATA)
    first = ProbeConfig(tasks=["sst2", "mmlu"], source="seeds", seeds_dir=directory).suite()
    rows = seed_rows("sst2")
    sst2 = first.tasks[0]
    assert first.intermediate == 100 and len(sst2.examples) == len(rows) - FEW_SHOT_POOL
    # "first": the reference's number_of_tests=100, records 10..109 in file order.
    assert [e["sentence"] for e in sst2.examples[:100]] == [r["sentence"] for r in rows[10:110]]
    seeded = ProbeConfig(tasks=["sst2"], source="seeds", seeds_dir=directory, subset="seeded", seed=3)
    again = ProbeConfig(tasks=["sst2"], source="seeds", seeds_dir=directory, subset="seeded", seed=3)
    other = ProbeConfig(tasks=["sst2"], source="seeds", seeds_dir=directory, subset="seeded", seed=4)
    a, b, c = (cfg.load()[0].examples for cfg in (seeded, again, other))
    assert a == b and a[:100] != c[:100] and a[:100] != sst2.examples[:100]
    assert sorted(map(json.dumps, a)) == sorted(map(json.dumps, sst2.examples))  # a permutation of the same set
    cut = ProbeConfig(tasks=["sst2"], source="seeds", seeds_dir=directory, num_examples=30).load()[0]
    assert cut.examples == sst2.examples[:30]


def test_malformed_seed_records_name_task_file_record_and_field(tmp_path):
    good = seed_rows("nli")[:14]

    def message(rows: list, name: str = "nli") -> str:
        directory = write_seeds(tmp_path / f"d{len(list(tmp_path.iterdir()))}", name, rows)
        with pytest.raises(DataError) as info:
            load_seed_task(name, str(directory))
        return str(info.value)

    bad = [dict(r) for r in good]
    bad[12]["label"] = "maybe"
    msg = message(bad)
    assert "'nli'" in msg and "nli.json.gz" in msg and "example 12" in msg and "'label'" in msg and "maybe" in msg
    bad = [dict(r) for r in good]
    del bad[11]["sentence2"]
    msg = message(bad)
    assert "example 11" in msg and "missing field 'sentence2'" in msg
    bad = [dict(r) for r in good]
    bad[13]["sentence1"] = ["a", "list"]
    msg = message(bad)
    assert "example 13" in msg and "'sentence1'" in msg
    sst2 = [dict(r) for r in seed_rows("sst2")[:12]]
    sst2[10]["label"] = True  # a bool is not the class 1
    msg = message(sst2, "sst2")
    assert "example 10" in msg and "True" in msg and "[0, 1]" in msg
    mmlu = [dict(r) for r in seed_rows("mmlu")[:12]]
    mmlu[11]["choices"] = mmlu[11]["choices"][:3]
    msg = message(mmlu, "mmlu")
    assert "example 11" in msg and "'choices[3]'" in msg
    assert "few-shot pool" in message(good[:10])
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(ValueError, match=r"'rte'.*empty.*rte.json.gz.*seeds_dir"):
        ProbeConfig(tasks=["rte"], source="seeds", seeds_dir=str(missing))
    with pytest.raises(ValueError, match="unknown task.*'dialogue'"):
        ProbeConfig(tasks=["dialogue"], source="sample")  # dialogue is a seeds' task only
    with pytest.raises(ValueError, match="intermediate_examples"):
        ProbeConfig(tasks=["sst2"], source="seeds", seeds_dir=str(SEEDS_DATA), intermediate_examples=0)
    with pytest.raises(ValueError, match="subset"):
        ProbeConfig(tasks=["sst2"], source="seeds", seeds_dir=str(SEEDS_DATA), subset="random")


def test_trailing_space_template_is_scored_as_the_reference(llama):
    model, tok = llama
    task = load_seed_task("cola", str(SEEDS_DATA), num_examples=6)
    assert task.template.endswith("Answer: ")
    details = probe_details(model, tok, task, batch_size=4)
    preds, table = slow_predictions(model, tok, task)  # tok(prompt) ends in its space, then tok(" Yes")
    torch.testing.assert_close(details.logprobs, table, atol=1e-4, rtol=1e-4)
    assert details.predictions == preds
    with pytest.raises(ValueError, match="exactly one space"):
        ProbeTask("x", "{sentence}:  ", ["no", "yes"], [{"sentence": "s", "label": 0}], trailing_space=True)
    with pytest.raises(ValueError, match="exactly one space"):
        ProbeTask("x", "{sentence}:", ["no", "yes"], [{"sentence": "s", "label": 0}], trailing_space=True)


@pytest.mark.parametrize("fixture", ["llama", "gpt2_bos"])
def test_shared_prompt_rows_equal_one_forward_per_word(request, fixture):
    """Single-token words share the prompt's row, multi-token ones get their own; batches of 3 rows
    sorted by length cut examples apart. Every cell equals the obvious per-(example, word) loop."""
    model, tok = request.getfixturevalue(fixture)
    words = ["a", "xylophone", "the", "Q"]
    lengths = [len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in words]
    assert 1 in lengths and max(lengths) > 1
    examples = [{"s": s, "label": i % 4} for i, s in enumerate(["one", "two words", "a longer third one", "4", "five"])]
    task = ProbeTask("mixed", "Say {s}:", words, examples, ties_invalid=True)
    got = choice_logprobs(model, tok, [task.prompt(e) for e in examples], words, batch_size=3)
    _, table = slow_predictions(model, tok, task)
    torch.testing.assert_close(got, table, atol=1e-4, rtol=1e-4)


def test_suite_scores_the_subset_during_the_stream_and_everything_before_and_after(llama):
    model, tok = llama
    tasks = [load_seed_task("sst2", str(SEEDS_DATA), 9), load_seed_task("cola", str(SEEDS_DATA), 7)]
    suite = ProbeSuite(tasks, intermediate=4, batch_size=5)
    during, full = suite.run(model, tok, full=False), suite.run(model, tok, full=True)
    assert set(during) == set(full) == suite.metric_names()
    assert "probe/cola/mcc" in during and "probe/sst2/mcc" not in during  # MCC is CoLA's
    for task in tasks:
        everything = probe_details(model, tok, task)
        first4 = probe_details(model, tok, task.select(range(4)))
        for score in task.scores:
            key = f"probe/{task.name}/{score}"
            assert during[key] == during[f"probe/{task.name}/subset_{score}"] == pytest.approx(first4.score(score))
            assert full[key] == pytest.approx(everything.score(score))
            assert full[f"probe/{task.name}/subset_{score}"] == pytest.approx(first4.score(score))
    with pytest.raises(ValueError, match="repeat"):
        ProbeSuite([tasks[0], tasks[0]])


def test_cached_probe_scores_equal_computed_ones_and_follow_the_weights(tmp_path, monkeypatch):
    from editlab.metrics import probes as probes_module

    model, tok = tiny_model("llama")
    tasks = [load_seed_task("sst2", str(SEEDS_DATA), 9), load_seed_task("mmlu", str(SEEDS_DATA), 6)]
    suite, cache = ProbeSuite(tasks, intermediate=4, batch_size=5), probe_cache(tmp_path)
    plain = suite.run(model, tok, full=True)
    first = suite.run(model, tok, full=True, cache=cache)
    assert first == plain and len(list((tmp_path / "probes").glob("logprobs_*.pt"))) == 2
    # A second run reads every task from the cache: no forward at all.
    monkeypatch.setattr(probes_module, "probe_details", lambda *a, **k: pytest.fail("recomputed"))
    assert suite.run(model, tok, full=True, cache=cache) == plain
    monkeypatch.undo()
    # Other weights, another subset or another batch size are other keys, never the stored scores.
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    edited = suite.run(model, tok, full=True, cache=cache)
    assert edited == suite.run(model, tok, full=True) and len(list((tmp_path / "probes").glob("*.pt"))) == 4
    weights = "w"
    key = probe_cache_key(tasks[0], tok, 5, weights)
    assert key != probe_cache_key(tasks[0].select(range(4)), tok, 5, weights)
    assert key != probe_cache_key(tasks[0], tok, 4, weights)


@pytest.mark.slow
def test_curve_points_probe_subsets_during_the_stream_and_full_sets_at_the_ends(tmp_path):
    """editlab fit, periodic every step on a tiny GPT-2 with exported weights: the pre and final
    points' probes equal a recomputation on every example (final: on the exported model), their
    subset_ scores one on the first 2; the point in between has subset values only."""
    import subprocess

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editlab.models.tiny import save_tiny

    from helpers import tiny_memit_fit_options

    seeds = tmp_path / "seeds"
    write_seeds(seeds, "sst2", seed_rows("sst2")[:16])  # 6 test records
    write_seeds(seeds, "cola", seed_rows("cola")[:15])  # 5
    save_tiny(tmp_path / "tiny", "gpt2")
    (tmp_path / "corpus.txt").write_text("\n".join(f"Line {i} is about a city and its river." for i in range(20)))
    options = {
        **tiny_memit_fit_options(tmp_path),
        "--data.path": str(SHARED_DATA / "multi_counterfact.json.gz"),
        "--data.num_edits": "3",
        "--data.edits_per_step": "1",
        "--model.evaluation.every_n_steps": "1",
        "--model.evaluation.fluency": "false",
        "--model.evaluation.probes.tasks": "[sst2, cola]",
        "--model.evaluation.probes.source": "seeds",
        "--model.evaluation.probes.seeds_dir": str(seeds),
        "--model.evaluation.probes.intermediate_examples": "2",
        "--model.export": "true",
        "--trainer.default_root_dir": str(tmp_path / "run"),
    }
    args = [a for kv in options.items() for a in kv]
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "EDITLAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "editlab.cli", "fit", *args],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    curve = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    assert [p["timing"] for p in curve] == ["pre", "periodic", "periodic", "periodic"]
    summary = json.loads((run / "summary.json").read_text())
    assert "sst2 6, cola 5" in summary["probe_setting"] and "the first 2" in summary["probe_setting"]

    def recomputed(model_dir: Path) -> dict[str, float]:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        tasks = [load_seed_task("sst2", str(seeds)), load_seed_task("cola", str(seeds))]
        return ProbeSuite(tasks, intermediate=2).run(model, tok, full=True)

    before, after = recomputed(tmp_path / "tiny"), recomputed(run / "edited_model")
    for key, value in before.items():
        assert curve[0][key] == pytest.approx(value, abs=1e-9), key
        assert summary[f"pre_{key}"] == pytest.approx(value, abs=1e-9), key
    for key, value in after.items():
        assert curve[-1][key] == pytest.approx(value, abs=1e-9), key
        assert summary[key] == pytest.approx(value, abs=1e-9), key
    for point in curve[1:-1]:  # during the stream: the first 2 examples only
        for key in before:
            if "/subset_" not in key:
                task, score = key.split("/")[1:]
                assert point[key] == point[f"probe/{task}/subset_{score}"], key

    # The per-example outcomes, rebuilt from the final edit state (editlab study --collect), are the
    # predictions of the unedited and of the exported model, example by example.
    from editlab.commands.probe_values import ProbeValuesError, run_probe_values

    records = run_probe_values(run)
    for model_dir, point in ((tmp_path / "tiny", "pre"), (run / "edited_model", "post")):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        for name in ("sst2", "cola"):
            expected = probe_details(model, tok, load_seed_task(name, str(seeds)))
            mine = [r for r in records if r["task"] == name]
            assert [r[point]["prediction"] for r in mine] == expected.predictions, (name, point)
            assert [r["label"] for r in mine] == expected.labels
    (run / "summary.json").write_text(
        json.dumps({**summary, "probe/sst2/accuracy": summary["probe/sst2/accuracy"] + 0.5})
    )
    with pytest.raises(ProbeValuesError, match="probe/sst2/accuracy from the final weights"):
        run_probe_values(run)


@pytest.mark.slow
def test_seed_tasks_on_smollm2_equal_the_reference_loop():
    """SmolLM2 (the real tokenizer): the batched scorer equals one forward per (example, word) on a
    few examples of a 2-word and a 4-word task, and the predictions follow."""
    from editlab.models.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    for name in ("sst2", "mmlu", "cola"):
        task = load_seed_task(name, str(SEEDS_DATA), num_examples=6)
        details = probe_details(model, tok, task, batch_size=4)
        _, table = slow_predictions(model, tok, task)
        torch.testing.assert_close(details.logprobs, table, atol=1e-4, rtol=1e-4)
        assert details.predictions == predict(table, task.ties_invalid)


def test_probe_benchmark_reports_chance_levels_and_the_side_by_side(tmp_path):
    """benchmarks/probes_smollm2.py on a tiny model: each task's chance levels come from its labels
    (balanced binary sets: majority 0.5, constant F1 1/3, MCC 0), the verdict follows the stated
    rule, and the batched scorer agrees with the reference-style loop."""
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("probes_smollm2", REPO / "benchmarks" / "probes_smollm2.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "probes.json"
    argv = ["--tiny", "--tasks", "sst2,cola", "--limit", "10", "--compare", "3", "--compare-tasks", "sst2"]
    result = bench.main([*argv, "--seeds-dir", str(SEEDS_DATA), "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for name in ("sst2", "cola"):
        row = result["tasks"][name]
        labels = load_seed_task(name, str(SEEDS_DATA), 10).labels
        assert row["examples"] == 10 and labels.count(0) == labels.count(1)
        assert row["chance"]["majority_rate"] == 0.5 and row["chance"]["uniform_rate"] == 0.5
        assert row["chance"]["constant_f1"] == pytest.approx(1 / 3) and row["chance"]["constant_mcc"] == 0.0
        assert row["above_chance"] == (row["accuracy"] > 0.5 + 2 * (0.25 / 10) ** 0.5)
        assert sum(row["prediction_rates"].values()) == pytest.approx(1.0)
    assert result["side_by_side"]["sst2"]["max_abs_logprob_difference"] < 1e-4
    assert not bench.above_chance(0.55, 0.5, 100) and bench.above_chance(0.61, 0.5, 100)  # 2 SE = 0.1
