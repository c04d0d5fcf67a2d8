"""Fuzzing the data layer: 200 seeded corruptions of CounterFact records (structured edits with a
known right answer, and raw byte edits of the file). Every file is either rejected with a DataError
naming the record (its case id, or its position when the id itself is broken) and the field, or
accepted with the requests the corruption implies. Nothing else may escape, and the data layer
never writes."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict

import pytest

from editlab.data.sources import DataError, load_requests, read_records

N_CASES = 200
N_RAW = 50  # of which raw byte edits of the file text
REQUIRED = [
    ("case_id",),
    ("requested_rewrite",),
    ("requested_rewrite", "prompt"),
    ("requested_rewrite", "subject"),
    ("requested_rewrite", "target_new"),
    ("requested_rewrite", "target_true"),
    ("requested_rewrite", "target_new", "str"),
    ("requested_rewrite", "target_true", "str"),
]
STRINGS = [p for p in REQUIRED if p[-1] in ("prompt", "subject", "str")]
LISTS = [("paraphrase_prompts",), ("neighborhood_prompts",), ("generation_prompts",), ("attribute_prompts",)]
WRONG = [None, 0, 1.5, True, [], {}, ["x"]]


def dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


def parent(rec: dict, path: tuple[str, ...]) -> dict:
    for key in path[:-1]:
        rec = rec[key]
    return rec


def mutate(rng: random.Random, records: list[dict], t: int) -> tuple[str, object]:
    """Corrupt ``records[t]`` in place. Returns (kind, expectation): ("reject", field) where the
    message must name ``field``, or ("accept", check) with check(requests) -> bool."""
    rec = records[t]
    kind = rng.choice(
        [
            "delete",
            "delete_list",
            "empty",
            "wrong_type",
            "list_item",
            "template",
            "same",
            "dup",
            "extra",
            "pad",
            "not_obj",
            "int_id",
        ]
    )
    if kind == "delete":
        path = rng.choice(REQUIRED)
        del parent(rec, path)[path[-1]]
        return "reject", dotted(path)
    if kind == "delete_list":
        path = rng.choice(LISTS)
        parent(rec, path).pop(path[-1], None)
        return "accept", lambda reqs: getattr(reqs[t], path[0]) == []
    if kind == "empty":
        path = rng.choice(STRINGS)
        parent(rec, path)[path[-1]] = rng.choice(["", " ", "\t\n"])
        return "reject", dotted(path)
    if kind == "wrong_type":
        path = rng.choice(REQUIRED + LISTS)
        value = rng.choice([v for v in WRONG if not isinstance(v, list)] if path in LISTS else WRONG)
        if path == ("case_id",) and isinstance(value, int) and not isinstance(value, bool):
            value = None  # an integer id is valid: covered by "int_id"
        parent(rec, path)[path[-1]] = value
        return "reject", dotted(path)
    if kind == "list_item":
        path = rng.choice(LISTS)
        items = list(parent(rec, path).get(path[-1], [])) + ["a prompt"]
        i = rng.randrange(len(items))
        items[i] = rng.choice([None, 3, "", ["nested"], {"a": 1}])
        parent(rec, path)[path[-1]] = items
        return "reject", f"{dotted(path)}[{i}]"
    if kind == "template":
        rw = rec["requested_rewrite"]
        rw["prompt"] = rng.choice(
            [rw["prompt"].replace("{}", "X"), rw["prompt"] + " {}", "{ " + rw["prompt"], rw["prompt"] + "}"]
        )
        return "reject", "requested_rewrite.prompt"
    if kind == "same":
        rw = rec["requested_rewrite"]
        rw["target_new"]["str"] = rw["target_true"]["str"]
        return "reject", "requested_rewrite.target_new.str"
    if kind == "dup":
        other = rng.choice([r for i, r in enumerate(records) if i != t])
        rec["case_id"] = other["case_id"]
        return "reject", "case_id"
    if kind == "extra":
        rec[rng.choice(["comment", "requested_rewrite_note", "x"])] = rng.choice([None, 1, "text", [1, 2]])
        want = copy.deepcopy(rec)
        return "accept", lambda reqs: reqs[t].prompt == want["requested_rewrite"]["prompt"]
    if kind == "pad":
        target = rec["requested_rewrite"]["target_new"]
        bare = target["str"]
        target["str"] = "  " + bare + "\t"
        return "accept", lambda reqs: reqs[t].target_new == bare
    if kind == "not_obj":
        records[t] = rng.choice(["a string", 7, None, ["list"]])
        return "reject", None  # no case id, no field: the message names the record's position
    # int_id: an integer case id is valid and becomes its string form
    rec["case_id"] = 900000 + t
    return "accept", lambda reqs: reqs[t].case_id == str(900000 + t)


def valid_request(req) -> bool:
    strings = [req.prompt, req.subject, req.target_new, req.target_true, *req.paraphrase_prompts]
    return req.prompt.count("{}") == 1 and all(isinstance(s, str) and s.strip() for s in strings)


@pytest.fixture(scope="module")
def base_records() -> list[dict]:
    return read_records("demo")[:4]


@pytest.mark.parametrize("case", range(N_CASES - N_RAW))
def test_structured_corruption(case, base_records, tmp_path):
    rng = random.Random(case)
    records = copy.deepcopy(base_records)
    t = rng.randrange(len(records))
    case_id = records[t]["case_id"]
    outcome, expect = mutate(rng, records, t)
    path = tmp_path / "data.json"
    text = json.dumps(records)
    path.write_text(text)
    if outcome == "reject":
        with pytest.raises(DataError) as info:
            load_requests(str(path))
        msg = str(info.value)
        if expect is None:
            assert f"record {t} of {path}" in msg, msg
        elif expect == "case_id" or (isinstance(records[t], dict) and records[t].get("case_id") != case_id):
            assert f"record {t}" in msg and "'case_id'" in msg, msg
        else:
            assert f"case {case_id}" in msg and f"record {t}" in msg, msg
            # The field, or for a lost top-level object on the first record the format it implies.
            assert f"'{expect}'" in msg or (expect == "requested_rewrite" and "requested_rewrite" in msg), msg
    else:
        reqs = load_requests(str(path))
        assert len(reqs) == len(records) and expect(reqs)
        assert all(valid_request(r) for r in reqs)
        assert len({r.case_id for r in reqs}) == len(reqs)
    assert path.read_text() == text  # the data layer never writes


@pytest.mark.parametrize("case", range(N_RAW))
def test_raw_byte_corruption(case, base_records, tmp_path):
    rng = random.Random(10_000 + case)
    name = rng.choice(["data.json", "data.jsonl"])
    lines = name.endswith(".jsonl")
    text = "\n".join(json.dumps(r) for r in base_records) if lines else json.dumps(base_records, indent=1)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text))
        op = rng.choice(["delete", "insert", "truncate"])
        if op == "delete":
            text = text[:i] + text[i + 1 :]
        elif op == "insert":
            text = text[:i] + rng.choice('{}[]",:\\x0 ') + text[i:]
        else:
            text = text[: max(i, 1)]
    path = tmp_path / name
    path.write_text(text)
    try:
        reqs = load_requests(str(path))
    except DataError as err:
        assert str(path) in str(err)
    else:
        # Survived parsing: every request is complete and consistent, ids unique.
        assert all(valid_request(r) for r in reqs), [asdict(r) for r in reqs]
        assert len({r.case_id for r in reqs}) == len(reqs)
