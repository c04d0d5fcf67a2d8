"""``editlab stats``: the covariance statistics of a config's method on their own.

    editlab stats [compute] [FIT OPTIONS]      fill the cache ($EDITLAB_CACHE/stats)
    editlab stats export DIR [FIT OPTIONS]     write the cached statistics as safetensors + README.md
    editlab stats import SRC [--replace true] [FIT OPTIONS]
                                               check SRC's files against the model and config, then
                                               put them in the cache (SRC: a directory or hub id)

FIT OPTIONS are ``editlab fit``'s (``--config C``, ``--model.*``, ``--threads``, ...), parsed by
the same parser, so the model, dtype, method layers and covariance options are exactly those a
fit with the same options uses, and the entries written are the ones it reads. The edit data is
never read. ``--trainer.accelerator gpu`` computes on the first GPU.
"""

from __future__ import annotations

import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from editlab.console import stderr_is_terminal
from editlab.errors import ConfigError

ACTIONS = ("compute", "export", "import")
USAGE = __doc__.split("\n\n")[1]


@dataclass(frozen=True)
class StatsArgs:
    action: str
    target: str | None  # export's DIR, import's SRC
    replace: bool
    repo_type: str
    fit_args: list[str]


def parse_stats_args(argv: list[str]) -> StatsArgs:
    """Split ``editlab stats`` arguments into the action, its target and its own flags, and the
    fit options (everything else, for the fit parser)."""
    args = list(argv)
    action = args.pop(0) if args and args[0] in ACTIONS else "compute"
    target = None
    if action in ("export", "import"):
        if not args or args[0].startswith("-"):
            raise ConfigError(
                f"editlab stats {action} needs a directory first: editlab stats {action} DIR [FIT OPTIONS]"
            )
        target = args.pop(0)
    own = {"--replace": "false", "--repo_type": "model"}
    rest: list[str] = []
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in own:
            if not eq:
                if not args:
                    raise ConfigError(f"option {name} needs a value")
                value = args.pop(0)
            own[name] = value
        else:
            rest.append(arg)
    if own["--replace"] not in ("true", "false"):
        raise ConfigError(f"option --replace={own['--replace']!r} must be true or false")
    if own["--replace"] == "true" and action != "import":
        raise ConfigError("option --replace is for editlab stats import")
    return StatsArgs(action, target, own["--replace"] == "true", own["--repo_type"], rest)


def resolve_fit_config(fit_args: list[str]):
    """The ``fit`` config these options resolve to (defaults, config files, overrides, checks of
    the fit parser), without building the trainer, the data module or the LM."""
    from editlab.lightning.cli import EditLabCLI

    class ParseOnly(EditLabCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    with warnings.catch_warnings():
        # Lightning warns when given args while sys.argv holds others: here they are ``editlab stats …``.
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter.*")
        return ParseOnly(args=["fit", *fit_args]).config["fit"]


def method_statistics(model_cfg) -> tuple[object, list[int], object]:
    """The method of the config, the layers whose statistics it reads and its CovarianceConfig."""
    from editlab.plan import instantiate_method

    try:
        method = instantiate_method(model_cfg.method)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    needs = method.covariance_statistics()
    if needs is None:
        raise ConfigError(f"method {method.name} uses no covariance statistics: nothing to compute, export or import")
    layers, cov = needs
    return method, layers, cov


def device_of(accelerator) -> str:
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


class ProgressLines:
    """A plain progress line about every tenth of the texts, for a log file (no bar there)."""

    def __init__(self, total: int) -> None:
        self.total, self.next_tenth, self.started = total, 1, time.perf_counter()

    def __call__(self, texts: int, tokens: int) -> None:
        if texts * 10 < self.next_tenth * self.total:
            return
        self.next_tenth = texts * 10 // self.total + 1
        rate = tokens / max(time.perf_counter() - self.started, 1e-9)
        print(
            f"editlab: covariance {texts}/{self.total} texts, {tokens:,} tokens, {rate:,.0f} tokens/s",
            file=sys.stderr,
            flush=True,
        )


def stats_main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage:\n" + USAGE + "\n\nFIT OPTIONS: see editlab fit --help.")
        return 0
    args = parse_stats_args(argv)
    cfg = resolve_fit_config(args.fit_args)
    _, layers, cov = method_statistics(cfg.model)
    if args.action == "export":
        from editlab.editing.stats_files import StatsFileError

        if Path(args.target).exists() and not Path(args.target).is_dir():
            raise StatsFileError(f"statistics directory {args.target} is a file")
    from editlab.numerics import set_threads

    set_threads(cfg.get("threads"))
    if not cov.use_cache:
        print(
            "editlab: note: covariance.use_cache is false in this config: editlab fit with it computes its "
            "statistics itself and reads none of these",
            file=sys.stderr,
        )
    from editlab.editing.stats import statistics_cache
    from editlab.keyed_cache import cache_root

    root = cache_root(cfg.model.get("cache_dir"))  # the config's, as editlab fit's
    model = ModelUnderStats.load(cfg.model.model, cfg.model.dtype, device_of(cfg.trainer.accelerator), root)
    model.view.check_layers(layers)
    cache = statistics_cache(root)  # the same entries editlab fit reads
    if args.action == "compute":
        compute(model, layers, cov, cache)
    elif args.action == "export":
        export(model, layers, cov, cache, Path(args.target), "editlab stats " + shlex.join(argv))
    else:
        import_(model, layers, cov, cache, args.target, args.replace, args.repo_type)
    return 0


@dataclass(frozen=True)
class ModelUnderStats:
    """The LM the statistics are of, with what their cache keys name it by."""

    lm: object
    tok: object
    view: object
    model_id: str
    fingerprint: str
    dtype: str
    device: str

    @classmethod
    def load(cls, model_id: str, dtype: str, device: str, cache=None) -> "ModelUnderStats":
        from editlab.models.arch import ModelView
        from editlab.models.fingerprint import model_fingerprint
        from editlab.models.load import load_model_and_tokenizer

        lm, tok = load_model_and_tokenizer(model_id, dtype, device=device, cache=cache)
        # model_id as given, as EditingModule names it in the keys of a fit's cache entries.
        return cls(lm, tok, ModelView.of(lm), model_id, model_fingerprint(lm), dtype, device)

    def keys(self, layers: list[int], cov) -> dict[int, dict]:
        from editlab.editing.stats import layer_cache_keys, read_corpus

        _, corpus_id = read_corpus(cov)
        return layer_cache_keys(self.model_id, self.fingerprint, self.view, layers, cov, corpus_id)


def compute(model: ModelUnderStats, layers: list[int], cov, cache) -> None:
    from editlab.editing.stats import fill_cache

    bars = stderr_is_terminal()
    report = None if bars else ProgressLines(cov.num_samples)
    fill = fill_cache(model.view, model.tok, model.model_id, model.fingerprint, layers, cov, cache, bars, report)
    for layer in layers:
        state = "already in the cache, skipped" if layer in fill.cached else f"computed, {fill.tokens:,} tokens"
        print(f"layer {layer} ({fill.keys[layer]['module']}): {state}: {fill.paths[layer]}", flush=True)
    if fill.computed:
        print(
            f"editlab: {len(fill.computed)} layers computed from {fill.texts} texts ({fill.tokens:,} tokens) in "
            f"{fill.seconds:.1f} s, {fill.tokens_per_second:,.0f} tokens/s; {len(fill.cached)} already in the cache",
            flush=True,
        )
    else:
        print(f"editlab: all {len(layers)} layers already in the cache: nothing computed", flush=True)


def export(model: ModelUnderStats, layers: list[int], cov, cache, directory: Path, command: str) -> None:
    from editlab.editing.stats_files import export_from_cache, export_info, write_readme

    info = export_info(cov.corpus, model.dtype)
    files = export_from_cache(directory, cache, model.keys(layers, cov), info)
    for f in files:
        print(f"layer {f.key['layer']} ({f.key['module']}): {f.path}", flush=True)
    print(write_readme(directory, files, command), flush=True)


def import_(model: ModelUnderStats, layers: list[int], cov, cache, source: str, replace: bool, repo_type: str) -> None:
    from editlab.editing.stats_files import fetch_stats_dir, import_into_cache, plan_import, read_stats_dir

    files = read_stats_dir(fetch_stats_dir(source, repo_type))
    plan = plan_import(files, model.keys(layers, cov), model.dtype)
    for file, why in plan.skipped:
        print(f"{file.path.name}: not imported ({why})", flush=True)
    for layer, what in import_into_cache(plan, cache, replace).items():
        print(f"layer {layer} ({plan.chosen[layer].key['module']}): {what}", flush=True)
