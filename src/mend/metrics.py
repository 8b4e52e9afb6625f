"""Edit metrics: pure functions of logits at scored positions.

A row counts as correct when every scored token is the argmax (edit and paraphrase accuracy),
and as kept when the argmax is unchanged by the edit (locality). `starts_with_word` is the
generated-answer counterpart: a pure function of the decoded greedy continuation.
"""

from __future__ import annotations

import torch

from mend.data.collate import IGNORE


def rows_all(flags: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """True for rows where every flagged position (P,) is True."""
    bad = torch.zeros(n_rows, dtype=torch.long, device=flags.device)
    bad.index_add_(0, rows, (~flags).long())
    return bad == 0


def all_correct(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_rows: int):
    """(n_rows,) bool: every target token of the row is the argmax (teacher-forced)."""
    ok = (logits.argmax(-1) == labels) | (labels == IGNORE)
    return rows_all(ok, rows, n_rows)


def row_logprobs(logits: torch.Tensor, labels: torch.Tensor, rows, n_rows: int):
    """((n_rows,) float64 log-probability of each row's labels, the sum over its scored
    positions (teacher-forced); (n_rows,) how many labels each row has). IGNORE adds nothing."""
    known = labels != IGNORE
    logp = torch.log_softmax(logits.float(), -1).gather(1, labels.clamp_min(0)[:, None])[:, 0]
    total = torch.zeros(n_rows, dtype=torch.float64, device=logits.device)
    total.index_add_(0, rows, (logp * known).double())
    count = torch.zeros(n_rows, dtype=torch.long, device=logits.device)
    count.index_add_(0, rows, known.long())
    return total, count


def argmax_unchanged(base_logits: torch.Tensor, edited_logits: torch.Tensor, rows, n_rows: int):
    """(n_rows,) bool: the edit left every scored prediction of the row unchanged."""
    return rows_all(base_logits.argmax(-1) == edited_logits.argmax(-1), rows, n_rows)


def starts_with_word(text: str, target: str) -> bool:
    """`text` begins with `target` and does not run on into a longer word: the character after
    it, if any, is not a letter or digit (" Paris." and " Paris is" count for " Paris",
    " Parisian" does not). The generated-answer test of edit success."""
    if not target or not text.startswith(target):
        return False
    rest = text[len(target) :]
    return not rest or not rest[0].isalnum()
