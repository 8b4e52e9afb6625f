"""Least-squares aggregation of an edit's tokens, and the memory of earlier edits' keys.

Token t of an edit (key k_t, the edited matrix's input there; editor output u~_t, d~_t) asks
for the output change v_t = -alpha (u~_t . k_t) d~_t: what its own rank-one change does at
its own key. S = V K^T (K K^T + C + lambda I)^-1 is the ridge least-squares change meeting
all of them (MALMEN, Tan et al. 2024), where C holds keys whose outputs should stay: those of
earlier edits still applied (`KeyMemory`) and, weighted, those of ordinary text. In factor
form u'_t = (u~_t . k_t) (K K^T + C + lambda I)^-1 k_t with d~_t unchanged, so the edit is
still -alpha sum_t d~_t u'_t^T and applies, reverts and saves like any other.

With a null-space basis U of ordinary text's keys (`null_space_basis`, AlphaEdit: Fang et al.
2025) the change is restricted to P = U U^T: S = V K^T P ((K K^T + C) P + lambda I)^-1,
which leaves S k_o = 0 for every key k_o orthogonal to U (see `solved_keys`).
"""

from __future__ import annotations

import weakref

import torch

from mend.errors import MendError
from mend.result import EditResult


def solved_keys(
    keys: torch.Tensor,
    n: int,
    ridge: float | torch.Tensor,
    held: torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """(K K^T + C + lambda I)^-1 k_t for every row of keys (T, in): the u'_t of an edit
    before each is scaled by its u~_t . k_t.

    With a basis U (in, r) of orthonormal columns, P = U U^T, the change is restricted to P:
    S = V K^T P (A P + lambda I)^-1, A = K K^T + C, so u'_t = (P A + lambda I)^-1 P k_t
    (AlphaEdit's code). A key with P k_o = 0 has (A P + lambda I) k_o = lambda k_o, so the
    inverse gives k_o / lambda, P zeroes it, and S k_o = 0. In the basis (U, its complement)
    u'_t = U (U^T A U + lambda I_r)^-1 U^T k_t, which is also (P A P + lambda I)^-1 P k_t,
    the paper's symmetric form: all three agree. The last is what runs: an (r, r) symmetric
    solve whose u'_t are combinations of U's columns by construction, so S k_o vanishes to
    the rounding of U's orthogonality, not of a dense projector's solve.

    Args:
        n: the number of edited tokens (rows of keys that are not empty slots).
        ridge: lambda relative to the keys' mean squared norm (unprojected, so a ridge means
            the same lambda with and without a basis); a tensor carries its gradient.
        held: C, (in, in) second moments of keys whose outputs should stay, or None.
        basis: U, (in, r), or None: no restriction.
    """
    gram = keys.T @ keys  # (in, in)
    lam = ridge * (gram.diagonal().sum() / max(n, 1)).detach()
    if held is not None:
        gram = gram + held
    rhs = keys.T  # (in, T)
    if basis is not None:
        gram, rhs = basis.T @ gram @ basis, basis.T @ rhs  # (r, r), (r, T)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solved = torch.linalg.solve(gram + lam * eye, rhs).T  # (T, in) or (T, r)
    return solved if basis is None else solved @ basis.T


def check_null_space(threshold: float) -> None:
    """Refuse a null-space threshold that is not a share of key energy in (0, 1)."""
    if not 0 < threshold < 1:
        raise MendError(
            f"the null-space threshold is a share of key energy in (0, 1), got {threshold}"
        )


def null_space_basis(moments: torch.Tensor, threshold: float) -> torch.Tensor:
    """U (in, r): the eigenvectors of C0 = E[k k^T] (in, in) of ordinary text's keys that
    together carry at most `threshold` of its trace E|k|^2, smallest eigenvalue first.

    The threshold is thus a share of text's key energy: P = U U^T passes
    E|P k|^2 = trace(P C0) <= threshold E|k|^2, so every matrix's change meets text keys
    with the same bound. It is cumulative and normalised by the trace, not a cut of each
    eigenvalue against the largest one or the trace (AlphaEdit's 1e-2 of an unnormalised
    C0), because a few outlier directions (massive activations, up to nine tenths of the
    trace in one eigenvalue) set the scale of such a cut: the same cut then passes a few
    percent of text's energy in one layer and a third of it in the next.

    Raises:
        MendError: a threshold outside (0, 1), or one below C0's smallest eigenvalue's share
            (an empty null space: the edit would change nothing).
    """
    check_null_space(threshold)
    values, vectors = torch.linalg.eigh(moments.double())  # ascending
    share = values.clamp(min=0).cumsum(0) / values.clamp(min=0).sum()
    r = int((share <= threshold).sum())
    if r == 0:
        raise MendError(
            f"no direction of the text keys carries under {threshold} of their energy "
            f"(the smallest carries {float(share[0]):.3g}): the null space is empty"
        )
    return vectors[:, :r].to(moments.dtype).contiguous()


class KeyMemory:
    """The running sum K K^T of the keys of edits still applied, per edited matrix.

    `add` records an edit's keys with its EditResult. Once an edit is reverted its keys leave
    before the next `held`: the sums are rebuilt from the edits still applied, in the order
    they were added, so they are bit for bit what adding only those edits gives, and what
    `replace` rebuilds from saved keys (`EditSequence.load`). Results are held by weak
    reference (a revert tells the memory), so the weights an edit replaced are not kept alive
    here once nobody else keeps its result.
    """

    def __init__(self):
        self._sum: dict[str, torch.Tensor] = {}
        # (the edit's result, whether it was reverted, its keys)
        self._entries: list[tuple[weakref.ref, list[bool], dict[str, torch.Tensor]]] = []

    def held(self, name: str) -> torch.Tensor | None:
        self._forget_reverted()
        return self._sum.get(name)

    def add(self, result: EditResult, keys: dict[str, torch.Tensor]) -> None:
        """Hold the keys {weight name: (n, in)} of the edit `result` applied."""
        self._entries.append(self._entry(result, keys))
        self._add_to_sum(keys)

    @staticmethod
    def _entry(result: EditResult, keys: dict[str, torch.Tensor]):
        flag = [result.reverted]
        result.on_revert.append(lambda: flag.__setitem__(0, True))
        return weakref.ref(result), flag, keys

    def keys_of(self, result: EditResult) -> dict[str, torch.Tensor] | None:
        """The keys held for `result` (None if it added none or they were forgotten)."""
        return next((keys for r, _, keys in self._entries if r() is result), None)

    def replace(self, entries: list[tuple[EditResult, dict[str, torch.Tensor]]]) -> None:
        """Hold exactly these (result, keys), in order, and nothing else."""
        self._entries = [self._entry(result, keys) for result, keys in entries]
        self._rebuild()

    def __contains__(self, name: str) -> bool:
        return name in self._sum

    def __len__(self) -> int:
        """How many applied edits' keys are held."""
        self._forget_reverted()
        return len(self._entries)

    def _add_to_sum(self, keys: dict[str, torch.Tensor]) -> None:
        for name, k in keys.items():
            gram = k.T @ k
            self._sum[name] = self._sum[name] + gram if name in self._sum else gram

    def _rebuild(self) -> None:
        self._sum = {}
        for _, _, keys in self._entries:
            self._add_to_sum(keys)

    def _forget_reverted(self) -> None:
        if any(flag[0] for _, flag, _ in self._entries):
            self._entries = [entry for entry in self._entries if not entry[1][0]]
            self._rebuild()
