"""Side-by-side comparison of editing methods on one model: single, simultaneous, sequential edits.

    python benchmarks/compare.py --editor runs/bench --name smollm2-135m [--quick]

Writes docs/results/<name>.json, docs/results/<name>.md and PNG plots next to them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mend.baselines import BASELINES, GradEditor, make_baseline
from mend.checkpoint import load_editor
from mend.data import load_checked, resolve_data
from mend.data.text import read_text
from mend.edit import MendEditor
from mend.evaluate import METRICS, evaluate, perplexity, score, summarize
from mend.files import write_json
from mend.models import context_length, load_model

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
SHORT = {"rewrite_acc": "rewrite", "rephrase_acc": "rephrase", "locality_acc": "locality",
         "efficacy_score": "ES", "paraphrase_score": "PS", "neighborhood_score": "NS"}  # fmt: skip


METHODS = ("mend", *BASELINES)


def make_methods(model, tok, editor_dir, grad_lr, ft_steps, names=METHODS):
    options = {"grad_lr": grad_lr, "ft_steps": ft_steps}
    return {
        name: MendEditor.from_pretrained(editor_dir, model, tok) if name == "mend"
        else make_baseline(name, model, tok, **options)
        for name in names
    }  # fmt: skip


def tune_grad_lr(model, tok, edits) -> float:
    """Pick the plain gradient step size with the best rewrite+rephrase+locality on held-out edits."""
    best, best_lr = -1.0, None
    for lr in (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4):
        r = evaluate(model, tok, GradEditor(model, tok, lr=lr), edits, progress=False)
        total = r["rewrite_acc"] + r["rephrase_acc"] + (r["locality_acc"] or 0)
        if total > best:
            best, best_lr = total, lr
    return best_lr


def run_single(model, tok, methods, datasets, ppl_text, n_ppl_edits, editor_for=None, out=None,
               save=None):  # fmt: skip
    """Run 1: every method on every data set, one edit at a time, plus perplexity drawdown.

    Args:
        editor_for: {data set: MendEditor} replacing methods["mend"] on that data set (an
            editor trained on that data set's training split).
        out: the dict to fill ({data set: {method: report}}); save: called after each method.
    """
    out = {} if out is None else out
    base_ppl = perplexity(model, tok, ppl_text)
    for ds_name, edits in datasets.items():
        stride = max(1, len(edits) // n_ppl_edits)
        unedited = {}  # the unedited scores, shared by all methods
        own = (editor_for or {}).get(ds_name)
        for name, method in methods.items():
            method = own if (name == "mend" and own is not None) else method
            ppls = []

            def after(i, ppls=ppls, stride=stride):
                if i % stride == 0 and len(ppls) < n_ppl_edits:
                    ppls.append(perplexity(model, tok, ppl_text))

            t = time.perf_counter()
            rep = evaluate(model, tok, method, edits, after_edit=after, desc=f"{ds_name} {name}",
                           unedited=unedited)  # fmt: skip
            rep["ppl_pre"], rep["ppl_post"] = base_ppl, sum(ppls) / len(ppls)
            rep["wall_seconds"] = time.perf_counter() - t
            out.setdefault(ds_name, {})[name] = rep
            print(f"[single] {ds_name:<12} {name:<6} " + fmt_row(rep))
            if save is not None:
                save()
    return out


def run_batched(model, tok, methods, edits, ks):
    """Run 2: k edits applied as one batch; metrics over all edits."""
    out, unedited = {}, {}
    for name in [m for m in ("mend", "ft") if m in methods]:
        for k in ks:
            rep = evaluate(model, tok, methods[name], edits[: max(k, len(edits) // k * k)], batch_size=k,
                           desc=f"batch k={k} {name}", unedited=unedited)  # fmt: skip
            out.setdefault(name, {})[k] = rep
            print(f"[batch k={k:<3}] {name:<6} " + fmt_row(rep))
    return out


def run_sequential(model, tok, methods, edits, every):
    """Run 3: edits applied one after another; all earlier edits re-scored every `every` edits.

    `mend` is anchored (each edit's gradient from the unedited weights, MendEditor's default);
    `mend-unanchored` is the paper's setting, each edit computed on the model as edited so far.
    """
    out = {}
    checkpoints = list(range(every, len(edits) + 1, every))
    # Unedited predictions for each prefix, taken before any edit is applied.
    base = {n: score(model, tok, edits[:n]) for n in checkpoints}
    if "mend" in methods:
        paper = MendEditor(model, tok, methods["mend"].net, anchored=False)
        methods = methods | {"mend-unanchored": paper}
    for name in [m for m in ("mend", "mend-unanchored", "ft") if m in methods]:
        results, curve = [], []
        try:
            for i, req in enumerate(tqdm(edits, desc=f"sequential {name}", leave=False)):
                results.append(methods[name].edit([req]))
                if i + 1 in base:
                    now = score(model, tok, edits[: i + 1], base[i + 1])
                    curve.append({"n": i + 1, **summarize(now["metrics"])})
                    print(f"[sequential] {name:<6} n={i + 1:<4} " + fmt_row(curve[-1]))
        finally:
            for r in reversed(results):
                r.revert()
        out[name] = curve
    return out


def fmt_row(rep) -> str:
    return " ".join(f"{SHORT[k]}={rep[k]:.3f}" for k in METRICS if rep.get(k) is not None)


def write_markdown(report, path: Path) -> None:
    commands = report.get("commands", [report["command"]])
    lines = [f"# Editing methods compared: {report['model']}", "", "Commands:", "",
             *(f"- `{c}`" for c in commands), ""]  # fmt: skip
    head = "| data | method | " + " | ".join(SHORT[k] for k in METRICS)
    head += " | ppl pre | ppl post | s/edit (median) |"
    for ds, methods in report.get("single", {}).items():
        lines += [f"## Single edits: {ds} (n={next(iter(methods.values()))['n_edits']})", "", head,
                  "|" + "---|" * (len(METRICS) + 5)]  # fmt: skip
        for name, r in methods.items():
            cells = [f"{r[k]:.3f}" if r.get(k) is not None else "-" for k in METRICS]
            ppl = [f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in ("ppl_pre", "ppl_post")]
            lines.append(f"| {ds} | {name} | " + " | ".join(cells + ppl)
                         + f" | {r['edit_seconds_median']:.4f} |")  # fmt: skip
        lines.append("")
    if "batched" in report:
        lines += ["## Simultaneous edits (one batch of k edits)", "", "| method | k | "
                  + " | ".join(SHORT[k] for k in METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]  # fmt: skip
    for name, by_k in report.get("batched", {}).items():
        for k, r in by_k.items():
            cells = [f"{r[m]:.3f}" if r.get(m) is not None else "-" for m in METRICS]
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    if "sequential" in report:
        lines += ["", "## Sequential edits (applied one after another)", "", "| method | n | "
                  + " | ".join(SHORT[k] for k in METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]  # fmt: skip
    for name, curve in report.get("sequential", {}).items():
        for row in curve:
            cells = [f"{row[m]:.3f}" if row.get(m) is not None else "-" for m in METRICS]
            lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(report, prefix: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for run, xlabel in (("batched", "edits per batch k"), ("sequential", "edits applied")):
        if run not in report:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, metric in zip(axes, ("rewrite_acc", "rephrase_acc", "locality_acc"), strict=True):
            for name, data in report[run].items():
                rows = (
                    [(int(k), r) for k, r in data.items()]
                    if run == "batched"
                    else [(r["n"], r) for r in data]
                )
                ax.plot([x for x, _ in rows], [r[metric] for _, r in rows], "o-", label=name)
            ax.set_title(metric)
            ax.set_xlabel(xlabel)
            ax.set_ylim(-0.02, 1.02)
            if run == "batched":
                ax.set_xscale("log")
            ax.legend()
        fig.tight_layout()
        fig.savefig(f"{prefix}_{run}.png", dpi=90)
        plt.close(fig)


def write_report(report: dict, name: str, plots: bool = False) -> None:
    """docs/results/<name>.json and .md (and the PNG plots)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", report)
    write_markdown(report, RESULTS / f"{name}.md")
    if plots:
        plot(report, RESULTS / name)
        print(f"wrote {RESULTS / name}.json, .md and plots")


def merge(paths: list[str], name: str) -> None:
    """One report from several partial ones: their single-edit rows, batched and sequential runs.

    A part written `DATASET:METHOD=REPORT` is one single-edit row taken from a `mend eval`
    report (no perplexity); every other part is a report of this script.
    """
    import json

    report: dict = {"commands": [], "parts": list(paths)}
    for path in paths:
        if "=" in path:
            where, path = path.split("=", 1)
            ds, method = where.split(":", 1)
            row = json.loads(Path(path).read_text())
            report.setdefault("single", {}).setdefault(ds, {})[method] = row
            editor = f" --editor {row['editor']}" if row.get("editor") else ""
            report["commands"].append(
                f"mend eval --model {row['model']} --method {row['method']}{editor} "
                f"--data {row['data']} --limit {row['n_edits']} (report: {path})"
            )
            continue
        part = json.loads(Path(path).read_text())
        report["commands"].append(part["command"])
        for key in ("model", "editor", "zsre_editor", "grad_lr"):
            report[key] = report.get(key) or part.get(key)
        for ds, methods in part.get("single", {}).items():
            report.setdefault("single", {}).setdefault(ds, {}).update(methods)
        for run in ("batched", "sequential"):
            if run in part:
                report[run] = part[run]
    report["command"] = " ; ".join(report["commands"])
    write_report(report, name, plots=True)


def main(argv=None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", help="the trained MEND editor (required unless --merge)")
    ap.add_argument("--name", default="compare-smollm2-135m/smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="a small version for smoke tests")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--ft-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--merge", nargs="+", metavar="REPORT",
                    help="combine the JSON reports of runs made in parts (e.g. in parallel "
                    "processes) into docs/results/<name>.*, and exit")  # fmt: skip
    ap.add_argument("--grad-lr", type=float, help="step size of `grad` (default: tuned here)")
    ap.add_argument("--zsre-editor", help="editor for the zsRE edits (default: --editor)")
    ap.add_argument("--runs", nargs="+", choices=("single", "batched", "sequential"),
                    default=["single", "batched", "sequential"])  # fmt: skip
    ap.add_argument("--datasets", nargs="+", choices=("counterfact", "zsre"),
                    default=["counterfact", "zsre"], help="data sets of the single-edit run")  # fmt: skip
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="methods of the single-edit run; batched and sequential runs take mend "
                    "and ft from them")  # fmt: skip
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.name)
        return
    needs_editor = "mend" in args.methods
    if needs_editor and not args.editor:
        ap.error("--editor is required when mend runs (leave it out of --methods otherwise)")
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 10 if args.quick else args.limit
    ks = [1, 5, 10] if args.quick else [1, 5, 25, 100]
    n_batch = 10 if args.quick else 100
    n_seq, every = (10, 5) if args.quick else (100, 10)

    model, tok = load_model(args.model)
    max_len = context_length(model)
    cf = load_checked("counterfact-val", tok, max_len, limit=max(n, n_batch, n_seq))
    zsre = load_checked("zsre-eval", tok, max_len, limit=n)
    grad_lr = args.grad_lr
    if grad_lr is None and "grad" in args.methods and "single" in args.runs:
        tune = load_checked("counterfact-train", tok, max_len)[-20:]
        grad_lr = tune_grad_lr(model, tok, tune[:10] if args.quick else tune)
        print(f"grad baseline step size: {grad_lr:g}")
    names = set(args.methods if "single" in args.runs else ())
    if {"batched", "sequential"} & set(args.runs):
        names |= {"mend", "ft"} & set(args.methods)
    methods = make_methods(model, tok, args.editor, grad_lr, args.ft_steps,
                           [m for m in METHODS if m in names])  # fmt: skip
    editor_for = {}
    if args.zsre_editor:
        editor_for["zsre"] = MendEditor(model, tok, load_editor(args.zsre_editor, model))
    text = read_text(resolve_data("wikitext-valid"))
    report = {"model": args.model, "editor": args.editor, "zsre_editor": args.zsre_editor,
              "quick": args.quick, "grad_lr": grad_lr, "command": "python " + " ".join(sys.argv)}  # fmt: skip
    name = args.name + ("-quick" if args.quick else "")

    def save() -> None:
        """Write what is done so far: a long run stopped part-way keeps its finished rows."""
        write_report(report, name)

    if "single" in args.runs:
        single = {m: methods[m] for m in args.methods}
        sets = {"counterfact": cf[:n], "zsre": zsre[:n]}
        report["single"] = {}
        run_single(model, tok, single, {d: sets[d] for d in args.datasets}, text,
                   2 if args.quick else 10, editor_for, out=report["single"], save=save)  # fmt: skip
    if "batched" in args.runs:
        report["batched"] = run_batched(model, tok, methods, cf[:n_batch], ks)
        save()
    if "sequential" in args.runs:
        report["sequential"] = run_sequential(model, tok, methods, cf[:n_seq], every)
        save()
    write_report(report, name, plots=True)


if __name__ == "__main__":
    main()
