"""General-ability probes: zero-shot classification scores of the (edited) model on GLUE-style tasks.

Editing papers (ECE §4.5, EAC §6, AlphaEdit, NSE) check that a stream of edits keeps the model's
general abilities by scoring SST-2, MRPC, CoLA, RTE, MMLU and NLI every N edit steps. A probe task
is a prompt template plus one label word per class; the model's prediction for an example is the
label word with the highest mean token log-probability after the prompt (teacher forced, so
multi-token label words work). This is the rule of the seeds' ``glue_eval/*_eval.py``
(their ``predictions_new``), and the usual zero-shot "choice scoring" of lm-evaluation-harness.

All (example, label word) pairs of a task are scored in batches (:func:`choice_logprobs`): one row
per prompt serves every single-token label word, rows sorted by length; the prompt and answer
tokens are built as :func:`editlab.models.scoring.score_answers` builds them, so a probe and an
edit metric can never disagree on how an answer is tokenised.

Two families of tasks:

* ``source: seeds`` reads the seeds' own probe sets (``glue_eval/dataset/*.pkl`` of the AlphaEdit /
  NSE code, as JSON in ``probes.seeds_dir``) with the seeds' prompts, label words and label
  mapping: sst2, mrpc, cola, rte, mmlu, nli, sentiment_analysis, dialogue
  (:data:`SEED_SPECS`). Scores: accuracy and the reference's weighted F1 for every task, MCC for
  CoLA.
* ``source: hub | sample | <path>`` builds lm-evaluation-harness-style prompts (:data:`SPECS`) over
  rows in the hub's field layout: from the hub (``datasets``, imported only on that path), a local
  ``.json`` / ``.jsonl`` file (or a directory of ``{task}.json`` files), or the small hand-written
  samples bundled in ``editlab/data/probes/``. Score: accuracy.

Every example is validated before any model is touched; an error names the task, the example
index and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.resources
import json
import os
import random
import re
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from editlab.data.sources import DataError, read_records
from editlab.keyed_cache import KeyedCache
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.prompts import answer_ids, check_context_length, pad
from editlab.models.scoring import token_nll_and_hits

TaskName = Literal["sst2", "rte", "mrpc", "cola", "mmlu", "nli"]
TASKS: tuple[str, ...] = get_args(TaskName)
SeedTaskName = Literal["sst2", "mrpc", "cola", "rte", "mmlu", "nli", "sentiment_analysis", "dialogue"]
SEED_TASKS: tuple[str, ...] = get_args(SeedTaskName)
HUB, SAMPLE, SEEDS = "hub", "sample", "seeds"
SEEDS_DIR = "../shared/data/probes"  # beside the project, as the configs' other data paths
METRIC_PREFIX = "probe/"
LABEL = "label"  # the key holding the class index in a ProbeTask example
NO_ANSWER = -1  # the prediction when no label word scores strictly highest (ties_invalid tasks)

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


def check_record(where: str, row: Any, fields, label_field: str, error: type[ValueError]) -> None:
    """Raise ``error`` naming the record unless ``row`` is an object holding ``fields`` and the label."""
    if not isinstance(row, dict):
        raise error(f"{where}: is a {type(row).__name__}, expected an object with fields {fields}")
    for key in [*fields, label_field]:
        if key not in row:
            raise error(f"{where}: missing field {key!r}")


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
    scores: tuple[str, ...] = ("accuracy",)  # reported, each a key of SCORES
    # A tie for the best label word is no answer (NO_ANSWER, counted wrong): the seeds' 4-choice
    # rule. Otherwise the first of the tied words wins (argmax), the seeds' 2-choice rule.
    ties_invalid: bool = False
    # The template ends in one space on purpose (the seeds' CoLA prompt "...Answer: "); the label
    # word is still scored as " " + word after it, as the reference does.
    trailing_space: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"probe task name must be a non-empty string, got {self.name!r}")
        fields = template_fields(self.template)
        if not fields:
            raise ValueError(f"probe task {self.name!r}: template {self.template!r} has no field: every prompt alike")
        if LABEL in map(field_root, fields):
            raise ValueError(f"probe task {self.name!r}: the template must not show the answer field {LABEL!r}")
        body = self.template[:-1] if self.trailing_space and self.template.endswith(" ") else self.template
        if body != body.rstrip() or (self.trailing_space and body == self.template):
            # The scorer appends " " + word; a trailing space/newline would put two separators there.
            what = "end in exactly one space (trailing_space)" if self.trailing_space else "not end with whitespace"
            raise ValueError(f"probe task {self.name!r}: template must {what}: {self.template!r}")
        unknown = [score for score in self.scores if score not in SCORES]
        if not self.scores or unknown:
            raise ValueError(f"probe task {self.name!r}: scores {list(self.scores)} must be some of {list(SCORES)}")
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

    def select(self, indices: Sequence[int]) -> ProbeTask:
        """The same task on ``examples[i]`` for ``i`` in ``indices``."""
        return dataclasses.replace(self, examples=[self.examples[i] for i in indices])


# --------------------------------------------------------------------------------------------
# Scoring


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Fraction of examples predicted right (NO_ANSWER counts wrong)."""
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int]) -> torch.Tensor:
    """[C, C] float64 counts, rows true class, columns predicted class, over the sorted classes in
    ``labels`` and ``predictions`` together (NO_ANSWER is a class of its own, as in the reference)."""
    if len(labels) != len(predictions) or not labels:
        raise ValueError(f"scores need as many predictions as labels, at least one ({len(labels)}, {len(predictions)})")
    classes = sorted(set(labels) | set(predictions))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    cells = torch.tensor([index[y] * k + index[p] for y, p in zip(labels, predictions, strict=True)])
    ones = torch.ones(len(cells), dtype=torch.float64)
    return torch.zeros(k * k, dtype=torch.float64).index_add_(0, cells, ones).view(k, k)


def weighted_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """The seeds' F1 (``sklearn.metrics.f1_score(average="weighted")``): each class's F1 weighted
    by its number of true examples. A class never predicted has precision 0 and F1 0; a predicted
    class with no true example (NO_ANSWER) weighs 0 but lowers the recall of the true classes."""
    cm = confusion_matrix(labels, predictions)
    tp, predicted, true = cm.diagonal(), cm.sum(0), cm.sum(1)  # [C] each
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(true > 0, tp / true.clamp(min=1), 0.0)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-300), 0.0)  # [C]
    return float((f1 * true).sum() / true.sum())


def matthews_corrcoef(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Matthews correlation (``sklearn.metrics.matthews_corrcoef``, the seeds' CoLA score; the
    multi-class form, which for two classes is (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN))).
    0 when either side is constant (the denominator is 0), as sklearn."""
    cm = confusion_matrix(labels, predictions)
    n, correct = cm.sum(), cm.trace()
    true, predicted = cm.sum(1), cm.sum(0)  # [C] each
    cov_tp = correct * n - true @ predicted
    cov_pp = n * n - predicted @ predicted
    cov_tt = n * n - true @ true
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / torch.sqrt(cov_pp * cov_tt))


SCORES: dict[str, Callable[[Sequence[int], Sequence[int]], float]] = {
    "accuracy": accuracy,
    "f1": weighted_f1,
    "mcc": matthews_corrcoef,
}


@dataclass
class ProbeResult:
    """Per-example outcome of one probe task."""

    task: str
    labels: list[int]
    predictions: list[int]  # NO_ANSWER where a ties_invalid task had no unique best word
    logprobs: torch.Tensor  # [N, L] mean token log-prob of each label word after each prompt

    @property
    def accuracy(self) -> float:
        return accuracy(self.labels, self.predictions)

    def score(self, name: str) -> float:
        return SCORES[name](self.labels, self.predictions)

    def select(self, indices: Sequence[int]) -> ProbeResult:
        """The outcome on ``examples[i]`` for ``i`` in ``indices``."""
        picked = list(indices)
        return ProbeResult(
            self.task, [self.labels[i] for i in picked], [self.predictions[i] for i in picked], self.logprobs[picked]
        )


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Score in eval mode (dropout off) and give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def choice_logprobs(
    model: torch.nn.Module, tok, prompts: list[str], words: list[str], batch_size: int = 16
) -> torch.Tensor:
    """[N, K] mean token log-prob of ``" " + words[k]`` after ``prompts[n]``, teacher forced.

    Tokens as :func:`editlab.models.scoring.answer_rows` builds them: ``tok(prompt)`` then
    ``tok(" " + word)`` without special tokens (the reference's ``prefix_tok_len`` and word ids).
    One row per prompt carries every single-token word (its last position predicts them all); a
    multi-token word gets its own row, prompt plus the word less its last token. Rows are scored
    longest first, ``batch_size`` to a forward, so a batch pads little.
    """
    view = ModelView.of(model)
    word_ids = [answer_ids(tok, word) for word in words]  # K lists of token ids
    k = len(words)
    rows: list[list[int]] = []
    t_row, t_pos, t_id, t_cell = [], [], [], []  # per scored token: row, position, id, cell n * K + k
    for n, prompt in enumerate(prompts):
        ids = tok(prompt)["input_ids"]
        shared = None
        for w, wid in enumerate(word_ids):
            if len(wid) == 1:
                if shared is None:
                    shared = len(rows)
                    rows.append(ids)
                row = shared
            else:
                row = len(rows)
                rows.append(ids + wid[:-1])
            for j, token in enumerate(wid):
                t_row.append(row)
                t_pos.append(len(ids) - 1 + j)
                t_id.append(token)
                t_cell.append(n * k + w)
    t_row, t_pos, t_id, t_cell = map(torch.tensor, (t_row, t_pos, t_id, t_cell))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    rank = torch.empty(len(rows), dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(len(rows))
    t_rank = rank[t_row]  # [T] place of each token's row in the scoring order
    base, unembed, device = view.model.base_model, view.unembed(), view.device
    token_nll = torch.zeros(len(t_row))  # [T]
    with eval_mode(view.model):
        for start in range(0, len(rows), batch_size):
            stop = min(start + batch_size, len(rows))
            batch = pad([rows[r] for r in order[start:stop]], tok.pad_token_id).to(device)
            out = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            sel = ((t_rank >= start) & (t_rank < stop)).nonzero().squeeze(1)  # [t]
            hidden = out.last_hidden_state[(t_rank[sel] - start).to(device), t_pos[sel].to(device)]  # [t, H]
            logits = unembed(hidden)  # [t, V]
            token_nll[sel] = token_nll_and_hits(logits, t_id[sel].to(device))[0].cpu()
    cells = len(prompts) * k
    total = torch.zeros(cells).index_add_(0, t_cell, token_nll)  # [N*K]
    count = torch.zeros(cells).index_add_(0, t_cell, torch.ones(len(t_cell)))  # [N*K]
    return -(total / count).view(len(prompts), k)


def label_logprobs(model: torch.nn.Module, tok, task: ProbeTask, batch_size: int = 16) -> torch.Tensor:
    """[N, L] mean token log-prob of ``" " + label_words[l]`` after the prompt of example ``n``."""
    prompts = [task.prompt(example) for example in task.examples]
    # A prompt past the context would fail as an index error deep inside the embedding.
    lengths = [len(tok(prompt)["input_ids"]) for prompt in prompts]  # [N]
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    word_len = max(len(answer_ids(tok, word)) for word in task.label_words)
    what = f"probe task {task.name!r}, example {longest} with its longest label word"
    check_context_length(model.config, lengths[longest] + word_len - 1, what)
    return choice_logprobs(model, tok, prompts, task.label_words, batch_size)


def predict(logprobs: torch.Tensor, ties_invalid: bool) -> list[int]:
    """[N, L] scores -> the index of the best word per row; a tie is NO_ANSWER with ``ties_invalid``,
    else the first tied word (argmax: torch returns the first maximal index)."""
    best = logprobs.argmax(dim=1)  # [N]
    if ties_invalid:
        tied = (logprobs == logprobs.max(dim=1, keepdim=True).values).sum(dim=1) > 1  # [N]
        best = torch.where(tied, torch.full_like(best, NO_ANSWER), best)
    return best.tolist()


def probe_details(model: torch.nn.Module, tok, task: ProbeTask, batch_size: int = 16) -> ProbeResult:
    """Predictions (the best label word by mean token log-prob) and scores of every example."""
    logprobs = label_logprobs(model, tok, task, batch_size)  # [N, L]
    return ProbeResult(task.name, task.labels, predict(logprobs, task.ties_invalid), logprobs)


def probe_cache(root: Path) -> KeyedCache:
    return KeyedCache(Path(root) / "probes", "logprobs", 32, "probe scores file")


def probe_cache_key(task: ProbeTask, tok, batch_size: int, weights: str) -> dict:
    """Everything the label log-probs of ``task`` depend on: the weights (fingerprint), the task's
    prompts, words and examples, the tokenizer, the batching, torch and its thread count (the
    bit-identity rule: same machine, torch version and threads)."""
    spec = json.dumps(
        [task.template, task.label_words, task.examples, task.trailing_space], sort_keys=True, default=str
    )
    return {
        "kind": "probe_logprobs",
        "weights": weights,
        "task": task.name,
        "examples": hashlib.sha256(spec.encode()).hexdigest(),
        "n": len(task.examples),
        "tokenizer": [getattr(tok, "name_or_path", None), len(tok)],
        "batch_size": batch_size,
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
    }


def cached_probe_details(
    model: torch.nn.Module, tok, task: ProbeTask, batch_size: int, cache: KeyedCache, weights: str
) -> ProbeResult:
    """:func:`probe_details` through ``cache``: the stored log-probs [N, L] of these weights, or
    computed and stored. The predictions follow from the log-probs as in probe_details."""
    key = probe_cache_key(task, tok, batch_size, weights)
    blob = cache.load(key)
    if blob is None:
        result = probe_details(model, tok, task, batch_size)
        cache.save(key, {"logprobs": result.logprobs.detach().cpu()})
        return result
    logprobs = blob["logprobs"]  # [N, L]
    return ProbeResult(task.name, task.labels, predict(logprobs, task.ties_invalid), logprobs)


def probe_accuracy(model: torch.nn.Module, tok, task: ProbeTask, batch_size: int = 16) -> float:
    """Fraction of examples whose highest-scoring label word is the true label's."""
    return probe_details(model, tok, task, batch_size).accuracy


def metric_name(task: str, score: str = "accuracy") -> str:
    return f"{METRIC_PREFIX}{task}/{score}"


def check_unique_names(tasks: Sequence[ProbeTask]) -> None:
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"probe task names repeat ({names}): their metrics would overwrite each other")


def run_probes(model: torch.nn.Module, tok, tasks: Sequence[ProbeTask], batch_size: int = 16) -> dict[str, float]:
    """``{"probe/<task>/<score>": value}`` for every task and each of its scores."""
    check_unique_names(tasks)
    out = {}
    for task in tasks:
        result = probe_details(model, tok, task, batch_size)
        out.update({metric_name(task.name, score): result.score(score) for score in task.scores})
    return out


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
    check_record(where, row, spec.fields, spec.label_field, ValueError)
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
# The seeds' probe sets


# The reference's load_data_split keeps the first 10 records of every set for few-shot prompts and
# tests on the rest; the seeds call it with 0 shots, so records[:10] are never scored.
FEW_SHOT_POOL = 10


@dataclass(frozen=True)
class SeedSpec:
    """One task of the seeds' ``glue_eval``: its zero-shot prompt, label words and label mapping.

    ``label_values[i]`` is how the file spells class ``i`` (compared with its type: ``True`` is not
    1); ``label_words[i]`` is the word standing for it. Prompts are the reference's ``_create_prompt``
    with 0 few-shot examples, text for text."""

    template: str
    label_words: tuple[str, ...]
    label_field: str
    label_values: tuple[Any, ...]
    scores: tuple[str, ...] = ("accuracy", "f1")  # the reference's correct/total and f1_new
    ties_invalid: bool = False
    trailing_space: bool = False

    @property
    def fields(self) -> list[str]:
        return [field_root(name) for name in template_fields(self.template)]


_CHOICES = "(A) {choices[0]}\n(B) {choices[1]}\n(C) {choices[2]}\n(D) {choices[3]}\n"
_OPTIONS = "(A){options[0]}\n(B){options[1]}\n(C){options[2]}\n(D){options[3]}\n"
SEED_SPECS: dict[str, SeedSpec] = {
    "sst2": SeedSpec("Review :{sentence}\nSentiment :", ("negative", "positive"), "label", (0, 1)),
    "mrpc": SeedSpec(
        "Are the sentences paraphrases of each other.\nSentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:",
        ("No", "Yes"),
        "label",
        (0, 1),
    ),
    "cola": SeedSpec(
        "Is this sentence linguistically acceptable?\nSentence: {sentence}\nAnswer: ",
        ("No", "Yes"),
        "label",
        (0, 1),
        scores=("accuracy", "f1", "mcc"),
        trailing_space=True,
    ),
    # The reference predicts 1 when " True" beats " False", and the file keeps GLUE's RTE labels,
    # where 1 is not_entailment: "True" is scored right for a non-entailed hypothesis. Kept, so the
    # numbers compare with the seeds'; on this class-balanced set, 1 - accuracy is GLUE's reading.
    "rte": SeedSpec("{sentence1}\nquestion: {sentence2} True or False?\nanswer:", ("False", "True"), "label", (0, 1)),
    "mmlu": SeedSpec(
        "Question: {question}\n" + _CHOICES + "Answer:", ("A", "B", "C", "D"), "answer", (0, 1, 2, 3), ties_invalid=True
    ),
    "nli": SeedSpec(
        "{sentence1} entails the {sentence2} True or False? Answer:",
        ("False", "True"),
        "label",
        ("not_entailment", "entailment"),
    ),
    "sentiment_analysis": SeedSpec(
        "For each snippet of text,label the sentiment of the text as positive or negative.The answer should be "
        "exact 'positive' or 'negative'. text: {sentence} answer:",
        ("negative", "positive"),
        "label",
        ("0", "1"),
    ),
    "dialogue": SeedSpec(
        "Q: Given the following: {article}\nWhich choice is correct?\n" + _OPTIONS + "Answer:",
        ("A", "B", "C", "D"),
        "answers",
        ("A", "B", "C", "D"),
        ties_invalid=True,
    ),
}
assert set(SEED_SPECS) == set(SEED_TASKS), "every SeedTaskName needs a SeedSpec"


def seed_file(name: str, directory: str) -> str:
    """``{directory}/{name}.json.gz`` (or ``.json``): the seeds' set of task ``name``."""
    if name not in SEED_SPECS:
        raise ValueError(f"unknown seeds' probe task {name!r}; known: {list(SEED_TASKS)}")
    found = [p for p in (os.path.join(directory, f"{name}.{ext}") for ext in ("json.gz", "json")) if os.path.isfile(p)]
    if len(found) != 1:
        what = "both" if found else "neither"
        raise ValueError(
            f"probe task {name!r}: {directory} holds {what} of {name}.json.gz / {name}.json "
            "(option probes.seeds_dir: the seeds' probe sets, ../shared/data/probes)"
        )
    return found[0]


def label_index(raw: Any, values: Sequence[Any]) -> int | None:
    """The class whose spelling is ``raw``, type included (``True`` is not ``1``), else None."""
    for i, value in enumerate(values):
        if type(raw) is type(value) and raw == value:
            return i
    return None


def seed_example(name: str, spec: SeedSpec, row: Any, index: int, origin: str) -> dict:
    """The template fields and class index of record ``index`` of the seeds' set (validated)."""
    where = _where(name, index, origin)
    check_record(where, row, spec.fields, spec.label_field, DataError)
    label = label_index(row[spec.label_field], spec.label_values)
    if label is None:
        raise DataError(
            f"{where}: field {spec.label_field!r} is {row[spec.label_field]!r}, "
            f"expected one of {list(spec.label_values)}"
        )
    example = {key: row[key] for key in spec.fields}
    example[LABEL] = label
    try:
        check_example(name, spec.template, len(spec.label_words), example, index, origin)
    except ValueError as err:
        raise DataError(str(err)) from None
    return example


def load_seed_task(
    name: str, directory: str = SEEDS_DIR, num_examples: int | None = None, seed: int | None = None
) -> ProbeTask:
    """The seeds' task ``name`` on its test records (all but the few-shot pool), every one
    validated: in file order (``seed`` None: the reference's ``number_of_tests=n`` takes the first
    n), or shuffled by ``seed``; then the first ``num_examples`` (None: all)."""
    path = seed_file(name, directory)
    spec = SEED_SPECS[name]
    rows = read_records(path)
    if len(rows) <= FEW_SHOT_POOL:
        raise DataError(
            f"probe task {name!r} ({path}): {len(rows)} records; the first {FEW_SHOT_POOL} are the few-shot pool"
        )
    examples = [seed_example(name, spec, rows[i], i, path) for i in range(FEW_SHOT_POOL, len(rows))]
    if seed is not None:
        examples = [examples[i] for i in seeded_order(len(examples), seed)]
    examples = examples[:num_examples]
    return ProbeTask(
        name,
        spec.template,
        list(spec.label_words),
        examples,
        scores=spec.scores,
        ties_invalid=spec.ties_invalid,
        trailing_space=spec.trailing_space,
    )


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ProbeSuite:
    """The probe tasks of a run, each with the examples it scores during the stream.

    At a ``full`` point (before and after the stream) every loaded example is scored; at an
    intermediate one, the first ``intermediate`` of each task. ``probe/<task>/<score>`` is on the
    examples scored at that point; ``probe/<task>/subset_<score>`` on the intermediate ones at every
    point (at a full point, from the same predictions), one series on the same examples throughout.
    """

    tasks: list[ProbeTask]
    intermediate: int | None = None  # None: every example at every point
    batch_size: int = 16
    setting: str = ""  # one line for the results: where the sets come from and how many examples

    def __post_init__(self) -> None:
        check_unique_names(self.tasks)

    def subset_size(self, task: ProbeTask) -> int:
        return len(task.examples) if self.intermediate is None else min(self.intermediate, len(task.examples))

    def run(self, model: torch.nn.Module, tok, full: bool, cache: KeyedCache | None = None) -> dict[str, float]:
        """``cache``: keep each task's label log-probs on disk, keyed by the weights' fingerprint (a
        point of unedited weights, computed once, serves every run; an evaluation cut short
        keeps the tasks it finished)."""
        out: dict[str, float] = {}
        weights = model_fingerprint(model) if cache is not None else None
        for task in self.tasks:
            subset = range(self.subset_size(task))
            scored = task if full else task.select(subset)
            if cache is None:
                result = probe_details(model, tok, scored, self.batch_size)
            else:
                result = cached_probe_details(model, tok, scored, self.batch_size, cache, weights)
            part = result.select(subset)
            for score in task.scores:
                out[metric_name(task.name, score)] = result.score(score)
                out[metric_name(task.name, f"subset_{score}")] = part.score(score)
        return out

    def metric_names(self) -> set[str]:
        return {
            metric_name(task.name, prefix + score)
            for task in self.tasks
            for score in task.scores
            for prefix in ("", "subset_")
        }


@dataclass
class ProbeConfig:
    """Which probes to run and when. No tasks = probing off.

    Args:
        tasks: task names; for ``source: seeds`` some of :data:`SEED_TASKS`, else of :data:`TASKS`.
        source: ``seeds`` (the seeds' sets in ``seeds_dir``, their prompts and scores), ``hub``,
            ``sample`` (the bundled 12-20 examples) or a local file / directory in the hub's layout.
        seeds_dir: the directory of the seeds' ``{task}.json.gz`` (``source: seeds``).
        num_examples: examples loaded per task: None is every test record for ``seeds``, 100 for
            the other sources (fewer if the set is smaller).
        intermediate_examples: examples scored per task at the points during the stream (periodic
            evaluation, ``every_n_steps``); before and after the stream every loaded example is
            scored. None: every loaded example at every point.
        subset: the order the seeds' examples are taken in: ``first`` (file order: the reference's
            ``number_of_tests=100`` scores the first 100 test records, which the authors' files
            alternate by class) or ``seeded`` (shuffled by ``seed``). The other sources are always
            shuffled by ``seed``.
        every_n_steps: also probe after every N-th edit step; 0 = only at the evaluation points.
        seed: shuffles the examples (above).
        batch_size: sequences per forward.
        cache: keep each task's label log-probs in the cache root (``probes/``), keyed by the
            weights' fingerprint and everything else they depend on: the unedited model's scores
            are computed once for every run, and an evaluation cut short keeps its finished tasks.
    """

    tasks: list[str] = field(default_factory=list)
    source: str = SAMPLE
    seeds_dir: str = SEEDS_DIR
    num_examples: int | None = None
    intermediate_examples: int | None = 100
    subset: Literal["first", "seeded"] = "first"
    every_n_steps: int = 0
    seed: int = 0
    batch_size: int = 16
    cache: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not isinstance(self.tasks, (list, tuple)):
            raise ValueError(f"probes.tasks must be a list of task names, got {self.tasks!r}")
        self.tasks = list(self.tasks)
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"probes.source must be {SEEDS!r}, {HUB!r}, {SAMPLE!r} or a path, got {self.source!r}")
        known = SEED_TASKS if self.source == SEEDS else TASKS
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(
                f"probes.tasks: unknown task(s) {unknown} for source {self.source!r}; known: {list(known)}"
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"probes.tasks repeats a task: {self.tasks}")
        for option in ("num_examples", "intermediate_examples", "batch_size"):
            value = getattr(self, option)
            if option != "batch_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                what = "a positive integer" + ("" if option == "batch_size" else " or null (all)")
                raise ValueError(f"probes.{option} must be {what}, got {value!r}")
        if isinstance(self.every_n_steps, bool) or not isinstance(self.every_n_steps, int) or self.every_n_steps < 0:
            raise ValueError(f"probes.every_n_steps must be an integer >= 0, got {self.every_n_steps!r}")
        if self.subset not in ("first", "seeded"):
            raise ValueError(f"probes.subset must be 'first' or 'seeded', got {self.subset!r}")
        if self.source == SEEDS:
            for name in self.tasks:  # a missing file fails here, before any model is loaded
                seed_file(name, self.seeds_dir)
        elif self.source not in (HUB, SAMPLE):
            for name in self.tasks:
                local_file(name, self.source)

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def due(self, steps_done: int) -> bool:
        """Whether to probe after ``steps_done`` edit steps (the before/after probes are always due)."""
        return self.enabled and self.every_n_steps > 0 and steps_done > 0 and steps_done % self.every_n_steps == 0

    def load(self) -> list[ProbeTask]:
        if self.source == SEEDS:
            seed = self.seed if self.subset == "seeded" else None
            return [load_seed_task(name, self.seeds_dir, self.num_examples, seed) for name in self.tasks]
        n = 100 if self.num_examples is None else self.num_examples
        return [load_task(name, self.source, n, self.seed) for name in self.tasks]

    def suite(self) -> ProbeSuite:
        tasks = self.load()
        return ProbeSuite(tasks, self.intermediate_examples, self.batch_size, self.setting(tasks))

    def setting(self, tasks: Sequence[ProbeTask]) -> str:
        """One line for the results: the sets, the rule and how many examples are scored when."""
        if self.source == SEEDS:
            where = f"the seeds' probe sets in {self.seeds_dir} with their zero-shot prompts"
            order = "in file order" if self.subset == "first" else f"shuffled by seed {self.seed}"
        else:
            where = f"{self.source} probe sets with lm-evaluation-harness prompts"
            order = f"shuffled by seed {self.seed}"
        n = self.intermediate_examples
        during = "every loaded example" if n is None else f"the first {n}"
        counts = ", ".join(f"{task.name} {len(task.examples)}" for task in tasks)
        return (
            f"{where}; the best label word by mean token log-prob; examples {order}: {during} per task during "
            f"the stream, all loaded ones before and after ({counts})"
        )
