"""Data formats -> list[EditRequest], and tokenisation into masked batches."""

from mend.data.collate import TokenBatch, encode, make_batch
from mend.data.formats import load_requests
from mend.data.sources import resolve_data

__all__ = ["TokenBatch", "encode", "load_requests", "make_batch", "resolve_data"]
