"""LightningDataModule that serves edit requests, one EditBatch per edit step."""

from __future__ import annotations

from typing import Literal

import lightning
from torch.utils.data import DataLoader

from editlab.data.sources import FORMATS, load_requests
from editlab.types import EditBatch, EditRequest


def keep_batch(item: EditBatch) -> EditBatch:
    """Collate function that returns the EditBatch untouched.

    With ``batch_size=None`` the DataLoader would otherwise run ``default_convert`` on each
    item; module-level (not a lambda) so the loader stays picklable for worker processes.
    """
    return item


def chunk(requests: list[EditRequest], size: int) -> list[EditBatch]:
    """Split ``requests`` in order into EditBatches of ``size`` (the last may be smaller)."""
    if size < 1:
        raise ValueError(f"option edits_per_step={size} must be >= 1")
    return [EditBatch(requests[i : i + size]) for i in range(0, len(requests), size)]


class EditDataModule(lightning.LightningDataModule):
    """Edit requests for sequential editing: each training "batch" is one edit step."""

    def __init__(
        self,
        path: str = "demo",
        format: Literal["auto", "counterfact", "zsre"] = "auto",
        num_edits: int | None = None,
        edits_per_step: int = 1,
        offset: int = 0,
        split: str = "train",
    ) -> None:
        """
        Args:
            path: ``"demo"`` for the bundled demo facts, a local ``.json``/``.json.gz`` (list of
                records) or ``.jsonl``/``.jsonl.gz`` file, or a hub dataset id ``owner/name``.
            format: record format; ``"auto"`` detects CounterFact or zsRE from the keys.
            num_edits: how many records to edit, taken in file order from ``offset``;
                ``None`` takes all remaining records. More than available is an error.
            edits_per_step: requests applied together in one edit step (one EditBatch).
            offset: index of the first record used (skip this many records).
            split: dataset split, only used for hub dataset ids.
        """
        super().__init__()
        # Checked here so a bad CLI value fails at parse time, before any model is loaded.
        if format not in FORMATS:
            raise ValueError(f"option format={format!r} is not one of {list(FORMATS)}")
        if num_edits is not None and num_edits < 1:
            raise ValueError(f"option num_edits={num_edits} must be >= 1 (or None for all)")
        if edits_per_step < 1:
            raise ValueError(f"option edits_per_step={edits_per_step} must be >= 1")
        if offset < 0:
            raise ValueError(f"option offset={offset} must be >= 0")
        self.path = path
        self.format = format
        self.num_edits = num_edits
        self.edits_per_step = edits_per_step
        self.offset = offset
        self.split = split
        self.requests: list[EditRequest] | None = None
        # The data position: a resumed run starts at the step after its checkpoint (set by the
        # EditingModule before the dataloader is made; not an option).
        self.first_step = 0
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Nothing to download: local files are read in :meth:`setup`."""

    def setup(self, stage: str | None = None) -> None:
        """Load and validate the requests (once; later calls keep the first result)."""
        if self.requests is None:
            self.requests = load_requests(
                self.path, format=self.format, num_edits=self.num_edits, offset=self.offset, split=self.split
            )

    def steps(self) -> list[EditBatch]:
        """The edit steps, in file order: EditBatches of ``edits_per_step`` requests."""
        self.setup()
        assert self.requests is not None
        return chunk(self.requests, self.edits_per_step)

    def train_dataloader(self) -> DataLoader:
        """One EditBatch per step, in order, from ``first_step``."""
        return DataLoader(self.steps()[self.first_step :], batch_size=None, shuffle=False, collate_fn=keep_batch)

    def test_dataloader(self) -> DataLoader:
        """``editlab test``: the same batches, evaluated without editing."""
        return DataLoader(self.steps(), batch_size=None, shuffle=False, collate_fn=keep_batch)
