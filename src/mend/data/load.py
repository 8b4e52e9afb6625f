"""One call from a data set name or path to validated, tokenisable edit requests."""

from __future__ import annotations

from mend.data.collate import check_requests
from mend.data.formats import load_requests
from mend.types import EditRequest, Layout


def load_checked(
    name: str, tokenizer, max_len: int, limit: int | None = None, layout: Layout | None = None
) -> list[EditRequest]:
    """Resolve, read and pre-tokenise a data set (as a model of `layout` reads it; default
    causal), so bad records fail before any work starts."""
    requests = load_requests(name, limit=limit)
    check_requests(tokenizer, requests, max_len, layout)
    return requests
