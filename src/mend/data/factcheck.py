"""A fact-checking task from CounterFact and zsRE: claims with a verdict, and edits that flip one.

A record with a true answer and a counterfactual one gives two claims, `prompt + " " + answer`:
with the true answer a claim is SUPPORTS, with the counterfactual one REFUTES. Paraphrased claims
put the same answer after each of the record's rephrased prompts.

An edit sets the verdict of one claim to the other label (records in turn: a true claim to
REFUTES, a counterfactual one to SUPPORTS); its paraphrases must follow, and two claims of other
records (one true, one counterfactual), with their verdicts, are its locality probes.
"""

from __future__ import annotations

from mend.data.formats import load_requests
from mend.errors import MendError
from mend.types import EditRequest, Probe

SUPPORTS, REFUTES = "SUPPORTS", "REFUTES"
LABELS = (REFUTES, SUPPORTS)  # class 0, class 1

# file -> the named data sets (sliced) whose records it is built from; disjoint record ranges
SPLITS: dict[str, tuple[str, ...]] = {
    "claims-train": ("counterfact-train[:4000]", "zsre-train[:500]"),  # fine-tuning
    "claims-test": ("counterfact-val[:1000]", "zsre-eval[:250]"),  # the classifier's accuracy
    "edits-train": ("counterfact-train[4000:]", "zsre-train[500:]"),  # the editor's training
    "edits-val": ("counterfact-val[1000:1200]", "zsre-eval[350:400]"),  # its checkpoint choice
    "edits-test": ("counterfact-val[1200:1600]", "zsre-eval[250:350]"),  # the reported edits
}


def claim(prompt: str, answer: str) -> str:
    return f"{prompt.rstrip()} {answer.strip()}"


def _with_truth(requests: list[EditRequest]) -> list[EditRequest]:
    return [r for r in requests if r.target_true and r.target_true.strip() != r.target.strip()]


def labelled_claims(requests: list[EditRequest]) -> list[EditRequest]:
    """Both claims of every record that has a true answer, as (claim, verdict) requests."""
    out = []
    for r in _with_truth(requests):
        out.append(EditRequest(claim(r.prompt, r.target_true), SUPPORTS))
        out.append(EditRequest(claim(r.prompt, r.target), REFUTES))
    return out


def verdict_edits(requests: list[EditRequest]) -> list[EditRequest]:
    """One edit per record with a true answer, flipping a claim's verdict (module docstring)."""
    pool = _with_truth(requests)
    if len(pool) < 3:
        raise MendError("a fact-checking split needs at least 3 records with a true answer")
    out = []
    for i, r in enumerate(pool):
        answer, verdict, flipped = (
            (r.target_true, SUPPORTS, REFUTES) if i % 2 == 0 else (r.target, REFUTES, SUPPORTS)
        )
        true_other, false_other = pool[(i + 1) % len(pool)], pool[(i + 2) % len(pool)]
        out.append(
            EditRequest(
                prompt=claim(r.prompt, answer),
                target=flipped,
                rephrases=tuple(claim(p, answer) for p in r.rephrases),
                locality=(
                    Probe(claim(true_other.prompt, true_other.target_true), SUPPORTS),
                    Probe(claim(false_other.prompt, false_other.target), REFUTES),
                ),
                target_true=verdict,
                subject=r.subject,
            )
        )
    return out


def build_split(name: str) -> list[EditRequest]:
    """The requests of one file of `SPLITS`, from the named data sets it lists."""
    if name not in SPLITS:
        raise MendError(f"unknown fact-checking split {name!r}; one of {', '.join(SPLITS)}")
    records = [r for source in SPLITS[name] for r in load_requests(source)]
    return labelled_claims(records) if name.startswith("claims") else verdict_edits(records)


def to_record(r: EditRequest) -> dict:
    """mend's JSONL layout of a request (`mend.data.formats`)."""
    out = {"prompt": r.prompt, "target": r.target}
    if r.rephrases:
        out["rephrases"] = list(r.rephrases)
    if r.locality:
        out["locality"] = [{"prompt": p.prompt, "answer": p.answer} for p in r.locality]
    if r.target_true:
        out["target_true"] = r.target_true
    if r.subject:
        out["subject"] = r.subject
    return out
