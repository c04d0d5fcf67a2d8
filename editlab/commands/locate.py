"""``editlab locate`` — causal tracing: which hidden states carry a fact (ROME's indirect effect).

For each fact the model answers, three runs of the prompt are compared (Meng et al. 2022, §2.1):
the clean run; the corrupted run, where Gaussian noise of scale ``noise_multiplier`` × the standard
deviation of subject-token embeddings is added to the embeddings of the subject tokens; and the
corrupted run with one clean state restored. A state is a layer's output (``residual``), or the MLP
or attention output of a run of ``window`` layers centred on a layer (``mlp``, ``attn``; ROME's
reference restores a window of 10 for these), at one token. The indirect effect of a state is
p(answer | corrupted, state restored) − p(answer | corrupted), p averaged over ``samples`` noise
draws; it is averaged over facts and over the positions of each token group of ROME's figure
(first, middle and last subject token, first subsequent token, further tokens, last token).

How it follows ROME's ``experiments/causal_trace.py`` and where it differs:

- one forward restores many states: row 0 of every batch is the clean run and every other row a
  corrupted run with its own restoration, copied from row 0 in the same forward (as the reference's
  row 0, which restores one state per forward);
- the noise of a fact is drawn once and shared by all its restorations (the reference re-seeds its
  generator with 1 at every forward, so its noise is also fixed across restorations, and across
  facts); here one generator seeded with ``seed`` draws each fact's noise in turn;
- the noise scale is measured on the subjects of the first ``noise_subjects`` records of the file,
  tokenised without special tokens (the reference: on its 1000 known facts' subjects);
- positions before the first subject token are not traced: clean and corrupted runs agree there
  (a causal model; the noise starts at the subject), so restoring them changes nothing;
- a fact is used when the model's greedy next token after the prompt is the first token of
  `` target_true`` (the reference requires the decoded top token to equal the whole answer);
  p(answer) is that token's probability, as the reference's p of its predicted token;
- group means are over (fact, position) rows of indirect effects; for the one-position groups that
  is the reference's mean, for the middle and further tokens it weights each position alike.

The suggestion is the ``edit_width`` consecutive layers whose summed MLP indirect effect at the last
subject token (the key position of ROME/MEMIT) is largest.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from editlab.errors import ConfigError
from editlab.models.arch import ModelView
from editlab.models.hooks import edit_output

KINDS: tuple[str, ...] = ("residual", "mlp", "attn")
GROUPS: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
SUGGESTION_GROUP = "last subject token"

State = tuple[str, int, int]  # (kind, layer, token position)
Restoration = tuple[State, ...]  # the states restored together in one corrupted run


@dataclass(frozen=True)
class LocateConfig:
    num_facts: int = 50
    samples: int = 10  # noise draws per fact (the reference's default)
    noise_multiplier: float = 3.0  # noise scale = this × std of subject embeddings (ROME: 3)
    noise: float | None = None  # an explicit noise scale instead
    noise_subjects: int = 1000  # records whose subjects measure the embedding std
    window: int = 10  # layers restored together for mlp/attn (the reference's 10); residual: 1
    kinds: tuple[str, ...] = KINDS
    edit_width: int = 5  # layers in the suggested editing window
    batch_size: int = 256  # corrupted rows per forward
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_facts", "samples", "noise_subjects", "window", "edit_width", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option --{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if not self.noise_multiplier > 0 or not math.isfinite(self.noise_multiplier):
            raise ConfigError(f"option --noise-multiplier={self.noise_multiplier} must be a positive number")
        if self.noise is not None and (not self.noise > 0 or not math.isfinite(self.noise)):
            raise ConfigError(f"option --noise={self.noise} must be a positive number")
        bad = [kind for kind in self.kinds if kind not in KINDS]
        if bad or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ConfigError(f"option --kinds={','.join(self.kinds)}: each must be one of {','.join(KINDS)}, once")
        if "mlp" not in self.kinds:
            raise ConfigError("option --kinds: the suggestion needs mlp among them")


@dataclass(frozen=True)
class TraceFact:
    case_id: str
    prompt: str
    subject: str
    answer: str
    input_ids: tuple[int, ...]  # the prompt's tokens
    subject_range: tuple[int, int]  # [start, end) token positions of the subject
    answer_id: int  # the first token of " " + answer


@dataclass
class FactTrace:
    fact: TraceFact
    p_clean: float
    p_corrupted: float
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> [L, S] p restored; NaN: not traced

    def effects(self, kind: str) -> torch.Tensor:
        return self.scores[kind] - self.p_corrupted  # [L, S] indirect effects


# --------------------------------------------------------------------------------------------
# Tokens, noise


def subject_token_range(tok, template: str, subject: str) -> tuple[list[int], int, int]:
    """Token ids of ``template.format(subject)`` and the [start, end) positions of the tokens that
    overlap the subject's characters (from the fast tokenizer's offsets)."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt template {template!r} must contain '{{}}' exactly once")
    text = template.format(subject)
    first = template.index("{}")
    last = first + len(subject)
    if not getattr(tok, "is_fast", False):
        raise ValueError("editlab locate needs a fast tokenizer (token offsets find the subject)")
    enc = tok(text, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < last and b > first]
    if not inside:
        raise ValueError(f"subject {subject!r} has no token in {text!r}")
    return list(enc["input_ids"]), inside[0], inside[-1] + 1


def embedding_std(view: ModelView, tok, subjects: Sequence[str]) -> float:
    """Standard deviation of every entry of the input embeddings of the subjects' tokens (each
    occurrence counts), as ROME measures the noise scale."""
    ids = [i for subject in subjects for i in tok(subject, add_special_tokens=False)["input_ids"]]
    if len(ids) < 1:
        raise ValueError("no subject tokens to measure the embedding spread on")
    embed = view.model.get_input_embeddings()
    with torch.no_grad():
        vectors = embed(torch.tensor(ids, device=view.device))  # [T, d]
    return vectors.float().std().item()


def draw_noise(generator: torch.Generator, samples: int, n_tokens: int, width: int, scale: float) -> torch.Tensor:
    return scale * torch.randn(samples, n_tokens, width, generator=generator)  # [K, n_subject, d]


# --------------------------------------------------------------------------------------------
# Restorations


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The reference's run of ``window`` layers around ``layer``, cut at the ends."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def grid(kind: str, n_layers: int, positions: Sequence[int], window: int) -> list[Restoration]:
    """One restoration per (layer, position), position-major: the residual state of one layer, or
    the MLP/attention outputs of ``window`` layers around it."""
    out = []
    for token in positions:
        for layer in range(n_layers):
            layers = [layer] if kind == "residual" else window_layers(layer, window, n_layers)
            out.append(tuple((kind, j, token) for j in layers))
    return out


def restoration_masks(
    restorations: Sequence[Restoration], samples: int, seq_len: int
) -> dict[tuple[str, int], torch.Tensor]:
    """{(kind, layer): [1 + R·K, S] bool}: which positions of which rows take row 0's state. Row 0
    is clean; rows 1 + r·K … 1 + r·K + K − 1 are restoration r's K noise samples."""
    rows = 1 + len(restorations) * samples
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for r, states in enumerate(restorations):
        for kind, layer, token in states:
            if kind not in KINDS or not 0 <= token < seq_len:
                raise ValueError(f"bad state {(kind, layer, token)} for a {seq_len}-token prompt")
            mask = masks.setdefault((kind, layer), torch.zeros(rows, seq_len, dtype=torch.bool))
            mask[1 + r * samples : 1 + (r + 1) * samples, token] = True
    return masks


def state_module(view: ModelView, kind: str, layer: int) -> nn.Module:
    """The module whose output is the state: the decoder layer (residual stream after it), the FFN
    out-projection (its output is the MLP's, in eval mode), the self-attention block."""
    if kind == "residual":
        return view.layer(layer)
    if kind == "mlp":
        return view.ffn_out(layer)
    if kind == "attn":
        return view.attn(layer)
    raise ValueError(f"unknown state kind {kind!r}; one of {KINDS}")


@torch.no_grad()
def restored_probabilities(
    view: ModelView,
    input_ids: Sequence[int],
    subject_range: tuple[int, int],
    answer_id: int,
    noise: torch.Tensor,  # [K, n_subject, d]
    restorations: Sequence[Restoration],
) -> tuple[float, torch.Tensor]:
    """One forward: p(answer) of the clean run and, per restoration, averaged over the K noise
    samples, of the corrupted run with those states restored. An empty restoration is the plain
    corrupted run. Returns (p_clean, [R])."""
    samples, seq_len = noise.shape[0], len(input_ids)
    start, end = subject_range
    if noise.shape[1] != end - start:
        raise ValueError(f"noise for {noise.shape[1]} tokens, subject has {end - start}")
    rows = 1 + len(restorations) * samples
    device = view.device
    ids = torch.tensor(list(input_ids), device=device).expand(rows, seq_len)  # [B, S]
    noise_rows = noise.to(device).repeat(len(restorations), 1, 1)  # [B - 1, n_subject, d]

    def corrupt(embedded: torch.Tensor) -> torch.Tensor:  # [B, S, d]
        added = torch.zeros_like(embedded)
        added[1:, start:end] = noise_rows.to(embedded.dtype)
        return embedded + added

    def restore(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        mask = mask.to(device)[:, :, None]  # [B, S, 1]
        return lambda hidden: torch.where(mask, hidden[:1], hidden)  # row 0's state, bit for bit

    with ExitStack() as stack:
        stack.enter_context(edit_output(view.model.get_input_embeddings(), "embeddings", corrupt))
        for (kind, layer), mask in restoration_masks(restorations, samples, seq_len).items():
            stack.enter_context(edit_output(state_module(view, kind, layer), f"{kind}@{layer}", restore(mask)))
        out = view.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    logits = view.unembed()(out.last_hidden_state[:, -1])  # [B, V]
    # float64 for the mean: K equal float32 values then average to exactly that value.
    probs = torch.softmax(logits.float(), dim=-1)[:, answer_id].cpu().double()  # [B]
    return probs[0].item(), probs[1:].view(len(restorations), samples).mean(dim=1)


def trace_fact(
    view: ModelView,
    fact: TraceFact,
    noise: torch.Tensor,  # [K, n_subject, d]
    kinds: Sequence[str],
    window: int,
    batch_size: int,
    on_batch: Callable[[int], None] = lambda n: None,
) -> FactTrace:
    """Every restoration grid of ``kinds`` for one fact, ``batch_size`` corrupted rows a forward."""
    n_layers, seq_len = view.n_layers, len(fact.input_ids)
    positions = list(range(fact.subject_range[0], seq_len))
    labels = [kind for kind in kinds for _ in range(n_layers * len(positions))]
    restorations: list[Restoration] = [()]  # the plain corrupted run first
    for kind in kinds:
        restorations += grid(kind, n_layers, positions, window)
    per_batch = max(1, batch_size // noise.shape[0])
    p_clean, parts = None, []
    for lo in range(0, len(restorations), per_batch):
        chunk = restorations[lo : lo + per_batch]
        clean, probs = restored_probabilities(view, fact.input_ids, fact.subject_range, fact.answer_id, noise, chunk)
        p_clean = clean if p_clean is None else p_clean  # the first batch's clean row
        parts.append(probs)
        on_batch(len(chunk))
    probs = torch.cat(parts)  # [1 + len(kinds) · P · L]
    scores = {}
    for kind in kinds:
        grid_probs = probs[1:][[i for i, k in enumerate(labels) if k == kind]].view(len(positions), n_layers)
        full = torch.full((n_layers, seq_len), float("nan"), dtype=torch.float64)
        full[:, positions] = grid_probs.T
        scores[kind] = full
    return FactTrace(fact, p_clean, probs[0].item(), scores)


# --------------------------------------------------------------------------------------------
# Aggregation, suggestion


def token_groups(start: int, end: int, seq_len: int) -> dict[str, list[int]]:
    """ROME's token groups for a subject at [start, end) of a ``seq_len``-token prompt. Groups may
    be empty (a one-token subject has no middle) or share a position (a subject at the end)."""
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, end - 1)),
        "last subject token": [end - 1],
        "first subsequent token": [end] if end < seq_len else [],
        "further tokens": list(range(end + 1, seq_len - 1)),
        "last token": [seq_len - 1],
    }


def aggregate(traces: Sequence[FactTrace], kinds: Sequence[str]) -> dict[str, dict[str, dict]]:
    """{kind: {group: {"mean": [L] mean indirect effect over (fact, position) rows, "rows": n,
    "facts": facts with that group}}}; mean is None where no fact has the group."""
    out: dict[str, dict[str, dict]] = {}
    for kind in kinds:
        out[kind] = {}
        for group in GROUPS:
            rows = []
            facts = 0
            for trace in traces:
                start, end = trace.fact.subject_range
                positions = token_groups(start, end, len(trace.fact.input_ids))[group]
                if positions:
                    facts += 1
                    rows.append(trace.effects(kind)[:, positions].T)  # [P, L]
            mean = torch.cat(rows).mean(dim=0).tolist() if rows else None
            out[kind][group] = {"mean": mean, "rows": sum(len(r) for r in rows), "facts": facts}
    return out


def suggest_window(effects: Sequence[float], width: int) -> list[int]:
    """The ``width`` consecutive layers with the largest summed effect (the first of equals)."""
    if not 1 <= width <= len(effects):
        raise ConfigError(f"option --edit-width={width} must be between 1 and the model's {len(effects)} layers")
    sums = [sum(effects[i : i + width]) for i in range(len(effects) - width + 1)]
    best = max(range(len(sums)), key=lambda i: (sums[i], -i))
    return list(range(best, best + width))


# --------------------------------------------------------------------------------------------
# Choosing facts


@torch.no_grad()
def select_known_facts(view: ModelView, tok, requests, n: int, batch_size: int = 32) -> tuple[list[TraceFact], int]:
    """The first ``n`` requests whose greedy next token after the prompt is the first token of
    `` target_true``, and how many requests were read to find them."""
    from editlab.models.prompts import answer_ids, pad

    facts: list[TraceFact] = []
    scanned = 0
    for lo in range(0, len(requests), batch_size):
        chunk = requests[lo : lo + batch_size]
        rows = [_subject_tokens(tok, req) for req in chunk]
        batch = pad([ids for ids, _, _ in rows], tok.pad_token_id).to(view.device)
        hidden = view.model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state  # [b, S, d]
        last = hidden[torch.arange(len(rows), device=hidden.device), batch.lengths - 1]  # [b, d]
        greedy = view.unembed()(last).argmax(dim=-1).tolist()  # [b]
        for req, (ids, start, end), top in zip(chunk, rows, greedy, strict=True):
            scanned += 1
            answer = answer_ids(tok, req.target_true)[0]
            if top == answer:
                facts.append(
                    TraceFact(req.case_id, req.prompt, req.subject, req.target_true, tuple(ids), (start, end), answer)
                )
                if len(facts) == n:
                    return facts, scanned
    return facts, scanned


def _subject_tokens(tok, req) -> tuple[list[int], int, int]:
    from editlab.data.sources import DataError

    try:
        return subject_token_range(tok, req.prompt, req.subject)
    except ValueError as err:  # the record or the tokenizer, not editlab: one line naming the case
        raise DataError(f"case {req.case_id}: {err}") from err


# --------------------------------------------------------------------------------------------
# The whole run


def check_requests(requests) -> None:
    if not requests or any(req.target_true is None for req in requests):
        raise ConfigError("editlab locate needs records with a true answer (CounterFact's target_true); zsRE has none")


def locate(
    view: ModelView, tok, requests, cfg: LocateConfig, progress: Callable[[int, int, FactTrace], None] | None = None
) -> dict:
    """Trace ``cfg.num_facts`` known facts of ``requests``; the result as written to locate.json."""
    from tqdm.auto import tqdm

    from editlab.console import stderr_is_terminal

    check_requests(requests)
    if cfg.edit_width > view.n_layers:
        suggest_window([0.0] * view.n_layers, cfg.edit_width)  # raises the option's error, before the work
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    std = embedding_std(view, tok, [req.subject for req in requests[: cfg.noise_subjects]])
    scale = cfg.noise if cfg.noise is not None else cfg.noise_multiplier * std
    facts, scanned = select_known_facts(view, tok, requests, cfg.num_facts)
    if len(facts) < cfg.num_facts:
        raise ConfigError(
            f"option --num-facts={cfg.num_facts}: the model answers only {len(facts)} of the {len(requests)} "
            "records correctly (greedy first token of target_true)"
        )
    seconds["select"] = time.perf_counter() - began
    generator = torch.Generator().manual_seed(cfg.seed)
    width = view.model.get_input_embeddings().weight.shape[1]
    rows_per_fact = [1 + len(cfg.kinds) * view.n_layers * (len(f.input_ids) - f.subject_range[0]) for f in facts]
    bar = tqdm(
        total=sum(rows_per_fact), desc="locate", unit="restoration", disable=not stderr_is_terminal(), file=sys.stderr
    )
    traces = []
    traced = time.perf_counter()
    for index, fact in enumerate(facts):
        start, end = fact.subject_range
        noise = draw_noise(generator, cfg.samples, end - start, width, scale)
        trace = trace_fact(view, fact, noise, cfg.kinds, cfg.window, cfg.batch_size, bar.update)
        traces.append(trace)
        if progress is not None:
            progress(index, len(facts), trace)
    bar.close()
    seconds["trace"] = time.perf_counter() - traced
    effects = aggregate(traces, cfg.kinds)
    curve = effects["mlp"][SUGGESTION_GROUP]["mean"]
    layers = suggest_window(curve, cfg.edit_width)
    seconds["total"] = time.perf_counter() - began
    p_clean = [t.p_clean for t in traces]
    p_corrupted = [t.p_corrupted for t in traces]
    return {
        "settings": {
            **asdict(cfg),
            "kinds": list(cfg.kinds),
            "embedding_std": std,
            "noise_scale": scale,
            "threads": torch.get_num_threads(),
        },
        "n_layers": view.n_layers,
        "groups": list(GROUPS),
        "selection": {
            "criterion": "greedy next token after the prompt == first token of ' ' + target_true",
            "records_read": scanned,
            "facts": len(facts),
        },
        "mean_p_clean": sum(p_clean) / len(p_clean),
        "mean_p_corrupted": sum(p_corrupted) / len(p_corrupted),
        "effects": effects,
        "suggestion": {
            "layers": layers,
            "kind": "mlp",
            "group": SUGGESTION_GROUP,
            "window": cfg.window,
            "summed_effect": sum(curve[i] for i in layers),
            "peak_layer": max(range(len(curve)), key=lambda i: (curve[i], -i)),
        },
        "facts": [
            {
                "case_id": t.fact.case_id,
                "prompt": t.fact.prompt.format(t.fact.subject),
                "subject": t.fact.subject,
                "answer": t.fact.answer,
                "tokens": len(t.fact.input_ids),
                "subject_range": list(t.fact.subject_range),
                "p_clean": t.p_clean,
                "p_corrupted": t.p_corrupted,
            }
            for t in traces
        ],
        "seconds": seconds,
    }


# --------------------------------------------------------------------------------------------
# Figure

CMAPS = {"residual": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"residual": "single layer output", "mlp": "MLP outputs", "attn": "attention outputs"}


def plot_locate(result: dict, path: str | Path, model_name: str = "") -> Path:
    """ROME's summary heatmaps: token group × layer, one panel per kind, one colour scale."""
    import matplotlib

    matplotlib.use("Agg")  # headless machines
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    kinds = result["settings"]["kinds"]
    n_layers, window = result["n_layers"], result["settings"]["window"]
    tables = {
        kind: np.array(
            [[math.nan] * n_layers if g["mean"] is None else g["mean"] for g in result["effects"][kind].values()]
        )  # [groups, L]
        for kind in kinds
    }
    vmax = max(float(np.nanmax(t)) for t in tables.values())
    vmax = vmax if vmax > 0 else 1.0
    # One panel gets the width of two: the title names the model, the facts and the suggestion.
    figure = Figure(figsize=(4.4 * max(2, len(kinds)), 2.9), dpi=150, layout="constrained")
    axes = figure.subplots(1, len(kinds), squeeze=False)[0]
    step = 1 if n_layers <= 12 else 5
    for ax, kind in zip(axes, kinds, strict=True):
        mesh = ax.pcolormesh(np.ma.masked_invalid(tables[kind]), cmap=CMAPS[kind], vmin=0.0, vmax=vmax)
        ax.invert_yaxis()
        ax.set_yticks([0.5 + i for i in range(len(GROUPS))])
        ax.set_yticklabels(GROUPS if ax is axes[0] else [], fontsize=8)
        ax.set_xticks([0.5 + i for i in range(0, n_layers, step)])
        ax.set_xticklabels([str(i) for i in range(0, n_layers, step)], fontsize=8)
        single = kind == "residual" or window == 1
        ax.set_title(TITLES[kind] if single else f"{TITLES[kind]}, window {window}", fontsize=9)
        ax.set_xlabel("layer" if single else "centre layer of the restored window", fontsize=8)
        figure.colorbar(mesh, ax=ax).ax.tick_params(labelsize=7)
        if kind == "mlp":
            layers = result["suggestion"]["layers"]
            row = GROUPS.index(SUGGESTION_GROUP)
            ax.add_patch(Rectangle((layers[0], row), len(layers), 1, fill=False, edgecolor="black", linewidth=1.2))
    name = f" of {model_name}" if model_name else ""
    figure.suptitle(
        f"Average indirect effect on p(answer){name}, {result['selection']['facts']} facts "
        f"(box: suggested MLP layers {result['suggestion']['layers'][0]}-{result['suggestion']['layers'][-1]})",
        fontsize=9,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# --------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + message is two lines; editlab's errors are one
        raise ConfigError(f"editlab locate: {message}")


def build_parser() -> argparse.ArgumentParser:
    defaults = LocateConfig()
    p = _Parser(prog="editlab locate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="hub id, local directory or the embedded default")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", required=True, help="CounterFact records (json, json.gz, jsonl)")
    p.add_argument("--out", required=True, help="directory for locate.json and locate.png")
    p.add_argument("--num-facts", type=int, default=defaults.num_facts, help="facts the model answers, traced")
    p.add_argument("--samples", type=int, default=defaults.samples, help="noise draws per fact")
    p.add_argument("--noise-multiplier", type=float, default=defaults.noise_multiplier)
    p.add_argument("--noise", type=float, default=None, help="explicit noise scale (instead of multiplier × std)")
    p.add_argument("--noise-subjects", type=int, default=defaults.noise_subjects)
    p.add_argument("--window", type=int, default=defaults.window, help="MLP/attention layers restored together")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: residual,mlp,attn")
    p.add_argument("--edit-width", type=int, default=defaults.edit_width, help="layers in the suggested window")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="corrupted rows per forward")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    return p


def locate_main(argv: list[str], debug: bool = False) -> int:
    from editlab.errors import USAGE_EXIT, user_error_message

    try:
        return _locate_main(argv)
    except BaseException as err:
        message = None if debug else user_error_message(err)
        if message is None:
            raise  # a bug, --help, or --debug: as it is, with its traceback
        print(f"editlab: error: {message}", file=sys.stderr, flush=True)
        return USAGE_EXIT


def _locate_main(argv: list[str]) -> int:
    from editlab.data.sources import load_requests
    from editlab.errors import one_line, strip_prefix
    from editlab.files import write_text_atomic
    from editlab.models.load import load_model_and_tokenizer
    from editlab.numerics import set_threads

    args = build_parser().parse_args(argv)
    try:
        cfg = LocateConfig(
            num_facts=args.num_facts,
            samples=args.samples,
            noise_multiplier=args.noise_multiplier,
            noise=args.noise,
            noise_subjects=args.noise_subjects,
            window=args.window,
            kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
            edit_width=args.edit_width,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except ConfigError as err:
        raise ConfigError(one_line(strip_prefix(str(err)))) from err
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"option --threads={args.threads} must be >= 1")
    set_threads(args.threads)
    requests = load_requests(args.data)  # before the model: a bad record fails in a second
    check_requests(requests)
    began = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model, args.dtype, args.device)
    try:
        view = ModelView.of(model)
    except ValueError as err:  # a model_type without an architecture entry
        raise ConfigError(str(err)) from err
    loaded = time.perf_counter() - began

    def line(index: int, total: int, trace: FactTrace) -> None:
        if not _terminal():
            print(
                f"editlab locate: fact {index + 1}/{total} (case {trace.fact.case_id}) "
                f"p clean {trace.p_clean:.3f}, corrupted {trace.p_corrupted:.3f}",
                file=sys.stderr,
                flush=True,
            )

    result = locate(view, tok, requests, cfg, progress=line)
    result = {"model": args.model, "dtype": args.dtype, "data": args.data, **result}
    result["seconds"]["load"] = loaded
    out = Path(args.out)
    write_text_atomic(out / "locate.json", json.dumps(result, indent=1) + "\n")
    plot_locate(result, out / "locate.png", Path(args.model).name)
    suggestion = result["suggestion"]
    print(
        f"editlab locate: suggested MLP layers {suggestion['layers']} (peak {suggestion['peak_layer']}, "
        f"last subject token, window {cfg.window})",
        file=sys.stderr,
    )
    print(out / "locate.json")
    return 0


def _terminal() -> bool:
    from editlab.console import stderr_is_terminal

    return stderr_is_terminal()
