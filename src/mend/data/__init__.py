"""Data formats -> list[EditRequest], and tokenisation into masked batches."""

from mend.data.collate import TokenBatch, check_requests, encode, make_batch
from mend.data.formats import load_requests
from mend.data.load import load_checked
from mend.data.sources import resolve_data

__all__ = [
    "TokenBatch",
    "check_requests",
    "encode",
    "load_checked",
    "load_requests",
    "make_batch",
    "resolve_data",
]
