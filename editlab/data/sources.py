"""Read edit records (CounterFact, zsRE, the bundled demo) and turn them into EditRequests.

Everything here validates eagerly: a bad record must fail before any model is loaded, with a
message naming the case id, the record position in the file and the offending field, so the
user can fix the data file instead of debugging a shape error deep inside an edit method.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol

from editlab.errors import UserError
from editlab.types import EditRequest

Format = Literal["auto", "counterfact", "zsre"]
FORMATS: tuple[str, ...] = ("auto", "counterfact", "zsre")

DEMO = "demo"
_DEMO_FILE = "demo_facts.json"
# owner/name, as the hub spells dataset ids; only tried when no local file has that path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LIST_FIELDS = ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts", "attribute_prompts")
# MEMIT's zsRE loader (dsets/zsre.py) asks the neighbourhood question as `loc + "?"`: the records'
# "nq question: ..." strings carry no question mark, and the mark changes the next-token logits.
ZSRE_LOC_SUFFIX = "?"


class DataError(UserError, ValueError):
    """A data file or record is unusable; the message names the file, record and field."""


# --------------------------------------------------------------------------------------------
# Reading files


def read_records(path: str, split: str = "train") -> list[dict]:
    """Return the records of ``path`` as a list of dicts.

    ``path`` is ``"demo"`` (the bundled demo facts), a local ``.json`` / ``.json.gz`` file
    holding a list of objects, a ``.jsonl`` / ``.jsonl.gz`` file with one object per line, or,
    when no such local file exists, a hub dataset id ``owner/name`` loaded with ``split``.
    """
    if path == DEMO and not os.path.exists(path):
        resource = importlib.resources.files("editlab.data").joinpath(_DEMO_FILE)
        if not resource.is_file():
            raise DataError(f"the bundled demo data editlab/data/{_DEMO_FILE} is missing from the package")
        return _parse_json_list(resource.read_bytes(), _DEMO_FILE)
    if os.path.isfile(path):
        return parse_records(_read_bytes(path), path)
    if os.path.exists(path):
        raise DataError(f"{path}: is not a regular file")
    if _HUB_ID.match(path):
        return _load_hub(path, split)
    raise DataError(f"{path}: no such file (and not a hub dataset id of the form owner/name)")


def parse_records(data: bytes, name: str, encoding: str = "utf-8-sig") -> list:
    """The records in a file's (decompressed) bytes: one per line of a ``.jsonl`` file, else the
    JSON list the file holds. ``name`` (a path, ``.gz`` or not) picks the format and names the file
    in errors. Record files are read as ``utf-8-sig`` (a BOM tolerated); the statistics' corpus
    files (editlab.data.corpus) as plain ``utf-8``, as they always were (their texts, hence the
    statistics, must not change)."""
    if _strip_gz(name).endswith(".jsonl"):
        return _parse_jsonl(data, name, encoding)
    return _parse_json_list(data, name, encoding)


def _strip_gz(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read: {e}") from e


def _decode(data: bytes, name: str, encoding: str = "utf-8-sig") -> str:
    try:
        return data.decode(encoding)  # -sig: tolerate a BOM written by some editors
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start}): {e.reason}") from e


def _parse_json_list(data: bytes, name: str, encoding: str = "utf-8-sig") -> list[dict]:
    text = _decode(data, name, encoding)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(obj, list):
        raise DataError(f"{name}: top level is a JSON {_json_type(obj)}, expected a list of records")
    return obj


def _parse_jsonl(data: bytes, name: str, encoding: str = "utf-8-sig") -> list[dict]:
    records = []
    for lineno, line in enumerate(_decode(data, name, encoding).splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no record
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: invalid JSON at line {lineno}, column {e.colno}: {e.msg}") from e
    return records


def _load_hub(path: str, split: str) -> list[dict]:
    # Imported lazily: `datasets` is slow to import and only needed for hub ids.
    import datasets

    ds = datasets.load_dataset(path, split=split)
    return [dict(row) for row in ds]


# --------------------------------------------------------------------------------------------
# Field validation helpers


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages a data author understands."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _a(value: Any) -> str:
    """The JSON type with its article: "null", "a string", "an object"."""
    name = _json_type(value)
    return name if name == "null" else ("an " if name[0] in "aeiou" else "a ") + name


def _fail(where: str, field: str, problem: str) -> DataError:
    return DataError(f"{where}: field '{field}' {problem}")


def _get(obj: dict, key: str, where: str, field: str) -> Any:
    if key not in obj:
        raise _fail(where, field, "is missing")
    return obj[key]


def _object(obj: dict, key: str, where: str, field: str) -> dict:
    value = _get(obj, key, where, field)
    if not isinstance(value, dict):
        raise _fail(where, field, f"is {_a(value)}, expected an object")
    return value


def _check_str(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, field, f"is {_a(value)}, expected a string")
    if not value.strip():
        raise _fail(where, field, "is empty")
    return value


def _str(obj: dict, key: str, where: str, field: str) -> str:
    return _check_str(_get(obj, key, where, field), where, field)


def _str_list(obj: dict, key: str, where: str, field: str, required: bool = False) -> list[str]:
    if key not in obj and not required:
        return []
    value = _get(obj, key, where, field)
    # A bare string is iterable too: reject it explicitly instead of splitting it into chars.
    if not isinstance(value, list):
        raise _fail(where, field, f"is {_a(value)}, expected a list of strings")
    return [_check_str(item, where, f"{field}[{i}]") for i, item in enumerate(value)]


def _check_template(prompt: str, where: str, field: str) -> str:
    count = prompt.count("{}")
    if count != 1:
        raise _fail(where, field, f"must contain '{{}}' exactly once, found {count}: {prompt!r}")
    # Any other brace would make prompt.format(subject) raise later, inside the model code.
    if "{" in prompt.replace("{}", "") or "}" in prompt.replace("{}", ""):
        raise _fail(where, field, f"has a brace other than the one '{{}}': {prompt!r}")
    return prompt


def _case_id(rec: dict, where: str, default: str | None = None) -> str:
    if "case_id" not in rec:
        if default is None:
            raise _fail(where, "case_id", "is missing")
        return default
    value = rec["case_id"]
    # bool is an int subclass, and a float id would print as "3.0": both are data mistakes.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _fail(where, "case_id", f"is {_a(value)}, expected an integer or a string")
    if isinstance(value, str) and not value.strip():
        raise _fail(where, "case_id", "is empty")
    return str(value)


def _optional_id(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------
# Record converters


def counterfact_request(rec: dict, where: str) -> EditRequest:
    """Convert one MEMIT-format CounterFact record; ``where`` is e.g. ``"record 3 of f.json"``."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: is {_a(rec)}, expected an object")
    case = _case_id(rec, where)
    at = f"case {case} ({where})"
    rw = _object(rec, "requested_rewrite", at, "requested_rewrite")
    prompt = _check_template(_str(rw, "prompt", at, "requested_rewrite.prompt"), at, "requested_rewrite.prompt")
    subject = _str(rw, "subject", at, "requested_rewrite.subject")
    targets = {}
    for key in ("target_new", "target_true"):
        target = _object(rw, key, at, f"requested_rewrite.{key}")
        # Stored bare: the separating space is added when the answer is appended to a prompt.
        targets[key] = _str(target, "str", at, f"requested_rewrite.{key}.str").strip()
    if targets["target_new"] == targets["target_true"]:
        raise _fail(
            at,
            "requested_rewrite.target_new.str",
            f"equals 'requested_rewrite.target_true.str' ({targets['target_new']!r}): the edit changes nothing",
        )
    lists = {key: _str_list(rec, key, at, key) for key in _LIST_FIELDS}
    return EditRequest(
        case_id=case,
        prompt=prompt,
        subject=subject,
        target_new=targets["target_new"],
        target_true=targets["target_true"],
        source="counterfact",
        # Optional ids: the consistency metric looks up reference snippets by them.
        relation_id=_optional_id(rw.get("relation_id")),
        target_new_id=_optional_id(rw["target_new"].get("id")),
        **lists,
    )


def zsre_request(rec: dict, where: str, index: int | None = None, loc_suffix: str = ZSRE_LOC_SUFFIX) -> EditRequest:
    """Convert one zsRE record (``subject, src, alt, answers, rephrase, loc, loc_ans``).

    zsRE records carry no id: ``case_id`` is used when present, else ``index`` (the record's
    position in the file, so ids stay stable whatever ``offset`` selects).

    Mapping, as MEMIT's zsRE loader (the one ECE, NSE and AlphaEdit report with): prompt = ``src``
    with the first occurrence of the subject replaced by ``{}``; target_new = ``answers[0]``;
    target_true = None (zsRE is scored by top-1 token accuracy, with no competing answer; ``alt``
    is empty in 75 of the shipped records); paraphrase = ``rephrase``; neighbourhood prompt =
    ``loc + loc_suffix`` (``loc + "?"`` there; ``loc_suffix=""`` gives editlab's earlier bare
    ``loc``), answer = ``loc_ans``. Answers are tokenised after a space, as there
    (``tok(" " + answer)``), but without the tokenizer's BOS (see ``answer_ids``).
    """
    if not isinstance(rec, dict):
        raise DataError(f"{where}: is {_a(rec)}, expected an object")
    case = _case_id(rec, where, default=None if index is None else str(index))
    at = f"case {case} ({where})"
    subject = _str(rec, "subject", at, "subject")
    src = _str(rec, "src", at, "src")
    if subject not in src:
        raise DataError(f"{at}: subject {subject!r} does not occur in field 'src' ({src!r})")
    prompt = _check_template(src.replace(subject, "{}", 1), at, "src")
    answers = _str_list(rec, "answers", at, "answers", required=True)
    if not answers:
        raise _fail(at, "answers", "is an empty list")
    return EditRequest(
        case_id=case,
        prompt=prompt,
        subject=subject,
        target_new=answers[0].strip(),
        target_true=None,
        paraphrase_prompts=[_str(rec, "rephrase", at, "rephrase")],
        neighborhood_prompts=[_str(rec, "loc", at, "loc") + loc_suffix],
        neighborhood_answer=_str(rec, "loc_ans", at, "loc_ans").strip(),
        source="zsre",
    )


def detect_format(rec: Any, where: str = "record") -> Literal["counterfact", "zsre"]:
    """Tell CounterFact from zsRE by the keys of one record."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: is {_a(rec)}, expected an object")
    if "requested_rewrite" in rec:
        return "counterfact"
    if "src" in rec or "alt" in rec:
        return "zsre"
    # A CounterFact record that lost 'requested_rewrite' still has its prompt lists: call it
    # CounterFact so the converter reports the missing field rather than an unknown format.
    if any(key in rec for key in _LIST_FIELDS):
        return "counterfact"
    at = f"case {rec['case_id']} ({where})" if isinstance(rec.get("case_id"), (int, str)) else where
    raise DataError(
        f"{at}: unknown record format (keys {sorted(rec)}); expected CounterFact "
        "(field 'requested_rewrite', ...) or zsRE (fields 'src', 'alt', ...)"
    )


def convert_records(
    records: Sequence[Any],
    name: str,
    format: Format = "auto",
    first_index: int = 0,
    source: str | None = None,
) -> list[EditRequest]:
    """Convert and validate ``records`` (the file's records from ``first_index`` on).

    ``name`` names the file in messages; ``source`` overrides ``EditRequest.source``.
    """
    if format not in FORMATS:
        raise ValueError(f"option format={format!r} is not one of {list(FORMATS)}")
    if not records:
        return []
    # One format per file: detected from the first record, so a stray record of another
    # format fails on its missing fields instead of being silently read differently.
    fmt = format if format != "auto" else detect_format(records[0], f"record {first_index} of {name}")
    requests: list[EditRequest] = []
    seen: dict[str, int] = {}
    for offset, rec in enumerate(records):
        index = first_index + offset
        where = f"record {index} of {name}"
        req = counterfact_request(rec, where) if fmt == "counterfact" else zsre_request(rec, where, index)
        if req.case_id in seen:
            raise DataError(
                f"case {req.case_id} ({where}): field 'case_id' duplicates record {seen[req.case_id]} of {name}"
            )
        seen[req.case_id] = index
        if source is not None:
            req.source = source
        requests.append(req)
    return requests


def load_requests(
    path: str,
    format: Format = "auto",
    num_edits: int | None = None,
    offset: int = 0,
    split: str = "train",
) -> list[EditRequest]:
    """Read ``path`` and return ``num_edits`` validated requests starting at record ``offset``.

    Records are taken in file order (deterministic: no shuffling). All selected records are
    validated before returning; any problem raises :class:`DataError`.
    """
    if offset < 0:
        raise ValueError(f"option offset={offset} must be >= 0")
    if num_edits is not None and num_edits < 1:
        raise ValueError(f"option num_edits={num_edits} must be >= 1")
    records = read_records(path, split=split)
    is_demo = path == DEMO and not os.path.exists(path)  # same rule as read_records
    name = _DEMO_FILE if is_demo else path
    available = len(records) - offset
    if available <= 0:
        raise DataError(f"{name}: offset {offset} leaves no records (the file has {len(records)})")
    if num_edits is not None and num_edits > available:
        raise DataError(
            f"{name}: num_edits={num_edits} but only {available} records are available "
            f"from offset {offset} (the file has {len(records)})"
        )
    end = len(records) if num_edits is None else offset + num_edits
    source = "demo" if is_demo else None
    return convert_records(records[offset:end], name, format, first_index=offset, source=source)


# --------------------------------------------------------------------------------------------
# Tokenizer checks


class _Tokenizer(Protocol):
    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...


def _token_count(tok: _Tokenizer, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def check_tokenization(requests: Iterable[EditRequest], tok: _Tokenizer) -> None:
    """Fail if an answer or subject would contribute no tokens with ``tok``.

    Answers are tokenised as they are used, appended after a space; an answer with no tokens
    would give an empty loss target, a subject with no tokens no position to edit at.
    """
    for req in requests:
        answers = {"target_new": req.target_new, "target_true": req.target_true}
        answers["neighborhood_answer"] = req.neighborhood_answer
        for field, text in answers.items():
            if text is not None and _token_count(tok, " " + text) == 0:
                raise DataError(f"case {req.case_id}: field '{field}' ({text!r}) tokenises to nothing")
        if _token_count(tok, req.subject) == 0:
            raise DataError(f"case {req.case_id}: field 'subject' ({req.subject!r}) tokenises to nothing")
