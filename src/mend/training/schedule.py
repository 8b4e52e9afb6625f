"""Per-step settings as pure functions of the step, so a resumed run follows the same course."""

from __future__ import annotations

import math
from dataclasses import replace

from mend.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then (with `schedule.cosine`) a cosine decay to 10% at max_steps."""
    s = cfg.schedule
    warm = min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps else 1.0
    if not s.cosine:
        return warm
    progress = min(1.0, step / s.max_steps)
    return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def batch_size_at(step: int, cfg: TrainConfig) -> int:
    """Requests per edit at this step: `sampling.batch_size` on a `batch_fraction` share of the
    steps, spread evenly, else 1."""
    f = cfg.sampling.batch_fraction
    return cfg.sampling.batch_size if math.floor((step + 1) * f) > math.floor(step * f) else 1


def is_late(step: int, cfg: TrainConfig) -> bool:
    """Whether step (0-based) runs with the late locality weight."""
    return (
        bool(cfg.loss.locality_late) and step >= cfg.schedule.late_fraction * cfg.schedule.max_steps
    )


def step_config(step: int, cfg: TrainConfig) -> TrainConfig:
    """The configuration of one step: in the late part of the run `loss.locality_late`
    replaces `loss.locality`, and `sampling.hard_locality_late` (where set) `hard_locality`."""
    if not is_late(step, cfg):
        return cfg
    hard = cfg.sampling.hard_locality_late or cfg.sampling.hard_locality
    return replace(
        cfg,
        loss=replace(cfg.loss, locality=cfg.loss.locality_late),
        sampling=replace(cfg.sampling, hard_locality=hard),
    )
