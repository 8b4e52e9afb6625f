"""Configuration dataclasses: validated on construction, round-trip through plain dicts."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mend.errors import MendError

# How the requests of a batched edit combine (`mend.edit.MendEditor`): an editor is trained
# for the first two; "singles" combines a single-edit editor's own edits.
AGGREGATES = ("sum", "ls", "singles")


def cache_dir() -> Path:
    """Where converted models and downloaded data live ($MEND_CACHE, else ~/.cache/mend)."""
    return Path(os.environ.get("MEND_CACHE", Path.home() / ".cache" / "mend"))


def _from_dict(cls, data: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise MendError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


@dataclass
class EditorConfig:
    """Shape of the editor networks (Mitchell et al., Fast Model Editing at Scale).

    Attributes:
        rank: rank r of the low-rank residual blocks (capped at d = in + out).
        n_blocks: number of identity-initialised residual blocks.
        init_alpha: initial per-matrix step size alpha.
        share: one editor per distinct (in, out) weight shape; False gives one per matrix.
        edit_modules: module names (relative to the model) whose weights are edited; empty
            means the architecture's default (MLP matrices of the last 3 blocks).
        precondition: ridge lambda of the key preconditioner (C / mean eig + lambda I)^-1
            applied to every u~, C being the second moment of the matrix's inputs (see
            editor/net.py); None is plain MEND.
        input_clip: the editor networks' standardised inputs are clipped to +-input_clip
            (standard deviations of what training saw); None: unclipped, as in the paper. A
            token far outside that range (the bare space a number's digits follow in
            SmolLM2's vocabulary, after a question: a gradient 100 times the usual) would
            otherwise give a change thousands of times the usual size, which makes its
            target the answer and wrecks the model.
    """

    rank: int = 512  # the paper used 1920; 512 trains as well here and edits faster
    n_blocks: int = 2
    init_alpha: float = 1e-4
    share: bool = True
    edit_modules: tuple[str, ...] = ()
    precondition: float | None = 0.1
    # rank of the edit component every edit shares (EditorNet.set_shared); 0: none set
    shared_rank: int = 0
    # how an edit of several requests combines the editor's outputs: "sum" (MEND) or "ls"
    # (one least-squares change over every edited token, mend.aggregate); what it was trained for
    aggregate: str = "sum"
    # the least-squares ridge, relative to the keys' mean squared norm (learned per matrix)
    init_ridge: float = 1e-4
    input_clip: float | None = 100.0

    def __post_init__(self):
        if self.rank < 1:
            raise MendError(f"rank must be >= 1, got {self.rank}")
        if self.n_blocks < 0:
            raise MendError(f"n_blocks must be >= 0, got {self.n_blocks}")
        if not (self.init_alpha > 0 and math.isfinite(self.init_alpha)):
            raise MendError(f"init_alpha must be a positive number, got {self.init_alpha}")
        if self.precondition is not None and not (
            self.precondition > 0 and math.isfinite(self.precondition)
        ):
            raise MendError(f"precondition must be a positive number, got {self.precondition}")
        if self.shared_rank < 0:
            raise MendError(f"shared_rank must be >= 0, got {self.shared_rank}")
        if self.aggregate not in ("sum", "ls"):
            raise MendError(f"aggregate must be 'sum' or 'ls', got {self.aggregate!r}")
        if not (self.init_ridge > 0 and math.isfinite(self.init_ridge)):
            raise MendError(f"init_ridge must be a positive number, got {self.init_ridge}")
        if self.input_clip is not None and not (
            self.input_clip > 0 and math.isfinite(self.input_clip)
        ):
            raise MendError(f"input_clip must be a positive number or None, got {self.input_clip}")
        self.edit_modules = tuple(self.edit_modules)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"edit_modules": list(self.edit_modules)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditorConfig:
        # Checkpoints written before preconditioning existed are plain MEND.
        return _from_dict(cls, {"precondition": None} | data)


# Keys of a flat TrainConfig dict (as written before the fields were grouped) -> (group, field).
_FLAT = {
    "c_edit": ("loss", "edit"), "c_loc": ("loss", "locality"),
    "c_loc_late": ("loss", "locality_late"),
    "batch_size": ("sampling", "edits_per_step"), "joint_edits": ("sampling", "batch_size"),
    "joint_fraction": ("sampling", "batch_fraction"),
    "loc_per_edit": ("sampling", "loc_per_edit"), "hard_locality": ("sampling", "hard_locality"),
    "hard_locality_late": ("sampling", "hard_locality_late"),
    "nearest_k": ("sampling", "nearest_k"),
    "lr": ("schedule", "lr"), "alpha_lr": ("schedule", "alpha_lr"),
    "max_steps": ("schedule", "max_steps"), "minutes": ("schedule", "minutes"),
    "warmup_steps": ("schedule", "warmup_steps"), "cosine": ("schedule", "cosine"),
    "late_fraction": ("schedule", "late_fraction"), "clip": ("schedule", "clip"),
    "ema": ("schedule", "ema"), "val_every": ("schedule", "val_every"),
    "val_edits": ("schedule", "val_edits"), "patience": ("schedule", "patience"),
    "reference": ("speed", "reference"), "row_cache_mb": ("speed", "row_cache_mb"),
    "lower_precision": ("speed", "lower_precision"),
}  # fmt: skip
# Settings a flat dict may carry that training no longer has, with the value that behaves as now.
_RETIRED = {"c_gap": 0.0, "c_size": 0.0, "select": "accuracy", "grad_accum": 1,
            "edit_loss_on_prompt": True}  # fmt: skip
HARD_LOCALITY = ("relation", "answer", "nearest")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MendError(message)


@dataclass
class LossWeights:
    """Weights of the training loss: edit * L_edit + locality * L_loc (MEND's c_edit, c_loc).

    Attributes:
        locality_late: the locality weight from `schedule.late_fraction` of the run on (0: keep
            `locality`). A high locality weight holds back an editor that does not edit yet,
            and pays off when raised late.
    """

    edit: float = 0.1
    locality: float = 1.0
    locality_late: float = 0.0

    def __post_init__(self):
        _check(min(self.edit, self.locality, self.locality_late) >= 0,
               "loss weights must be >= 0")  # fmt: skip


@dataclass
class Sampling:
    """What one training step draws.

    Attributes:
        edits_per_step: edits trained side by side in one step.
        batch_size: requests per edit (1: single edits; k: every k edits of a step form one
            batched edit, as an edit of k requests does); divides edits_per_step.
        batch_fraction: share of steps with batched edits, spread evenly; the others train
            single edits. Validation always scores single edits.
        loc_per_edit: extra locality inputs per edit, drawn from other records; half of them
            "hard": records with the same "relation" (prompt ending), the same true "answer",
            or among the `nearest_k` records whose prompts' inputs at the first edited weight
            are "nearest" the record's (training.sampling).
        hard_locality_late: `hard_locality` from `schedule.late_fraction` on (needs
            `loss.locality_late`); None: `hard_locality` throughout.
        edit_sizes: for an editor that aggregates by least squares (`editor.aggregate`
            "ls"): each step is one edit of n requests, n drawn in turn from these sizes
            (e.g. (1, 10, 100), so one editor serves single and mass edits);
            edits_per_step, batch_size and batch_fraction do not apply then.
    """

    edits_per_step: int = 4
    batch_size: int = 1
    batch_fraction: float = 1.0
    loc_per_edit: int = 4
    hard_locality: str = "relation"
    hard_locality_late: str | None = None
    nearest_k: int = 16
    edit_sizes: tuple[int, ...] = (1, 10, 100)

    def __post_init__(self):
        self.edit_sizes = tuple(int(n) for n in self.edit_sizes)
        _check(len(self.edit_sizes) > 0 and min(self.edit_sizes) >= 1,
               f"edit_sizes must be sizes >= 1, got {self.edit_sizes}")  # fmt: skip
        _check(self.edits_per_step >= 1, f"edits_per_step must be >= 1, got {self.edits_per_step}")
        _check(self.batch_size >= 1 and self.edits_per_step % self.batch_size == 0,
               f"batch_size must divide edits_per_step ({self.edits_per_step}), "
               f"got {self.batch_size}")  # fmt: skip
        _check(0 <= self.batch_fraction <= 1,
               f"batch_fraction must be in [0, 1], got {self.batch_fraction}")  # fmt: skip
        _check(self.loc_per_edit >= 0, f"loc_per_edit must be >= 0, got {self.loc_per_edit}")
        _check(self.hard_locality in HARD_LOCALITY,
               f"hard_locality must be one of {HARD_LOCALITY}, got {self.hard_locality!r}")  # fmt: skip
        _check(self.hard_locality_late in (*HARD_LOCALITY, None),
               f"hard_locality_late must be one of {HARD_LOCALITY} or None, "
               f"got {self.hard_locality_late!r}")  # fmt: skip
        _check(self.nearest_k >= 2, f"nearest_k must be >= 2, got {self.nearest_k}")


@dataclass
class Schedule:
    """How long training runs, how fast it learns, when it validates.

    Attributes:
        alpha_lr: learning rate of the per-matrix log step sizes (a relative step).
        minutes: wall-time budget, counting the passes before the first step; None: none.
        cosine: decay the learning rates to 10% at max_steps (after a linear warm-up).
        late_fraction: where the late part of the run starts (`loss.locality_late`).
        ema: decay of a moving average of the editor's weights that validation, the best
            checkpoint and `last` hold (training moves the raw weights); 0: off.
        patience: validations without improvement before training stops early.
    """

    lr: float = 1e-4
    alpha_lr: float = 1e-2
    max_steps: int = 2000
    minutes: float | None = None
    warmup_steps: int = 50
    cosine: bool = False
    late_fraction: float = 0.75
    clip: float = 100.0
    ema: float = 0.0
    val_every: int = 100
    val_edits: int = 256
    patience: int = 8

    def __post_init__(self):
        for name in ("lr", "alpha_lr", "clip"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_steps", "val_every", "val_edits", "patience"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.late_fraction <= 1,
               f"late_fraction must be in [0, 1], got {self.late_fraction}")  # fmt: skip
        _check(0 <= self.ema < 1, f"ema must be in [0, 1), got {self.ema}")
        _check(self.minutes is None or self.minutes > 0, f"minutes must be > 0, got {self.minutes}")


@dataclass
class Speed:
    """How training computes (the results do not depend on it beyond float rounding).

    Attributes:
        reference: full forward passes of the whole model instead of rerunning only the
            edited blocks (slow; for checking the fast path).
        row_cache_mb: memory for reusing the lower blocks' outputs per row (0: off).
        lower_precision: the no-grad pass below the edited blocks in "bf16", "fp32", or
            "auto": bf16 where the hardware has fast bf16 products (`bf16_is_fast`).
        chunk_rows: a least-squares step runs its rows through the model this many at a
            time, so its memory does not grow with the number of edits.
    """

    reference: bool = False
    row_cache_mb: int = 4096
    lower_precision: str = "auto"
    chunk_rows: int = 256

    def __post_init__(self):
        _check(self.chunk_rows >= 1, f"chunk_rows must be >= 1, got {self.chunk_rows}")
        _check(self.row_cache_mb >= 0, f"row_cache_mb must be >= 0, got {self.row_cache_mb}")
        _check(self.lower_precision in ("fp32", "bf16", "auto"),
               f"lower_precision must be fp32, bf16 or auto, got {self.lower_precision!r}")  # fmt: skip


_GROUPS = {"loss": LossWeights, "sampling": Sampling, "schedule": Schedule, "speed": Speed}


@dataclass
class TrainConfig:
    """Everything the training loop needs besides the model and data, grouped by concern.

    Attributes:
        init_editor: start from this trained editor folder (networks, step sizes, statistics,
            preconditioner; its editor configuration replaces `editor`).
        key_text: general text (a data set name or a path) whose windows join the training
            texts in estimating the key preconditioner's statistics; None: training texts only.
        shared_rank: after training, the rank of the change all edits share, fitted on
            training edits and saved with the best checkpoint, that batched edits count once
            (edit.fit_shared); 0: off.
    """

    editor: EditorConfig = field(default_factory=EditorConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    sampling: Sampling = field(default_factory=Sampling)
    schedule: Schedule = field(default_factory=Schedule)
    speed: Speed = field(default_factory=Speed)
    init_editor: str | None = None
    key_text: str | None = "wikitext-valid"
    shared_rank: int = 16
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.editor, dict):
            self.editor = _from_dict(EditorConfig, self.editor)
        for name, cls in _GROUPS.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _from_dict(cls, getattr(self, name)))
        _check(self.shared_rank >= 0, f"shared_rank must be >= 0, got {self.shared_rank}")
        _check(self.sampling.hard_locality_late is None or self.loss.locality_late > 0,
               "hard_locality_late needs a late part of the run (loss.locality_late > 0)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"editor": self.editor.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From `to_dict`'s nested form, or the flat form of earlier training states."""
        data = dict(data)
        grouped: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
        for key in [k for k in data if k in _FLAT or k in _RETIRED]:
            value = data.pop(key)
            if key in _RETIRED:
                _check(value == _RETIRED[key],
                       f"{key}={value!r} is not supported any more (only {_RETIRED[key]!r})")  # fmt: skip
                continue
            group, name = _FLAT[key]
            grouped[group][name] = value
        for name in _GROUPS:
            grouped[name] |= data.pop(name, {})
        editor = data.pop("editor", {})
        # (not EditorConfig.from_dict: its default for a missing key is that of old checkpoints)
        editor = _from_dict(EditorConfig, editor) if isinstance(editor, dict) else editor
        groups = {name: _from_dict(cls_, grouped[name]) for name, cls_ in _GROUPS.items()}
        return _from_dict(cls, data | groups | {"editor": editor})

    def override(self, key: str, value: Any) -> TrainConfig:
        """A copy with one field set by its dotted name ("schedule.lr", "seed"), validated."""
        data = self.to_dict()
        *path, last = key.split(".")
        node = data
        for part in path:
            _check(isinstance(node.get(part), dict), f"unknown setting {key!r}")
            node = node[part]
        _check(last in node, f"unknown setting {key!r}")
        node[last] = value
        return TrainConfig.from_dict(data)
