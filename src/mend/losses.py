"""Loss functions: pure functions of logits at scored positions, labels and row indices."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mend.data.collate import IGNORE, TokenBatch


def row_mean(values: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, n_rows: int):
    """Mean of values (P,) per row over valid positions -> ((n_rows,) means, (n_rows,) counts)."""
    v = torch.where(valid, values, torch.zeros_like(values))
    sums = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, v)
    counts = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(
        0, rows, valid.to(values.dtype)
    )
    return sums / counts.clamp_min(1), counts


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(P, V), (P,) -> (P,) negative log-likelihood, 0 where the label is IGNORE."""
    return F.cross_entropy(logits, labels.clamp_min(0), reduction="none") * (labels != IGNORE)


def row_nll(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_rows: int):
    """Mean NLL of each row's labelled tokens: (n_rows,)."""
    means, _ = row_mean(token_nll(logits, labels), rows, labels != IGNORE, n_rows)
    return means


def masked_nll(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_rows: int):
    """Mean over rows (that have labels) of each row's mean target-token NLL: a scalar."""
    means, counts = row_mean(token_nll(logits, labels), rows, labels != IGNORE, n_rows)
    has = counts > 0
    return means[has].mean() if has.any() else logits.sum() * 0


def kl_base_edited(base_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_edited) averaged over positions; base_logits carry no gradient."""
    base_logp = F.log_softmax(base_logits, dim=-1)
    edited_logp = F.log_softmax(edited_logits, dim=-1)
    return (base_logp.exp() * (base_logp - edited_logp)).sum(-1).mean()


def top_gap(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """(P,) logit of class `top` minus the largest other logit: negative once `top` lost the argmax."""
    chosen = logits.gather(-1, top[:, None])[:, 0]
    others = logits.scatter(-1, top[:, None], float("-inf"))
    return chosen - others.amax(-1)


def edit_loss(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """The loss whose gradient MEND transforms: each row's mean target NLL, summed over rows.

    Summing (not averaging) over rows keeps each edit's gradient independent of how many
    edits share the batch.
    """
    return row_nll(logits, batch.labels[batch.pos_mask], batch.pos_row, len(batch)).sum()
