"""Where do sequential MEND edits break? A per-edit trace of edits applied one after another.

    python experiments/sequential_probe.py --editor runs/bench5 [--n 30] [--boost] [--boost 1.5 2]
        [--unanchored]

For each --boost setting (no scales: unchecked), applies the first n CounterFact-val edits to the
same model in turn and prints, after every edit: whether that edit took (rewrite), the size of
its own change and of the accumulated change (largest ||dW|| / ||W|| over the edited matrices),
and every `--every` edits the rewrite / rephrase / locality of all edits so far (against the
unedited model's predictions) and WikiText perplexity (2 windows of 512 tokens).
Edits are anchored (MendEditor's default: gradients from the unedited weights); --unanchored
traces the paper's sequential editing, where each edit sees the model as the others left it.
"""

from __future__ import annotations

import argparse

import torch

from mend.checkpoint import load_editor
from mend.data import load_checked
from mend.data.sources import resolve_data
from mend.data.text import read_text
from mend.edit import DEFAULT_BOOST, MendEditor
from mend.evaluate import perplexity, score, summarize
from mend.models import context_length, load_model


def relative_change(params, before: dict) -> float:
    with torch.no_grad():
        return max(((p.weight - before[p.name]).norm() / before[p.name].norm()).item()
                   for p in params)  # fmt: skip


def trace(model, tok, net, edits, text, boost, every, anchored=True) -> None:
    editor = MendEditor(model, tok, net, boost=boost, anchored=anchored)
    original = {p.name: p.weight.detach().clone() for p in editor.params}
    # the unedited predictions of each scored prefix, for locality
    base = {n: score(model, tok, edits[:n]) for n in range(every, len(edits) + 1, every)}
    results = []
    print(
        f"\n== {'anchored' if anchored else 'unanchored'}, boost {boost or '(unchecked)'}: perplexity {perplexity(model, tok, text, 2):.2f}"
    )
    try:
        for i, req in enumerate(edits):
            before = {p.name: p.weight.detach().clone() for p in editor.params}
            results.append(editor.edit([req]))
            own = summarize(score(model, tok, [req])["metrics"])["rewrite_acc"]
            line = (f"edit {i + 1:>3}: took {own:.0f}  own dW {relative_change(editor.params, before):.3f}"
                    f"  total dW {relative_change(editor.params, original):.3f}")  # fmt: skip
            if i + 1 in base:
                now = summarize(score(model, tok, edits[: i + 1], base[i + 1])["metrics"])
                line += (f"  | all so far: rw {now['rewrite_acc']:.2f} rp {now['rephrase_acc']:.2f}"
                         f" loc {now['locality_acc']:.2f}  ppl {perplexity(model, tok, text, 2):.2f}")  # fmt: skip
            print(line, flush=True)
    finally:
        for r in reversed(results):
            r.revert()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", required=True)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--boost", type=float, nargs="*", action="append",
                    help="scales of the edit check; repeat for several runs; empty: unchecked")  # fmt: skip
    ap.add_argument("--unanchored", action="store_true",
                    help="each edit's gradient from the edited model (the paper's setting)")  # fmt: skip
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    net = load_editor(args.editor, model)
    text = read_text(resolve_data("wikitext-valid"))
    edits = load_checked("counterfact-val", tok, context_length(model), limit=args.n)
    for boost in args.boost or [list(DEFAULT_BOOST), []]:
        trace(model, tok, net, edits, text, tuple(boost), args.every, not args.unanchored)


if __name__ == "__main__":
    main()
