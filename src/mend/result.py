"""EditResult: what an edit did to the weights, and how to undo, save or export it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mend.errors import MendError
from mend.models.params import EditableParam

DELTA_FORMAT = "mend-delta-v1"


def atomic_dir(path: str | Path):
    """A temporary sibling folder for `path` and a function that moves it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))

    def commit():
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)

    return tmp, commit


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) on a temporary sibling of path, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EditResult:
    """An applied edit. The model's weights are already changed in place.

    Attributes:
        deltas: {weight name: the tensor added to that weight}, in the weight's own layout.
        seconds: wall time of the edit.
    """

    def __init__(
        self, model, params: list[EditableParam], deltas: dict[str, torch.Tensor], seconds: float
    ):
        self.model = model
        self.deltas = deltas
        self.seconds = seconds
        self._params = {p.name: p for p in params if p.name in deltas}
        # The edited weight is a new tensor swapped in; the original tensor itself is kept, so
        # reverting is a swap back (bit-exact, no copy) and editing costs one add.
        self._originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, delta in deltas.items():
                w = self._params[name].weight
                self._originals[name] = w.data
                w.data = w.data + delta.to(w.dtype)
        self.reverted = False

    def revert(self) -> None:
        """Restore the weights exactly (bit for bit) as they were before the edit."""
        if self.reverted:
            return
        for name, original in self._originals.items():
            self._params[name].weight.data = original
        self.reverted = True

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        """Save the edited model (and tokenizer) as a Hugging Face folder, atomically."""
        if self.reverted:
            raise MendError("this edit was reverted; there is no edited model to save")
        tmp, commit = atomic_dir(path)
        try:
            self.model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            commit()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def save_delta(self, path: str | Path) -> None:
        """Export only the weight change as safetensors (apply it with `apply_delta`)."""
        tensors = {f"{n}.weight": d.detach().float().contiguous() for n, d in self.deltas.items()}
        meta = {"format": DELTA_FORMAT, "model": str(self.model.config.name_or_path)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def apply_delta(model, path: str | Path) -> EditResult:
    """Add a delta written by `EditResult.save_delta` to the model; returns a revertible result."""
    from mend.models.params import find_editable

    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise MendError(f"cannot read delta file {path}: {e}") from None
    names = [k.removesuffix(".weight") for k in tensors]
    params = find_editable(model, names)
    for p in params:
        if tuple(tensors[p.name + ".weight"].shape) != tuple(p.weight.shape):
            raise MendError(
                f"delta for {p.name} has shape {tuple(tensors[p.name + '.weight'].shape)}, weight has {tuple(p.weight.shape)}"
            )
    return EditResult(model, params, {n: tensors[n + ".weight"] for n in names}, 0.0)


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    atomic_write(path, write)
