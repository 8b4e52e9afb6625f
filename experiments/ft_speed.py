"""FT and FT+KL per-edit time, rerunning only the edited blocks vs full forward passes.

    python experiments/ft_speed.py > experiments/runs/probes/ft_fast_path.txt

The two paths are timed interleaved, edit by edit, in one process (first `--limit`
CounterFact validation records); each edit is reverted before the next.
"""

from __future__ import annotations

import argparse
import statistics

from mend.baselines import FTEditor, kl_prompts
from mend.data import load_checked
from mend.models import context_length, load_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=20)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    data = load_checked("counterfact-val", tok, context_length(model), args.limit)
    loc = kl_prompts()
    for kl in (0.0, 1.0):
        eds = {
            f: FTEditor(model, tok, kl_weight=kl, loc_prompts=loc, fast=f) for f in (True, False)
        }
        times: dict[bool, list[float]] = {True: [], False: []}
        for request in data:
            for fast, ed in eds.items():
                result = ed.edit([request])
                times[fast].append(result.seconds)
                result.revert()
        fast, full = statistics.median(times[True]), statistics.median(times[False])
        print(f"{'ft-kl' if kl else 'ft':<6} median s/edit: edited blocks only {fast:.3f}, "
              f"full model {full:.3f}, speed-up {full / fast:.2f}x ({len(data)} edits)")  # fmt: skip


if __name__ == "__main__":
    main()
