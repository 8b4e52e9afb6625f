"""The editor's optimiser, its update step, and a moving average of its weights."""

from __future__ import annotations

import math

import torch

from mend.config import Schedule
from mend.models.params import swapped_data


class WeightAverage:
    """An exponential moving average of a module's parameters, swapped in to score or save.

    Buffers are not averaged: the editor's running statistics and preconditioner are used as
    they are now. The decay ramps up as min(decay, (1 + n) / (10 + n)) over the n updates
    so far, so the first averages are not held at the initial weights.
    """

    def __init__(self, module: torch.nn.Module, decay: float, state: dict | None = None):
        self.params = list(module.parameters())
        self.decay = decay
        if state is None:
            self.n, self.avg = 0, [p.detach().clone() for p in self.params]
        else:
            self.n = state["n"]
            self.avg = [
                a.to(p.device, p.dtype) for a, p in zip(state["avg"], self.params, strict=True)
            ]

    def update(self) -> None:
        self.n += 1
        weight = 1 - min(self.decay, (1 + self.n) / (10 + self.n))
        with torch.no_grad():
            torch._foreach_lerp_(self.avg, self.params, weight)

    def swapped(self):
        """Run with the averaged weights in the module; the raw ones come back after."""
        return swapped_data(self.params, self.avg)

    def state_dict(self) -> dict:
        return {"n": self.n, "avg": self.avg}


def make_optimizer(net: torch.nn.Module, schedule: Schedule) -> torch.optim.Adam:
    """Adam over the editor networks at `lr`, their per-matrix log step sizes (and ridges)
    at `alpha_lr`.

    PyTorch's fused kernel (one pass over all parameters) on CPU and CUDA: the same update to
    float rounding, and faster where one editor network per matrix makes many parameters.
    """
    step_names = ("log_alpha", "log_ridge")  # (a ridge only where edits are solved)
    nets = [p for n, p in net.named_parameters() if n not in step_names]
    steps = [p for n, p in net.named_parameters() if n in step_names]
    fused = net.log_alpha.device.type in ("cpu", "cuda")
    groups = [{"params": nets, "lr": schedule.lr},
              {"params": steps, "lr": schedule.alpha_lr}]  # fmt: skip
    return torch.optim.Adam(groups, fused=fused)


def apply_update(net, opt, average: WeightAverage | None, clip: float) -> float:
    """Clip, step and average after backward; returns the gradient norm, NaN for a skipped step.

    A non-finite gradient anywhere makes the total norm non-finite, so the clip's one pass is
    also the finite check; a skipped step's clipped gradients are dropped with it.
    """
    gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip).item()
    if not math.isfinite(gnorm):
        return float("nan")
    opt.step()
    if average is not None:
        average.update()
    return gnorm
