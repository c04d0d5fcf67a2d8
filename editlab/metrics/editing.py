"""Edit metrics averaged per case, then over cases (the CounterFact / zsRE protocol).

Functional core: plain functions on tensors. The ``Metric`` classes only hold sum-reducible states
(``dist_reduce_fx="sum"``), so they are exact under DDP: each rank adds the means of the cases it
scored and the number of those cases; the ranks' sums are added and divided once in ``compute``.

Whole cases per update: a case's prompts must all arrive in the same ``update`` call (the per-case
mean is taken inside ``update``). ``case_index`` only groups the prompts of one call: any integer
labels work, and the same label in two calls denotes two different cases.

Families (see ``editlab.evaluation``):

- efficacy / generalization / specificity *success*: ``PromptSuccess`` fed (NLL of the expected
  answer, NLL of the competitor) per prompt; on neighbourhood prompts the expected answer is the
  true one and target_new the competitor.
- the same families' *magnitude*: ``PromptMagnitude`` fed the same NLL pairs, the mean of
  exp(-NLL(expected)) - exp(-NLL(competitor)) (the reference summary's ``*_diff``; exp(-mean token
  NLL) is the per-token geometric-mean probability).
- the same families' *accuracy*: ``PromptAccuracy`` fed the per-prompt ``exact`` flag.
- zsRE src / rephrase / loc: ``TokenAccuracy`` fed the per-prompt fraction of correct tokens.
- score: ``harmonic_mean`` of efficacy, generalization and specificity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from editlab.metrics.base import LocalMetric

# ----------------------------------------------------------------------------- functional core


def prompt_success(nll_expected: torch.Tensor, nll_competitor: torch.Tensor) -> torch.Tensor:
    """[N] bool: the expected answer is more likely (lower mean token NLL) than the competitor."""
    if nll_expected.shape != nll_competitor.shape or nll_expected.dim() != 1:
        raise ValueError(f"expected two [N] tensors; got {tuple(nll_expected.shape)} and {tuple(nll_competitor.shape)}")
    return nll_expected < nll_competitor


def prob_difference(nll_expected: torch.Tensor, nll_competitor: torch.Tensor) -> torch.Tensor:
    """[N] exp(-nll_expected) - exp(-nll_competitor): by how much the expected answer's (per-token,
    geometric-mean) probability exceeds the competitor's; in [-1, 1]. float64."""
    if nll_expected.shape != nll_competitor.shape or nll_expected.dim() != 1:
        raise ValueError(f"expected two [N] tensors; got {tuple(nll_expected.shape)} and {tuple(nll_competitor.shape)}")
    return torch.exp(-nll_expected.double()) - torch.exp(-nll_competitor.double())


def case_means(values: torch.Tensor, case_index: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [N] within each distinct label of ``case_index`` [N] -> [C] (C labels)."""
    if values.dim() != 1 or case_index.shape != values.shape:
        raise ValueError(
            f"expected values [N] and case_index [N]; got {tuple(values.shape)}, {tuple(case_index.shape)}"
        )
    if case_index.dtype.is_floating_point or case_index.dtype == torch.bool:
        raise TypeError(f"case_index must hold integer labels, got {case_index.dtype}")
    _, group = torch.unique(case_index, return_inverse=True)  # group [N] in [0, C)
    n_cases = int(group.max()) + 1 if len(group) else 0
    sums = torch.zeros(n_cases, dtype=torch.float64, device=values.device).index_add(0, group, values.double())
    counts = torch.bincount(group, minlength=n_cases).to(sums)
    return sums / counts  # [C]


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0 if any is 0 (the editing "score")."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("harmonic mean of no values")
    if any(math.isnan(v) or v < 0 for v in values):
        raise ValueError(f"harmonic mean needs non-negative numbers, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


# ----------------------------------------------------------------------------- Metric wrappers


class CaseMean(LocalMetric):
    """Mean over cases of the per-case mean of a per-prompt value.

    States (sum-reduced across processes): ``sum_case_means`` (float64) and ``n_cases``. Each update
    must contain whole cases (see the module docstring).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_case_means", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_cases", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, values: torch.Tensor, case_index: torch.Tensor) -> None:
        means = case_means(values.to(self.device), torch.as_tensor(case_index, device=self.device))  # [C]
        self.sum_case_means += means.sum()
        self.n_cases += means.numel()

    def update(self, values: torch.Tensor, case_index: torch.Tensor) -> None:
        """values [N] (float or bool) per prompt, case_index [N] integer case labels."""
        self._add(values.float(), case_index)

    def compute(self) -> torch.Tensor:
        if int(self.n_cases) == 0:
            raise RuntimeError(f"{type(self).__name__}: no case was scored, the mean over cases is undefined")
        return (self.sum_case_means / self.n_cases).float()


class PromptSuccess(CaseMean):
    """Success rate: a prompt succeeds when NLL(expected) < NLL(competitor); mean per case, then over
    cases. Efficacy / generalization / specificity "success" (ES, PS, NS)."""

    def update(self, nll_expected: torch.Tensor, nll_competitor: torch.Tensor, case_index: torch.Tensor) -> None:
        """nll_expected [N], nll_competitor [N] mean token NLLs; case_index [N]."""
        self._add(prompt_success(nll_expected, nll_competitor).float(), case_index)


class PromptMagnitude(CaseMean):
    """Magnitude: mean per case, then over cases, of exp(-NLL(expected)) - exp(-NLL(competitor)),
    the reference summary's ``rewrite_diff`` / ``paraphrase_diff`` / ``neighborhood_diff`` (it
    prints them ×100). May be negative: the expected answer is then the less likely one."""

    def update(self, nll_expected: torch.Tensor, nll_competitor: torch.Tensor, case_index: torch.Tensor) -> None:
        """nll_expected [N], nll_competitor [N] mean token NLLs; case_index [N]."""
        self._add(prob_difference(nll_expected, nll_competitor), case_index)


class PromptAccuracy(CaseMean):
    """Greedy accuracy: a prompt is right when every teacher-forced answer token is the argmax."""

    def update(self, exact: torch.Tensor, case_index: torch.Tensor) -> None:
        """exact [N] bool; case_index [N]."""
        if exact.dtype != torch.bool:
            raise TypeError(f"exact must be a bool tensor (all tokens greedy), got {exact.dtype}")
        self._add(exact.float(), case_index)


class TokenAccuracy(CaseMean):
    """zsRE top-1 token accuracy: per prompt the fraction of answer tokens that are the argmax."""

    def update(self, token_acc: torch.Tensor, case_index: torch.Tensor) -> None:
        """token_acc [N] in [0, 1]; case_index [N]."""
        if token_acc.numel() and (token_acc.min() < 0 or token_acc.max() > 1):
            raise ValueError("token accuracies must lie in [0, 1]")
        self._add(token_acc.float(), case_index)
