"""Locate the weights MEND edits and record how each one is oriented."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mend.errors import MendError
from mend.models.archs import ARCHS, arch_for


@dataclass(frozen=True)
class EditableParam:
    """One edited weight matrix.

    Attributes:
        name: module path, e.g. "model.layers.27.mlp.up_proj".
        module: the nn.Linear or Conv1D itself.
        transposed: True for GPT-2's Conv1D, whose weight is stored (in, out).
        decoder: True for a weight of a seq2seq model's decoder (or its head), whose inputs
            are the decoder's tokens (`TokenBatch.token_mask`); False for every other weight.
    """

    name: str
    module: nn.Module
    transposed: bool
    decoder: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def in_out(self) -> tuple[int, int]:
        """(in_features, out_features), whatever the storage orientation."""
        rows, cols = self.weight.shape
        return (rows, cols) if self.transposed else (cols, rows)

    def outer_sum(
        self,
        u: torch.Tensor,
        delta: torch.Tensor,
        base: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sum_t delta_t u_t^T in this weight's storage layout: u (T, in), delta (T, out).

        With `base`, returns base + that sum in one fused product (written into `out` if given).
        """
        a, b = (u.T, delta) if self.transposed else (delta.T, u)
        if base is None:
            return a @ b
        return torch.addmm(base, a, b, out=out)


@contextmanager
def swapped_data(tensors: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run with each tensor's storage replaced by its value's (no copies); the old ones come back."""
    old = [t.data for t in tensors]
    try:
        for t, v in zip(tensors, values, strict=True):
            t.data = v
        yield
    finally:
        for t, o in zip(tensors, old, strict=True):
            t.data = o


def _reads_decoder(model, name: str, module: nn.Module) -> bool:
    """Whether a weight's inputs are a seq2seq decoder's tokens."""
    spec = ARCHS.get(getattr(model.config, "model_type", None))
    if spec is None or spec.decoder is None:
        return False
    return name.startswith(spec.decoder + ".") or module is model.get_output_embeddings()


def find_editable(model, names: tuple[str, ...] | list[str] = ()) -> list[EditableParam]:
    """Return the edited weights: `names` if given, else the architecture's default.

    Names may be module paths ("transformer.h.5.mlp.c_fc") or parameter names ending
    in ".weight"; the order of the result is the order given.
    """
    if not names:
        names = arch_for(model).default_modules(model)
    out = []
    for raw in names:
        name = raw.removesuffix(".weight")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise MendError(
                f"unknown weight name {raw!r}: the model has no module {name!r}"
            ) from None
        if isinstance(module, Conv1D):
            transposed = True
        elif isinstance(module, nn.Linear):
            transposed = False
        else:
            raise MendError(
                f"cannot edit {raw!r}: it is a {type(module).__name__}, not a Linear or Conv1D"
            )
        out.append(EditableParam(name, module, transposed, _reads_decoder(model, name, module)))
    if len({p.name for p in out}) != len(out):
        raise MendError("the same weight is named twice in edit_modules")
    return out
