"""Fine-tuning baselines: FT, and FT+KL (the paper's FT with a locality KL penalty).

A zero-initialised delta on each edited weight is optimised on the edit's NLL until every
target token is the argmax, or a step limit. With `kl_weight > 0` the loss adds
KL(p_base || p_edited) on locality inputs, which must be supplied (`loc_prompts`): they should
be unrelated text, not the probes the edit is scored on.

Only the edited blocks change, so by default each edit runs the lower blocks once, without
gradients (`UpperStack`), and every optimisation step reruns just the edited blocks and the
head: the same losses as full forward passes (`fast=False`), several times cheaper per step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mend.data.collate import make_batch
from mend.data.sources import resolve_data
from mend.data.text import wikitext_prompts
from mend.errors import MendError
from mend.losses import kl_base_edited, masked_nll
from mend.metrics import all_correct
from mend.models import context_length
from mend.models.forward import layout, scored_logits
from mend.models.params import find_editable
from mend.models.upper import UpperStack
from mend.result import EditResult
from mend.types import EditRequest


def kl_prompts(source: str = "wikitext-valid", n: int = 256) -> list[str]:
    """FT+KL's locality inputs: the openings of n sentences of general text (a name or path)."""
    return wikitext_prompts(resolve_data(source), n)


class FTEditor:
    """Fine-tune the edited weights on each edit.

    Args:
        lr: Adam learning rate.
        max_steps: step limit per edit.
        kl_weight: weight of the locality KL term (0 gives plain FT).
        loc_prompts: locality inputs for the KL term (used when kl_weight > 0).
        n_loc: how many locality inputs per edit.
        fast: rerun only the edited blocks each step (False: the whole model).
    """

    def __init__(self, model, tokenizer, lr: float = 5e-4, max_steps: int = 40, kl_weight: float = 0.0,
                 loc_prompts: list[str] = (), n_loc: int = 8, edit_modules=(), fast: bool = True):  # fmt: skip
        if kl_weight > 0 and not loc_prompts:
            raise MendError("ft-kl needs locality prompts")
        self.model, self.tokenizer = model, tokenizer
        self.lr, self.max_steps, self.kl_weight = lr, max_steps, kl_weight
        self.loc_prompts, self.n_loc = list(loc_prompts), n_loc
        self.params = find_editable(model, edit_modules)
        self.max_len = context_length(model)
        self.layout = layout(model)
        self._cursor = 0
        start = UpperStack.first_edited_block(model, [p.name for p in self.params])
        self._stack = UpperStack(model, start) if fast and start is not None else None
        self.last_steps = 0

    @contextmanager
    def _with(self, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run the model with W + delta, functionally."""

        def make(p):
            delta = deltas[p.name]

            def hook(module, inputs, output):
                x = inputs[0]
                return output + (x @ delta if p.transposed else x @ delta.T).to(output.dtype)

            return hook

        handles = [p.module.register_forward_hook(make(p)) for p in self.params]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _loc_batch(self):
        picks = [
            self.loc_prompts[(self._cursor + i) % len(self.loc_prompts)] for i in range(self.n_loc)
        ]
        self._cursor += self.n_loc
        pairs = [(p, None) for p in picks]
        return make_batch(self.tokenizer, pairs, max_len=self.max_len, layout=self.layout)

    def _logits_of(self, batch):
        """A function giving batch's scored logits under the current hooks."""
        if self._stack is None:
            return lambda: scored_logits(self.model, batch)
        prepared = self._stack.prepare(batch, base_logits=False)
        return lambda: self._stack.logits(prepared)

    def edit(self, requests: list[EditRequest]) -> EditResult:
        start = time.perf_counter()
        device = self.params[0].weight.device
        batch = make_batch(self.tokenizer, [(r.prompt, r.target) for r in requests],
                           max_len=self.max_len, layout=self.layout).to(device)  # fmt: skip
        labels, rows = batch.labels[batch.pos_mask], batch.pos_row
        deltas = {p.name: torch.zeros_like(p.weight, requires_grad=True) for p in self.params}
        opt = torch.optim.Adam(deltas.values(), lr=self.lr)
        edit_logits = self._logits_of(batch)
        loc_logits = base = None
        if self.kl_weight > 0:
            loc = self._loc_batch().to(device)
            loc_logits = self._logits_of(loc)
            with torch.no_grad():
                base = loc_logits()
        self.last_steps = 0
        with torch.enable_grad():
            for step in range(self.max_steps):
                with self._with(deltas):
                    logits = edit_logits()
                    if all_correct(logits, labels, rows, len(batch)).all():
                        break
                    loss = masked_nll(logits, labels, rows, len(batch))
                    if loc_logits is not None:
                        loss = loss + self.kl_weight * kl_base_edited(base, loc_logits())
                opt.zero_grad()
                loss.backward()
                opt.step()
                self.last_steps = step + 1
        final = {n: d.detach() for n, d in deltas.items()}
        return EditResult(self.model, self.params, final, time.perf_counter() - start)
