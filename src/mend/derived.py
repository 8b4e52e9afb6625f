"""Tensors derived from others (a bf16 copy, row norms), remade when their sources change."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class Derived:
    """A cache of values computed from source tensors, keyed on the sources' storage and
    version counters: new storage swapped in (an edit, `.data = ...`) or an in-place change
    that autograd saw remakes them. Version counters miss some in-place updates (PyTorch's
    fused Adam bumps none), so an owner whose sources such updates can change calls `clear()`
    where they may have happened (the editor's blocks: on every train/eval switch).
    """

    def __init__(self):
        self._held: dict[object, tuple] = {}

    def get(self, name, sources: Sequence[torch.Tensor], make: Callable[..., tuple]) -> tuple:
        """make(*sources) (a tuple), computed once for these sources as they are now."""
        key = tuple((t.data_ptr(), t._version) for t in sources)
        held = self._held.get(name)
        if held is None or held[0] != key:
            with torch.no_grad():
                held = self._held[name] = (key, make(*sources))
        return held[1]

    def clear(self) -> None:
        self._held.clear()
