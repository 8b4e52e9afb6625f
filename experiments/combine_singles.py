"""Many edits as one least-squares change that reproduces each request's own single edit.

Each request is first edited alone with a single-edit (summed) editor, checked as usual, and
reverted: its change Delta W_i. At every token t of its prompt and target (key k_t, the edited
matrix's input there on the unedited model) that change moves the output by v_t = Delta W_i k_t.
One ridge least-squares change per matrix then gives every key its v_t, so the requests do not
act on each other's keys (MALMEN's solve, with the single edit's full change as the value
instead of one token's own rank-one term). `--keep-before-subject` asks the tokens before the
subject (template words other prompts share) to keep their outputs (v_t = 0) instead.

    python experiments/combine_singles.py --editor runs/demo --limit 100 --ridge 0.01
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mend import load_model, load_requests
from mend.aggregate import solved_keys
from mend.baselines.locate import subject_position
from mend.edit import MendEditor
from mend.evaluate import evaluate, format_report, ppl_text
from mend.key_stats import text_key_moments
from mend.result import EditResult


class CombinedSingles:
    def __init__(self, editor: MendEditor, ridge: float, keep_before: bool, preserve: float,
                 correct_sum: bool = False, span: str = "keys", scored_only: bool = False):  # fmt: skip
        self.editor, self.ridge, self.keep_before = editor, ridge, keep_before
        self.span, self.scored_only = span, scored_only
        self.correct_sum = correct_sum
        self.preserve = preserve
        self.moments = (
            text_key_moments(editor.model, editor.tokenizer, editor.params) if preserve else None
        )

    def _first_edited(self, r) -> int:
        if not self.keep_before or not r.subject:
            return 0
        at = r.prompt.find(r.subject)
        if at <= 0:
            return 0
        return subject_position(self.editor.tokenizer, r.prompt, r.subject) - (
            len(self.editor.tokenizer(r.subject)["input_ids"]) - 1
        )

    @torch.no_grad()
    def edit(self, requests):
        start = time.perf_counter()
        ed = self.editor
        keys = {p.name: [] for p in ed.params}
        values = {p.name: [] for p in ed.params}
        factors = {p.name: [] for p in ed.params}
        for r in requests:
            batch = ed.batch([(r.prompt, r.target)])
            captured, _ = ed._capture(batch)
            single = ed.edit([r])
            single.revert()
            first = max(0, self._first_edited(r))
            for p in ed.params:
                u, d = single.updates[p.name]  # (T, in), (T, out): Delta W^T = u^T d
                k = captured[p.name][0][0]  # (S, in)
                mask = batch.attention_mask[0].bool().clone()
                mask[int(batch.pos_mask[0].nonzero()[-1]) + 1 :] = False  # last target token
                if self.scored_only:  # the positions that predict the target's tokens
                    mask = batch.pos_mask[0].bool()
                k = k[mask]
                v = (k @ u.T) @ d
                v[:first] = 0
                factors[p.name].append((u, d))
                keys[p.name].append(k)
                values[p.name].append(v)
        updates = {}
        for p in ed.params:
            k = torch.cat(keys[p.name]).double()
            v = torch.cat(values[p.name]).float()
            held = None
            if self.preserve:
                held = self.preserve * len(k) * self.moments[p.name].double()
            if self.span == "editor":
                updates[p.name] = self._in_editor_span(factors[p.name], k, v, held)
                continue
            solved = solved_keys(k, len(k), self.ridge, held).float()
            if self.correct_sum:  # the summed change, corrected at the requests' own keys
                su = torch.cat([u for u, _ in factors[p.name]])
                sd = torch.cat([d for _, d in factors[p.name]])
                v = v - (k.float() @ su.T) @ sd
                updates[p.name] = (torch.cat([su, solved]), torch.cat([sd, v]))
            else:
                updates[p.name] = (solved, v)
        return EditResult(ed.model, ed.params, updates, time.perf_counter() - start)

    def _in_editor_span(self, factors, k, v, held):
        """The change restricted to the input directions the single edits chose:
        Delta W^T = U^T M, U (R, in) every single edit's u rows; M (R, out) solves
        min ||K U^T M - V||^2 + M^T U C U^T M + lambda ||M||^2."""
        u = torch.cat([f[0] for f in factors]).double()
        a = k @ u.T  # (N, R)
        gram = a.T @ a
        if held is not None:
            gram = gram + u @ held @ u.T
        lam = self.ridge * gram.diagonal().mean()
        eye = torch.eye(len(gram), dtype=gram.dtype)
        m = torch.linalg.solve(gram + lam * eye, a.T @ v.double())
        return u.float(), m.float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--editor", required=True)
    ap.add_argument("--data", default="counterfact-val")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--ridge", type=float, default=0.01)
    ap.add_argument("--preserve", type=float, default=0.0)
    ap.add_argument("--keep-before-subject", action="store_true")
    ap.add_argument("--correct-sum", action="store_true")
    ap.add_argument(
        "--scored-only",
        action="store_true",
        help="solve at the positions that predict the target only, not the whole prompt",
    )
    ap.add_argument(
        "--span",
        choices=["keys", "editor"],
        default="keys",
        help="editor: the change along the single edits' own input directions",
    )
    ap.add_argument("--summed", action="store_true", help="the editor's own batched edit instead")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    editor = MendEditor.from_pretrained(args.editor, model, tok)
    method = (
        editor
        if args.summed
        else CombinedSingles(
            editor,
            args.ridge,
            args.keep_before_subject,
            args.preserve,
            args.correct_sum,
            args.span,
            args.scored_only,
        )
    )
    reqs = load_requests(args.data, limit=args.limit)
    report = evaluate(model, tok, method, reqs, batch_size=args.batch_size,
                      ppl_text=ppl_text(), ppl_windows=4)  # fmt: skip
    report["settings"] = vars(args)
    print(format_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
