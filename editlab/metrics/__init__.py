"""Editing metrics: functional cores on tensors and sum-reducible torchmetrics wrappers."""

from editlab.metrics.editing import (
    CaseMean,
    PromptAccuracy,
    PromptSuccess,
    TokenAccuracy,
    answer_scores,
    case_means,
    edit_score,
    harmonic_mean,
    prompt_success,
)
from editlab.metrics.functional import answer_rows, reduce_rows, score_answers, token_nll_and_hits
from editlab.metrics.generation import (
    Consistency,
    Fluency,
    TfidfReference,
    consistency_reference,
    fluency,
    generate_ids,
    generate_text,
    load_consistency_reference,
    ngram_entropy,
    tfidf_similarity,
    word_tokens,
)
from editlab.metrics.perplexity import Perplexity, load_me_ppl, sequence_nll, token_nll

__all__ = [
    "CaseMean",
    "Consistency",
    "Fluency",
    "Perplexity",
    "PromptAccuracy",
    "PromptSuccess",
    "TfidfReference",
    "TokenAccuracy",
    "answer_rows",
    "answer_scores",
    "case_means",
    "consistency_reference",
    "edit_score",
    "fluency",
    "generate_ids",
    "generate_text",
    "harmonic_mean",
    "load_consistency_reference",
    "load_me_ppl",
    "ngram_entropy",
    "prompt_success",
    "reduce_rows",
    "score_answers",
    "sequence_nll",
    "tfidf_similarity",
    "token_nll",
    "token_nll_and_hits",
    "word_tokens",
]
