"""Tests for editlab.data: reading, validating and chunking edit records."""

from __future__ import annotations

import copy
import gzip
import json
import random
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from editlab.data import DataError, EditDataModule, check_tokenization, load_requests, sources
from editlab.data.sources import convert_records, counterfact_request, detect_format, read_records, zsre_request
from editlab.types import EditBatch, EditRequest

DATA = Path(__file__).parents[1].parent / "shared" / "data"
COUNTERFACT = DATA / "multi_counterfact.json.gz"
ZSRE = DATA / "zsre_mem.json.gz"


@pytest.fixture(scope="module")
def cf_records() -> list[dict]:
    with gzip.open(COUNTERFACT, "rt") as f:
        return json.load(f)[:200]


@pytest.fixture(scope="module")
def zsre_records() -> list[dict]:
    with gzip.open(ZSRE, "rt") as f:
        return json.load(f)[:200]


def write_json(path: Path, obj: Any) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------ real records


def test_counterfact_real_records(cf_records):
    reqs = load_requests(str(COUNTERFACT), num_edits=3, offset=2)
    assert [r.case_id for r in reqs] == [str(rec["case_id"]) for rec in cf_records[2:5]]
    r, rec = reqs[0], cf_records[2]
    rw = rec["requested_rewrite"]
    assert (r.prompt, r.subject) == (rw["prompt"], rw["subject"])
    assert (r.target_new, r.target_true) == (rw["target_new"]["str"], rw["target_true"]["str"])
    assert r.paraphrase_prompts == rec["paraphrase_prompts"]
    assert r.neighborhood_prompts == rec["neighborhood_prompts"]
    assert r.generation_prompts == rec["generation_prompts"]
    assert r.attribute_prompts == rec["attribute_prompts"]
    assert r.source == "counterfact" and r.neighborhood_answer is None
    assert r.locality_answer == r.target_true
    assert r.rewrite_prompt == rw["prompt"].format(rw["subject"])


def test_zsre_real_records(zsre_records):
    reqs = load_requests(str(ZSRE), num_edits=4)
    assert [r.case_id for r in reqs] == ["0", "1", "2", "3"]
    for r, rec in zip(reqs, zsre_records[:4], strict=True):
        assert r.source == "zsre"
        assert r.rewrite_prompt == rec["src"]
        assert r.prompt.count("{}") == 1 and r.subject == rec["subject"]
        # MEMIT's mapping: the edit writes the true answer; no competing answer.
        assert r.target_new == rec["answers"][0].strip() and r.target_true is None
        assert r.paraphrase_prompts == [rec["rephrase"]]
        assert r.neighborhood_prompts == [rec["loc"] + "?"]  # dsets/zsre.py asks `loc + "?"`
        assert r.neighborhood_answer == r.locality_answer == rec["loc_ans"]


def test_zsre_ids_are_file_positions_and_empty_alt_is_not_needed(zsre_records):
    # Record 150 of the real file has an empty alt, which MEMIT's mapping does not use.
    reqs = load_requests(str(ZSRE), num_edits=2, offset=150)
    assert [r.case_id for r in reqs] == ["150", "151"]
    assert zsre_records[150]["alt"] == ""
    assert reqs[0].target_new == zsre_records[150]["answers"][0].strip()


def test_detect_format(cf_records, zsre_records):
    assert detect_format(cf_records[0]) == "counterfact"
    assert detect_format(zsre_records[0]) == "zsre"
    assert "unknown record format" in error_of(detect_format, {"question": "q"}, "record 4 of x.json")


def test_explicit_format_mismatch_names_field(tmp_path, zsre_records):
    path = write_json(tmp_path / "z.json", zsre_records[:2])
    msg = error_of(load_requests, path, format="counterfact")
    assert "record 0 of" in msg and "case_id" in msg


def test_file_kinds_load_the_same(tmp_path, cf_records):
    recs = cf_records[:5]
    plain = write_json(tmp_path / "d.json", recs)
    with gzip.open(tmp_path / "d.json.gz", "wt") as f:
        json.dump(recs, f)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in recs))
    expected = load_requests(plain)
    assert len(expected) == 5
    for name in ("d.json.gz", "d.jsonl", "d.jsonl.gz"):
        assert load_requests(str(tmp_path / name)) == expected


def test_hub_id_uses_datasets(monkeypatch, cf_records):
    calls = []

    def fake_load_dataset(path, split):
        calls.append((path, split))
        return iter(cf_records[:3])

    # A stand-in module: no network, and no slow `datasets` import in the test.
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    reqs = load_requests("someone/counterfact", split="test", num_edits=2)
    assert calls == [("someone/counterfact", "test")]
    assert [r.case_id for r in reqs] == [str(r["case_id"]) for r in cf_records[:2]]


def test_missing_local_file(tmp_path):
    assert "no such file" in error_of(read_records, str(tmp_path / "nope.json"))


def test_demo_loads():
    # The bundled demo facts (CounterFact format) are also the datamodule's default.
    reqs = load_requests("demo")
    assert reqs and all(r.source == "demo" for r in reqs)
    dm = EditDataModule()
    dm.setup("fit")
    assert dm.requests == reqs


def test_demo_reads_package_resource(monkeypatch, tmp_path, cf_records):
    # Independent of the real demo file: point the package resource lookup at a temp dir.
    write_json(tmp_path / "demo_facts.json", cf_records[:2])
    monkeypatch.setattr(sources.importlib.resources, "files", lambda pkg: tmp_path)
    reqs = load_requests("demo")
    assert [r.source for r in reqs] == ["demo", "demo"]
    (tmp_path / "demo_facts.json").unlink()
    assert "demo" in error_of(load_requests, "demo")


# ------------------------------------------------------------------------------ error cases


def cf_record(case_id: int = 17) -> dict:
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": "The capital of {} is",
            "subject": "France",
            "target_new": {"str": "Rome", "id": "Q220"},
            "target_true": {"str": "Paris", "id": "Q90"},
            "relation_id": "P36",
        },
        "paraphrase_prompts": ["France's capital city is"],
        "neighborhood_prompts": ["The capital of Germany is"],
    }


def zsre_record() -> dict:
    return {
        "subject": "Life Electric",
        "src": "The designer for Life Electric was?",
        "pred": "Kimball & Thompson",
        "rephrase": "What architect did Life Electric design?",
        "alt": "Mitsumasa Anno",
        "answers": ["Daniel Libeskind"],
        "loc": "nq question: most consecutive games with 20+ points - nba history",
        "loc_ans": "126",
    }


def test_missing_field_names_case_and_field(tmp_path):
    bad = cf_record()
    del bad["requested_rewrite"]["target_new"]
    path = write_json(tmp_path / "data.json", [cf_record(1), cf_record(2), cf_record(3), bad])
    msg = error_of(load_requests, path)
    assert msg == f"case 17 (record 3 of {path}): field 'requested_rewrite.target_new' is missing"


def test_empty_string_names_case_and_field(tmp_path):
    bad = cf_record()
    bad["requested_rewrite"]["target_new"]["str"] = "  "
    path = write_json(tmp_path / "data.json", [cf_record(1), bad])
    msg = error_of(load_requests, path)
    assert msg == f"case 17 (record 1 of {path}): field 'requested_rewrite.target_new.str' is empty"


def test_missing_case_id_names_record():
    bad = cf_record()
    del bad["case_id"]
    assert error_of(counterfact_request, bad, "record 5 of f.json") == "record 5 of f.json: field 'case_id' is missing"


def test_prompt_without_placeholder():
    bad = cf_record()
    bad["requested_rewrite"]["prompt"] = "The capital of France is"
    msg = error_of(counterfact_request, bad, "record 0 of f.json")
    assert "case 17" in msg and "'requested_rewrite.prompt'" in msg and "exactly once" in msg


def test_prompt_with_two_placeholders_or_stray_brace():
    for prompt in ("{} and {} are", "The {capital} of {} is"):
        bad = cf_record()
        bad["requested_rewrite"]["prompt"] = prompt
        msg = error_of(counterfact_request, bad, "record 0 of f.json")
        assert "case 17" in msg and "'requested_rewrite.prompt'" in msg


def test_same_targets_rejected():
    bad = cf_record()
    bad["requested_rewrite"]["target_new"]["str"] = "Paris"
    msg = error_of(counterfact_request, bad, "record 0 of f.json")
    assert "case 17" in msg and "'requested_rewrite.target_new.str'" in msg and "changes nothing" in msg


def test_list_field_of_bare_string_rejected():
    bad = cf_record()
    bad["paraphrase_prompts"] = "France's capital city is"
    msg = error_of(counterfact_request, bad, "record 0 of f.json")
    assert "case 17" in msg and "'paraphrase_prompts'" in msg and "list" in msg


def test_zsre_subject_not_in_src():
    bad = zsre_record()
    bad["subject"] = "Death Acoustic"
    msg = error_of(zsre_request, bad, "record 9 of z.json", 9)
    assert msg.startswith("case 9 (record 9 of z.json): subject 'Death Acoustic' does not occur in field 'src'")


def test_zsre_empty_answer_and_explicit_case_id():
    bad = zsre_record() | {"case_id": "z-1", "answers": [""]}
    msg = error_of(zsre_request, bad, "record 9 of z.json", 9)
    assert msg.startswith("case z-1 (record 9 of z.json): field 'answers")


def test_zsre_first_occurrence_only():
    rec = zsre_record() | {"subject": "Bo", "src": "Is Bo the son of Bob?"}
    assert zsre_request(rec, "record 0 of z.json", 0).prompt == "Is {} the son of Bob?"


def test_duplicate_ids(tmp_path):
    path = write_json(tmp_path / "data.json", [cf_record(4), cf_record(5), cf_record(4)])
    msg = error_of(load_requests, path)
    assert msg == f"case 4 (record 2 of {path}): field 'case_id' duplicates record 0 of {path}"


def test_bad_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"case_id": 1,\n   "requested_rewrite": }\n]')
    msg = error_of(load_requests, str(path))
    assert str(path) in msg and "line 3, column 25" in msg
    jl = tmp_path / "broken.jsonl"
    jl.write_text(json.dumps(cf_record(1)) + "\n{oops}\n")
    msg = error_of(load_requests, str(jl))
    assert str(jl) in msg and "line 2, column 2" in msg


def test_top_level_not_a_list(tmp_path):
    path = write_json(tmp_path / "obj.json", {"data": [cf_record()]})
    msg = error_of(load_requests, path)
    assert path in msg and "top level is a JSON object" in msg


def test_non_object_record(tmp_path):
    path = write_json(tmp_path / "data.json", [cf_record(1), ["not", "a", "record"]])
    msg = error_of(load_requests, path, format="counterfact")
    assert f"record 1 of {path}" in msg


def test_num_edits_and_offset_bounds(tmp_path):
    path = write_json(tmp_path / "data.json", [cf_record(i) for i in range(5)])
    assert [r.case_id for r in load_requests(path, num_edits=2, offset=3)] == ["3", "4"]
    assert "only 2 records" in error_of(load_requests, path, num_edits=3, offset=3)
    assert "offset 5" in error_of(load_requests, path, offset=5)
    with pytest.raises(ValueError, match="num_edits"):
        load_requests(path, num_edits=0)


def test_validation_covers_all_selected_records_before_returning(tmp_path):
    recs = [cf_record(i) for i in range(6)]
    recs[5]["requested_rewrite"]["subject"] = ""
    path = write_json(tmp_path / "data.json", recs)
    assert "case 5" in error_of(load_requests, path)
    assert len(load_requests(path, num_edits=5)) == 5  # the bad record is outside the slice


# ------------------------------------------------------------------------------ tokenisation


@pytest.fixture(scope="module")
def ascii_tok():
    """A tiny word-level tokenizer that drops non-ASCII text, so '東京' tokenises to nothing."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "Paris": 1, "Rome": 2, "France": 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Replace(Regex(r"[^\x00-\x7f]"), "")
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


def test_check_tokenization(ascii_tok):
    good = counterfact_request(cf_record(), "record 0 of f.json")
    check_tokenization([good], ascii_tok)
    for field, value in (("target_new", "東京"), ("target_true", "巴黎"), ("subject", "フランス")):
        bad = copy.deepcopy(good)
        setattr(bad, field, value)
        msg = error_of(check_tokenization, [good, bad], ascii_tok)
        assert f"case 17: field '{field}'" in msg and "tokenises to nothing" in msg
    none_true = copy.deepcopy(good)
    none_true.target_true = None  # optional: not checked when absent
    check_tokenization([none_true], ascii_tok)


# ------------------------------------------------------------------------------ datamodule


def test_datamodule_chunks_in_order(tmp_path):
    path = write_json(tmp_path / "data.json", [cf_record(i) for i in range(7)])
    dm = EditDataModule(path=path, edits_per_step=3, num_edits=7)
    steps = dm.steps()
    assert [[r.case_id for r in s] for s in steps] == [["0", "1", "2"], ["3", "4", "5"], ["6"]]
    yielded = list(dm.train_dataloader())
    assert all(type(b) is EditBatch for b in yielded)
    assert all(isinstance(r, EditRequest) for b in yielded for r in b)
    assert yielded == steps
    # Deterministic: a second pass, and a fresh module, give the same order.
    assert list(dm.train_dataloader()) == steps
    assert EditDataModule(path=path, edits_per_step=3).steps() == steps


def test_datamodule_setup_is_idempotent(tmp_path):
    path = tmp_path / "data.json"
    write_json(path, [cf_record(i) for i in range(3)])
    dm = EditDataModule(path=str(path))
    dm.prepare_data()
    dm.setup("fit")
    first = dm.requests
    path.write_text("not json any more")  # a second setup must not re-read
    dm.setup("fit")
    assert dm.requests is first and len(dm.steps()) == 3


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"edits_per_step": 0}, "edits_per_step"),
        ({"num_edits": 0}, "num_edits"),
        ({"offset": -1}, "offset"),
        ({"format": "squad"}, "format"),
    ],
)
def test_datamodule_rejects_bad_options(kwargs, option):
    with pytest.raises(ValueError, match=option):
        EditDataModule(**kwargs)


def test_datamodule_surfaces_data_errors(tmp_path):
    bad = cf_record()
    del bad["requested_rewrite"]["subject"]
    dm = EditDataModule(path=write_json(tmp_path / "data.json", [bad]))
    with pytest.raises(DataError, match="case 17 .*'requested_rewrite.subject' is missing"):
        dm.setup("fit")


# ------------------------------------------------------------------------------ fuzz

# Paths into a CounterFact record; ints index lists. Some are optional or ignored, so a
# corruption there may legitimately load.
FUZZ_PATHS: list[tuple] = [
    ("case_id",),
    ("requested_rewrite",),
    ("requested_rewrite", "prompt"),
    ("requested_rewrite", "subject"),
    ("requested_rewrite", "target_new"),
    ("requested_rewrite", "target_new", "str"),
    ("requested_rewrite", "target_true"),
    ("requested_rewrite", "target_true", "str"),
    ("requested_rewrite", "relation_id"),
    ("paraphrase_prompts",),
    ("paraphrase_prompts", 0),
    ("neighborhood_prompts",),
    ("neighborhood_prompts", 3),
    ("attribute_prompts", 1),
    ("generation_prompts",),
    ("pararel_idx",),
]
IGNORED = {("requested_rewrite", "relation_id"), ("pararel_idx",)}
OPTIONAL_LISTS = {("paraphrase_prompts",), ("neighborhood_prompts",), ("generation_prompts",), ("attribute_prompts",)}
WRONG_VALUES: list[Any] = [None, 7, 2.5, True, [], {}, ["x"], "text"]


def field_name(path: tuple) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def parent_and_key(rec: dict, path: tuple) -> tuple[Any, Any]:
    node = rec
    for key in path[:-1]:
        node = node[key]
    return node, path[-1]


def corrupt(rec: dict, other: dict, rng: random.Random) -> tuple[list[dict], str, str, bool]:
    """Corrupt a copy of ``rec``; return (records, field name, kind, whether it must fail)."""
    rec = copy.deepcopy(rec)
    kind = rng.choice(["drop", "empty", "wrong_type", "no_placeholder", "duplicate_id", "same_target"])
    if kind == "no_placeholder":
        rec["requested_rewrite"]["prompt"] = rec["requested_rewrite"]["prompt"].replace("{}", "")
        return [rec], "requested_rewrite.prompt", kind, True
    if kind == "duplicate_id":
        rec["case_id"] = other["case_id"]
        return [other, rec], "case_id", kind, True
    if kind == "same_target":
        rw = rec["requested_rewrite"]
        rw["target_new"]["str"] = rw["target_true"]["str"]
        return [rec], "requested_rewrite.target_new.str", kind, True
    path = rng.choice(FUZZ_PATHS)
    parent, key = parent_and_key(rec, path)
    original = parent[key]
    if kind == "drop":
        if isinstance(key, int):
            parent[key] = None  # "dropping" a list item without shifting the rest: a null
        else:
            del parent[key]
        must_fail = path not in IGNORED and path not in OPTIONAL_LISTS
    elif kind == "empty":
        parent[key] = rng.choice(["", "   ", "\n"])
        must_fail = path not in IGNORED
    else:
        # A value of another type; a string case id (or an empty list for a list field) is valid.
        choices = [v for v in WRONG_VALUES if type(v) is not type(original)]
        if path == ("case_id",):
            choices = [v for v in choices if not isinstance(v, str)]
        if path in OPTIONAL_LISTS:
            choices = [v for v in choices if v != []]
        parent[key] = copy.deepcopy(rng.choice(choices))
        must_fail = path not in IGNORED
    return [rec], field_name(path), kind, must_fail


def reference_request(rec: dict) -> EditRequest:
    """The straightforward mapping of a valid CounterFact record."""
    rw = rec["requested_rewrite"]
    return EditRequest(
        case_id=str(rec["case_id"]),
        prompt=rw["prompt"],
        subject=rw["subject"],
        target_new=rw["target_new"]["str"],
        target_true=rw["target_true"]["str"],
        paraphrase_prompts=rec.get("paraphrase_prompts", []),
        neighborhood_prompts=rec.get("neighborhood_prompts", []),
        generation_prompts=rec.get("generation_prompts", []),
        attribute_prompts=rec.get("attribute_prompts", []),
        source="counterfact",
        relation_id=rw.get("relation_id") if isinstance(rw.get("relation_id"), str) else None,
        target_new_id=rw["target_new"].get("id") if isinstance(rw["target_new"].get("id"), str) else None,
    )


def assert_valid(req: EditRequest) -> None:
    assert req.prompt.count("{}") == 1
    for text in (req.case_id, req.prompt, req.subject, req.target_new, req.target_true):
        assert isinstance(text, str) and text.strip()
    assert req.target_new != req.target_true
    for items in (req.paraphrase_prompts, req.neighborhood_prompts, req.generation_prompts, req.attribute_prompts):
        assert isinstance(items, list) and all(isinstance(p, str) and p.strip() for p in items)


def test_fuzz_corrupted_counterfact(cf_records):
    rng = random.Random(1234)
    outcomes = {"error": 0, "loaded": 0}
    for i, rec in enumerate(cf_records):
        other = cf_records[(i + 1) % len(cf_records)]
        records, field, kind, must_fail = corrupt(rec, other, rng)
        bad = records[-1]
        position = f"record {len(records) - 1} of fuzz.json"
        context = f"record {i}: {kind} on {field}"
        try:
            reqs = convert_records(records, "fuzz.json")
        except DataError as e:
            msg = str(e)
            outcomes["error"] += 1
            assert f"'{field}" in msg, context + ": " + msg  # "'field'" or "'field.sub'"/"'field[i]'"
            assert position in msg, context + ": " + msg
            # A corrupted case id cannot be quoted back usefully; every other error names it.
            if field != "case_id" or kind == "duplicate_id":
                assert f"case {bad['case_id']} (" in msg, context + ": " + msg
            continue
        # Any other exception type propagates and fails the test.
        assert not must_fail, f"{context}: loaded but should have failed"
        outcomes["loaded"] += 1
        assert_valid(reqs[-1])
        assert reqs[-1] == reference_request(bad), context
    assert outcomes["error"] > 100 and outcomes["loaded"] > 0, outcomes
