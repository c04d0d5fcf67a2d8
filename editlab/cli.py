"""``editlab`` — the command. ``fit|validate|test`` go to the Lightning CLI with editlab's defaults
(EditLabCLI, editlab/lightning/cli.py); ``report``, ``study``, ``locate``, ``apply-delta``,
``stats`` and ``zbank`` to their modules (editlab/report.py, editlab/commands/). A user error ends as one
``editlab: error: …`` line and exit status 2 (``--debug`` or ``EDITLAB_DEBUG=1``: the traceback).

The last line ``editlab fit`` prints is the path of summary.json. ``editlab fit ... --ckpt_path
last`` continues an interrupted run from its edit-state checkpoint (``<run dir>/checkpoints/
edit_state.pt``, editlab's own: Lightning's checkpoints would hold the whole LM).
"""

from __future__ import annotations

import sys

from lightning.pytorch.utilities.exceptions import SIGTERMException

from editlab.console import quiet_library_bars, quiet_lightning
from editlab.errors import SIGTERM_EXIT, USAGE_EXIT, debug_requested, user_error_message, without_debug_flag
from editlab.lightning.cli import EditLabCLI


def quiet_expected_warnings() -> None:
    """Lightning warns about two things editlab does on purpose: the frozen LM stays in eval mode
    during fit, and the module (not the data module) decides that batches of strings stay put."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device` in `LightningModule`.*")
    warnings.filterwarnings("ignore", message=r".*configure_optimizers` returned `None`.*")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    debug = debug_requested(argv)
    argv = without_debug_flag(argv)
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself, and would refuse --debug
    quiet_expected_warnings()
    quiet_lightning()
    quiet_library_bars()
    if argv and argv[0] == "report":
        from editlab.report import report_main

        sys.exit(report_main(argv[1:]))
    if argv and argv[0] == "study":
        from editlab.commands.study import study_main

        sys.exit(study_main(argv[1:]))
    if argv and argv[0] == "locate":
        from editlab.commands.locate import locate_main

        sys.exit(locate_main(argv[1:], debug=debug))
    if argv and argv[0] == "apply-delta":
        from editlab.commands.apply_delta import apply_delta_main

        sys.exit(apply_delta_main(argv[1:]))
    try:
        if argv and argv[0] == "stats":  # in here: its user errors get the one line too
            from editlab.commands.stats import stats_main

            sys.exit(stats_main(argv[1:]))
        if argv and argv[0] == "zbank":
            from editlab.commands.zbank import zbank_main

            sys.exit(zbank_main(argv[1:]))
        # args=None lets LightningCLI read sys.argv itself (it warns when given both).
        EditLabCLI(args=None if args is None else argv)
    except SIGTERMException:
        # Lightning's SIGTERMException is a SystemExit with status 0: a stopped run must not look finished.
        print("editlab: stopped by SIGTERM before the run finished", file=sys.stderr, flush=True)
        sys.exit(SIGTERM_EXIT)
    except BaseException as err:
        message = None if debug else user_error_message(err)
        if message is None:
            raise  # a bug, an ordinary exit (--help), or --debug: as it is, with its traceback
        print(f"editlab: error: {message}", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT)


if __name__ == "__main__":
    main()
