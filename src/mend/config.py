"""Configuration dataclasses: validated on construction, round-trip through plain dicts."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mend.errors import MendError


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
    """Shape of the editor networks (MEND_SPEC section 3).

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
    """

    rank: int = 512  # the paper used 1920; 512 trains as well here and edits faster
    n_blocks: int = 2
    init_alpha: float = 1e-4
    share: bool = True
    edit_modules: tuple[str, ...] = ()
    precondition: float | None = 0.1
    # rank of the edit component every edit shares (Editor.set_shared); 0: none set
    shared_rank: int = 0

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
        self.edit_modules = tuple(self.edit_modules)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"edit_modules": list(self.edit_modules)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditorConfig:
        # Checkpoints written before preconditioning existed are plain MEND.
        return _from_dict(cls, {"precondition": None} | data)


@dataclass
class TrainConfig:
    """Everything the training loop needs besides the model and data (MEND_SPEC section 5)."""

    editor: EditorConfig = field(default_factory=EditorConfig)
    lr: float = 1e-4
    alpha_lr: float = 1e-2  # on log(alpha): a relative step, see editor/net.py
    c_edit: float = 0.1
    c_loc: float = 1.0
    # c_loc from step late_fraction * max_steps on (0: c_loc throughout). A high locality
    # weight holds back an editor that does not edit yet, and pays off raised late
    c_loc_late: float = 0.0
    late_fraction: float = 0.75
    # weight of losses.gap_hinge on the locality rows: keeps unedited predictions the argmax
    # where KL barely sees the change (near-ties); 0 is plain MEND
    c_gap: float = 0.0
    # weight of the edit's size, sum over edited matrices of ||Delta W||^2 / ||W||^2
    # (train.edit_size); 0 is plain MEND
    c_size: float = 0.0
    batch_size: int = 4  # independent single edits per step, run side by side
    # edits per batched edit in training (1: single edits); divides batch_size. Validation
    # always scores single edits.
    joint_edits: int = 1
    # share of steps that train batched edits (the others single edits), spread evenly
    joint_fraction: float = 1.0
    # start from this trained editor (networks, step sizes, statistics, preconditioner; its
    # editor configuration replaces `editor`) instead of an identity-initialised one
    init_editor: str | None = None
    grad_accum: int = 1
    clip: float = 100.0
    loc_per_edit: int = 4  # extra locality probes sampled from other records, per edit
    # half of them are "hard": records with the same "relation" (prompt ending), the same
    # true "answer", or among the `nearest_k` records whose prompts' inputs at the first
    # edited weight are "nearest" its own (train.similar_key, train.nearest_records)
    hard_locality: str = "relation"
    # hard_locality in the late part of the run (with c_loc_late); None: hard_locality throughout
    hard_locality_late: str | None = None
    nearest_k: int = 16
    edit_loss_on_prompt: bool = True  # besides the paraphrases, also train x_e itself
    max_steps: int = 2000
    minutes: float | None = None
    val_every: int = 100
    val_edits: int = 256
    patience: int = 8  # validations without improvement before early stopping
    select: str = "accuracy"  # best checkpoint by "accuracy" (mean of the three) or by "loss"
    warmup_steps: int = 50
    cosine: bool = False  # cosine-decay the learning rates to 10% at max_steps
    # decay of an exponential moving average of the editor's weights (train.WeightAverage):
    # validation, the best checkpoint and `last` hold the average, training moves the raw
    # weights; 0: off (the raw weights everywhere)
    ema: float = 0.0
    reference: bool = False  # run full forward passes instead of caching the lower blocks
    row_cache_mb: int = 4096  # memory for reusing the lower blocks' output per row (0: off)
    # "bf16": the fast path's no-grad pass below the edited blocks in bf16 (autocast);
    # "auto": bf16 where the hardware has fast bf16 products (see models/upper.bf16_is_fast)
    lower_precision: str = "fp32"
    # general text (a data set name or a path) whose windows join the training texts in
    # estimating the key preconditioner's C; None: the training texts only
    key_text: str | None = "wikitext-valid"
    # after training: rank of the component shared by all edits, fitted on training edits and
    # saved with the best checkpoint, that batched edits then count once (edit.fit_shared); 0: off
    shared_rank: int = 16
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.editor, dict):
            self.editor = EditorConfig.from_dict(self.editor)
        for name in ("lr", "alpha_lr", "clip"):
            if not getattr(self, name) > 0:
                raise MendError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "max_steps", "val_every", "val_edits"):
            if getattr(self, name) < 1:
                raise MendError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.joint_edits < 1 or self.batch_size % self.joint_edits:
            raise MendError(
                f"joint_edits must divide batch_size ({self.batch_size}), got {self.joint_edits}"
            )
        if not 0 <= self.joint_fraction <= 1:
            raise MendError(f"joint_fraction must be in [0, 1], got {self.joint_fraction}")
        if self.select not in ("accuracy", "loss"):
            raise MendError(f"select must be 'accuracy' or 'loss', got {self.select!r}")
        if self.lower_precision not in ("fp32", "bf16", "auto"):
            raise MendError(
                f"lower_precision must be fp32, bf16 or auto, got {self.lower_precision!r}"
            )
        if self.shared_rank < 0:
            raise MendError(f"shared_rank must be >= 0, got {self.shared_rank}")
        if self.row_cache_mb < 0:
            raise MendError(f"row_cache_mb must be >= 0, got {self.row_cache_mb}")
        if min(self.c_edit, self.c_loc, self.c_loc_late, self.c_gap, self.c_size) < 0:
            raise MendError("c_edit, c_loc, c_loc_late, c_gap and c_size must be >= 0")
        modes = ("relation", "answer", "nearest")
        if self.hard_locality not in modes:
            raise MendError(f"hard_locality must be one of {modes}, got {self.hard_locality!r}")
        if self.hard_locality_late not in (*modes, None):
            raise MendError(
                f"hard_locality_late must be one of {modes} or None, "
                f"got {self.hard_locality_late!r}"
            )
        if self.hard_locality_late is not None and not self.c_loc_late:
            raise MendError("hard_locality_late needs a late part of the run (c_loc_late > 0)")
        if self.nearest_k < 2:
            raise MendError(f"nearest_k must be >= 2, got {self.nearest_k}")
        if not 0 <= self.late_fraction <= 1:
            raise MendError(f"late_fraction must be in [0, 1], got {self.late_fraction}")
        if not 0 <= self.ema < 1:
            raise MendError(f"ema must be in [0, 1), got {self.ema}")
        if self.minutes is not None and not self.minutes > 0:
            raise MendError(f"minutes must be > 0, got {self.minutes}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"editor": self.editor.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        editor = EditorConfig.from_dict(data.pop("editor", {}))
        return _from_dict(cls, data | {"editor": editor})
