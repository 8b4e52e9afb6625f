"""Running per-dimension standardisation of u and delta, the editor networks' inputs.

MEND normalises them so that one network serves gradients of very different scales
(Mitchell et al., Fast Model Editing at Scale).
"""

from __future__ import annotations

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Standardise each dimension with running statistics, kept separately per edited matrix.

    Statistics are merged batch by batch (Chan et al.'s parallel form of Welford's algorithm)
    in float64, updated only in training mode, and saved with the module. A matrix whose
    statistics have seen fewer than two tokens is passed through unchanged. With `clip`, the
    standardised values are clipped to +-clip (`EditorConfig.input_clip`).
    """

    def __init__(self, n_layers: int, dim: int, clip: float | None = None):
        super().__init__()
        self.clip = clip
        self.register_buffer("count", torch.zeros(n_layers, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_layers, dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n_layers, dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor, layer_ids: torch.Tensor) -> None:
        """Merge tokens x (N, dim), each belonging to matrix layer_ids[i], into the statistics."""
        x = x.double()
        for layer in layer_ids.unique().tolist():
            xs = x[layer_ids == layer]  # (n, dim)
            n = xs.shape[0]
            mean_b = xs.mean(0)
            m2_b = ((xs - mean_b) ** 2).sum(0)
            count = self.count[layer]
            total = count + n
            diff = mean_b - self.mean[layer]
            self.mean[layer] += diff * (n / total)
            self.m2[layer] += m2_b + diff**2 * (count * n / total)
            self.count[layer] = total

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (n_layers, dim); identity where fewer than two tokens were seen."""
        ready = (self.count >= 2)[:, None]
        var = self.m2 / (self.count[:, None] - 1).clamp_min(1)
        std = var.sqrt()
        # A dimension that never varies must not blow up: floor it relative to its matrix.
        std = std.clamp_min(1e-3 * std.mean(-1, keepdim=True) + 1e-30)
        mean = torch.where(ready, self.mean, torch.zeros_like(self.mean))
        std = torch.where(ready, std, torch.ones_like(std))
        return mean, std

    def forward(self, x: torch.Tensor, layer_ids: torch.Tensor) -> torch.Tensor:
        """x (N, dim) -> standardised (N, dim); updates the statistics first when training."""
        if self.training:
            self.update(x, layer_ids)
        mean, std = self.stats()
        z = (x - mean[layer_ids].to(x.dtype)) / std[layer_ids].to(x.dtype)
        return z if self.clip is None else z.clamp(-self.clip, self.clip)
