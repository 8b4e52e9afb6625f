"""Batched MEND edits with and without the edit check (an experiment, not a test).

    python experiments/batched_check.py --editor runs/bench3 > experiments/runs/core/batched_check.txt

The first 100 CounterFact validation records, k at a time, unchecked (`boost=()`), checked with
the default scales and checked up to scale 4 (`check_batches=True`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compare import fmt_row  # benchmarks/compare.py

from mend.checkpoint import load_editor
from mend.data import load_checked
from mend.edit import DEFAULT_BOOST, MendEditor
from mend.evaluate import evaluate
from mend.models import context_length, load_model

SETTINGS = {"unchecked": (), "checked": DEFAULT_BOOST, "checked-to-4": (1.5, 2.0, 3.0, 4.0)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", required=True)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 25, 100])
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    net = load_editor(args.editor, model)
    data = load_checked("counterfact-val", tok, context_length(model), args.limit)
    shared = {}
    for k in args.ks:
        for name, boost in SETTINGS.items():
            method = MendEditor(model, tok, net, boost=boost, check_batches=True)
            r = evaluate(
                model, tok, method, data, batch_size=k, unedited=shared, desc=f"k={k} {name}"
            )
            print(f"k={k:<3} {name:<13} {fmt_row(r)} | {r['edit_seconds_median']:.2f} s/batch")


if __name__ == "__main__":
    main()
