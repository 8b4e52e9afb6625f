"""What a training step draws besides its edits: paraphrase rows and locality rows.

Half of an edit's extra locality inputs are "hard": other records an edit of this one most
easily spills onto (the same relation, the same true answer, or the nearest prompts by their
inputs at the first edited weight; `prepare.nearest_records`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mend.config import Sampling
from mend.errors import MendError
from mend.types import EditRequest, Probe


@dataclass
class StepRows:
    """The paraphrase and locality rows of one step, each tagged with its edit's index."""

    gen: list[tuple[str, str]]
    gen_group: list[int]
    gen_is_prompt: list[bool]
    loc: list[tuple[str, str | None]]
    loc_group: list[int]
    loc_own: list[bool]  # the edit's own probe (scored for locality accuracy)


def as_probe(req: EditRequest) -> Probe:
    """Another record used as a locality input: its prompt, with its true answer if known."""
    return Probe(req.prompt, req.target_true)


def record_rows(r: EditRequest) -> list[tuple[str, str | None]]:
    """A record's own rows: the edit, each paraphrase with the target, each locality probe."""
    return ([(r.prompt, r.target)] + [(p, r.target) for p in r.rephrases]
            + [(probe.prompt, probe.answer) for probe in r.locality])  # fmt: skip


def relation_key(prompt: str) -> str:
    """The last two words of a prompt: a cheap stand-in for its relation ("located in")."""
    return " ".join(prompt.lower().split()[-2:])


def similar_key(r: EditRequest, by: str = "relation") -> str:
    """What makes two records each other's hard locality inputs.

    "relation": prompts that end alike (`relation_key`). "answer": the same true answer,
    where known (else the relation): CounterFact's neighbourhood probes are other subjects
    with the edited subject's true answer, the inputs an edit most easily carries along.
    "nearest": the record itself, whose list `similar_index` takes from `nearest_records`.
    """
    if by == "nearest":
        return "prompt:" + r.prompt
    if by == "answer" and r.target_true:
        return "answer:" + r.target_true
    return "relation:" + relation_key(r.prompt)


def similar_index(
    pool: list[EditRequest], by: str = "relation", near: list[list[int]] | None = None
) -> dict[str, list[int]]:
    """Records grouped by `similar_key`: hard locality inputs (a like fact of another subject).

    Each record is also listed under its relation, where a record without a true answer looks.
    By "nearest", `near[i]` (from `prepare.nearest_records`) is pool record i's own group.
    """
    if by == "nearest" and (near is None or len(near) != len(pool)):
        raise MendError("hard_locality 'nearest' needs one list of nearest records per record")
    index: dict[str, list[int]] = {}
    for i, r in enumerate(pool):
        if by == "nearest":  # its own list (a copy), which does not hold the record itself
            index[similar_key(r, by)] = list(near[i])
            keys = [similar_key(r, "relation")]
        else:
            keys = dict.fromkeys((similar_key(r, by), similar_key(r, "relation")))
        for key in keys:
            index.setdefault(key, []).append(i)
    return index


def build_rows(
    reqs: list[EditRequest],
    pool: list[EditRequest],
    sampling: Sampling,
    rng: random.Random | None,
    similar: dict[str, list[int]] | None = None,
    batch_size: int = 1,
) -> StepRows:
    """Paraphrase rows (generalisation) and locality rows for a set of edits.

    With an rng (training) one paraphrase is sampled per edit and `loc_per_edit` extra locality
    inputs are drawn from other records, half of them (when `similar`, a `similar_index` by
    `sampling.hard_locality`, is given) from records like this one. Without an rng
    (validation) every paraphrase is used and a record with no locality probe borrows the
    next record of the pool. With `batch_size` > 1, every `batch_size` consecutive edits form
    one batched edit, and their rows are scored under it.
    """
    rows = StepRows([], [], [], [], [], [])
    for i, r in enumerate(reqs):
        reph = list(r.rephrases)
        if rng is not None and reph:
            reph = [rng.choice(reph)]
        for p in [r.prompt] + reph:
            rows.gen.append((p, r.target))
            rows.gen_group.append(i // batch_size)
            rows.gen_is_prompt.append(p == r.prompt and p not in reph)
        own = list(r.locality)
        if not own and rng is None:
            own = [as_probe(pool[(pool.index(r) + 1) % len(pool)])] if r in pool else []
        extra = []
        if rng is not None:
            n_hard = sampling.loc_per_edit // 2 if similar else 0
            near = similar.get(similar_key(r, sampling.hard_locality), []) if similar else []
            picks = [rng.choice(near) for _ in range(n_hard) if len(near) > 1]
            picks += [rng.randrange(len(pool)) for _ in range(sampling.loc_per_edit - len(picks))]
            extra = [as_probe(pool[j]) for j in picks]
            extra = [p for p in extra if p.prompt != r.prompt]
        for j, probe in enumerate(own + extra):
            rows.loc.append((probe.prompt, probe.answer))
            rows.loc_group.append(i // batch_size)
            rows.loc_own.append(j < len(own))
    return rows
