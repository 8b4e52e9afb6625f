"""Row-cache warm-up and nearest-record keys: rows batched by character count against by token count.

    python experiments/warm_order.py [--records 1000] > experiments/runs/probes/warm_order.txt

`mend train` runs two no-grad passes over the whole training set before its first step: the prompt
keys of `--hard-locality nearest` (`training.prepare.nearest_records`) and the row-cache warm-up
(`training.prepare.warm_rows`), both in batches of 64 rows, shortest first. Rows used to be ordered
by characters; that is a poor proxy of their token count, and a batch pads every row to its longest.
This script times both passes, bf16 lower blocks as `mend train --lower-precision bf16` runs them,
once with the rows ordered by characters (the old key, restored here by patching
`training.prepare.by_tokens`) and once by tokens (the code as it is), alternating the two
`--repeats` times in one process; it prints padded and real token counts, median seconds and their
ratio, and checks that both orders cache the same rows and find the same nearest records.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mend.config import EditorConfig
from mend.data import load_checked
from mend.data.collate import encode
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.models import context_length, find_editable, load_model
from mend.models.upper import RowCache, UpperStack
from mend.training import prepare
from mend.training.sampling import record_rows

BY_TOKENS = prepare.by_tokens


def by_chars(editor, pairs):
    """The old order: characters of prompt and target as the proxy of a row's cost."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1] or ""))
    return order, [len(encode(editor.tokenizer, *pairs[i], editor.max_len)[0]) for i in order]


def padded(editor, pairs, order, batch_rows=64) -> tuple[int, int]:
    """(real tokens, tokens after padding) of the pairs in this order, batch_rows a batch."""
    lengths = [len(encode(editor.tokenizer, *pairs[i], editor.max_len)[0]) for i in order]
    chunks = [lengths[i : i + batch_rows] for i in range(0, len(lengths), batch_rows)]
    return sum(lengths), sum(max(c) * len(c) for c in chunks)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    model.requires_grad_(False)
    data = load_checked("counterfact-train", tok, context_length(model), args.records)
    params = find_editable(model)
    editor = MendEditor(model, tok, EditorNet({p.name: p.in_out for p in params}, EditorConfig()))
    start = UpperStack.first_edited_block(model, [p.name for p in params])

    rows = list(dict.fromkeys(p for r in data for p in record_rows(r)))
    prompts = [(r.prompt, None) for r in data]
    print(f"{len(data)} CounterFact training records: {len(rows)} rows to warm, "
          f"{len(prompts)} prompts to key; batches of 64 rows, bf16 lower blocks")  # fmt: skip
    for name, key in (("characters", by_chars), ("tokens", BY_TOKENS)):
        for what, pairs in (("warm-up rows", rows), ("prompts", prompts)):
            real, pad = padded(editor, pairs, key(editor, pairs)[0])
            print(f"  by {name:<10} {what:<12}: {pad:7d} tokens run for {real:7d} real "
                  f"({1 - real / pad:.0%} padding)")  # fmt: skip

    times = {k: {"warm": [], "keys": []} for k in ("characters", "tokens")}
    results = {}
    for _ in range(args.repeats):
        for name, key in (("characters", by_chars), ("tokens", BY_TOKENS)):
            prepare.by_tokens = key
            try:
                stack = UpperStack(model, start, RowCache(4 << 30), lower_dtype=torch.bfloat16)
                t = time.perf_counter()
                prepare.warm_rows(editor, stack, data, progress=False)
                times[name]["warm"].append(time.perf_counter() - t)
                t = time.perf_counter()
                near = prepare.nearest_records(
                    editor, data, 16, lower=torch.bfloat16, progress=False
                )
                times[name]["keys"].append(time.perf_counter() - t)
            finally:
                prepare.by_tokens = BY_TOKENS
            results[name] = (set(stack.cache.rows), near)
    for what, label in (("warm", "row-cache warm-up"), ("keys", "prompt keys + nearest")):
        old, new = (statistics.median(times[k][what]) for k in ("characters", "tokens"))
        print(f"{label:<22}: by characters {old:6.1f} s, by tokens {new:6.1f} s, "
              f"{old / new:.2f}x (median of {args.repeats})")  # fmt: skip
    (rows_c, near_c), (rows_t, near_t) = results["characters"], results["tokens"]
    same = sum(a[:4] == b[:4] for a, b in zip(near_c, near_t, strict=True)) / len(near_c)
    print(
        f"same rows cached: {rows_c == rows_t}; records whose 4 nearest agree: {same:.1%} "
        "(bf16 keys depend a little on the batch a prompt ran in)"
    )


if __name__ == "__main__":
    main()
