"""Generation metrics: fluency (n-gram entropy) and consistency (TF-IDF similarity), and the
seeded top-k sampler that produces the texts.

The sampler can reproduce the reference's ``generate_fast(..., max_out_len=100)``: each text is
``max_new_tokens`` tokens long *including* its prompt (``max_length_includes_prompt``), sampling
goes on past an EOS token (which the decoding drops, as the reference strips ``<|endoftext|>``),
and the decoded text is NFKD-normalised with each blank line ("\\n\\n") turned into a space
(``clean``). The evaluator turns these on by default; ``generate_text``'s own defaults keep the
plain behaviour (new tokens only, stop at EOS, text as decoded).

Fluency follows the ROME/MEMIT reference (``compute_n_gram_entropy``): word n-gram frequency
entropies in bits for n = 2 and 3, weighted 2/3 and 4/3 and averaged, so
``fluency = (2/3 * H2 + 4/3 * H3) / 2``. The raw number is returned (the papers' tables show it
×100). Words come from the regex ``\\w+|[^\\w\\s]`` (combining marks kept in their word) instead of
``nltk.word_tokenize`` (no nltk dependency); they differ on contractions ("don't") and a few
punctuation cases. Case is kept, as
``nltk.word_tokenize`` keeps it; pass ``lowercase=True`` to fold it.

Consistency follows ROME's ``tfidf_similarity``: cosine between the TF-IDF vectors (raw counts ×
idf, L2-normalised, sklearn ``TfidfVectorizer`` defaults: lowercase, tokens ``\\b\\w\\w+\\b``) of the
joined generated texts and the joined reference snippets about (relation_id, target_new.id). The
reference files (``idf.npy``, ``tfidf_vocab.json``, ``attribute_snippets.json``) are not shipped:
without them the metric is absent and a reason is given, never a number computed from other text.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from editlab.metrics.base import LocalMetric
from editlab.metrics.editing import case_means
from editlab.models.kv_cache import returned_cache
from editlab.models.sampling import sample_top_k

# Combining marks (U+0300-U+036F) belong to their word: the texts are NFKD-normalised, which splits
# "é" into "e" + U+0301, and nltk.word_tokenize (the reference) leaves the pair in one token.
WORD_RE = re.compile(r"(?:\w|[\u0300-\u036f])+|[^\w\s]")
# sklearn's TfidfVectorizer default token_pattern; the reference vocabulary was built with it.
TFIDF_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")
FLUENCY_NS = (2, 3)
FLUENCY_WEIGHTS = (2 / 3, 4 / 3)
CONSISTENCY_FILES = ("idf.npy", "tfidf_vocab.json", "attribute_snippets.json")

# ----------------------------------------------------------------------------- fluency


def word_tokens(text: str, lowercase: bool = False) -> list[str]:
    """Words and punctuation marks of ``text`` (nltk-like word tokenisation)."""
    return WORD_RE.findall(text.lower() if lowercase else text)


def ngram_entropy(tokens: str | Sequence[str], n: int, lowercase: bool = False) -> float:
    """Entropy in bits, -sum f log2 f, of the frequency distribution of the word n-grams of ``tokens``
    (a text, tokenised with ``word_tokens``, or a list of tokens). 0 when there is no n-gram."""
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}")
    words = word_tokens(tokens, lowercase) if isinstance(tokens, str) else list(tokens)
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def fluency(text: str, lowercase: bool = False) -> float:
    """Weighted n-gram entropy of one text: mean of (2/3 * H2, 4/3 * H3). Raw, not ×100."""
    words = word_tokens(text, lowercase)
    terms = [w * ngram_entropy(words, n) for n, w in zip(FLUENCY_NS, FLUENCY_WEIGHTS, strict=True)]
    return sum(terms) / len(terms)


def case_fluency(
    texts: Sequence[str], case_index: Sequence[int] | torch.Tensor | None = None, lowercase: bool = False
) -> torch.Tensor:
    """Each case's mean fluency over its texts, [C] float64 in the order of the distinct
    ``case_index`` labels (sorted); without ``case_index`` each text is its own case."""
    if isinstance(texts, str):
        raise TypeError("Fluency.update takes a list of texts, not one string")
    values = torch.tensor([fluency(t, lowercase) for t in texts], dtype=torch.float64)  # [N]
    index = torch.arange(len(texts)) if case_index is None else torch.as_tensor(case_index)
    return case_means(values, index)  # [C]


class Fluency(LocalMetric):
    """Mean fluency per case (over its generated texts), then over cases, as the reference averages
    ``n_gram_entropy(gen_texts)`` per record. States: ``sum_case_means``, ``n_cases`` (sum-reduced).
    Without ``case_index`` each text is its own case; with it, each update holds whole cases."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, lowercase: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lowercase = lowercase
        self.add_state("sum_case_means", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_cases", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        texts: Sequence[str] | None = None,
        case_index: Sequence[int] | torch.Tensor | None = None,
        *,
        case_means: torch.Tensor | None = None,
    ) -> None:
        """Add generated ``texts`` (grouped into cases by ``case_index``), or cases whose mean fluency
        is already known (``case_means`` [C], from :func:`case_fluency`: a caller that keeps the
        per-case values too scores each text once). Both go through ``update``, which torchmetrics
        wraps: it counts the update and drops a value cached by an earlier ``compute``."""
        if (texts is None) == (case_means is None):
            raise TypeError("Fluency.update takes either texts or case_means")
        means = case_fluency(texts, case_index, self.lowercase) if case_means is None else case_means
        self.sum_case_means += means.sum().to(self.device)
        self.n_cases += means.numel()

    def update_case_means(self, means: torch.Tensor) -> None:
        """``update(case_means=means)``."""
        self.update(case_means=means)

    def compute(self) -> torch.Tensor:
        if int(self.n_cases) == 0:
            raise RuntimeError("Fluency: no generated text was scored")
        return (self.sum_case_means / self.n_cases).float()


# ----------------------------------------------------------------------------- generation


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, S] and attention mask [B, S]: the last column is every prompt's last
    token, so each step appends one column and the KV cache stays aligned."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt must have at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def token_budgets(prompt_lengths: Sequence[int], max_tokens: int, includes_prompt: bool) -> list[int]:
    """New tokens each prompt may get: ``max_tokens``, or with ``includes_prompt`` what is left of
    ``max_tokens`` after the prompt's own tokens (the reference's ``max_out_len``: a 12-token
    prompt and 100 get 88; a prompt of 100 tokens or more gets none)."""
    if max_tokens < 0 or any(n < 0 for n in prompt_lengths):
        raise ValueError(f"need non-negative lengths, got max_tokens={max_tokens}, prompts {list(prompt_lengths)}")
    return [max(max_tokens - n, 0) if includes_prompt else max_tokens for n in prompt_lengths]


def clean_text(text: str) -> str:
    """The reference's post-processing of a generated text (``generate_fast``): NFKD Unicode
    normalisation, then each blank line ("\\n\\n") becomes a space."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


@torch.no_grad()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int | Sequence[int] | torch.Tensor,
    top_k: int,
    generator: torch.Generator,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> torch.Tensor:
    """Top-k sampling with a KV cache from left-padded prompts.

    input_ids, attention_mask: [B, S] left-padded. ``max_new_tokens``: one budget for every row or
    one per row ([B]). Returns the new tokens [B, n], n = the largest budget, or fewer when every
    row has stopped early; a row is ``pad_token_id`` after its budget or its EOS (any of
    ``eos_token_ids``; an empty list never stops). The full attention mask (prompt + generated so
    far) is passed at every step (the reference passed only the current token's mask), and
    positions count real tokens only, so left padding does not shift them (absolute-position
    models such as GPT-2 depend on it).
    """
    budget = torch.as_tensor(max_new_tokens, dtype=torch.long).expand(len(input_ids)).cpu()  # [B]
    if bool((budget < 0).any()):
        raise ValueError(f"token budgets must be >= 0, got {budget.tolist()}")

    def sample(step_ids, mask, position_ids, cache):
        res = model(input_ids=step_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
        return sample_top_k(res.logits[:, -1], top_k, generator), returned_cache(res)  # [B]

    return decode(sample, input_ids, attention_mask, budget, eos_token_ids, pad_token_id)


def decode(
    next_tokens: Callable,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    budget: torch.Tensor,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> torch.Tensor:
    """The incremental decoding loop shared by the sampler and greedy decoding.

    ``next_tokens(step_ids, mask, position_ids, cache)`` runs one forward and returns the next
    token of every row ([B], on the CPU) and the model's cache. ``budget``: [B] new tokens per row
    (CPU). The full attention mask is passed at every step and positions count real tokens only.
    """
    device = input_ids.device
    mask = attention_mask.clone()  # [B, S + t]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
    done = budget == 0  # [B] on CPU, like the chosen ids
    out, cache, step_ids = [], None, input_ids
    for step in range(int(budget.max()) if len(budget) else 0):
        nxt, cache = next_tokens(step_ids, mask, position_ids, cache)  # [B]
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        out.append(nxt)
        done |= torch.isin(nxt, eos) | (budget <= step + 1)
        if bool(done.all()):
            break
        step_ids = nxt.unsqueeze(1).to(device)  # [B, 1]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position_ids = mask.sum(-1, keepdim=True) - 1  # [B, 1]
    if not out:
        return torch.zeros((len(input_ids), 0), dtype=torch.long)
    return torch.stack(out, dim=1)  # [B, n]


def _eos_ids(model, tok) -> list[int]:
    """Stop tokens: the generation config's (an int or a list, e.g. Llama-3 chat) else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def generate_token_rows(
    model,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    max_length_includes_prompt: bool = False,
    stop_at_eos: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, sampled ids) per prompt, seeded top-k; see ``generate_text`` for the options.

    The sampled ids end at the row's budget (``token_budgets``) or before its first EOS with
    ``stop_at_eos``; without it they run through any EOS to the budget, as the reference does.
    """
    if isinstance(prompts, str):
        raise TypeError("generate_text takes a list of prompts, not one string")
    if top_k < 1 or max_new_tokens < 0 or batch_size < 1:
        raise ValueError(f"need top_k >= 1, max_new_tokens >= 0, batch_size >= 1; got {top_k}, {max_new_tokens}")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad prompts with")
    if model.training:
        raise ValueError("generate_text needs model.eval(): dropout would make the samples irreproducible")
    eos_ids = _eos_ids(model, tok)
    stops = eos_ids if stop_at_eos else []
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(prompts), batch_size):
        rows = [tok(p)["input_ids"] for p in prompts[start : start + batch_size]]
        budgets = token_budgets([len(r) for r in rows], max_new_tokens, max_length_includes_prompt)
        ids, mask = left_pad(rows, pad_id)
        new = generate_ids(model, ids.to(device), mask.to(device), budgets, top_k, generator, stops, pad_id)
        for row, gen, budget in zip(rows, new.tolist(), budgets, strict=True):
            gen = gen[:budget]  # the pads after a short budget
            ends = [j for j, t in enumerate(gen) if t in stops]
            out.append((row, gen[: ends[0]] if ends else gen))
    return out


def generate_text(
    model,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    include_prompt: bool = True,
    max_length_includes_prompt: bool = False,
    stop_at_eos: bool = True,
    clean: bool = False,
) -> list[str]:
    """Seeded top-k samples, one per prompt, decoded without special tokens.

    Deterministic for a given (seed, prompts, batch_size) on a given device: one explicit CPU
    ``torch.Generator`` drives the sampling (never the global RNG), consumed batch after batch.

    Args:
        max_new_tokens: length of each sample in tokens: new tokens only, or with
            ``max_length_includes_prompt`` prompt + new tokens (the reference's ``max_out_len``).
        include_prompt: the text is the decoded prompt + continuation (the reference's) rather
            than the continuation alone.
        stop_at_eos: stop a row at its first EOS; False samples on to the length, as the
            reference does (the EOS tokens are dropped from the text, being special tokens).
        clean: ``clean_text`` each text, as the reference does.
    """
    rows = generate_token_rows(
        model, tok, prompts, max_new_tokens, top_k, seed, batch_size, max_length_includes_prompt, stop_at_eos
    )
    texts = [tok.decode((row if include_prompt else []) + gen, skip_special_tokens=True) for row, gen in rows]
    return [clean_text(t) for t in texts] if clean else texts


# ----------------------------------------------------------------------------- consistency


def tfidf_vector(text: str, vocab: dict[str, int], idf: torch.Tensor) -> dict[int, float]:
    """Sparse L2-normalised TF-IDF vector {term index: weight} of ``text``; words outside the
    vocabulary are ignored; empty when no word is in it."""
    counts = Counter(vocab[w] for w in TFIDF_TOKEN_RE.findall(text.lower()) if w in vocab)
    weights = {j: c * float(idf[j]) for j, c in counts.items()}
    norm = math.sqrt(sum(v * v for v in weights.values()))
    return {j: v / norm for j, v in weights.items()} if norm > 0 else {}


def tfidf_similarity(text_a: str, text_b: str, vocab: dict[str, int], idf: torch.Tensor) -> float:
    """Cosine of the TF-IDF vectors of two texts. 0 when either has no vocabulary word (the
    reference divides by a zero norm there and gets NaN)."""
    a, b = tfidf_vector(text_a, vocab, idf), tfidf_vector(text_b, vocab, idf)
    return sum(v * b[j] for j, v in a.items() if j in b)


@dataclass
class TfidfReference:
    """IDF weights, vocabulary and attribute snippets in ROME's format.

    vocab: word -> column of ``idf``; idf: [V] float64; snippets: (relation_id, target_id) -> texts.
    """

    vocab: dict[str, int]
    idf: torch.Tensor  # [V]
    snippets: dict[tuple[str, str], list[str]]

    def snippet_texts(self, relation_id: str, target_id: str) -> list[str]:
        texts = self.snippets.get((relation_id, target_id), [])
        if not texts:
            raise KeyError(f"no reference snippet for relation {relation_id!r} and target {target_id!r}")
        return texts

    def consistency(self, generated: Sequence[str], relation_id: str, target_id: str) -> float:
        """Cosine between the joined generated texts and the joined snippets about the target."""
        if isinstance(generated, str) or not generated:
            raise ValueError("consistency needs a non-empty list of generated texts")
        reference = " ".join(self.snippet_texts(relation_id, target_id))
        return tfidf_similarity(" ".join(generated), reference, self.vocab, self.idf)


def _read_snippets(path: Path) -> dict[tuple[str, str], list[str]]:
    snippets: dict[tuple[str, str], list[str]] = defaultdict(list)
    for record in json.loads(path.read_text()):
        try:
            key = (str(record["relation_id"]), str(record["target_id"]))
            snippets[key].extend(s["text"] for s in record["samples"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: records need relation_id, target_id and samples[].text ({e!r})") from e
    return dict(snippets)


def consistency_reference(data_dir: str | Path | None) -> tuple[TfidfReference | None, str]:
    """(reference, "") when ``data_dir`` holds the three reference files, else (None, reason)."""
    if data_dir is None:
        return None, (
            "consistency not computed: no reference directory given (needs " + ", ".join(CONSISTENCY_FILES) + ")"
        )
    data_dir = Path(data_dir)
    missing = [name for name in CONSISTENCY_FILES if not (data_dir / name).is_file()]
    if missing:
        return None, f"consistency not computed: {', '.join(missing)} missing from {data_dir}"
    import numpy as np

    idf = torch.from_numpy(np.load(data_dir / "idf.npy")).double().flatten()  # [V]
    vocab = {str(w): int(j) for w, j in json.loads((data_dir / "tfidf_vocab.json").read_text()).items()}
    if vocab and (min(vocab.values()) < 0 or max(vocab.values()) >= len(idf)):
        raise ValueError(f"{data_dir}: tfidf_vocab.json indexes beyond idf.npy ({len(idf)} entries)")
    return TfidfReference(vocab, idf, _read_snippets(data_dir / "attribute_snippets.json")), ""


def load_consistency_reference(data_dir: str | Path | None) -> TfidfReference | None:
    """The reference, or None when a file is missing (``consistency_reference`` says which)."""
    return consistency_reference(data_dir)[0]


class Consistency(LocalMetric):
    """Mean over cases of the TF-IDF consistency of each case's generated texts with the reference
    snippets about its target_new. States: ``sum_scores``, ``n_cases`` (sum-reduced)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, reference: TfidfReference, **kwargs) -> None:
        if reference is None:
            raise ValueError("Consistency needs a TfidfReference; without one report the metric as absent")
        super().__init__(**kwargs)
        self.reference = reference
        self.add_state("sum_scores", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_cases", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, generated: Sequence[Sequence[str]], relation_ids: Sequence[str], target_ids: Sequence[str]
    ) -> None:
        """One entry per case: its generated texts, relation id and target_new id."""
        if not len(generated) == len(relation_ids) == len(target_ids):
            raise ValueError("generated, relation_ids and target_ids must have one entry per case")
        for texts, rel, tgt in zip(generated, relation_ids, target_ids, strict=True):
            self.sum_scores += self.reference.consistency(texts, rel, tgt)
            self.n_cases += 1

    def compute(self) -> torch.Tensor:
        if int(self.n_cases) == 0:
            raise RuntimeError("Consistency: no case was scored")
        return (self.sum_scores / self.n_cases).float()
