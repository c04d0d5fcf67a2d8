"""Edit data: reading CounterFact / zsRE / demo records and serving them as edit steps; the text
corpora of the key statistics (corpus.py)."""

from editlab.data.sources import DataError, check_tokenization, load_requests

__all__ = ["DataError", "EditDataModule", "check_tokenization", "load_requests"]


def __getattr__(name: str):
    # The datamodule imports lightning (seconds): only its users pay for it, not every reader of
    # records or corpora (editlab.editing.stats, editlab stats).
    if name == "EditDataModule":
        from editlab.data.datamodule import EditDataModule

        return EditDataModule
    raise AttributeError(f"module 'editlab.data' has no attribute {name!r}")
