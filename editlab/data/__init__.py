"""Edit data: reading CounterFact / zsRE / demo records and serving them as edit steps."""

from editlab.data.datamodule import EditDataModule
from editlab.data.sources import DataError, check_tokenization, load_requests

__all__ = ["DataError", "EditDataModule", "check_tokenization", "load_requests"]
