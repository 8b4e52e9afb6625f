"""Side-by-side comparison of editing methods on one model.

Single, simultaneous and sequential edits, written to docs/results/<name>.json, .md and PNG plots:

    python benchmarks/compare.py --editor runs/bench --name smollm2-135m [--quick]

Mass editing (`--setting mass`): for each method and size k, k edits made as one change, scored
and reverted (`evaluate` with batch_size=k):

    python benchmarks/compare.py --setting mass --sizes 1 10 100 1000 --methods mend ls ft \
        --editor DIR --data counterfact-val --limit 1000 --out FOLDER

Size k edits the first n(k) of the --limit requests: all of them for sizes from --limit-small M
(default 100) up, at most the first M for smaller sizes (a thousand single edits of ft cost far
more than ten changes of 100); `--limit-per-size 1=1000,10=500` sets n(k) itself. n(k) is
rounded down to whole changes of k.

Lifelong editing (`--setting lifelong`): batches of b edits kept applied one after another, all
edits so far re-scored every --every edits and at the end (`evaluate_sequential`):

    python benchmarks/compare.py --setting lifelong --batch-sizes 100 1 --methods mend ls ft \
        --editor DIR --data counterfact-val --limit 1000 --every 100 --out FOLDER

Each (setting, method, size) writes FOLDER/<setting>-<method>-<size>.json; a rerun keeps the
reports already there (--force redoes them), so a long comparison resumes. Then FOLDER/summary.md
and mass.png / lifelong.png are rebuilt from every report in FOLDER (`--replot FOLDER`: only that).
Methods: `mend` (the editor at --editor, as it was trained), `mend-sum` (--sum-editor, default
--editor, its edits' changes summed) and the baselines (ft, ft-kl, grad, ls, none) with their flags.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mend.baselines import BASELINES, OPTIONS, GradEditor, make_baseline
from mend.checkpoint import load_editor
from mend.data import load_checked, resolve_data
from mend.data.text import read_text
from mend.edit import MendEditor
from mend.errors import MendError
from mend.evaluate import (
    GEN_METRICS,
    LOCALITY_LABEL,
    evaluate,
    evaluate_sequential,
    perplexity,
    ppl_text,
    score,
    summarize,
)
from mend.evaluate import METRICS as REPORTED
from mend.files import atomic_write, write_json
from mend.models import context_length, load_model
from mend.plots import plot_edit_sizes, plot_lifelong

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
SHORT = {"rewrite_acc": "rewrite", "rephrase_acc": "rephrase", "locality_acc": "locality",
         "efficacy_score": "ES", "paraphrase_score": "PS", "neighborhood_score": "NS",
         "rewrite_gen": "rewrite gen", "rephrase_gen": "rephrase gen",
         "locality_gen": "locality gen"}  # fmt: skip
# the tables' columns: a language model's metrics (a classifier's label accuracy on its
# locality inputs is in `mend eval`'s reports)
METRICS = [m for m in REPORTED if m != LOCALITY_LABEL]


LOCATE = ("rome", "memit", "alphaedit")  # slow on a CPU (an optimisation per request)
METHODS = ("mend", *(b for b in BASELINES if b not in LOCATE))  # the default --methods
SPECS = ("mend", "mend-sum", *BASELINES)  # what --methods takes
SETTINGS = {"mass": "Mass editing: k edits made as one change, scored, reverted",
            "lifelong": "Lifelong editing: batches of k edits kept applied one after another; "
            "every edit scored at the end"}  # fmt: skip


def make_methods(model, tok, editor_dir, names=METHODS, sum_editor=None, **options):
    """{name: method}: `mend` binds the editor in editor_dir with MendEditor's defaults (the
    aggregation it was trained for), `mend-sum` the one in sum_editor (default editor_dir) with
    its edits' changes summed; a baseline gets `options` (None: the baseline's own default)."""
    options = {k: v for k, v in options.items() if v is not None}

    def build(name):
        if name == "mend":
            return MendEditor.from_pretrained(editor_dir, model, tok)
        if name == "mend-sum":
            return MendEditor.from_pretrained(sum_editor or editor_dir, model, tok, aggregate="sum")
        return make_baseline(name, model, tok, **options)

    return {name: build(name) for name in names}


def tune_grad_lr(model, tok, edits) -> float:
    """Pick the plain gradient step size with the best rewrite+rephrase+locality on held-out edits."""
    best, best_lr = -1.0, None
    for lr in (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4):
        r = evaluate(model, tok, GradEditor(model, tok, lr=lr), edits, progress=False)
        total = r["rewrite_acc"] + r["rephrase_acc"] + (r["locality_acc"] or 0)
        if total > best:
            best, best_lr = total, lr
    return best_lr


def grad_step(args, model, tok, names) -> float | None:
    """--grad-lr, or the step size tuned on held-out edits when `grad` is among names."""
    if args.grad_lr is not None or "grad" not in names:
        return args.grad_lr
    tune = load_checked("counterfact-train", tok, context_length(model))[-20:]
    lr = tune_grad_lr(model, tok, tune[:10] if args.quick else tune)
    print(f"grad baseline step size: {lr:g}")
    return lr


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


def edits_per_size(sizes, limit: int, small: int = 100, explicit=None) -> dict[int, int]:
    """Mass editing: size k -> how many of the first `limit` requests it edits (the rule of the
    module docstring: `explicit` if it names k, else all from size `small` up, at most `small`
    below it), rounded down to whole changes of k."""
    out = {}
    for k in sizes:
        n = (explicit or {}).get(k, limit if k >= small else min(limit, small))
        if not 1 <= k <= n <= limit:
            raise MendError(f"size {k} needs between {k} and --limit {limit} edits, got {n}")
        out[k] = n // k * k
    return out


def report_path(folder: Path, setting: str, method: str, size: int) -> Path:
    return Path(folder) / f"{setting}-{method}-{size}.json"


def run_setting(model, tok, methods, edits, setting, sizes, folder, counts=None, every=None,
                ppl=None, force=False, meta=None) -> None:  # fmt: skip
    """Each method at each size of a setting, one report each in `folder` (kept if there).

    Args:
        setting: "mass" (`evaluate` of the first counts[k] edits, k at a time) or "lifelong"
            (`evaluate_sequential` of all edits in batches of k, re-scored every `every`).
        ppl: `evaluate`'s perplexity arguments (ppl_text, ppl_windows).
        force: redo the runs whose report is already there; meta: added to every report.
    """
    for k in sizes:
        unedited: dict = {}  # the unedited model's scores of size k's changes, shared by methods
        for name, method in methods.items():
            path = report_path(folder, setting, name, k)
            if path.exists() and not force:
                print(f"[{setting} k={k}] {name:<8} kept {path}")
                continue
            if setting == "mass":
                rep = evaluate(model, tok, method, edits[: counts[k]], batch_size=k,
                               desc=f"mass k={k} {name}", unedited=unedited, **(ppl or {}))  # fmt: skip
            else:
                rep = evaluate_sequential(model, tok, method, edits, k, every, **(ppl or {}))
            for point in rep.get("curve", [])[:-1]:  # (the last has every edit: the end's)
                print(f"[{setting} k={k}] {name:<8} n={point['n_edits']:<5} " + fmt_row(point))
            write_json(path, {"setting": setting, "method": name, "size": k} | (meta or {}) | rep)
            print(f"[{setting} k={k}] {name:<8} n={rep['n_edits']:<5} " + fmt_row(rep)
                  + f" ppl_change={_cell(rep['ppl_change'], '+.2%')}"
                  + f" s/batch={rep['seconds_per_batch_median']:.4f}")  # fmt: skip


def load_reports(folder: Path) -> dict:
    """{setting: {method: {size: report}}} from the reports in folder, methods in SPECS order."""
    found: dict = {}
    for path in sorted(Path(folder).glob("*.json")):
        rep = json.loads(path.read_text())
        if isinstance(rep, dict) and rep.get("setting") in SETTINGS:
            found.setdefault(rep["setting"], {}).setdefault(rep["method"], {})[rep["size"]] = rep
    order = {m: i for i, m in enumerate(SPECS)}
    ranked = {s: sorted(by, key=lambda m: (order.get(m, len(SPECS)), m)) for s, by in found.items()}
    return {s: {m: dict(sorted(found[s][m].items())) for m in ms} for s, ms in ranked.items()}


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_summary(folder: Path) -> None:
    """folder/summary.md (one table per setting) and mass.png / lifelong.png from its reports."""
    folder = Path(folder)
    reports = load_reports(folder)
    if not reports:
        raise MendError(f"no mass or lifelong reports in {folder}")
    runs = [r for by in reports.values() for sizes in by.values() for r in sizes.values()]
    commands = dict.fromkeys(r["command"] for r in runs if r.get("command"))
    lines = ["# Editing methods compared", "", "Commands:", "", *(f"- `{c}`" for c in commands)]
    metrics = (*METRICS[:3], *GEN_METRICS, *METRICS[3:])
    head = ["method", "k", "edits", *(SHORT[m] for m in metrics), "ppl change", "s/batch (median)"]
    for setting, by_method in reports.items():
        lines += ["", f"## {SETTINGS[setting]}", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]  # fmt: skip
        for name, by_size in by_method.items():
            for k, r in by_size.items():
                cells = [_cell(r.get(m), ".3f") for m in metrics]
                cells += [_cell(r.get("ppl_change"), "+.2%"),
                          _cell(r.get("seconds_per_batch_median"), ".4f")]  # fmt: skip
                lines.append(f"| {name} | {k} | {r['n_edits']} | " + " | ".join(cells) + " |")
    atomic_write(folder / "summary.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    if "mass" in reports:
        plot_edit_sizes(reports["mass"], folder / "mass.png")
    if "lifelong" in reports:
        by_size: dict = {}
        for name, sizes in reports["lifelong"].items():
            for k, r in sizes.items():
                by_size.setdefault(k, {})[name] = r
        plot_lifelong(by_size, folder / "lifelong.png")
    print(f"wrote {folder / 'summary.md'} and plots")


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


def compare_setting(args) -> None:
    """--setting mass or lifelong: the runs whose report is missing (all with --force), then
    summary.md and the plots."""
    import sys

    out, mass = Path(args.out), args.setting == "mass"
    sizes = args.sizes if mass else args.batch_sizes
    if mass:
        explicit = dict(map(int, kn.split("=")) for kn in args.limit_per_size.split(",") if kn)
        counts = edits_per_size(sizes, args.limit, args.limit_small, explicit)
        print(f"mass: size k edits the first n of {args.limit} requests, k at a time (sizes below "
              f"--limit-small {args.limit_small} at most {args.limit_small}; --limit-per-size "
              "sets n): " + ", ".join(f"k={k} n={n}" for k, n in counts.items()))  # fmt: skip
    every = args.every or max(1, args.limit // 10)
    todo = [m for m in args.methods
            if any(args.force or not report_path(out, args.setting, m, k).exists() for k in sizes)]  # fmt: skip
    if todo:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
        edits = load_checked(args.data, tok, context_length(model), limit=args.limit)
        if len(edits) < args.limit:
            raise MendError(f"{args.data} has only {len(edits)} edits (--limit {args.limit})")
        grad_lr = grad_step(args, model, tok, todo)
        options = {k: getattr(args, k) for k in OPTIONS} | {"grad_lr": grad_lr}
        methods = make_methods(model, tok, args.editor, todo, args.sum_editor, **options)
        text = ppl_text() if args.ppl_windows else None
        ppl = {"ppl_text": text, "ppl_windows": args.ppl_windows}
        meta = {"model": args.model, "editor": args.editor, "sum_editor": args.sum_editor,
                "data": args.data, "limit": args.limit, "options": options,
                "command": "python " + " ".join(sys.argv)}  # fmt: skip
        run_setting(model, tok, methods, edits, args.setting, sizes, out,
                    counts if mass else None, every, ppl, args.force, meta)  # fmt: skip
    else:
        print(f"every report is already in {out} (--force runs them again)")
    write_summary(out)


def main(argv=None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", help="the trained MEND editor (required unless --merge)")
    ap.add_argument("--name", default="compare-smollm2-135m/smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="a small version for smoke tests")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--ft-steps", type=int, help="ft / ft-kl step limit per edit (default 40)")
    ap.add_argument("--ft-lr", type=float, help="ft / ft-kl learning rate (default 5e-4)")
    ap.add_argument("--ls-lr", type=float, help="ls: step of the identity editor (default 0.003)")
    ap.add_argument("--preserve", type=float, help="ls: weight holding ordinary text's keys")
    ap.add_argument(
        "--null-space",
        type=float,
        help="ls, alphaedit: keep the change off this share of ordinary text's key energy",
    )
    ap.add_argument(
        "--layers",
        type=int,
        nargs="+",
        help="rome / memit / alphaedit: the edited blocks (default: scaled MEMIT window)",
    )
    ap.add_argument(
        "--mom2-weight",
        type=float,
        help="memit: weight of ordinary text's key covariance (default 15000)",
    )
    ap.add_argument("--stats-text", help="rome / memit / alphaedit: text of the key covariance")
    ap.add_argument("--loc-data", help="ft-kl: text for locality inputs (default wikitext-valid)")
    ap.add_argument("--sum-editor", help="mend-sum: the editor (default: --editor)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
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
    ap.add_argument("--methods", nargs="+", choices=SPECS, default=list(METHODS),
                    help="methods of the single-edit run or of --setting; batched and sequential "
                    "runs take mend and ft from them")  # fmt: skip
    ap.add_argument("--setting", choices=SETTINGS, help="mass or lifelong editing, into --out")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100],
                    help="mass: edits in one change")  # fmt: skip
    ap.add_argument("--limit-small", type=int, default=100, metavar="M",
                    help="mass: sizes below M edit at most the first M requests (0: all)")  # fmt: skip
    ap.add_argument("--limit-per-size", metavar="K=N,...", default="",
                    help="mass: size K edits the first N requests")  # fmt: skip
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 1],
                    help="lifelong: edits per batch")  # fmt: skip
    ap.add_argument("--every", type=int, help="lifelong: re-score every M edits (--limit / 10)")
    ap.add_argument("--data", default="counterfact-val", help="--setting: the edits")
    ap.add_argument("--ppl-windows", type=int, default=4, help="--setting: perplexity windows")
    ap.add_argument("--out", help="--setting: folder of the reports, summary.md and plots")
    ap.add_argument("--force", action="store_true", help="--setting: redo existing reports")
    ap.add_argument("--replot", metavar="FOLDER",
                    help="rebuild FOLDER's summary.md and plots from its reports, and exit")  # fmt: skip
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.name)
        return
    if args.replot:
        write_summary(Path(args.replot))
        return
    if "mend" in args.methods and not args.editor:
        ap.error("--editor is required when mend runs (leave it out of --methods otherwise)")
    if "mend-sum" in args.methods and not (args.sum_editor or args.editor):
        ap.error("mend-sum needs --sum-editor or --editor")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.setting:
        if not args.out:
            ap.error("--setting needs --out")
        compare_setting(args)
        return
    n = 10 if args.quick else args.limit
    ks = [1, 5, 10] if args.quick else [1, 5, 25, 100]
    n_batch = 10 if args.quick else 100
    n_seq, every = (10, 5) if args.quick else (100, 10)

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    max_len = context_length(model)
    cf = load_checked("counterfact-val", tok, max_len, limit=max(n, n_batch, n_seq))
    zsre = load_checked("zsre-eval", tok, max_len, limit=n)
    grad_lr = grad_step(args, model, tok, args.methods if "single" in args.runs else ())
    names = set(args.methods if "single" in args.runs else ())
    if {"batched", "sequential"} & set(args.runs):
        names |= {"mend", "ft"} & set(args.methods)
    options = {k: getattr(args, k) for k in OPTIONS} | {"grad_lr": grad_lr}
    methods = make_methods(model, tok, args.editor, [m for m in SPECS if m in names],
                           args.sum_editor, **options)  # fmt: skip
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
