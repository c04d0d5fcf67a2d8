"""General-ability probes: zero-shot classification accuracy of the (edited) model on GLUE-style tasks.

Editing papers (ECE §4.5, EAC §6) check that a stream of edits keeps the model's general abilities by
measuring SST-2, RTE, MRPC, CoLA, MMLU and MNLI accuracy every N edit steps. A probe task is a prompt
template plus one label word per class; the model's prediction for an example is the label word with
the highest mean token log-probability after the prompt (teacher forced, so multi-token label words
work), which is the usual zero-shot "choice scoring" of lm-evaluation-harness.

All (example, label word) pairs of a task are scored in one batched pass through
:func:`editlab.metrics.functional.score_answers`, the scorer the editing metrics use, so a probe and an
edit metric can never disagree on how an answer is tokenised or scored.

Examples come from the hub (``datasets``, imported only on that path), from a local ``.json`` /
``.jsonl`` file (or a directory of ``{task}.json`` files) in the hub's field layout, or from the small
hand-written samples bundled in ``editlab/data/probes/``. Every example is validated before any model
is touched; an error names the task, the example index and the field.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import random
import re
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from editlab.data.sources import read_records
from editlab.editing.prompts import check_context_length
from editlab.metrics.functional import score_answers
from editlab.models.arch import ModelView

TaskName = Literal["sst2", "rte", "mrpc", "cola", "mmlu", "nli"]
TASKS: tuple[str, ...] = get_args(TaskName)
HUB, SAMPLE = "hub", "sample"
METRIC_PREFIX = "probe/"
LABEL = "label"  # the key holding the class index in a ProbeTask example

_FORMATTER = string.Formatter()


# --------------------------------------------------------------------------------------------
# Task interface


def template_fields(template: str) -> list[str]:
    """The replacement fields of ``template`` as written (``"choices[0]"``), in order, without repeats."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as e:  # unbalanced braces
        raise ValueError(f"probe template {template!r} is not a valid format string: {e}") from e
    names: list[str] = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name[0].isdigit():
            # Positional fields would be filled from nothing: examples are dicts of named fields.
            raise ValueError(f"probe template {template!r}: use named fields ({{sentence}}), not {{{name}}}")
        if name not in names:
            names.append(name)
    return names


def field_root(name: str) -> str:
    """The example key a template field reads: ``"choices[0]"`` -> ``"choices"``."""
    return re.split(r"[.\[]", name, maxsplit=1)[0]


def _where(task: str, index: int, origin: str = "") -> str:
    return f"probe task {task!r}{f' ({origin})' if origin else ''}, example {index}"


def check_example(task: str, template: str, n_labels: int, example: Any, index: int, origin: str = "") -> None:
    """Raise ValueError naming task, example index and field unless ``example`` fills ``template`` and
    carries an integer ``label`` in ``[0, n_labels)``."""
    where = _where(task, index, origin)
    if not isinstance(example, dict):
        raise ValueError(f"{where}: is a {type(example).__name__}, expected an object of named fields")
    for name in template_fields(template):
        root = field_root(name)
        if root not in example:
            raise ValueError(f"{where}: missing field {root!r} (the template uses {{{name}}})")
        try:
            value, _ = _FORMATTER.get_field(name, (), example)
        except (LookupError, AttributeError, TypeError) as e:
            raise ValueError(f"{where}: field {name!r} cannot be read from {example[root]!r}: {e}") from e
        # bool is an int subclass; None/lists would silently format as "None" / "[...]".
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: field {name!r} is a {type(value).__name__} ({value!r}), expected text")
    if LABEL not in example:
        raise ValueError(f"{where}: missing field {LABEL!r}")
    label = example[LABEL]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_labels:
        raise ValueError(f"{where}: field {LABEL!r} is {label!r}, expected an integer in [0, {n_labels - 1}]")


@dataclass
class ProbeTask:
    """A zero-shot classification task: ``template.format(**example)`` is the prompt, ``label_words[i]``
    the answer standing for class ``i``, and ``example["label"]`` the true class."""

    name: str
    template: str  # named fields, e.g. "Review: {sentence}\nSentiment:"
    label_words: list[str]  # index = label id; scored as " " + word
    examples: list[dict]  # template fields + "label": int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"probe task name must be a non-empty string, got {self.name!r}")
        fields = template_fields(self.template)
        if not fields:
            raise ValueError(f"probe task {self.name!r}: template {self.template!r} has no field: every prompt alike")
        if LABEL in map(field_root, fields):
            raise ValueError(f"probe task {self.name!r}: the template must not show the answer field {LABEL!r}")
        if self.template != self.template.rstrip():
            # The scorer appends " " + word; a trailing space/newline would put two separators there.
            raise ValueError(f"probe task {self.name!r}: template must not end with whitespace: {self.template!r}")
        self.label_words = list(self.label_words)
        words = self.label_words
        if len(words) < 2 or any(not isinstance(w, str) or not w or w != w.strip() for w in words):
            raise ValueError(
                f"probe task {self.name!r}: label_words must be >= 2 non-empty strings without surrounding "
                f"whitespace, got {words!r}"
            )
        if len(set(words)) != len(words):
            raise ValueError(f"probe task {self.name!r}: label_words repeat: {words!r}")
        if not self.examples:
            raise ValueError(f"probe task {self.name!r} has no examples")
        for i, example in enumerate(self.examples):
            check_example(self.name, self.template, len(words), example, i)

    def prompt(self, example: dict) -> str:
        return self.template.format(**example)

    @property
    def labels(self) -> list[int]:
        return [example[LABEL] for example in self.examples]


# --------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ProbeResult:
    """Per-example outcome of one probe task."""

    task: str
    labels: list[int]
    predictions: list[int]
    logprobs: torch.Tensor  # [N, L] mean token log-prob of each label word after each prompt

    @property
    def accuracy(self) -> float:
        return sum(p == y for p, y in zip(self.predictions, self.labels, strict=True)) / len(self.labels)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Score in eval mode (dropout off) and give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def label_logprobs(model: torch.nn.Module, tok, task: ProbeTask, batch_size: int = 16) -> torch.Tensor:
    """[N, L] mean token log-prob of ``" " + label_words[l]`` after the prompt of example ``n``."""
    n, k = len(task.examples), len(task.label_words)
    prompts = [task.prompt(example) for example in task.examples]
    # A prompt past the context would fail as an index error deep inside the embedding.
    lengths = [len(tok(prompt)["input_ids"]) for prompt in prompts]  # [N]
    longest = max(range(n), key=lengths.__getitem__)
    word_len = max(len(tok(" " + word, add_special_tokens=False)["input_ids"]) for word in task.label_words)
    what = f"probe task {task.name!r}, example {longest} with its longest label word"
    check_context_length(model.config, lengths[longest] + word_len - 1, what)
    # Example-major flattening: pair (n, l) sits at row n * k + l, so .view(n, k) undoes it.
    pair_prompts = [p for p in prompts for _ in range(k)]  # [N*L]
    pair_answers = task.label_words * n  # [N*L]
    with eval_mode(model):
        nll = score_answers(ModelView.of(model), tok, pair_prompts, pair_answers, batch_size)["nll"]  # [N*L]
    return -nll.view(n, k)


def probe_details(model: torch.nn.Module, tok, task: ProbeTask, batch_size: int = 16) -> ProbeResult:
    """Predictions (argmax over label words of the mean token log-prob) and scores of every example."""
    logprobs = label_logprobs(model, tok, task, batch_size)  # [N, L]
    # argmax takes the first of tied words; ties need identical scores, i.e. practically never.
    predictions = logprobs.argmax(dim=1).tolist()  # [N]
    return ProbeResult(task.name, task.labels, predictions, logprobs)


def probe_accuracy(model: torch.nn.Module, tok, task: ProbeTask, batch_size: int = 16) -> float:
    """Fraction of examples whose highest-scoring label word is the true label's."""
    return probe_details(model, tok, task, batch_size).accuracy


def metric_name(task: str) -> str:
    return f"{METRIC_PREFIX}{task}_accuracy"


def run_probes(model: torch.nn.Module, tok, tasks: Sequence[ProbeTask], batch_size: int = 16) -> dict[str, float]:
    """``{"probe/<task>_accuracy": accuracy}`` for every task."""
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"probe task names repeat ({names}): their metrics would overwrite each other")
    return {metric_name(task.name): probe_accuracy(model, tok, task, batch_size) for task in tasks}


# --------------------------------------------------------------------------------------------
# Built-in tasks and loaders


def _mmlu_fields(example: dict, where: str) -> dict:
    choices = example["choices"]
    if not isinstance(choices, list) or len(choices) != 4:
        raise ValueError(f"{where}: field 'choices' must be a list of 4 answers, got {choices!r}")
    subject = example["subject"]
    # cais/mmlu spells subjects as identifiers ("high_school_biology"); the prompt reads them as words.
    return {**example, "subject": subject.replace("_", " ") if isinstance(subject, str) else subject}


@dataclass(frozen=True)
class TaskSpec:
    """How to build one built-in task from rows in the hub's field layout."""

    template: str
    label_words: tuple[str, ...]
    hub: tuple[str, str, str]  # datasets.load_dataset(path, config, split=split)
    label_field: str = "label"  # the row key holding the class index
    prepare: Callable[[dict, str], dict] | None = None  # row fields -> template fields; may raise

    @property
    def fields(self) -> list[str]:
        return [field_root(name) for name in template_fields(self.template)]


# Prompt formats of lm-evaluation-harness (glue/*, mmlu); label id order is the datasets' ClassLabel order.
_MMLU_TEMPLATE = (
    "The following are multiple choice questions (with answers) about {subject}.\n\n"
    "{question}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:"
)
SPECS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:",
        ("negative", "positive"),
        ("nyu-mll/glue", "sst2", "validation"),
    ),
    "rte": TaskSpec(  # 0 entailment, 1 not_entailment
        "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:",
        ("True", "False"),
        ("nyu-mll/glue", "rte", "validation"),
    ),
    "mrpc": TaskSpec(  # 0 not_equivalent, 1 equivalent
        "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
        ("no", "yes"),
        ("nyu-mll/glue", "mrpc", "validation"),
    ),
    "cola": TaskSpec(  # 0 unacceptable, 1 acceptable
        "{sentence}\nQuestion: Does this sentence make sense?\nAnswer:",
        ("no", "yes"),
        ("nyu-mll/glue", "cola", "validation"),
    ),
    "nli": TaskSpec(  # 0 entailment, 1 neutral, 2 contradiction
        "{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:",
        ("True", "Neither", "False"),
        ("nyu-mll/glue", "mnli", "validation_matched"),
    ),
    "mmlu": TaskSpec(
        _MMLU_TEMPLATE,
        ("A", "B", "C", "D"),
        ("cais/mmlu", "all", "validation"),
        label_field="answer",
        prepare=_mmlu_fields,
    ),
}
assert set(SPECS) == set(TASKS), "every TaskName needs a TaskSpec"


def task_spec(name: str) -> TaskSpec:
    if name not in SPECS:
        raise ValueError(f"unknown probe task {name!r}; known: {list(TASKS)}")
    return SPECS[name]


def example_from_row(name: str, spec: TaskSpec, row: Any, index: int, origin: str = "") -> dict:
    """The template fields and integer label of one row in the hub's layout (validated)."""
    where = _where(name, index, origin)
    if not isinstance(row, dict):
        raise ValueError(f"{where}: is a {type(row).__name__}, expected an object with fields {spec.fields}")
    for key in [*spec.fields, spec.label_field]:
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    example = {key: row[key] for key in spec.fields}
    label = row[spec.label_field]
    if isinstance(label, str) and label in spec.label_words:
        label = spec.label_words.index(label)  # local files may spell the class ("B" for MMLU)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(spec.label_words):
        hint = " (-1 marks an unlabelled test split; use validation)" if label == -1 else ""
        raise ValueError(
            f"{where}: field {spec.label_field!r} is {label!r}, expected an integer in "
            f"[0, {len(spec.label_words) - 1}] or one of {list(spec.label_words)}{hint}"
        )
    example[LABEL] = label
    if spec.prepare is not None:
        example = spec.prepare(example, where)
    check_example(name, spec.template, len(spec.label_words), example, index, origin)
    return example


def seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``seed``; a shorter take is a prefix of a longer one."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def local_file(name: str, source: str) -> str:
    """The data file of task ``name`` in ``source``: the file itself, or ``{name}.json[l]`` in a directory."""
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        found = [p for p in (os.path.join(source, f"{name}.{ext}") for ext in ("json", "jsonl")) if os.path.isfile(p)]
        if len(found) != 1:
            what = "both" if found else "neither"
            raise ValueError(f"probe task {name!r}: directory {source} holds {what} of {name}.json / {name}.jsonl")
        return found[0]
    raise ValueError(f"probe task {name!r}: source {source!r} is not {HUB!r}, {SAMPLE!r}, a file or a directory")


def _sample_rows(name: str) -> tuple[list, str]:
    resource = importlib.resources.files("editlab.data.probes").joinpath(f"{name}.json")
    if not resource.is_file():
        raise ValueError(f"probe task {name!r}: the bundled sample editlab/data/probes/{name}.json is missing")
    with importlib.resources.as_file(resource) as path:
        return read_records(str(path)), f"sample {name}.json"


def _hub_rows(spec: TaskSpec) -> tuple[Sequence, str]:
    # Imported lazily: `datasets` is slow to import and only the hub path needs it.
    import datasets

    path, config, split = spec.hub
    # Rows are read by index, so only the selected ones are materialised (MNLI has ~10k).
    return datasets.load_dataset(path, config, split=split), f"{path}/{config}:{split}"


def load_task(name: TaskName, source: str = HUB, num_examples: int = 100, seed: int = 0) -> ProbeTask:
    """A built-in task with the first ``num_examples`` examples (all, if fewer) after a seeded shuffle.

    ``source``: ``"hub"`` (``datasets.load_dataset``, GLUE validation / MMLU validation), ``"sample"``
    (the bundled 12-20 examples) or a local ``.json`` / ``.jsonl`` file, or directory of
    ``{name}.json[l]`` files, holding rows in the hub's field layout. Local and sample rows are all
    validated; hub rows only where selected.
    """
    spec = task_spec(name)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"probe task {name!r}: num_examples must be a positive integer, got {num_examples!r}")
    if source == HUB:
        rows, origin = _hub_rows(spec)
    elif source == SAMPLE:
        rows, origin = _sample_rows(name)
    else:
        path = local_file(name, source)
        rows, origin = read_records(path), path
    if len(rows) == 0:
        raise ValueError(f"probe task {name!r} ({origin}): no examples")
    order = seeded_order(len(rows), seed)[:num_examples]
    # Small local files are checked whole so a bad row fails now, not when another seed picks it.
    checked = order if source == HUB else range(len(rows))
    examples = {i: example_from_row(name, spec, rows[i], i, origin) for i in checked}
    return ProbeTask(name, spec.template, list(spec.label_words), [examples[i] for i in order])


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ProbeConfig:
    """Which probes to run and when. No tasks = probing off.

    ``every_n_steps``: also probe after every N-th edit step; 0 = only before and after the stream.
    """

    tasks: list[str] = field(default_factory=list)
    source: str = SAMPLE
    num_examples: int = 100
    every_n_steps: int = 0
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not isinstance(self.tasks, (list, tuple)):
            raise ValueError(f"probes.tasks must be a list of task names, got {self.tasks!r}")
        self.tasks = list(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"probes.tasks: unknown task(s) {unknown}; known: {list(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"probes.tasks repeats a task: {self.tasks}")
        for option in ("num_examples", "batch_size"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"probes.{option} must be a positive integer, got {value!r}")
        if isinstance(self.every_n_steps, bool) or not isinstance(self.every_n_steps, int) or self.every_n_steps < 0:
            raise ValueError(f"probes.every_n_steps must be an integer >= 0, got {self.every_n_steps!r}")
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"probes.source must be {HUB!r}, {SAMPLE!r} or a path, got {self.source!r}")
        if self.source not in (HUB, SAMPLE):
            for name in self.tasks:  # a missing local file fails here, before any model is loaded
                local_file(name, self.source)

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def due(self, steps_done: int) -> bool:
        """Whether to probe after ``steps_done`` edit steps (the before/after probes are always due)."""
        return self.enabled and self.every_n_steps > 0 and steps_done > 0 and steps_done % self.every_n_steps == 0

    def load(self) -> list[ProbeTask]:
        return [load_task(name, self.source, self.num_examples, self.seed) for name in self.tasks]
