"""EditResult: what an edit did to the weights, and how to undo, save or export it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from mend.errors import MendError
from mend.files import atomic_folder, atomic_write, read_tensors
from mend.models.params import EditableParam

DELTA_FORMAT = "mend-delta-v1"
log = logging.getLogger(__name__)


class WeightPool:
    """One spare tensor per edited weight, reused from edit to edit.

    An edit swaps in a new tensor for each edited weight (so that revert is a bit-exact swap
    back). Allocating a fresh one costs more than filling it: for an MLP matrix the allocator
    maps new pages, which takes several times as long as the sum itself, and over every edited
    matrix and its delta that is a sizeable share of a single edit.
    A reverted edit leaves its tensors here for the next one, so a tensor taken from an edited
    weight (e.g. a `state_dict()` made while the edit was applied) is overwritten by a later
    edit once that edit is reverted: clone what you keep. `protected` tensors (e.g. the weights
    edits are anchored to) are never reused, whatever order edits are reverted in.
    """

    def __init__(self, protected=()):
        self.spare: dict[str, torch.Tensor] = {}
        self._protected = {t.data_ptr() for t in protected}  # the owner keeps them alive

    def take(self, name: str, like: torch.Tensor) -> torch.Tensor:
        t = self.spare.pop(name, None)
        ok = t is not None and (t.shape, t.dtype, t.device) == (like.shape, like.dtype, like.device)
        return t if ok else torch.empty_like(like)

    def give(self, name: str, t: torch.Tensor) -> None:
        if t.data_ptr() not in self._protected:
            self.spare[name] = t


Update = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class EditResult:
    """An applied edit. The model's weights are already changed in place.

    The constructor is the one function that adds a change to weights: the same updates added
    to the same weights give the same bits (same ops, dtypes and order), which is what lets an
    `EditSequence` rebuild edited weights from the base ones, bit for bit.

    Args:
        updates: {weight name: the change}, either a tensor in the weight's own layout or a
            low-rank pair (u (T, in), d (T, out)) meaning `EditableParam.outer_sum(u, d)`,
            which is added in one fused product without materialising the change (the pair
            is kept contiguous, so its product does not depend on the caller's layout).
        pool: where reverted tensors go for reuse (see WeightPool); None allocates each time.

    Attributes:
        deltas: {weight name: the tensor added to that weight} (materialised on first use).
        seconds: wall time of the edit.
        scales: for an edit that checked itself (`MendEditor` boost), the scale each request's
            change got (1.0: as MEND computed it); None for an unchecked edit.
    """

    def __init__(
        self,
        model,
        params: list[EditableParam],
        updates: dict[str, Update],
        seconds: float,
        pool: WeightPool | None = None,
    ):
        self.model = model
        self.seconds = seconds
        self.scales: list[float] | None = None
        self._updates = {
            n: tuple(c.contiguous() for c in ch) if isinstance(ch, tuple) else ch
            for n, ch in updates.items()
        }
        self._deltas: dict[str, torch.Tensor] | None = None
        self._pool = pool
        self._params = {p.name: p for p in params if p.name in updates}
        # The edited weight is a new tensor swapped in; the original tensor itself is kept, so
        # reverting is a swap back (bit-exact, no copy) and editing costs one add.
        self._originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, change in self._updates.items():
                p = self._params[name]
                w = p.weight.data
                new = pool.take(name, w) if pool is not None else torch.empty_like(w)
                if isinstance(change, tuple) and w.dtype in (change[0].dtype, torch.bfloat16):
                    # (a bf16 weight takes bf16 factors: their rounding is of the order of the
                    # new weight's own, and an fp32 Delta W would be 1.6 GB of traffic on 7B)
                    p.outer_sum(*(c.to(w.dtype) for c in change), base=w, out=new)
                else:
                    torch.add(w, self._delta(name).to(w.dtype), out=new)
                self._originals[name] = w
                p.weight.data = new
        self.reverted = False
        self.released = False
        self.on_revert: list = []  # called after a revert (e.g. by a KeyMemory holding its keys)

    @property
    def updates(self) -> dict[str, Update]:
        """{weight name: the change} exactly as it was added (a pair or a tensor)."""
        return self._updates

    def _delta(self, name: str) -> torch.Tensor:
        change = self._updates[name]
        return self._params[name].outer_sum(*change) if isinstance(change, tuple) else change

    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        if self._deltas is None:
            self._deltas = {name: self._delta(name) for name in self._updates}
        return self._deltas

    def revert(self) -> None:
        """Restore the weights exactly (bit for bit) as they were before the edit."""
        if self.reverted:
            return
        if self.released:
            raise MendError(
                "this edit no longer keeps the weights from before it (released): revert it "
                "through the EditSequence that made it"
            )
        for name, original in self._originals.items():
            p = self._params[name]
            edited, p.weight.data = p.weight.data, original
            if self._pool is not None:
                self._pool.give(name, edited)
        self.reverted = True
        for call in self.on_revert:
            call()

    def undone_with(self, earlier: EditResult) -> None:
        """Mark this edit reverted because `earlier`, an edit of the same or more weights
        made before it, was reverted (which brought back the weights from before both)."""
        if not earlier.reverted or not set(self.updates) <= set(earlier.updates):
            raise MendError("only an earlier reverted edit of the same weights undoes this one")
        self._originals = {}
        self.reverted = True
        for call in self.on_revert:
            call()

    def release(self) -> None:
        """Drop the weights from before this edit (one copy of every edited weight, unless a
        later edit holds them): `revert()` is refused afterwards."""
        self._originals = {}
        self.released = True

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        """Save the edited model (and tokenizer) as a Hugging Face folder, atomically."""
        if self.reverted:
            raise MendError("this edit was reverted; there is no edited model to save")
        save_model(path, self.model, tokenizer)

    def save_delta(self, path: str | Path) -> None:
        """Export only the weight change as safetensors (apply it with `apply_delta`)."""
        save_delta(path, self.model, self.deltas)


def save_model(path: str | Path, model, tokenizer=None) -> None:
    """Save the model as it is now (and its tokenizer) as a Hugging Face folder, atomically."""
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def save_delta(path: str | Path, model, deltas: dict[str, torch.Tensor]) -> None:
    """Write {weight name: change} (in each weight's layout) for `apply_delta`, atomically."""
    tensors = {f"{n}.weight": d.detach().float().contiguous() for n, d in deltas.items()}
    meta = {"format": DELTA_FORMAT, "model": str(model.config.name_or_path)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def apply_delta(model, path: str | Path) -> EditResult:
    """Add a delta written by `EditResult.save_delta` to the model; returns a revertible result."""
    from mend.models.params import find_editable

    tensors, meta = read_tensors(path, DELTA_FORMAT, "mend weight delta")
    made_for, here = meta.get("model"), str(model.config.name_or_path)
    if made_for and Path(made_for).name != Path(here).name:  # (shapes are checked below)
        log.warning("%s was made for model %s, not %s", path, made_for, here)
    names = [k.removesuffix(".weight") for k in tensors]
    params = find_editable(model, names)
    for p in params:
        if tuple(tensors[p.name + ".weight"].shape) != tuple(p.weight.shape):
            raise MendError(
                f"delta for {p.name} has shape {tuple(tensors[p.name + '.weight'].shape)}, weight has {tuple(p.weight.shape)}"
            )
    return EditResult(model, params, {n: tensors[n + ".weight"] for n in names}, 0.0)
