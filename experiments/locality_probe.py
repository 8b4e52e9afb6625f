"""Where single edits lose locality, and whether shielding nearby known facts wins it back
(an experiment, not a test).

    python experiments/locality_probe.py --editor runs/bench5s --limit 200

Part 1, the editor as it is (checked edits): of the locality probes whose answer changes, how
many now start with the edit's new target, the unedited model's top-two log-prob gap on the
probes that change and on those that do not, and how far the edit raises the new target's
first token on the probe.

Part 2, shielded edits (`mend.shield`, `mend eval --shield BETA`): Delta W <- Delta W (I - beta
K^T (K K^T + lam I)^-1 K), where the rows of K are each edited weight's inputs at the answer
positions of the m known facts nearest the edit (prompt + true answer, the first --bank records
of --bank-data; nearness: cosine of the first edited weight's input at the prompt's last
token). With beta = 1 the edit leaves those inputs' outputs (nearly) unchanged; the check sees
the shielded change. Known facts whose prompt is one of the evaluated locality probes are left
out of the bank (a shield on the probe itself would flatter locality). The unedited model's
scores are computed once and shared.

Part 3, the nearest known facts (`--neighbours M`, 0 skips): for each edit, the M bank facts
nearest its prompt (the shield's nearness), how many change their first answer token under the
(unshielded, checked) edit and how many now answer the edit's new target, split by whether the
edit keeps its own CounterFact probe: whether a check on those neighbours could tell the edits
that leak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compare import fmt_row  # benchmarks/compare.py

from mend.checkpoint import load_editor
from mend.data import load_checked
from mend.edit import MendEditor
from mend.evaluate import evaluate
from mend.files import write_json
from mend.grads import prompt_keys
from mend.models import context_length, load_model
from mend.models.forward import scored_logits
from mend.shield import KeyBank, Shield, known_facts


@torch.no_grad()
def where_lost(editor: MendEditor, data) -> dict:
    """Part 1: what happens to each edit's first locality probe."""
    lost = to_target = 0
    gap_lost, gap_kept, rise = [], [], []
    for r in tqdm(data, desc="where locality is lost"):
        probe = r.locality[0]
        pb, tb = (
            editor.batch([(probe.prompt, probe.answer)]),
            editor.batch([(probe.prompt, r.target)]),
        )
        new_first = int(tb.labels[tb.pos_mask][0])
        before = scored_logits(editor.model, pb)
        logp = before[0].log_softmax(-1)
        top2 = logp.topk(2).values
        result = editor.edit([r])
        try:
            after = scored_logits(editor.model, pb)
        finally:
            result.revert()
        rise.append(float(after[0].log_softmax(-1)[new_first] - logp[new_first]))
        if bool((after.argmax(-1) == before.argmax(-1)).all()):
            gap_kept.append(float(top2[0] - top2[1]))
        else:
            lost += 1
            gap_lost.append(float(top2[0] - top2[1]))
            to_target += int(after[0].argmax()) == new_first
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    return {
        "n": len(data),
        "locality_acc": 1 - lost / len(data),
        "changed": lost,
        "changed_to_new_target": to_target,
        "gap_median_changed": med(gap_lost),
        "gap_median_kept": med(gap_kept),
        "new_target_logprob_rise_median": med(rise),
    }


@torch.no_grad()
def first_answers(editor: MendEditor, pairs) -> torch.Tensor:
    """The argmax at each (prompt, answer) pair's first answer token."""
    b = editor.batch(pairs)
    first = torch.ones_like(b.pos_row, dtype=torch.bool)
    first[1:] = b.pos_row[1:] != b.pos_row[:-1]
    return scored_logits(editor.model, b).argmax(-1)[first]


def neighbours(editor: MendEditor, bank: KeyBank, facts, data, m: int) -> dict:
    """Part 3: the m bank facts nearest each edit, under the edit."""
    out = {True: [], False: []}  # own probe kept -> per edit (changed, to new target)
    ref = next(p for p in editor.params if p.name == bank.ref)
    for r in tqdm(data, desc="nearest facts"):
        b = editor.batch([(r.prompt, r.target)])
        idx = bank.nearest_facts(prompt_keys(editor.model, ref, [b]), m)
        probe = r.locality[0]
        pairs = [facts[i] for i in idx.tolist()] + [(probe.prompt, probe.answer)]  # probe last
        new_first = int(b.labels[b.pos_mask][0])
        before = first_answers(editor, pairs)
        result = editor.edit([r])
        try:
            after = first_answers(editor, pairs)
        finally:
            result.revert()
        kept = bool(after[-1] == before[-1])
        before, after = before[:-1], after[:-1]
        out[kept].append(
            (
                int((after != before).sum()),
                int(((after == new_first) & (before != new_first)).sum()),
            )
        )
    summary = {}
    for kept, rows in out.items():
        n = max(len(rows), 1)
        summary["probe kept" if kept else "probe lost"] = {
            "edits": len(rows),
            "neighbours_changed_mean": sum(c for c, _ in rows) / n,
            "neighbours_to_new_target_mean": sum(t for _, t in rows) / n,
            "edits_with_a_neighbour_to_new_target": sum(t > 0 for _, t in rows),
        }
    return {"m": m, **summary}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", required=True)
    ap.add_argument("--data", default="counterfact-val")
    ap.add_argument("--bank-data", default="counterfact-train")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--bank", type=int, default=3000, help="known facts in the key bank")
    ap.add_argument("--shield", nargs="*", default=["16:0.5", "16:1"], metavar="M:BETA")
    ap.add_argument("--skip-where", action="store_true", help="skip part 1")
    ap.add_argument("--skip-off", action="store_true", help="skip the unshielded edits")
    ap.add_argument("--neighbours", type=int, default=8, help="part 3: nearest facts (0: skip)")
    ap.add_argument("--out", default=None, help="JSON report (default: EDITOR/locality_probe.json)")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    net = load_editor(args.editor, model)
    data = load_checked(args.data, tok, context_length(model), args.limit)
    plain = MendEditor(model, tok, net)
    report = {}
    if not args.skip_where:
        report["where_lost"] = where_lost(plain, data)
        print(report["where_lost"])
    known = load_checked(args.bank_data, tok, context_length(model), args.bank)
    facts, left = known_facts(known, leave_out=data)
    report["probes_left_out_of_bank"] = left  # the bank must not hold them
    print(f"bank: {len(facts)} facts ({left} left out: locality probes here)")
    bank = KeyBank.build(model, tok, plain.params, facts, plain.max_len, progress=True)
    if args.neighbours:
        report["neighbours"] = neighbours(plain, bank, facts, data, args.neighbours)
        print(report["neighbours"])
    shared = {}
    for spec in ([] if args.skip_off else ["off"]) + args.shield:
        shield = None
        if spec != "off":
            m, beta = spec.split(":")
            shield = Shield(bank, m=int(m), beta=float(beta))
        editor = MendEditor(model, tok, net, shield=shield)
        r = evaluate(model, tok, editor, data, unedited=shared, desc=spec)
        report[f"shield {spec}"] = r
        print(f"shield {spec:<8} {fmt_row(r)} | {r['edit_seconds_median'] * 1e3:.0f} ms")
    write_json(args.out or f"{args.editor}/locality_probe.json", report)


if __name__ == "__main__":
    main()
