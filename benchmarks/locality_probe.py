"""Where single edits lose locality, and whether shielding nearby known facts wins it back
(an experiment, not a test).

    python benchmarks/locality_probe.py --editor runs/bench5s --limit 200

Part 1, the editor as it is (checked edits): of the locality probes whose answer changes, how
many now start with the edit's new target, the unedited model's top-two log-prob gap on the
probes that change and on those that do not, and how far the edit raises the new target's
first token on the probe.

Part 2, shielded edits: Delta W <- Delta W (I - beta K^T (K K^T + lam I)^-1 K), where the rows
of K are each edited weight's inputs at the answer positions of the m training facts nearest
the edit (prompt + true answer, from the first --bank records of --bank-data; nearness: cosine
of the first edited weight's input at the prompt's last token). With beta = 1 the edit leaves
those inputs' outputs (nearly) unchanged; the check sees the shielded change. The unedited
model's scores are computed once and shared.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from compare import fmt_row  # benchmarks/compare.py
from tqdm import tqdm

from mend.checkpoint import load_editor
from mend.data import load_checked
from mend.data.collate import context_length
from mend.edit import MendEditor
from mend.evaluate import evaluate
from mend.files import write_json
from mend.grads import capture
from mend.models import load_model
from mend.models.forward import scored_logits


def _inputs(me: MendEditor, pairs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each edited weight's input at the scored positions of (prompt, answer) pairs, and the
    pair each position belongs to."""
    batch = me.batch(pairs)
    captured, _ = capture(me.model, me.params, batch, lambda lg: lg.logsumexp(-1).sum())
    return {n: u[batch.pos_mask] for n, (u, _) in captured.items()}, batch.pos_row


class KeyBank:
    """Edited-layer inputs at the answer positions of known facts (prompt, true answer)."""

    def __init__(self, me: MendEditor, facts, chunk: int = 64, progress: bool = True):
        self.prompts = [f.prompt for f in facts]
        keys, owner = {}, []
        with torch.no_grad():
            for i in tqdm(range(0, len(facts), chunk), desc="key bank", disable=not progress):
                part = facts[i : i + chunk]
                k, rows = _inputs(me, [(f.prompt, f.target_true) for f in part])
                for n, v in k.items():
                    keys.setdefault(n, []).append(v)
                owner.append(rows + i)
        self.keys = {n: torch.cat(v) for n, v in keys.items()}
        self.owner = torch.cat(owner)  # (P,) fact of each key
        first = torch.ones_like(self.owner, dtype=torch.bool)
        first[1:] = self.owner[1:] != self.owner[:-1]  # each fact's first answer position
        self.ref = me.params[0].name
        ref = self.keys[self.ref][first]
        self.ref_unit = ref / ref.norm(dim=-1, keepdim=True)
        self.ref_owner = self.owner[first]

    def nearest(self, query: torch.Tensor, m: int, skip_prompt: str) -> dict[str, torch.Tensor]:
        """{weight: K (rows, in)}: the keys of the m facts nearest `query` (a reference-layer
        input), leaving out a fact with the edit's own prompt."""
        order = (self.ref_unit @ (query / query.norm())).argsort(descending=True)
        facts = [int(self.ref_owner[j]) for j in order[: m + 1]]
        facts = [f for f in facts if self.prompts[f] != skip_prompt][:m]
        rows = torch.isin(self.owner, torch.tensor(facts))
        return {n: k[rows] for n, k in self.keys.items()}


class Shielded(MendEditor):
    """MendEditor whose single edits are projected off the keys of their nearest known facts."""

    def __init__(self, *args, bank: KeyBank, m: int, beta: float, lam: float = 1e-2, **kw):
        super().__init__(*args, **kw)
        self.bank, self.m, self.beta, self.lam = bank, m, beta, lam
        self._shield: dict[str, torch.Tensor] | None = None

    def edit(self, requests):
        r = requests[0] if isinstance(requests, list) else requests
        with torch.no_grad():
            keys, _ = _inputs(self, [(r.prompt, r.target)])
        self._shield = self.bank.nearest(keys[self.bank.ref][0], self.m, r.prompt)
        try:
            return super().edit(requests)
        finally:
            self._shield = None

    def _shared_once(self, factors, keep):
        factors = super()._shared_once(factors, keep)
        if self._shield is None or not self.beta:
            return factors
        out = {}
        for name, (u, d) in factors.items():
            k = self._shield[name]  # (m', in)
            gram = k @ k.T
            gram = gram + self.lam * gram.diagonal().mean() * torch.eye(len(k), device=k.device)
            coef = torch.linalg.solve(gram, k @ u.reshape(-1, u.shape[-1]).T)  # (m', G T)
            out[name] = (u - self.beta * (coef.T @ k).reshape(u.shape), d)
        return out


@torch.no_grad()
def where_lost(me: MendEditor, data) -> dict:
    """Part 1: what happens to each edit's first locality probe."""
    lost = to_target = 0
    gap_lost, gap_kept, rise = [], [], []
    for r in tqdm(data, desc="where locality is lost"):
        probe = r.locality[0]
        pb, tb = me.batch([(probe.prompt, probe.answer)]), me.batch([(probe.prompt, r.target)])
        new_first = int(tb.labels[tb.pos_mask][0])
        before = scored_logits(me.model, pb)
        logp = before[0].log_softmax(-1)
        top2 = logp.topk(2).values
        result = me.edit([r])
        try:
            after = scored_logits(me.model, pb)
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", required=True)
    ap.add_argument("--data", default="counterfact-val")
    ap.add_argument("--bank-data", default="counterfact-train")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--bank", type=int, default=3000, help="known facts in the key bank")
    ap.add_argument("--shield", nargs="+", default=["16:0.5", "16:1"], metavar="M:BETA")
    ap.add_argument("--out", default=None, help="JSON report (default: EDITOR/locality_probe.json)")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    editor = load_editor(args.editor, model)
    data = load_checked(args.data, tok, context_length(model), args.limit)
    plain = MendEditor(model, tok, editor)
    report = {"where_lost": where_lost(plain, data)}
    print(report["where_lost"])
    bank = KeyBank(plain, load_checked(args.bank_data, tok, context_length(model), args.bank))
    own = {p.prompt for r in data for p in r.locality} & set(bank.prompts)
    report["probes_in_bank"] = len(own)
    shared = {}
    for spec in ["0:0"] + args.shield:
        m, beta = spec.split(":")
        me = Shielded(model, tok, editor, bank=bank, m=int(m), beta=float(beta))
        r = evaluate(model, tok, me, data, unedited=shared, desc=spec)
        report[f"shield {spec}"] = r
        print(f"shield {spec:<8} {fmt_row(r)} | {r['edit_seconds_median'] * 1e3:.0f} ms")
    write_json(args.out or f"{args.editor}/locality_probe.json", report)


if __name__ == "__main__":
    main()
