"""Run only the top of the model: the blocks from the first edited one, the final norm, the head.

Edits touch only the last few blocks, so everything below them is the same with or without an
edit. `UpperStack.prepare` runs the whole model once without gradients, keeping the hidden state
that enters the first edited block and the exact arguments each upper block was called with;
`UpperStack.logits` then reruns just those blocks (with gradients, under any edit hooks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mend.models.archs import arch_for
from mend.models.forward import scored_logits


@dataclass
class Prepared:
    """A batch whose lower blocks have run: the top's input and each upper block's call."""

    hidden: torch.Tensor  # (R, S, hidden) input of the first upper block
    calls: list[tuple[tuple, dict]]  # (args, kwargs) each upper block was called with
    pos_mask: torch.Tensor  # (R, S) scored positions
    base_logits: torch.Tensor  # (P, V) unedited logits at the scored positions


class UpperStack:
    """Cache below block `start`, rerun from there.

    Args:
        model: a causal LM of a family in the architecture table.
        start: index of the first block to rerun.
    """

    def __init__(self, model, start: int):
        arch = arch_for(model)
        self.model = model
        self.blocks = list(model.get_submodule(arch.blocks))[start:]
        self.norm = model.get_submodule(arch.final_norm)
        self.head = model.get_output_embeddings()

    @staticmethod
    def first_edited_block(model, names: list[str]) -> int | None:
        """Index of the lowest block holding an edited weight; None if one lies outside blocks."""
        prefix = arch_for(model).blocks + "."
        indices = []
        for name in names:
            if not name.startswith(prefix):
                return None
            indices.append(int(name[len(prefix) :].split(".")[0]))
        return min(indices)

    @torch.no_grad()
    def prepare(self, batch) -> Prepared:
        """Full no-grad forward of batch, keeping what `logits` needs and the base logits."""
        calls = []

        def grab(module, args, kwargs):
            calls.append((args, kwargs))

        handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in self.blocks]
        try:
            logits = scored_logits(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        args, kwargs = calls[0]
        hidden = args[0] if args else kwargs["hidden_states"]
        return Prepared(hidden, calls, batch.pos_mask, logits)

    def logits(self, prepared: Prepared) -> torch.Tensor:
        """Scored logits (P, V) of a prepared batch, running only the upper blocks."""
        h = prepared.hidden
        for block, (args, kwargs) in zip(self.blocks, prepared.calls, strict=True):
            if args:
                out = block(h, *args[1:], **kwargs)
            else:
                out = block(**(kwargs | {"hidden_states": h}))
            h = out[0] if isinstance(out, tuple) else out
        h = self.norm(h)
        return self.head(h[prepared.pos_mask]).float()
