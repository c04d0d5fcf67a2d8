"""``editlab zbank``: the z on θ₀ of a config's ECE or NSE for its edit data, computed ahead.

    editlab zbank [FIT OPTIONS]

ECE (as released) and NSE optimise each request's z on the unedited weights θ₀, so z depends on
the request and the z settings, never on the stream: it can be computed once, in another process,
and shared by every run that uses it. This fills the method's z cache (``z_cache`` true: under the
cache root; a directory: that z bank) step by step, with the keys a run's steps use (model, θ₀'s
fingerprint, context templates, z settings, request; each chunk of ``targets.requests_per_forward``
requests is kept as it is done). A request whose z is there already is skipped. Nothing is edited
or evaluated. With ``--data.offset`` (a multiple of ``--data.edits_per_step``, so that the steps are
the run's) one process fills the second half of a stream on one core while the run works through
the first half on the other.

FIT OPTIONS are ``editlab fit``'s (``--config C``, ``--data.*``, ``--model.*``, ``--threads``),
parsed by the same parser. The method's setup runs as in a fit (context templates; the covariance
statistics, from the cache when there).
"""

from __future__ import annotations

import sys
import time

from editlab.commands.stats import ModelUnderStats, device_of, resolve_fit_config
from editlab.console import stderr_is_terminal
from editlab.errors import ConfigError

USAGE = __doc__.split("\n\n")[1]


def zbank_main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage:\n" + USAGE + "\n\nFIT OPTIONS: see editlab fit --help.")
        return 0
    import torch

    from editlab.data.datamodule import EditDataModule
    from editlab.editing.methods.base import EditContext
    from editlab.editing.methods.rewinding import RewindingMethod
    from editlab.keyed_cache import cache_root
    from editlab.numerics import set_threads
    from editlab.plan import instantiate_method

    cfg = resolve_fit_config(argv)
    try:
        method = instantiate_method(cfg.model.method)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if not isinstance(method, RewindingMethod):
        raise ConfigError(f"editlab zbank: method {method.name} takes no z on θ₀ (ECE and NSE do)")
    try:
        method.check_fill_z()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    data = EditDataModule(**cfg.data.as_dict())
    steps = data.steps()  # the records are read and checked before the model is loaded
    set_threads(cfg.get("threads"))
    root = cache_root(cfg.model.get("cache_dir"))  # the config's, as editlab fit's
    model = ModelUnderStats.load(cfg.model.model, cfg.model.dtype, device_of(cfg.trainer.accelerator), root)
    bars = stderr_is_terminal()
    ctx = EditContext(
        model.lm, model.tok, model.view, model.model_id, model.fingerprint, cfg.model.seed, bars, cache_root=root
    )
    torch.manual_seed(cfg.model.seed)  # as EditRun.start before the method's setup
    method.setup(ctx)
    for k, batch in enumerate(steps, start=1):
        t0 = time.perf_counter()
        there = method.fill_z(ctx, batch)
        print(
            f"editlab: zbank step {k}/{len(steps)}: {len(batch)} requests, {there} already there, "
            f"{len(batch) - there} computed in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    return 0
