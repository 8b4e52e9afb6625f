"""Speed of training and editing, measured side by side in one run.

    python benchmarks/speed.py [--model smollm2-135m] [--steps 5] [--out runs/speed/mine]   # writes OUT.json and OUT.md

Prints (and writes as Markdown + JSON):
- one training step of the reference path and of the fast path, on the same batches, timed in
  this process with the paths interleaved step by step: time, ratio, and each path's peak
  memory (from a process of its own). The fast path is timed three times: on rows it has not
  seen (the first epoch), the same with the lower blocks' no-grad pass in bf16
  (`--lower-precision bf16`), and on rows whose lower-block activations are in its row cache
  (every later epoch);
- single-edit latency vs one plain no-grad forward pass of the same ~15-token prompt, ratio;
  also unchecked (`boost=()`) and with the editor in fp32 throughout (`editor_bf16=False`);
- batched edit throughput (edits/s) for k = 1, 10, 100;
- the median time per edit of the `ft` baseline.
Peak memory is the peak resident set of a process holding the model and data, over two steps
of one path (on Linux the peak is reset after loading, which peaks higher than a step).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import random
import resource
import statistics
import time
from pathlib import Path

import torch

from mend.baselines import FTEditor
from mend.checkpoint import load_editor
from mend.config import EditorConfig, Sampling, TrainConfig
from mend.data import load_checked
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.files import write_json
from mend.models import context_length, find_editable, load_model
from mend.models.upper import RowCache, UpperStack
from mend.training.sampling import build_rows, similar_index
from mend.training.step import edit_step

PROMPT = "The mother tongue of Danielle Darrieux, the French actress, is"  # ~15 tokens


def rss_peak_mb() -> float:
    """Peak resident memory of this process since start or the last `reset_rss_peak()`, in MB."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_rss_peak() -> None:
    """Start the peak over from the current resident memory (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


MODES = {"reference": "reference path", "fast": "fast path, new rows",
         "fast_bf16": "fast path, new rows, bf16 lower blocks",
         "fast_warm": "fast path, cached rows"}  # fmt: skip


def _setup(args, model, tok):
    """Training data, config and a fresh editor bound to the model, the same for every path."""
    model.requires_grad_(False)
    data = load_checked("counterfact-train", tok, context_length(model))[:2000]
    cfg = TrainConfig(
        editor=EditorConfig(rank=args.rank), sampling=Sampling(edits_per_step=args.batch)
    )
    params = find_editable(model)
    torch.manual_seed(0)
    net = EditorNet({p.name: p.in_out for p in params}, cfg.editor).train()
    editor = MendEditor(model, tok, net)
    start = UpperStack.first_edited_block(model, [p.name for p in params])
    stacks = {
        "reference": None,
        "fast": UpperStack(model, start),
        "fast_bf16": UpperStack(model, start, lower_dtype=torch.bfloat16),
        "fast_warm": UpperStack(model, start, RowCache(cfg.speed.row_cache_mb << 20)),
    }
    return data, cfg, editor, stacks, similar_index(data)


def _step(data, cfg, editor, stack, similar, step: int) -> float:
    """One training step (forward, backward) on the batch of `step`; its wall time."""
    rng = random.Random(step)
    reqs = rng.sample(data, cfg.sampling.edits_per_step)
    rows = build_rows(reqs, data, cfg.sampling, rng, similar)
    t = time.perf_counter()
    loss, _ = edit_step(editor, reqs, rows, cfg, stack)
    loss.backward()
    return time.perf_counter() - t


def _peak_memory(args, mode: str, queue) -> None:
    """Child process: peak resident memory of two training steps of one path."""
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    data, cfg, editor, stacks, similar = _setup(args, model, tok)
    reset_rss_peak()  # loading the model peaks higher than a step; count from here
    rss_model = rss_peak_mb()
    for step in range(2 if mode != "fast_warm" else 4):
        _step(data, cfg, editor, stacks[mode], similar, step % 2)  # fast_warm: the rows again
    queue.put({"peak_rss_mb": rss_peak_mb(), "rss_model_mb": rss_model})


def train_speed(args, model, tok) -> dict:
    """Step time of every path, interleaved step by step in this process (so machine noise
    hits all paths alike), and each path's peak memory from a process of its own."""
    data, cfg, editor, stacks, similar = _setup(args, model, tok)
    for step in range(args.steps + 1):  # fill the row cache of the cached path (untimed)
        _step(data, cfg, editor, stacks["fast_warm"], similar, step)
    times = {mode: [] for mode in MODES}
    for step in range(args.steps + 1):
        for mode in MODES:
            t = _step(data, cfg, editor, stacks[mode], similar, step)
            if step:  # the first step warms up
                times[mode].append(t)
    out = {}
    ctx = mp.get_context("spawn")
    for mode, label in MODES.items():
        q = ctx.Queue()
        p = ctx.Process(target=_peak_memory, args=(args, mode, q))
        p.start()
        out[mode] = {"step_seconds": statistics.median(times[mode]), **q.get()}
        p.join()
        print(f"train step, {label:<38}: {out[mode]['step_seconds']:.3f} s, "
              f"peak RSS {out[mode]['peak_rss_mb']:.0f} MB")  # fmt: skip
    ref = out["reference"]["step_seconds"]
    out["speedup"] = ref / out["fast"]["step_seconds"]
    out["speedup_bf16"] = ref / out["fast_bf16"]["step_seconds"]
    out["speedup_warm"] = ref / out["fast_warm"]["step_seconds"]
    print(f"fast path speed-up: {out['speedup']:.2f}x on new rows "
          f"({out['speedup_bf16']:.2f}x with bf16 lower blocks), "
          f"{out['speedup_warm']:.2f}x on cached rows")  # fmt: skip
    return out


def _median_time(fn, repeats: int) -> float:
    return _median_times([fn], repeats)[0]


def _median_times(fns, repeats: int) -> list[float]:
    """Median seconds of each function, run interleaved (one call of each per round)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def edit_speed(args, model, tok, editor: MendEditor, edits) -> dict:
    from mend.types import EditRequest

    ids = tok(PROMPT, return_tensors="pt")
    request = [EditRequest(PROMPT, "English")]
    unchecked = MendEditor(model, tok, editor.net, boost=())
    fp32 = MendEditor(model, tok, editor.net, editor_bf16=False)

    @torch.no_grad()
    def forward():
        model(**ids, use_cache=False)

    fwd, edit, plain, exact = _median_times(
        [forward, *(lambda m=m: m.edit(request).revert() for m in (editor, unchecked, fp32))],
        args.repeats,
    )
    result = editor.edit(request)
    with torch.no_grad():
        took = bool(editor.reaches_target({}, editor.batch([(PROMPT, "English")])))
    result.revert()
    res = {"prompt_tokens": ids["input_ids"].shape[1], "forward_seconds": fwd, "edit_seconds": edit,
           "edit_over_forward": edit / fwd, "unchecked_edit_seconds": plain,
           "unchecked_over_forward": plain / fwd, "editor_bf16": editor.editor_bf16,
           "fp32_editor_edit_seconds": exact, "fp32_editor_over_forward": exact / fwd,
           "edit_took": took}  # fmt: skip
    print(f"single edit {edit * 1e3:.1f} ms (checked; unchecked {plain * 1e3:.1f} ms; editor in "
          f"fp32 {exact * 1e3:.1f} ms) vs forward {fwd * 1e3:.1f} ms ({res['prompt_tokens']} "
          f"tokens): {res['edit_over_forward']:.2f}x ({res['unchecked_over_forward']:.2f}x "
          f"unchecked, {res['fp32_editor_over_forward']:.2f}x editor in fp32); editor bf16: "
          f"{editor.editor_bf16}; target reached: {took}")  # fmt: skip
    res["batched"] = {}
    for k in (1, 10, 100):
        batch = edits[:k]
        sec = _median_time(lambda b=batch: editor.edit(b).revert(), max(2, args.repeats // 5))
        res["batched"][k] = {"seconds": sec, "edits_per_second": k / sec}
        print(f"batched edit k={k:<3}: {sec:.3f} s, {k / sec:.1f} edits/s")
    return res


def ft_speed(model, tok, edits) -> dict:
    ft = FTEditor(model, tok)
    times = []
    for r in edits:
        res = ft.edit([r])
        times.append(res.seconds)
        res.revert()
    med = statistics.median(times)
    print(f"ft baseline: {med:.3f} s per edit (median of {len(times)})")
    return {"ft_seconds_median": med}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", default=None, help="trained editor (default: an untrained one)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="runs/speed/speed", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"model": args.model, "threads": args.threads, "batch": args.batch, "rank": args.rank}
    model, tok = load_model(args.model)
    report["train"] = train_speed(args, model, tok)
    edits = load_checked("counterfact-val", tok, context_length(model), limit=100)
    if args.editor:
        net = load_editor(args.editor, model)
    else:
        params = find_editable(model)
        net = EditorNet({p.name: p.in_out for p in params}, EditorConfig(rank=args.rank))
    editor = MendEditor(model, tok, net)
    report["edit"] = edit_speed(args, model, tok, editor, edits)
    report["ft"] = ft_speed(model, tok, edits[:10])
    report["mend_vs_ft"] = report["ft"]["ft_seconds_median"] / report["edit"]["edit_seconds"]
    print(f"MEND edit is {report['mend_vs_ft']:.1f}x faster than ft")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out + ".json"), report)
    Path(args.out + ".md").write_text(to_markdown(report))
    print(f"wrote {args.out}.json and .md")


def to_markdown(r: dict) -> str:
    t, e = r["train"], r["edit"]
    lines = [f"# Speed: {r['model']} on CPU ({r['threads']} threads)", "",
             "| measurement | value |", "|---|---|",
             *(f"| train step, {label} (batch {r['batch']} edits) | {t[m]['step_seconds']:.3f} s, "
               f"peak RSS {t[m]['peak_rss_mb']:.0f} MB ({t[m]['rss_model_mb']:.0f} MB before the steps) |"
               for m, label in MODES.items()),
             f"| fast-path speed-up, new rows | {t['speedup']:.2f}x |",
             f"| fast-path speed-up, new rows, bf16 lower blocks | {t['speedup_bf16']:.2f}x |",
             f"| fast-path speed-up, cached rows | {t['speedup_warm']:.2f}x |",
             f"| single edit ({e['prompt_tokens']}-token prompt) | {e['edit_seconds'] * 1e3:.1f} ms |",
             f"| plain no-grad forward, same prompt | {e['forward_seconds'] * 1e3:.1f} ms |",
             f"| edit / forward | {e['edit_over_forward']:.2f}x |",
             f"| the same edit unchecked (`boost=()`) | {e['unchecked_edit_seconds'] * 1e3:.1f} ms, "
             f"{e['unchecked_over_forward']:.2f}x |",
             f"| the same edit, editor in fp32 throughout (`--editor-fp32`) | "
             f"{e['fp32_editor_edit_seconds'] * 1e3:.1f} ms, {e['fp32_editor_over_forward']:.2f}x |",
             f"| editor's large products in bf16 (default here) | {e['editor_bf16']} |"]  # fmt: skip
    for k, b in e["batched"].items():
        lines.append(f"| batched edit k={k} | {b['edits_per_second']:.1f} edits/s |")
    lines.append(f"| ft baseline, median per edit | {r['ft']['ft_seconds_median']:.3f} s |")
    lines.append(f"| MEND vs ft per edit | {r['mend_vs_ft']:.1f}x faster |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
