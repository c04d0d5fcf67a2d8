"""Plain data types shared by every stage, and the protocol of a unit of work's kept parts.

Dataclasses are plain (not frozen): Lightning's batch-transfer utilities rebuild dataclasses
field by field, which fails on frozen ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class EditRequest:
    """One fact to write into the model.

    ``prompt`` holds ``{}`` where the subject goes; ``target_new`` / ``target_true`` are the
    bare answer strings (no leading space: the space is added when the answer is appended to a
    prompt, see :func:`editlab.editing.tokens.answer_text`).
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    # Expected answer on the neighbourhood prompts; None means target_true (CounterFact).
    neighborhood_answer: str | None = None
    generation_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    source: str = ""
    relation_id: str | None = None
    target_new_id: str | None = None

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)

    @property
    def locality_answer(self) -> str | None:
        return self.neighborhood_answer if self.neighborhood_answer is not None else self.target_true


class EditBatch(list):
    """The requests of one edit step (a list subclass so Lightning leaves it alone)."""


@dataclass
class EditResult:
    """What one method application reports.

    ``scalars`` are logged per step; ``details`` (JSON-able: lists, dicts) go into steps.jsonl;
    ``per_request[case_id]`` (JSON-able) goes into that case's line of cases.jsonl under "edit".
    """

    scalars: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    per_request: dict[str, dict[str, Any]] = field(default_factory=dict)


class Parts(Protocol):
    """The finished parts of one unit of work, by name: what a unit killed part-way keeps for its
    second attempt (an evaluation point's cases, generations, perplexity and probe scores; an edit
    step's z, chunk by chunk). editlab.lightning.parts keeps them in the run directory."""

    def get(self, name: str) -> Any | None: ...

    def put(self, name: str, value: Any) -> None: ...


def through_parts(parts: Parts | None, name: str, compute: Callable[[], Any]) -> Any:
    """``name``'s value from ``parts`` when it holds it, else computed and handed to ``parts``."""
    if parts is None:
        return compute()
    value = parts.get(name)
    if value is None:
        value = compute()
        parts.put(name, value)
    return value
