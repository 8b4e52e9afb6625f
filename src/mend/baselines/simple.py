"""The two simplest methods: no edit at all, and one plain gradient step."""

from __future__ import annotations

import time

import torch

from mend.data.collate import make_batch
from mend.grads import capture
from mend.losses import edit_loss
from mend.models import context_length
from mend.models.forward import layout
from mend.models.params import find_editable
from mend.result import EditResult
from mend.types import EditRequest


class NoEdit:
    """The unedited model, behind the same interface as the editing methods."""

    def __init__(self, model, tokenizer=None, edit_modules=()):
        self.params = find_editable(model, edit_modules)
        self.model = model

    def edit(self, requests: list[EditRequest]) -> EditResult:
        return EditResult(self.model, self.params, {}, 0.0)


class GradEditor:
    """W <- W - lr * dL/dW on the edited weights: what an untrained MEND editor does, minus
    the normalisation. It isolates what training the editor buys.

    Args:
        lr: the step size (tune it on held-out edits; see benchmarks/compare.py).
    """

    def __init__(self, model, tokenizer, lr: float = 1e-3, edit_modules=()):
        self.model, self.tokenizer, self.lr = model, tokenizer, lr
        self.params = find_editable(model, edit_modules)
        self.max_len = context_length(model)

    def edit(self, requests: list[EditRequest]) -> EditResult:
        start = time.perf_counter()
        batch = make_batch(self.tokenizer, [(r.prompt, r.target) for r in requests],
                           max_len=self.max_len, layout=layout(self.model))  # fmt: skip
        batch = batch.to(self.params[0].weight.device)

        captured, _ = capture(self.model, self.params, batch, lambda lg: edit_loss(lg, batch))
        deltas = {}
        with torch.no_grad():
            for p in self.params:
                u, d = captured[p.name]
                u, d = u.reshape(-1, u.shape[-1]), d.reshape(-1, d.shape[-1])
                deltas[p.name] = -self.lr * p.outer_sum(u, d)
        return EditResult(self.model, self.params, deltas, time.perf_counter() - start)
