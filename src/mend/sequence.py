"""Edits kept over time: a sequence of edits to revert, save and resume, bit for bit.

After m edits an edited weight is W0 + D1 + ... + Dm: the base weight W0 and each edit's
change added in turn by one function, `EditResult`'s constructor (one fused product of the
edit's low-rank factors with the weight, into a new tensor). The sequence keeps every edit's
factors exactly as they were added, so the weights after any first j edits are made again,
bit for bit, by adding D1..Dj to W0 with that same function: that is how an older edit is
reverted and how a saved sequence is resumed on a freshly loaded base model. The latest
`swap_depth` edits also keep the weights from before them, so reverting them is a storage
swap (`EditResult.revert`). The least-squares editor's memory of earlier keys follows: it is
rebuilt from the keys of the edits kept, in order (`KeyMemory.replace`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from mend.checkpoint import model_identity
from mend.errors import MendError
from mend.files import atomic_folder, read_json_format, read_tensors, write_json
from mend.models.params import EditableParam
from mend.result import EditResult, Update, WeightPool
from mend.result import save_model as write_model
from mend.types import EditRequest, Probe

FORMAT = "mend-sequence-v1"
STATE_FILE = "sequence.json"  # format, base model identity and checksums, every edit's requests
FACTORS_FILE = "edits.safetensors"  # "{id}/{weight}/u", ".../d" (a pair) or ".../delta"
KEYS_FILE = "keys.safetensors"  # "{id}/{weight}": the keys an edit added to the KeyMemory
MODEL_DIR = "model"  # the edited model, with save(..., save_model=True)
log = logging.getLogger(__name__)


class Method(Protocol):
    """What a sequence edits with: a `MendEditor`, or any method editing `params` in place."""

    model: Any
    params: list[EditableParam]

    def edit(self, requests: list[EditRequest]) -> EditResult: ...


@dataclass
class EditRecord:
    """One edit of a sequence.

    Attributes:
        id: its number in the sequence (never reused, also after a revert).
        requests: what it asked for (one edit of them all).
        time: when it was made, in seconds since the epoch.
        updates: {weight name: the change} exactly as it was added (`EditResult.updates`).
        keys: {weight name: (n, in)} keys it added to the editor's KeyMemory, or None.
        result: its applied EditResult (made again by a replay).
    """

    id: int
    requests: list[EditRequest]
    time: float
    updates: dict[str, Update] = field(repr=False)
    keys: dict[str, torch.Tensor] | None = field(repr=False)
    result: EditResult | None = field(default=None, repr=False)


class EditSequence:
    """Edits made one after another with `method`, revertible and resumable bit for bit.

    Args:
        method: a `MendEditor` just created on the base model (or any `Method`); every edit
            of its model must go through this sequence.
        swap_depth: how many of the latest edits keep the weights from before them, so that
            reverting them is a storage swap; each costs one copy of the edited weights. An
            older edit is reverted by adding the kept edits to the base weights again.
    """

    def __init__(self, method: Method, swap_depth: int = 1):
        if swap_depth < 0:
            raise MendError(f"swap_depth must be >= 0, got {swap_depth}")
        memory = getattr(method, "memory", None)
        if getattr(method, "moved", lambda: False)() or (memory is not None and len(memory)):
            raise MendError(
                "the model already carries edits: start a sequence (or load one) with an "
                "editor just created on the base model"
            )
        self.method, self.swap_depth = method, swap_depth
        self.records: list[EditRecord] = []
        self._params = {p.name: p for p in method.params}
        # Edits swap new tensors in, so these aliases keep the base weights at no cost.
        self._base = {name: p.weight.data for name, p in self._params.items()}
        self._base_sha: dict[str, str] | None = None
        self._pool = WeightPool(protected=self._base.values())
        self._next_id = 1
        self._mark()

    @property
    def model(self):
        return self.method.model

    def __len__(self) -> int:
        return len(self.records)

    def edit(self, requests: list[EditRequest] | EditRequest) -> EditResult:
        """Apply one edit of all `requests` together and record it; returns its EditResult
        (revert it through `revert_last`, not directly)."""
        requests = [requests] if isinstance(requests, EditRequest) else list(requests)
        self._check_in_step()
        result = self.method.edit(requests)
        unknown = set(result.updates) - set(self._params)
        if unknown:
            result.revert()
            raise MendError(f"the method edited weights it does not list: {sorted(unknown)}")
        memory = getattr(self.method, "memory", None)
        keys = memory.keys_of(result) if memory is not None else None
        record = EditRecord(self._next_id, requests, time.time(), result.updates, keys, result)
        self.records.append(record)
        self._next_id += 1
        self._release_old()
        self._mark()
        return result

    def revert_last(self, k: int = 1) -> None:
        """Undo the last k edits: the weights become, bit for bit, those after the others."""
        if not 0 <= k <= len(self):
            raise MendError(f"cannot revert {k} edits: the sequence holds {len(self)}")
        if k == 0:
            return
        self._check_in_step()
        gone, kept = self.records[-k:], self.records[:-k]
        if not any(r.result.released for r in gone):
            for r in reversed(gone):  # the method's KeyMemory forgets reverted results
                r.result.revert()
        else:
            self._replay(kept)
        self.records = kept
        self._mark()

    def remove(self, edit_id: int) -> None:
        """Undo the edit numbered `edit_id` alone, keeping the edits made after it.

        The weights become the base weights plus the factors of every other edit, added in
        order, exactly as they were stored when each edit was made (the last edit is undone by
        `revert_last`). With an anchored, summed editor (`MendEditor`'s default) an edit made
        while others are applied takes its gradient on the base weights and adds its change
        unchecked, so its factors do not depend on the edits before it: removing an edit that
        is not the first gives, bit for bit, the weights of a sequence that never made it.
        Removing the first edit keeps the later edits' factors, which were computed as edits
        joining others (no check, no shared part), where a fresh sequence would have checked
        the new first edit. A least-squares editor (`aggregate="ls"`) solved each later edit
        holding the earlier edits' keys: those factors are kept as computed, and its memory
        forgets the removed edit's keys.
        """
        index = next((i for i, r in enumerate(self.records) if r.id == edit_id), None)
        if index is None:
            raise MendError(f"no edit {edit_id} in the sequence")
        if index == len(self.records) - 1:
            return self.revert_last(1)
        self._check_in_step()
        kept = self.records[:index] + self.records[index + 1 :]
        self._replay(kept)
        self.records = kept
        self._mark()

    def _replay(self, records: list[EditRecord]) -> None:
        """Make the weights W0 + D1 + ... from the base, with the function that made them."""
        for r in self.records:  # no revert outside the sequence may swap old weights back
            r.result.release()
        for name, p in self._params.items():
            p.weight.data = self._base[name]
        for i, r in enumerate(records):
            params = [self._params[name] for name in r.updates]
            r.result = EditResult(self.model, params, r.updates, 0.0, self._pool)
            if i >= self.swap_depth:
                records[i - self.swap_depth].result.release()
        memory = getattr(self.method, "memory", None)
        if memory is not None:
            memory.replace([(r.result, r.keys) for r in records if r.keys is not None])

    def _release_old(self) -> None:
        for r in self.records[: max(len(self.records) - self.swap_depth, 0)]:
            r.result.release()

    def _mark(self) -> None:
        self._at = {name: p.weight.data_ptr() for name, p in self._params.items()}

    def _check_in_step(self) -> None:
        if any(p.weight.data_ptr() != self._at[name] for name, p in self._params.items()):
            raise MendError(
                "the edited weights were changed outside this sequence (an edit made or "
                "reverted directly): make and revert edits through the sequence"
            )

    def save(self, folder: str | Path, save_model: bool = False) -> None:
        """Write the sequence to `folder`, replacing it whole once the new one is complete.

        It holds every edit's requests and factors, the keys of the method's KeyMemory, the
        base model's identity with checksums of its edited weights (and of the edited ones),
        and with `save_model` the edited model itself (with the method's tokenizer) in
        `folder/model`.
        """
        self._check_in_step()
        factors, keys = {}, {}
        for r in self.records:
            f, k = record_tensors(r)
            factors |= f
            keys |= k
        state = {
            "format": FORMAT,
            "model": model_identity(self.model, list(self._params)),
            "dtype": str(next(iter(self._base.values())).dtype).removeprefix("torch."),
            "base_sha256": self._base_checksums(),
            "edited_sha256": _checksums(self._current()),
            "next_id": self._next_id,
            "edits": [record_entry(r) for r in self.records],
        }
        with atomic_folder(folder) as tmp:
            meta = {"format": FORMAT}
            save_file(factors, str(tmp / FACTORS_FILE), metadata=meta)
            save_file(keys, str(tmp / KEYS_FILE), metadata=meta)
            write_json(tmp / STATE_FILE, state)
            if save_model:
                write_model(tmp / MODEL_DIR, self.model, getattr(self.method, "tokenizer", None))

    @classmethod
    def load(cls, folder: str | Path, method: Method, swap_depth: int = 1) -> EditSequence:
        """Resume the sequence saved in `folder` on `method`, made on a freshly loaded base model.

        Every edit is added to the base weights again, as it was when made, and the method's
        KeyMemory gets the saved keys back: further edits continue as if never interrupted.
        Refuses a model other than the one the sequence was saved on, or one carrying edits.
        """
        folder = Path(folder)
        state = _read_state(folder)
        seq = cls(method, swap_depth)
        factors, _ = read_tensors(folder / FACTORS_FILE, FORMAT, "mend edit sequence")
        keys, _ = read_tensors(folder / KEYS_FILE, FORMAT, "mend edit sequence")
        try:
            seq._check_base(state, folder)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MendError(f"corrupt edit sequence in {folder}: {e!r}") from None
        seq.restore(state["edits"], factors, keys, state["next_id"], str(folder))
        if _checksums(seq._current()) != state["edited_sha256"]:
            log.warning(
                "the weights remade from %s differ in their last bits from those saved (other "
                "hardware or library versions): edits continue from these",
                folder,
            )
        return seq

    @classmethod
    def open(cls, folder: str | Path, method: Method, swap_depth: int = 1) -> EditSequence:
        """The sequence saved in `folder`, or a new one where `folder` is missing or empty."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise MendError(f"{folder}: an existing file, not a folder")
        if (folder / STATE_FILE).exists():
            return cls.load(folder, method, swap_depth)
        if folder.is_dir() and any(folder.iterdir()):
            raise MendError(f"{folder} holds no saved edit sequence (no {STATE_FILE})")
        return cls(method, swap_depth)

    def restore(
        self, entries: list[dict], factors: dict, keys: dict, next_id: int, where: str = "input"
    ) -> None:
        """Make saved edits this (empty) sequence's edits, as `load` does.

        Args:
            entries: each edit as `record_entry` writes it, in the order they were made.
            factors, keys: their tensors, named as `record_tensors` names them.
            next_id: the number the next edit gets (ids are never reused).
            where: where they were read from, for errors.
        """
        if self.records:
            raise MendError("restore needs an empty sequence")
        try:
            records = [self._record(e, factors, keys) for e in entries]
            next_id = int(next_id)
        except MendError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MendError(f"corrupt edit sequence in {where}: {e!r}") from None
        self._replay(records)
        self.records, self._next_id = records, next_id
        self._mark()

    def checksums(self) -> dict[str, dict[str, str]]:
        """sha256 of each edited weight's bytes: {"base": of the base weights, "edited": now}."""
        return {"base": dict(self._base_checksums()), "edited": _checksums(self._current())}

    def _check_base(self, state: dict, folder: Path) -> None:
        """Refuse a model whose edited weights are not the base the sequence was saved on."""
        saved, here = state["model"], model_identity(self.model, list(self._params))
        if saved["model_type"] != here["model_type"] or saved["params"] != here["params"]:
            raise MendError(
                f"{folder} was saved on another model ({saved['name']}, a {saved['model_type']} "
                f"editing {len(saved['params'])} weights): this one does not match it"
            )
        dtype = str(next(iter(self._base.values())).dtype).removeprefix("torch.")
        if state["dtype"] != dtype:
            raise MendError(f"{folder} was saved on {state['dtype']} weights, these are {dtype}")
        if self._base_checksums() != state["base_sha256"]:
            raise MendError(
                f"{folder} was saved on other weights: this model is another checkpoint of "
                f"{saved['name']}'s shape, or already carries edits; load the base model afresh"
            )

    def _record(self, entry: dict, factors: dict, keys: dict) -> EditRecord:
        """An edit of the saved state, its tensors on the weights' device."""
        ident, updates, held = entry["id"], {}, {}
        for name in entry["weights"]:
            weight = self._params[name].weight
            (n_in, n_out), key = self._params[name].in_out, f"{ident}/{name}"
            if f"{key}/delta" in factors:
                change = factors[f"{key}/delta"]
                fits = change.shape == weight.shape
            else:
                change = factors[f"{key}/u"], factors[f"{key}/d"]
                fits = (
                    [t.dim() for t in change] == [2, 2]
                    and change[0].shape[0] == len(change[1])
                    and (change[0].shape[1], change[1].shape[1]) == (n_in, n_out)
                )
            if key in keys:
                held[name] = keys[key].to(weight.device)
                fits = fits and held[name].dim() == 2 and held[name].shape[1] == n_in
            if not fits:  # (checked before any weight changes)
                raise MendError(f"corrupt edit sequence: edit {ident}'s {name} has other shapes")
            pair = isinstance(change, tuple)
            updates[name] = (
                tuple(t.to(weight.device) for t in change) if pair else change.to(weight.device)
            )
        requests = [_request(q) for q in entry["requests"]]
        return EditRecord(int(ident), requests, float(entry["time"]), updates, held or None)

    def _base_checksums(self) -> dict[str, str]:
        if self._base_sha is None:  # (the base weights never change)
            self._base_sha = _checksums(self._base)
        return self._base_sha

    def _current(self) -> dict[str, torch.Tensor]:
        return {name: p.weight.data for name, p in self._params.items()}


def record_entry(r: EditRecord) -> dict:
    """An edit's number, time, edited weights and requests, as JSON values."""
    return {
        "id": r.id,
        "time": r.time,
        "weights": list(r.updates),
        "requests": [asdict(q) for q in r.requests],
    }


def record_tensors(r: EditRecord) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An edit's factors and KeyMemory keys on the CPU, named as a saved sequence names them."""
    factors, keys = {}, {}
    for name, change in r.updates.items():
        pair = isinstance(change, tuple)
        parts = {"u": change[0], "d": change[1]} if pair else {"delta": change}
        for tag, t in parts.items():
            factors[f"{r.id}/{name}/{tag}"] = _cpu(t)
    for name, k in (r.keys or {}).items():
        keys[f"{r.id}/{name}"] = _cpu(k)
    return factors, keys


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().clone()


def _checksums(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of each weight's bytes."""
    out = {}
    for name, w in weights.items():
        raw = w.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        out[name] = hashlib.sha256(raw.numpy().data).hexdigest()
    return out


def _request(d: dict) -> EditRequest:
    return EditRequest(
        d["prompt"],
        d["target"],
        tuple(d["rephrases"]),
        tuple(Probe(**p) for p in d["locality"]),
        d["target_true"],
        tuple(d["neighborhood"]),
        d.get("subject"),
    )


def _read_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    state = read_json_format(path, FORMAT, "no saved edit sequence", "corrupt edit sequence")
    needed = ("model", "dtype", "base_sha256", "edited_sha256", "next_id", "edits")
    if any(k not in state for k in needed):
        raise MendError(f"corrupt edit sequence: {path} lacks one of {', '.join(needed)}")
    return state
