"""Target values z: the residual-stream vector at the last edited layer that makes the model say
target_new, optimised for all requests of a step in one padded forward.

config.py    TargetConfig (the settings), TargetResult (z, h, loss, nll, steps per request)
rows.py      the step's token rows: rewrite rows (answers teacher-forced as in the metrics), KL rows,
             the plug-ins' extra rows (ExtraRow)
forwards.py  FullForward, PrefixCachedForward, LowerLayersCached: one forward of the selected rows
descent.py   descend_offsets (per-row Adam, clamp, early stop, chunks) and its plug-in interface
             (DescentTerm, EditSite); optimize_targets, MEMIT's z

The plug-ins live beside their methods: editing/eac.py (anchor mask, gradient record, scored
elastic net), editing/neighbours.py (neighbour rows), methods/pmet.py (the attention site),
editing/cluster.py (ECE's two-step z). This package imports none of them.
"""

from editlab.editing.targets.config import TargetConfig, TargetResult
from editlab.editing.targets.descent import (
    DescentSetup,
    DescentStep,
    DescentTerm,
    EditSite,
    OffsetDescent,
    RowAdam,
    TermLoss,
    descend_offsets,
    optimize_targets,
    row_means,
)
from editlab.editing.targets.forwards import FullForward, LowerLayersCached, PrefixCachedForward, rows_forward
from editlab.editing.targets.rows import ExtraRow, TargetRows, kl_token_index, target_rows

__all__ = [
    "DescentSetup",
    "DescentStep",
    "DescentTerm",
    "EditSite",
    "ExtraRow",
    "FullForward",
    "LowerLayersCached",
    "OffsetDescent",
    "PrefixCachedForward",
    "RowAdam",
    "TargetConfig",
    "TargetResult",
    "TargetRows",
    "TermLoss",
    "descend_offsets",
    "kl_token_index",
    "optimize_targets",
    "row_means",
    "rows_forward",
    "target_rows",
]
