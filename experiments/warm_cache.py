"""Training throughput with the row cache warmed before the first step, and without.

    python experiments/warm_cache.py > experiments/runs/probes/warm_cache.txt

Trains twice in one process, the same run (first `--records` CounterFact training records, `--steps`
steps, bf16 lower blocks, validation only at the end): once with `training.prepare.warm_rows` as
`mend train` runs it, once with it switched off, so rows are cached as the steps meet them. Prints
the wall time of each run (warm-up included), the median step time per epoch, and the final
validation numbers. Those agree only up to noise: the lower blocks run in bf16, and a row's bf16
hidden state depends a little on the batch it ran in, which moves a 300-step run by a few of its 64
validation edits (that the math is the same is tested in fp32, tests/test_fast_path.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from itertools import pairwise
from pathlib import Path

from mend.config import Schedule, Speed, TrainConfig
from mend.data import load_checked
from mend.models import context_length, load_model
from mend.training import loop
from mend.training.logs import LOG_FILE


def run(model, tok, data, val, cfg, warm: bool) -> dict:
    saved = loop.warm_rows  # the loop's own name for it is the one to switch off
    if not warm:
        loop.warm_rows = lambda *a, **k: False
    try:
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            summary = loop.train(model, tok, data, val, cfg, out, progress=False)
            wall = time.perf_counter() - t
            lines = (Path(out) / LOG_FILE).read_text().splitlines()
    finally:
        loop.warm_rows = saved
    seconds = [x["seconds"] for x in map(json.loads, lines) if "seconds" in x]
    per_epoch = len(data) // cfg.sampling.edits_per_step
    gaps = [b - a for a, b in pairwise(seconds)]  # gaps[k]: the time of step k + 2
    epochs = [statistics.median(gaps[e : e + per_epoch]) for e in range(0, len(gaps), per_epoch)]
    return {"wall": wall, "epochs": epochs, "first_step_at": seconds[0], "val": summary["best_val"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    data = load_checked("counterfact-train", tok, context_length(model), args.records + 64)
    data, val = data[: args.records], data[args.records :]
    cfg = TrainConfig(schedule=Schedule(max_steps=args.steps, val_every=args.steps,
                                        val_edits=len(val)),
                      speed=Speed(lower_precision="bf16"))  # fmt: skip
    print(f"{args.records} records ({args.records // cfg.sampling.edits_per_step} steps an epoch), "
          f"{args.steps} steps, {len(val)} validation edits")  # fmt: skip
    results = {warm: run(model, tok, data, val, cfg, warm) for warm in (True, False)}
    for warm, r in results.items():
        v = r["val"]
        print(f"{'warmed' if warm else 'cached as met':<14} {r['wall']:6.1f} s in all, first step "
              f"after {r['first_step_at']:5.1f} s; median step by epoch "
              + " / ".join(f"{s:.3f}" for s in r["epochs"]) + " s; validation "
              f"{v['rewrite_acc']:.3f} / {v['rephrase_acc']:.3f} / {v['locality_acc']:.3f}")  # fmt: skip
    print(f"speed-up of the whole run: {results[False]['wall'] / results[True]['wall']:.2f}x")


if __name__ == "__main__":
    main()
