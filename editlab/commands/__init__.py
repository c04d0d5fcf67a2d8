"""The subcommands besides LightningCLI's fit / validate / test / predict (editlab/cli.py dispatches):

- ``editlab stats``: compute, export and import the covariance statistics (stats.py).
- ``editlab locate``: ROME's causal tracing (locate.py).
- ``editlab study``: a list of runs, resumable, with a side-by-side report (study.py).
- ``editlab apply-delta``: write the edited model from an exported delta (apply_delta.py).
- a finished run's per-example probe outcomes for paired comparisons (probe_values.py; ``editlab study
  --collect`` and ``python -m editlab.commands.probe_values``).

``editlab report`` is editlab/report.py's. A command parses its own arguments and calls the
library; nothing below editlab/cli.py imports a command.
"""
