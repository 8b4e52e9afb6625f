"""PNG plots: training curves from train_log.jsonl; evaluation reports against edit size (mass
editing) and against edits applied so far (lifelong editing)."""

from __future__ import annotations

import json
from pathlib import Path

from mend.files import atomic_write


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


# (title, keys, y axis): the first key drawn solid, a second dashed; "acc" a 0-1 scale
ACCURACY_PANELS = (
    ("rewrite", ("rewrite_acc", "rewrite_gen"), "acc"),
    ("rephrase", ("rephrase_acc", "rephrase_gen"), "acc"),
    ("locality", ("locality_acc", "locality_gen"), "acc"),
)
PPL_PANEL = ("perplexity change", ("ppl_change",), "linear")
SECONDS_PANEL = ("seconds per batch (median)", ("seconds_per_batch_median",), "log")


def _value(row: dict, key: str) -> float:
    value = row.get(key)
    return float("nan") if value is None else float(value)


def _draw_panels(axes, series: dict[str, list[tuple[int, dict]]], panels, xlabel: str) -> None:
    """One panel per entry of `panels`, one colour per method of `series` ({method: [(x, row)]})."""
    for ax, (title, keys, yscale) in zip(axes, panels, strict=True):
        positive = False
        for i, (method, points) in enumerate(series.items()):
            xs = [x for x, _ in points]
            for key, style in zip(keys, ("o-", "s--"), strict=False):
                ys = [_value(row, key) for _, row in points]
                positive |= any(y > 0 for y in ys)
                ax.plot(xs, ys, style, color=f"C{i}", label=method if style == "o-" else None)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter("{x:g}")  # 1, 10, 100 rather than powers of ten
        ax.xaxis.set_minor_formatter("")
        if yscale == "acc":
            ax.set_ylim(-0.02, 1.02)
        elif yscale == "log" and positive:  # (no edit at all takes 0 seconds)
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)


def _save(fig, png_path: str | Path) -> None:
    fig.suptitle("solid: teacher-forced, dashed: generated")
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def plot_edit_sizes(reports: dict[str, dict[int, dict]], png_path: str | Path) -> None:
    """Mass editing: `evaluate` reports ({method: {edits in one change: report}}) as one panel
    per metric (rewrite, rephrase, locality, perplexity change, seconds per batch) against the
    number of edits in one change, on a log scale; one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (*ACCURACY_PANELS, PPL_PANEL, SECONDS_PANEL)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    series = {m: sorted(by_size.items()) for m, by_size in reports.items()}
    _draw_panels(axes, series, panels, "edits in one change")
    _save(fig, png_path)
    plt.close(fig)


def _curve(report: dict) -> list[tuple[int, dict]]:
    """(edits applied, scores) along a sequential report's curve (its end when it has none),
    with the perplexity change against the unedited model."""
    before = report.get("ppl_before")
    out = []
    for p in report.get("curve") or [report | {"ppl": report.get("ppl_after")}]:
        change = p["ppl"] / before - 1 if before and p.get("ppl") else None
        out.append((p["n_edits"], p | {"ppl_change": change}))
    return out


def plot_lifelong(reports: dict[int, dict[str, dict]], png_path: str | Path) -> None:
    """Lifelong editing: `evaluate_sequential` reports ({batch size: {method: report}}), one row
    of panels per batch size (rewrite, rephrase, locality, perplexity change) with each method's
    curve against the edits applied so far, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (*ACCURACY_PANELS, PPL_PANEL)
    rows = sorted(reports)
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4 * len(panels), 3.6 * len(rows)),
                             squeeze=False)  # fmt: skip
    for row, size in zip(axes, rows, strict=True):
        series = {m: _curve(r) for m, r in reports[size].items()}
        _draw_panels(row, series, panels, "edits applied so far")
        row[0].set_ylabel(f"batches of {size} edits")
    _save(fig, png_path)
    plt.close(fig)
