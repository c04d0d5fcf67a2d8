"""EditLabCLI: the Lightning CLI with editlab's defaults (``editlab fit|validate|test``).

Every run writes into ``--trainer.default_root_dir`` itself (no nested version folder): the
resolved config, metrics.csv of the default CSV logger, cases.jsonl and summary.json. The CLI
takes the run directory (a lock, refused when another run, a finished run or other options hold
it) before anything is built, and turns an option value refused by the class it configures into a
ConfigError (one line). ``editlab.cli.main`` dispatches to it and to the other commands.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from editlab import rundir
from editlab.console import stderr_is_terminal
from editlab.data.datamodule import EditDataModule
from editlab.errors import ConfigError, RunDirRefused
from editlab.lightning.editstate import config_differences
from editlab.lightning.module import EditingModule
from editlab.numerics import set_threads
from editlab.runlock import acquire_run_lock, is_rank_zero_process, release_run_lock

DEFAULT_ROOT = "runs/editlab"


class RunDirConfig(SaveConfigCallback):
    """Save the resolved config into the run directory itself, and give it to every logger as the
    run's hyperparameters (W&B shows it as the run config)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config,
            root / self.config_filename,
            skip_none=False,
            overwrite=self.overwrite,
            multifile=self.multifile,
        )
        resolved = self.config.clone().as_dict()
        # The variant (MEMIT_seq, ECE-two-step, ...): the class_path alone does not say it.
        resolved["method_name"] = pl_module.method.name
        for logger in trainer.loggers:
            logger.log_hyperparams(resolved)
        self.already_saved = True


class EditLabCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            EditingModule,
            EditDataModule,
            save_config_callback=RunDirConfig,
            save_config_kwargs={"overwrite": True, "config_filename": rundir.CONFIG},
            trainer_defaults={
                "max_epochs": 1,
                "accelerator": "cpu",
                "devices": 1,
                "default_root_dir": DEFAULT_ROOT,
                "enable_checkpointing": False,
                "num_sanity_val_steps": 0,
                "log_every_n_steps": 1,
                "enable_model_summary": False,
                # Every rank of a multi-device run edits with the same batches (it shares each
                # batch's requests itself); a distributed sampler would give ranks different ones.
                "use_distributed_sampler": False,
                # Tensors made under inference mode cannot enter autograd later (z optimisation).
                "inference_mode": False,
            },
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Allow writing into a run directory that already holds a finished run (its summary.json).",
        )
        parser.add_argument(
            "--threads",
            type=Optional[int],
            default=None,
            help="Intra-op CPU threads (default: torch's, all cores). Results are bit-identical for the same "
            "torch version and thread count; the count in use is written into config.yaml.",
        )
        parser.add_argument(
            "--plan",
            type=Optional[bool],
            nargs="?",
            const=True,
            default=False,
            help="Print the resolved plan (model, method, layers, dtype, steps) and the memory estimate, "
            "built on the meta device without the weights, then exit.",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.get("plan"):  # before the run-directory checks: a plan writes nothing
            from editlab.plan import make_plan

            print(make_plan(cfg.model, cfg.data).describe(), flush=True)
            sys.exit(0)
        trainer = cfg.trainer
        root = trainer.default_root_dir or DEFAULT_ROOT
        trainer.default_root_dir = root
        # Before anything runs a kernel: the thread count decides the bits of every float reduction.
        cfg.threads = set_threads(cfg.get("threads"))
        # The lock first: a directory another run is writing is "in use", not "interrupted".
        self.take_run_dir(Path(root))
        try:
            self.check_run_dir(Path(root), cfg.get("ckpt_path"), bool(cfg.get("overwrite", False)))
            if cfg.get("ckpt_path") is not None and (Path(root) / rundir.CONFIG).is_file():
                self.check_same_run(Path(root) / rundir.CONFIG, cfg)
        except BaseException:
            self.release_run_dir()  # refused: the directory stays free for the run that may write it
            raise
        if trainer.enable_progress_bar is None and not stderr_is_terminal():
            trainer.enable_progress_bar = False  # a log file gets the module's line per step instead
        if trainer.strategy in (None, "auto") and wants_several_processes(trainer.devices, trainer.num_nodes):
            from jsonargparse import Namespace

            trainer.strategy = Namespace(class_path="editlab.lightning.strategy.EditStrategy", init_args=Namespace())
        # The CSV logger always writes metrics.csv straight into the run directory; configured
        # loggers without a save_dir of their own write there too.
        from jsonargparse import Namespace

        csv = Namespace(
            class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=root, name="", version="")
        )
        logger = trainer.logger
        if logger is None or logger is True:
            trainer.logger = csv
            return
        if logger is False:
            return
        loggers = list(logger) if isinstance(logger, list) else [logger]
        for item in loggers:
            init = getattr(item, "init_args", None)
            if init is not None and "save_dir" in init and init.save_dir in (None, ".", ""):
                init.save_dir = root
            if "CSVLogger" in str(getattr(item, "class_path", "")):
                init.name, init.version = "", ""
        if not any("CSVLogger" in str(getattr(item, "class_path", "")) for item in loggers):
            loggers.insert(0, csv)
        trainer.logger = loggers

    def take_run_dir(self, root: Path) -> None:
        """Lock the run directory for this process (editlab.runlock); the other ranks of a
        multi-device run are this process's children and write under its lock."""
        self.run_lock = acquire_run_lock(root) if is_rank_zero_process() else None

    def release_run_dir(self) -> None:
        lock = getattr(self, "run_lock", None)
        if lock is not None:
            release_run_lock(lock)
            self.run_lock = None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException as err:
            self.release_run_dir()
            if isinstance(err, ValueError) and not isinstance(err, ConfigError):
                raise ConfigError(str(err)) from err  # an option value refused by the class it configures
            raise

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:  # an in-process run (tests) frees the directory at once, not at interpreter exit
            self.release_run_dir()

    def check_run_dir(self, root: Path, ckpt_path: str | None, overwrite: bool) -> None:
        """Refuse, before any work, to overwrite a finished run or to restart an interrupted one."""
        state = rundir.edit_state_path(root)
        if (root / rundir.SUMMARY).exists() and not overwrite:
            hint = " (nothing to resume)" if ckpt_path else ""
            raise RunDirRefused(
                f"editlab: {root} already holds a finished run (summary.json){hint}; choose another "
                "--trainer.default_root_dir or pass --overwrite true"
            )
        if self.subcommand != "fit":
            if ckpt_path is not None:
                raise RunDirRefused(
                    f"editlab {self.subcommand}: --ckpt_path is for fit; evaluate a saved model with --model.model DIR"
                )
            return
        if ckpt_path is None and state.exists():
            if not overwrite:
                raise RunDirRefused(
                    f"editlab: {root} holds an interrupted run ({state}); continue it with --ckpt_path last, "
                    "or start over with --overwrite true"
                )
            # Starting over: the old edit state must not be resumed by mistake later. missing_ok:
            # under srun every task of a shared run directory runs this check, and one removes it first.
            state.unlink(missing_ok=True)
            (root / rundir.EVALUATION_PARTS).unlink(missing_ok=True)  # nor the old run's parts
            shutil.rmtree(root / rundir.STEP_PARTS, ignore_errors=True)
        if ckpt_path not in (None, "last") and not Path(ckpt_path).is_file():
            raise RunDirRefused(f"editlab: --ckpt_path {ckpt_path}: no such file (use 'last' or an edit_state.pt)")

    def check_same_run(self, saved_path: Path, cfg) -> None:
        """A resumed run must have the interrupted run's model and data options (the edits and the
        results depend on them); anything else may change. Checked before the loggers start (the
        CSV logger clears metrics.csv)."""
        import yaml

        saved = yaml.safe_load(saved_path.read_text()) or {}
        current = yaml.safe_load(self._parser(self.subcommand).dump(cfg)) or {}
        diff = config_differences(saved, current)
        if diff:
            raise RunDirRefused(
                f"editlab: cannot resume {saved_path.parent}: options differ from the interrupted run's "
                f"({saved_path}): " + "; ".join(diff) + ". Use the same options, or start over with --overwrite true"
            )

    def fit(self, model: EditingModule, datamodule=None, ckpt_path: str | None = None, **kwargs) -> None:
        """trainer.fit without Lightning's checkpoint loading: the module restores editlab's edit state."""
        if ckpt_path is not None:
            path = rundir.edit_state_path(self.trainer.default_root_dir) if ckpt_path == "last" else Path(ckpt_path)
            if path.is_file():
                model.resume_from = path
            else:  # as Lightning's "last" with no checkpoint: a first run of a restartable job
                print(
                    f"[editlab] --ckpt_path last: no edit state in {path.parent}, starting from the first step",
                    file=sys.stderr,
                )
        kwargs.pop("weights_only", None)
        self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def after_test(self) -> None:
        self.after_fit()

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return  # rank 0 writes the results and prints their path
        summary = getattr(self.model, "summary_path", None)
        if summary is None:
            raise RuntimeError("the edit stream ended without writing summary.json")
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        except ImportError:
            pass
        sys.stdout.flush()
        print(os.fspath(summary), flush=True)


def wants_several_processes(devices, num_nodes) -> bool:
    """Whether the trainer's ``devices``/``num_nodes`` ask for more than one process."""
    if num_nodes not in (None, 1):
        return True
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    if isinstance(devices, str):
        devices = devices.strip()
        if devices == "auto":
            return False
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()]) > 1
        devices = int(devices)
    return devices is not None and (devices == -1 or devices > 1)
