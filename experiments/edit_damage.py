"""How much does one edit disturb running text? WikiText perplexity after single edits.

    python experiments/edit_damage.py --editor runs/bench3 [--editor OTHER ...] [--n 8]

For each editor, applies the first n CounterFact-val edits one at a time (reverting each) and
prints, per edit, the largest relative weight change ||dW|| / ||W|| over the edited matrices and
the perplexity on the first 2 windows of 512 tokens of wiki.valid.raw; then the medians.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mend.checkpoint import load_editor
from mend.data import load_checked
from mend.data.sources import resolve_data
from mend.data.text import read_text
from mend.edit import MendEditor
from mend.evaluate import perplexity
from mend.models import context_length, load_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", action="append", required=True)
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    text = read_text(resolve_data("wikitext-valid"))
    edits = load_checked("counterfact-val", tok, context_length(model), limit=args.n)
    print(f"WikiText perplexity, unedited: {perplexity(model, tok, text, n_windows=2):.2f}")
    for folder in args.editor:
        editor = MendEditor(model, tok, load_editor(folder, model))
        original = {p.name: p.weight.detach().clone() for p in editor.params}
        rel, ppl = [], []
        for r in edits:
            result = editor.edit([r])
            with torch.no_grad():
                rel.append(max(((p.weight - original[p.name]).norm() / original[p.name].norm()).item()
                               for p in editor.params))  # fmt: skip
                ppl.append(perplexity(model, tok, text, n_windows=2))
            result.revert()
            print(f"{folder}: ||dW||/||W|| {rel[-1]:.3f}  perplexity {ppl[-1]:.2f}  "
                  f"{r.prompt!r} -> {r.target!r}")  # fmt: skip
        print(f"{folder}: median ||dW||/||W|| {statistics.median(rel):.3f}, "
              f"median perplexity {statistics.median(ppl):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
