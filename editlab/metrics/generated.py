"""Generation-based answer scores: does the model *say* target_new when it continues a prompt?

The teacher-forced rows (``efficacy_accuracy`` and the rest) check each answer token given the
answer's own earlier tokens, so they are told the answer's content and length. These scores give
the model the bare prompt instead:

- greedy continuation of ``len(answer tokens) + margin`` new tokens (margin 3 by default: room for
  the punctuation that ends the answer and for a tokenisation of the answer longer than the
  target's), stopped at EOS; leading whitespace and blank lines are skipped (a question, as zsRE's,
  is often answered on the next line) and the text is cut at the line break after it;
- SQuAD's ``normalize_answer``: lowercase, ASCII punctuation removed, the articles a / an / the
  removed, whitespace collapsed;
- ``prefix``: the normalised continuation starts with the normalised target at a word boundary
  (" Paris, France" and " Paris and Rome" for Paris; not " Parisian");
- ``exact``: the continuation cut at a clause boundary is the target after normalisation. A
  boundary is one of . , ; : ! ? followed by whitespace or the end of the text, or the end of a
  text that stopped on its own (EOS or a line break), not one cut by the budget. So " Paris, France"
  and " Paris. It" are exact for Paris, " Paris and Rome" and " Paris France is" are not, and
  " Washington, D.C. is" is exact for "Washington, D.C." (the cut after "D.C."). Exact implies prefix.

The continuations are batched across prompts sorted by length (left padding, a KV cache) and the
vocabulary logits are computed at each row's last position only. Greedy decoding draws no random
numbers, so batching changes no draw; a near-tie of the two best logits can flip with the batch's
float32 rounding, as it can for the teacher-forced accuracy.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch

from editlab.metrics.generation import _eos_ids, decode, left_pad
from editlab.models.kv_cache import returned_cache
from editlab.models.prompts import answer_ids

PUNCTUATION = frozenset(string.punctuation)
ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
# A clause ends at one of these followed by whitespace or the end of the text.
BOUNDARY_RE = re.compile(r"[.,;:!?](?=\s|$)")
DEFAULT_MARGIN = 3


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, punctuation removed, articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES_RE.sub(" ", text).split())


def clause_cuts(text: str, stopped: bool) -> list[int]:
    """Ends of the candidate answers in ``text``: before each clause-ending punctuation mark, and
    the end of the text when the generation stopped on its own."""
    cuts = [m.start() for m in BOUNDARY_RE.finditer(text)]
    return cuts + [len(text)] if stopped else cuts


def match_answer(continuation: str, target: str, stopped: bool) -> tuple[bool, bool]:
    """(exact, prefix) of a generated continuation against a target; see the module docstring.
    ``stopped``: the generation ended on its own (EOS or a line break), not at its budget."""
    want = normalize_answer(target)
    if not want:
        raise ValueError(f"target {target!r} is empty after normalisation: nothing to match")
    said = normalize_answer(continuation)
    prefix = said == want or said.startswith(want + " ")
    exact = any(normalize_answer(continuation[:b]) == want for b in clause_cuts(continuation, stopped))
    return exact, prefix


@torch.no_grad()
def greedy_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    budgets: Sequence[int],
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> torch.Tensor:
    """Greedy continuation of left-padded prompts with a KV cache.

    input_ids, attention_mask: [B, S] left-padded; ``budgets``: new tokens per row. Returns [B, n],
    n = the largest budget or fewer when every row stopped; a row is ``pad_token_id`` after its
    budget or its EOS. Positions count real tokens only (left padding must not shift them). Unlike
    ``generate_ids`` (the seeded sampler, which keeps the reference's full-sequence logits so its
    draws stay as they were), the vocabulary is projected at the last position only.
    """
    base, head = model.base_model, model.get_output_embeddings()

    def greedy(step_ids, mask, position_ids, cache):
        res = base(input_ids=step_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
        return head(res.last_hidden_state[:, -1]).argmax(-1).cpu(), returned_cache(res)  # [B]

    budget = torch.as_tensor(list(budgets), dtype=torch.long)  # [B]
    return decode(greedy, input_ids, attention_mask, budget, eos_token_ids, pad_token_id)


def greedy_continuations(
    model, tok, prompts: Sequence[str], budgets: Sequence[int], batch_size: int = 32
) -> list[tuple[str, bool]]:
    """(continuation text, stopped on its own) per prompt, greedy; the text starts at its first
    non-space character and ends before the line break that follows (or at EOS or the budget).
    The prompts run in batches of ``batch_size`` sorted by token length; results in input order."""
    if len(prompts) != len(budgets):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    if model.training:
        raise ValueError("greedy_continuations needs model.eval(): dropout would change the answers")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad prompts with")
    eos = _eos_ids(model, tok)
    device = next(model.parameters()).device
    rows = [tok(p)["input_ids"] for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    out: list[tuple[str, bool]] = [("", False)] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_pad([rows[i] for i in chunk], pad_id)
        new = greedy_ids(model, ids.to(device), mask.to(device), [budgets[i] for i in chunk], eos, pad_id)
        for i, gen in zip(chunk, new.tolist(), strict=True):
            gen = gen[: budgets[i]]
            ends = [j for j, t in enumerate(gen) if t in eos]
            stopped = bool(ends)
            text = tok.decode(gen[: ends[0]] if ends else gen, skip_special_tokens=True)
            # A question (zsRE) is often answered on the next line: leading blank lines are skipped.
            text = text.lstrip()
            if "\n" in text:
                text, stopped = text[: text.index("\n")], True
            out[i] = (text, stopped)
    return out


def generated_answers(
    model, tok, prompts: Sequence[str], answers: Sequence[str], margin: int = DEFAULT_MARGIN, batch_size: int = 32
) -> dict[str, list]:
    """{"text": continuations, "exact": [N] flags, "prefix": [N] flags} of each (prompt, answer)."""
    if margin < 0:
        raise ValueError(f"the token margin must be >= 0, got {margin}")
    budgets = [len(answer_ids(tok, a)) + margin for a in answers]
    said = greedy_continuations(model, tok, prompts, budgets, batch_size)
    matches = [match_answer(text, a, stopped) for (text, stopped), a in zip(said, answers, strict=True)]
    return {"text": [t for t, _ in said], "exact": [e for e, _ in matches], "prefix": [p for _, p in matches]}
