"""How long one edit of n requests takes against a plain forward pass over the same n
prompts, side by side in one process: the forward pass is what any method that reads the
model's gradients on n facts must at least spend.

    python benchmarks/mass_edit_time.py --editor runs/mass --sizes 100 1000 --threads 1

Prints, per size: the edit's seconds, the no-grad forward pass's seconds (64 rows per pass,
as an edit captures them), and their ratio; each timed twice, interleaved, the faster kept;
then the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from mend import MendEditor, load_model, load_requests
from mend.data.collate import make_batch
from mend.models import context_length


def forward_seconds(model, tok, requests) -> float:
    batch = make_batch(tok, [(r.prompt, r.target) for r in requests], max_len=context_length(model))
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(batch), 64):
            part = batch.select(list(range(first, min(first + 64, len(batch)))))
            model.base_model(input_ids=part.input_ids, attention_mask=part.attention_mask)
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", required=True)
    ap.add_argument("--data", default="counterfact-val")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    editor = MendEditor.from_pretrained(args.editor, model, tok)
    requests = load_requests(args.data, limit=max(args.sizes))
    print(f"{args.model}, editor {args.editor}, {torch.get_num_threads()} threads")
    print("edits  edit s  forward s  ratio")
    for n in args.sizes:
        edit, forward = [], []
        for _ in range(2):
            forward.append(forward_seconds(model, tok, requests[:n]))
            result = editor.edit(requests[:n])
            edit.append(result.seconds)
            result.revert()
        e, f = min(edit), min(forward)
        print(f"{n:5d} {e:7.1f} {f:10.1f} {e / f:6.1f}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # (KB on Linux)
    print(f"process peak resident memory: {peak:.1f} GB")


if __name__ == "__main__":
    main()
