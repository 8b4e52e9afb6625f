"""Variants of the edit check, scored on the same editor and edits (an experiment, not a test).

    python experiments/check_variants.py --editor runs/bench3 --limit 200 [--skip 500]

Each variant is a JSON object: `boost` (the scales tried after the first, default [1.5, 2]),
`start` (the scale every request starts at and falls back to, default 1; `mend eval --start`)
and `margin` (the log-prob lead the target must have over every other token at each target
position, default 0: the argmax).
The unedited model's scores are computed once and shared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compare import fmt_row  # benchmarks/compare.py

from mend.checkpoint import load_editor
from mend.data import load_checked
from mend.data.collate import IGNORE
from mend.edit import MendEditor
from mend.evaluate import evaluate
from mend.files import write_json
from mend.losses import top_gap
from mend.metrics import rows_all
from mend.models import context_length, load_model

DEFAULT_VARIANTS = [
    "{}",
    '{"start": 0.75, "boost": [1, 1.5, 2]}',
    '{"start": 0.5, "boost": [0.75, 1, 1.5, 2]}',
    '{"margin": 1.0}',
]


class CheckVariant(MendEditor):
    """MendEditor whose check may demand a log-prob margin (`start` is MendEditor's own)."""

    def __init__(self, *args, margin: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin = margin

    def reaches_target(self, factors, batch, prepared=None) -> torch.Tensor:
        if not self.margin or prepared is None:
            return super().reaches_target(factors, batch, prepared)
        labels = batch.labels[batch.pos_mask]
        with self.applied(factors):
            logp = self._stack.logits(prepared).log_softmax(-1)
        ok = (top_gap(logp, labels.clamp_min(0)) >= self.margin) | (labels == IGNORE)
        return rows_all(ok, batch.pos_row, len(batch))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", required=True)
    ap.add_argument("--data", default="counterfact-val")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument(
        "--skip",
        type=int,
        default=0,
        metavar="N",
        help="leave out the first N records (tune on records a benchmark does not score)",
    )
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="JSON")
    ap.add_argument("--out", default=None, help="JSON report (default: EDITOR/check_variants.json)")
    args = ap.parse_args(argv)
    if args.skip < 0:
        ap.error("--skip must be >= 0")
    model, tok = load_model(args.model)
    net = load_editor(args.editor, model)
    data = load_checked(args.data, tok, context_length(model), args.skip + args.limit)[args.skip :]
    shared, out = {}, {}
    for text in args.variants:
        kw = json.loads(text)
        boost = tuple(kw.pop("boost", (1.5, 2.0)))
        method = CheckVariant(model, tok, net, boost=boost, **kw)
        r = evaluate(model, tok, method, data, unedited=shared, desc=text)
        out[text] = r
        print(f"{text:<45} {fmt_row(r)} | {r['edit_seconds_median'] * 1e3:.0f} ms")
    write_json(args.out or f"{args.editor}/check_variants.json", out)


if __name__ == "__main__":
    main()
