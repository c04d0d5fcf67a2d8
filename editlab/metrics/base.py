"""The base of editlab's torchmetrics."""

from __future__ import annotations

from torchmetrics import Metric


class LocalMetric(Metric):
    """A torchmetrics Metric that never synchronises across processes.

    In a multi-device run only rank 0 evaluates (the ranks share the editing work, not the
    evaluation), so a cross-rank sync in ``compute`` would wait forever for ranks that never
    update; rank 0's state already covers every case."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(**kwargs)
