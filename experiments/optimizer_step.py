"""The editor's update after backward: the old loop against the one `mend train` runs now.

    python experiments/optimizer_step.py [--updates 30] > experiments/runs/probes/optimizer_step.txt

After each step's backward, training checks the gradients are finite, clips them, takes an
Adam step and, with `--ema`, updates the weight average. The old loop was a
per-tensor finite check, then the clip's norm pass, Adam's per-tensor CPU loop and a
per-tensor lerp; now the clip's total norm is the finite check, Adam is PyTorch's fused
kernel (`training.optim.make_optimizer`) and the average one foreach lerp
(`training.optim.apply_update`).
This script builds the editor for SmolLM2-135M's edited weights, shared (8.7M parameters)
and with `--no-share` (39M), gives both updates the same random gradients, alternates them
`--updates` times in one process and prints the median milliseconds, their ratio, and how
far the two editors' weights drifted apart (float rounding only: fused Adam orders its
arithmetic differently).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mend.config import EditorConfig, TrainConfig
from mend.editor import EditorNet
from mend.models import find_editable, load_model
from mend.training.optim import WeightAverage, apply_update, make_optimizer

CLIP = TrainConfig().schedule.clip


def old_update(net, opt, average) -> None:
    """The update as training ran it before the fused one: per-tensor checks, loop and lerp."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if all(torch.isfinite(g).all() for g in grads):
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
        with torch.no_grad():
            for a, p in zip(average.avg, average.params, strict=True):
                a.lerp_(p, 0.002)


def new_update(net, opt, average) -> None:
    """The update `training.loop.train` runs now."""
    apply_update(net, opt, average, CLIP)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--updates", type=int, default=30)
    args = ap.parse_args(argv)
    model, _ = load_model(args.model)
    shapes = {p.name: p.in_out for p in find_editable(model)}
    del model
    torch.manual_seed(0)
    cfg = TrainConfig()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(shapes)} edited matrices"
    )
    for share in (True, False):
        old_net = EditorNet(shapes, EditorConfig(share=share))
        new_net = copy.deepcopy(old_net)
        old_opt = torch.optim.Adam(
            [{"params": [p for n, p in old_net.named_parameters() if n != "log_alpha"],
              "lr": cfg.schedule.lr}, {"params": [old_net.log_alpha], "lr": cfg.schedule.alpha_lr}]
        )  # fmt: skip
        new_opt = make_optimizer(new_net, cfg.schedule)
        old_avg = WeightAverage(old_net, 0.998)
        new_avg = WeightAverage(new_net, 0.998)
        n_params = sum(p.numel() for p in old_net.parameters())
        times = {"old": [], "new": []}
        for _ in range(args.updates):
            for p, q in zip(old_net.parameters(), new_net.parameters(), strict=True):
                p.grad = torch.randn_like(p) * 1e-3
                q.grad = p.grad.clone()
            for name, net, opt, avg, update in (
                ("old", old_net, old_opt, old_avg, old_update),
                ("new", new_net, new_opt, new_avg, new_update),
            ):
                t = time.perf_counter()
                update(net, opt, avg)
                times[name].append(time.perf_counter() - t)
        drift = max(
            (p - q).abs().max().item()
            for p, q in zip(old_net.parameters(), new_net.parameters(), strict=True)
        )
        old_ms, new_ms = (1000 * statistics.median(times[k]) for k in ("old", "new"))
        label = "shared   " if share else "no-share "
        print(
            f"{label} {n_params / 1e6:5.1f}M parameters: old {old_ms:6.1f} ms, new {new_ms:6.1f} ms,"
            f" {old_ms / new_ms:.2f}x (median of {args.updates}); weights differ by at most {drift:.1e}"
        )


if __name__ == "__main__":
    main()
