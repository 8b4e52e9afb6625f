"""Shielding known facts: keep an edit off the inputs of the known facts nearest to it.

MEND's edits of CounterFact facts leak to other subjects with the same relation: most of the
locality probes an edit changes answer with the edit's new target (see
`experiments/locality_probe.py`). A `KeyBank` holds, for a set of known facts (a prompt and its
true answer, e.g. the editor's training records), each edited weight's input at the answer
positions. A `Shield` finds the `m` facts whose input at the first edited weight is nearest
the edit prompt's and removes `beta` of the change's action on their inputs:

    Delta W <- Delta W (I - beta K^T (K K^T + lam I)^-1 K),   K: those inputs, one per row.

With beta = 1 the edit leaves those inputs' outputs (nearly) as they were. `MendEditor` applies
it before its check, so the check sees the shielded change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from mend.data.collate import make_batch
from mend.errors import MendError
from mend.files import atomic_write, read_tensors
from mend.grads import scored_inputs
from mend.models.params import EditableParam
from mend.types import EditRequest

BANK_FILE = "key_bank.safetensors"
BANK_FORMAT = "mend-key-bank-v1"
SAME_FACT = 0.999  # a bank fact this close to the edit prompt is the edited fact itself


def known_facts(
    records: list[EditRequest], leave_out: list[EditRequest] = ()
) -> tuple[list[tuple[str, str]], int]:
    """The (prompt, true answer) facts a key bank can hold, from records that know their answer.

    Leaves out every fact whose prompt is a locality probe of `leave_out` (the edits whose
    locality will be measured: a shield on the probe itself flatters the number).

    Returns:
        (facts, how many were left out).
    """
    probes = {p.prompt for r in leave_out for p in r.locality}
    known = [(r.prompt, r.target_true) for r in records if r.target_true]
    facts = [f for f in known if f[0] not in probes]
    return facts, len(known) - len(facts)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x's rows scaled to unit length (fp32): their products are cosines."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class KeyBank:
    """Edited-weight inputs at the answer positions of known facts.

    Attributes:
        keys: {weight name: (P, in)} one row per answer position.
        owner: (P,) the fact each row belongs to.
        ref: the weight whose inputs decide which facts are nearest (the first edited one).
    """

    def __init__(self, keys: dict[str, torch.Tensor], owner: torch.Tensor, ref: str):
        self.keys, self.owner, self.ref = keys, owner, ref
        first = torch.ones_like(owner, dtype=torch.bool)
        first[1:] = owner[1:] != owner[:-1]  # rows are grouped by fact, in order
        self._unit = unit_rows(keys[ref][first])
        self._fact = owner[first]

    @classmethod
    @torch.no_grad()
    def build(cls, model, tokenizer, params: list[EditableParam], facts, max_len: int,
              chunk: int = 64, progress: bool = False) -> KeyBank:  # fmt: skip
        """facts: (prompt, true answer) pairs."""
        if not facts:
            raise MendError("a key bank needs at least one fact")
        device = next(model.parameters()).device
        keys: dict[str, list[torch.Tensor]] = {p.name: [] for p in params}
        owner = []
        for i in tqdm(range(0, len(facts), chunk), desc="key bank", disable=not progress):
            batch = make_batch(tokenizer, facts[i : i + chunk], None, max_len).to(device)
            for name, u in scored_inputs(model, params, [batch]).items():
                keys[name].append(u)
            owner.append(batch.pos_row + i)
        return cls({n: torch.cat(v) for n, v in keys.items()}, torch.cat(owner), params[0].name)

    def nearest_facts(self, queries: torch.Tensor, m: int) -> torch.Tensor:
        """Indices (into the bank's facts) of the m facts nearest the queries (Q, in) at the
        reference weight by cosine, leaving out a fact that is a query's own; all queries'
        picks together, nearest first per query."""
        sims = unit_rows(queries.to(self._unit.device)) @ self._unit.T  # (Q, F)
        sims = sims.masked_fill(sims > SAME_FACT, float("-inf"))
        best = sims.topk(min(m, sims.shape[1]), dim=1)
        return self._fact[best.indices[best.values > float("-inf")]]

    def nearest(self, queries: torch.Tensor, m: int) -> dict[str, torch.Tensor]:
        """{weight: (rows, in)} the inputs of the m facts nearest each query (Q, in) at the
        reference weight, leaving out a fact that is the query's own."""
        rows = torch.isin(self.owner, self.nearest_facts(queries, m))
        return {n: k[rows].float() for n, k in self.keys.items()}

    def save(self, path: str | Path) -> None:
        tensors = {f"keys.{n}": k.to(torch.bfloat16).contiguous() for n, k in self.keys.items()}
        tensors["owner"] = self.owner.contiguous()
        meta = {"format": BANK_FORMAT, "ref": self.ref}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, params: list[EditableParam]) -> KeyBank:
        """Read a bank saved by `save`, checked against the weights it will shield."""
        path = Path(path)
        if not path.is_file():
            raise MendError(f"no key bank at {path} (make one with `mend build-shield`)")
        tensors, _ = read_tensors(path, BANK_FORMAT, "mend key bank")
        owner = tensors.pop("owner", None)
        keys = {n.removeprefix("keys."): k for n, k in tensors.items()}
        want = {p.name: p.in_out[0] for p in params}
        got = {n: k.shape[1] for n, k in keys.items() if k.dim() == 2}
        if owner is None or got != want or any(len(k) != len(owner) for k in keys.values()):
            raise MendError(f"key bank {path} does not fit this model's edited weights")
        return cls(keys, owner, params[0].name)


@dataclass
class Shield:
    """Remove `beta` of an edit's action on the inputs of its `m` nearest known facts."""

    bank: KeyBank
    m: int = 16
    beta: float = 0.5
    lam: float = 1e-2  # ridge, relative to the mean squared norm of the shielded inputs

    def __post_init__(self):
        if self.m < 1 or not 0 < self.beta <= 1 or self.lam <= 0:
            raise MendError(f"shield needs m >= 1, 0 < beta <= 1, lam > 0 (got {self})")

    def projector(self, queries: torch.Tensor) -> Callable[[dict], dict]:
        """The shield of one edit, as a function of its factors {weight: (u (G, T, in),
        d (G, T, out))}, Delta W = sum_t d_t u_t^T; queries: (Q, in) the edit prompts' inputs
        at the reference weight. The nearest facts and their ridge solves are found once, so
        the check's boosts reuse them."""
        near = self.bank.nearest(queries, self.m)
        if not len(next(iter(near.values()))):  # the bank holds only the edited facts
            return lambda factors: factors
        parts = {}
        for name, k in near.items():  # k: (n, in)
            gram = k @ k.T
            gram = gram + self.lam * gram.diagonal().mean() * torch.eye(len(k), device=k.device)
            parts[name] = (k, torch.linalg.solve(gram, k))  # K, (K K^T + lam I)^-1 K

        def project(factors: dict) -> dict:
            out = {}
            for name, (u, d) in factors.items():
                k, solved = (t.to(u.device) for t in parts[name])
                out[name] = (u - self.beta * (u @ k.T) @ solved, d)
            return out

        return project

    def __repr__(self) -> str:
        return f"Shield(m={self.m}, beta={self.beta}, lam={self.lam}, facts={len(self.bank._fact)})"
