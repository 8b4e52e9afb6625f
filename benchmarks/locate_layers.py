"""Which blocks ROME and MEMIT (and so AlphaEdit) should edit on a model: a small sweep on
CounterFact *training* edits, so the choice sees none of the edits a benchmark scores.

    python benchmarks/locate_layers.py --edits 10 --rome 3 6 9 12 15 \
        --memit 1-5 4-8 7-11 10-14 > docs/results/peers/layers.txt
    python benchmarks/locate_layers.py --edits 10 --memit 4-8 --mom2-weights 15000 1500 150

ROME edits the requests one at a time at each block given; MEMIT edits them all in one change
over each window. Each line gives the teacher-forced rewrite / rephrase / locality, CounterFact's
ES / PS / NS and the sum the choice maximises (rewrite + rephrase + locality, as for `grad`'s
step in compare.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from mend.baselines import make_baseline
from mend.data.formats import load_requests
from mend.evaluate import evaluate
from mend.models.load import load_model


def window(text: str) -> tuple[int, ...]:
    first, _, last = text.partition("-")
    return tuple(range(int(first), int(last or first) + 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="counterfact-train")
    ap.add_argument("--edits", type=int, default=10, help="the last N training records")
    ap.add_argument("--rome", type=int, nargs="*", default=[], metavar="L")
    ap.add_argument("--memit", nargs="*", default=[], metavar="A-B")
    ap.add_argument(
        "--mom2-weights",
        type=float,
        nargs="+",
        default=[15000.0],
        help="MEMIT's weight of the text key covariance, each tried on every window",
    )
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.requires_grad_(False)
    edits = load_requests(args.data)[-args.edits :]
    runs = [("rome", (layer,), 1, None) for layer in args.rome]
    runs += [("memit", window(w), len(edits), m) for w in args.memit for m in args.mom2_weights]
    print(f"{args.model}, the last {len(edits)} records of {args.data}")
    print("method     blocks   mom2    rewrite rephrase locality    ES    PS    NS    sum  seconds")
    for method, layers, k, mom2 in runs:
        start = time.perf_counter()
        editor = make_baseline(method, model, tok, layers=layers, mom2_weight=mom2)
        r = evaluate(model, tok, editor, edits, batch_size=k, progress=False)
        total = r["rewrite_acc"] + r["rephrase_acc"] + r["locality_acc"]
        blocks = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        weight = f"{mom2:g}" if mom2 else "-"
        print(f"{method:10} {blocks:8} {weight:6} {r['rewrite_acc']:8.2f} {r['rephrase_acc']:8.2f} "
              f"{r['locality_acc']:8.2f} {r['efficacy_score']:5.2f} {r['paraphrase_score']:5.2f} "
              f"{r['neighborhood_score']:5.2f} {total:6.2f} {time.perf_counter() - start:8.0f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
