"""Peak memory and time of one least-squares training step of n edits on SmolLM2-135M.

Each configuration runs in its own process (a fresh model, so no cache or allocator state
carries over); a thread samples the process's resident memory every 5 ms during the step.
Two-stage is MALMEN's (`mend.training.mass`); plain backpropagates through one graph.

    python benchmarks/mass_step.py --edits 10 100 1000 --plain 10 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """The highest resident memory seen while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.before = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def one(n: int, two_stage: bool, chunk: int) -> dict:
    import random

    import torch

    from mend.config import EditorConfig, TrainConfig
    from mend.data import load_requests
    from mend.edit import MendEditor
    from mend.editor import EditorNet
    from mend.models import find_editable, load_model
    from mend.models.upper import UpperStack
    from mend.training.mass import ls_step
    from mend.training.sampling import build_rows

    model, tok = load_model("smollm2-135m")
    model.requires_grad_(False)
    cfg = TrainConfig(editor=EditorConfig(share=False, aggregate="ls"))
    cfg = cfg.override("speed.chunk_rows", chunk).override("sampling.loc_per_edit", 2)
    params = find_editable(model)
    net = EditorNet({p.name: p.in_out for p in params}, cfg.editor).train()
    editor = MendEditor(model, tok, net)
    stack = UpperStack(model, UpperStack.first_edited_block(model, net.names))
    reqs = load_requests("counterfact-train")[:n]
    rows = build_rows(reqs, reqs, cfg.sampling, random.Random(0), None, n)
    torch.manual_seed(0)
    with PeakMemory() as mem:
        start = time.perf_counter()
        stats = ls_step(editor, reqs, rows, cfg, stack, two_stage=two_stage)
        seconds = time.perf_counter() - start
    return {"edits": n, "mode": "two-stage" if two_stage else "plain", "chunk_rows": chunk,
            "rows": len(rows.gen) + len(rows.loc), "seconds": round(seconds, 2),
            "rss_before_mb": round(mem.before), "peak_rss_mb": round(mem.peak),
            "step_peak_mb": round(mem.peak - mem.before), "loss": round(stats["loss"], 4)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--plain", type=int, nargs="*", default=[10, 100],
                    help="edit sizes to also run as one autograd graph")  # fmt: skip
    ap.add_argument("--chunk", type=int, default=256, help="rows per chunk")
    ap.add_argument("--one", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1] == "two-stage", args.chunk)))
        return
    runs = [(n, "two-stage") for n in args.edits] + [(n, "plain") for n in args.plain]
    print(
        f"{'edits':>6} {'mode':>10} {'rows':>6} {'seconds':>8} {'step peak MB':>13} {'peak RSS MB':>12}"
    )
    for n, mode in runs:
        cmd = [
            sys.executable,
            str(Path(__file__)),
            "--one",
            str(n),
            mode,
            "--chunk",
            str(args.chunk),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{n:>6} {mode:>10} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['edits']:>6} {r['mode']:>10} {r['rows']:>6} {r['seconds']:>8} "
              f"{r['step_peak_mb']:>13} {r['peak_rss_mb']:>12}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
