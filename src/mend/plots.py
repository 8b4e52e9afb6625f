"""Training curves as a PNG, from train_log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def _smooth(values: list[float], k: int = 20) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def plot_training(log_path: str | Path, png_path: str | Path) -> None:
    """Loss terms and validation metrics against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(x) for x in Path(log_path).read_text().splitlines() if x.strip()]
    train = [x for x in lines if "val" not in x]
    val = [x for x in lines if "val" in x]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [x["step"] for x in train]
    for key in ("loss", "l_edit", "l_loc"):
        ys = [x.get(key, float("nan")) for x in train]
        axes[0].plot(steps, _smooth(ys), label=f"train {key}")
    axes[0].plot([x["step"] for x in val], [x["val"]["loss"] for x in val], "k.-", label="val loss")
    axes[0].set_yscale("log")
    axes[0].set_title("losses")
    for key in ("rewrite_acc", "rephrase_acc", "locality_acc"):
        axes[1].plot(
            steps, _smooth([x.get(key, float("nan")) for x in train]), label=f"train {key}"
        )
        axes[2].plot([x["step"] for x in val], [x["val"].get(key, float("nan")) for x in val], ".-",
                     label=f"val {key}")  # fmt: skip
    axes[1].set_title("training accuracies (smoothed)")
    axes[2].set_title("validation accuracies")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
