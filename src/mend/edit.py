"""The MEND algorithm: loss -> (u, delta) -> editor -> low-rank Delta W -> apply.

An edit is kept as low-rank factors per edited matrix, never as a full gradient:
    Delta W = sum_i delta~_i u~_i^T  (out, in)      W_new = W - alpha * Delta W
so the edited layer's output is y - alpha * (x @ u~^T) @ delta~. That form serves two uses:
`applied()` adds it with forward hooks (functional: weights untouched, gradients reach the
editor; rows of one batch may even carry different edits), and `edit()` materialises Delta W
and changes the weights in place, returning a revertible EditResult.

`edit()` also checks its work: a request whose target is not yet the argmax after its prompt
has its change scaled up (by `boost`, e.g. 1.5 then 2), which reruns only the edited blocks;
`start` (e.g. 0.9) lets the check begin, and fall back to, a little less than MEND's change.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mend.aggregate import KeyMemory, check_null_space, null_space_basis, solved_keys
from mend.checkpoint import load_editor, model_identity, save_editor
from mend.config import AGGREGATES
from mend.data.collate import IGNORE, TokenBatch, make_batch
from mend.editor.net import EditorNet
from mend.errors import MendError
from mend.grads import capture, first_scored_inputs
from mend.key_stats import text_key_moments
from mend.losses import edit_loss
from mend.metrics import all_correct, rows_all
from mend.models import context_length
from mend.models.forward import layout, scored_logits
from mend.models.head import HeadArgmax
from mend.models.params import find_editable, swapped_data
from mend.models.upper import Prepared, UpperStack, bf16_is_fast
from mend.result import EditResult, WeightPool
from mend.shield import Shield
from mend.types import EditRequest

# {weight name: (u~ (G, T, in), delta~ (G, T, out))}: G edit groups of T token slots each;
# unused slots are zero and contribute nothing.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]

# Scales tried, in turn, on a request whose edit has not made its target the argmax.
DEFAULT_BOOST = (1.5, 2.0)
# The relative ridge of `aggregate="singles"` when none is given: 100 CounterFact edits in one
# change with the demo editor landed 0.85 of 20 at 1e-6 against 0.70 at 1e-4
# (experiments/runs/combined-singles/).
SINGLES_RIDGE = 1e-6


CAPTURE_ROWS = 64  # requests whose gradients one pass of a batched edit captures


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    """(R, S, d) right-padded with zeros to (R, width, d)."""
    return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]))


def _dense_is_cheaper(rows: int, rank: int, d_in: int, d_out: int) -> bool:
    """Whether x (Delta W) beats (x u^T) d in flops, Delta W = u^T d formed once."""
    return rows * rank * (d_in + d_out) > (rank + rows) * d_in * d_out


class MendEditor:
    """Binds a trained EditorNet to a model and tokenizer.

    Args:
        model: a causal LM whose edited weights match the editor's names and shapes.
        tokenizer: its tokenizer.
        net: the trained editor networks (`EditorNet`).
        boost: scales tried in turn by `edit()` on each request whose target is not yet the
            argmax (every token, after its prompt) under the edit; () applies MEND's change
            as it comes, unchecked.
        start: the scale of MEND's change that the check tries first and falls back to when
            no scale of `boost` reaches the target (default 1: MEND's change). Below 1 it
            keeps edits that need less off other inputs, trading a little paraphrase accuracy
            for locality. It needs a check (`boost`), and edits that are not checked get
            MEND's change as it comes.
        check_batches: check edits that join others too: batched edits (several requests
            in one change) and anchored edits on a model that already carries edits. Off by
            default: scaling up the share of the requests that miss raises the interference
            between them, which costs batched edits much of their locality for little gain in
            rewrite accuracy and lowers every score of anchored edits made in turn, so those
            get MEND's change as it comes.
        anchored: compute every edit's gradient on the weights this editor was created on
            (its anchor), even when earlier edits are still applied, and leave out the part
            of the change that all edits share (`fit_shared`) once the model carries one. Off,
            each edit sees the model as it is now: the paper's sequential editing, where the
            editor meets gradients of a model it was never trained on and, after a handful of
            edits, makes changes hundreds of times the weights' norm (docs/ARCHITECTURE.md).
            Either way the change is added to the current weights and the check runs on them.
        shield: a `mend.shield.Shield`: keep each single edit off the inputs of the known
            facts nearest its prompt (applied before the check). None: off. Batched edits
            are not shielded: shielding the union of every request's nearest facts removes
            much of the requests' own changes.
        editor_bf16: run the editor networks' large products in bf16 where no gradient is
            taken (edits; training stays fp32): an edit's cost there is reading the editor's
            weights, and bf16 halves it (`EditorNet.forward`). None (default): where bf16 is
            fast (`bf16_is_fast`: bf16 GPUs, CPUs with bf16 units); False: fp32 throughout.
        aggregate: how the requests of a batched edit combine; None: as the editor was
            trained (`EditorConfig.aggregate`). "sum" adds MEND's changes
            (the paper). "ls" reads each edited token's change as a value change at its own
            key, d = -alpha (u~ . k) delta~, and solves one ridge least-squares system per
            matrix so that every key gets its value and the requests do not act on each
            other's keys (MALMEN, Tan et al. 2024): W += D K^T (K K^T + lambda I)^-1.
            "singles" edits each request alone (checked), reverts it, and solves one change
            per matrix that gives every request's keys the output change its own single
            edit gave them (`_combined_singles`): a single-edit editor's batched edits
            without summing its changes. A single request is edited as with "sum".
        ridge: lambda of that solve, relative to the mean squared norm of the keys; None:
            the editor's own, per matrix (learned when it was trained for "ls"), and
            `SINGLES_RIDGE` for "singles".
        remember: with "ls" or "singles", later edits keep the outputs at the keys of the earlier edits
            that are still applied (their key sum joins K K^T), so a sequence of batches
            does not undo itself.
        preserve: with "ls", how strongly the keys of ordinary text keep their outputs:
            mu n C0 joins K K^T in the solve, n the number of edited tokens and C0 =
            E[k k^T] over running text (`text_moments`; by default WikiText's, computed once
            per model by `key_stats.text_key_moments` and cached).
        null_space: with "ls", restrict the change to the null space of ordinary text's
            keys (AlphaEdit): the directions of C0 that together carry at most this share
            (0, 1) of its trace (`aggregate.null_space_basis`), found once per matrix. Keys
            in the span of C0's other directions keep their outputs exactly. None: off.
        adapt_stats: every edit also updates the editor's running mean and std of its inputs
            (u, delta) with its own tokens before transforming them, as training does
            (UltraEdit's lifelong normalisation). The statistics are not reverted with an edit.
    """

    def __init__(
        self,
        model,
        tokenizer,
        net: EditorNet,
        boost=DEFAULT_BOOST,
        start: float = 1.0,
        check_batches: bool = False,
        anchored: bool = True,
        shield: Shield | None = None,
        editor_bf16: bool | None = None,
        aggregate: str | None = None,
        ridge: float | None = None,
        preserve: float = 0.0,
        text_moments: dict[str, torch.Tensor] | None = None,
        remember: bool = True,
        null_space: float | None = None,
        adapt_stats: bool = False,
    ):
        self.model, self.tokenizer, self.net = model, tokenizer, net
        self.shield = shield
        self.boost = tuple(float(s) for s in boost)
        self.start = float(start)
        self.check_batches = check_batches
        self.anchored = anchored
        aggregate = net.cfg.aggregate if aggregate is None else aggregate
        if aggregate not in AGGREGATES:
            raise MendError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        if ridge is not None and not ridge > 0:
            raise MendError(f"ridge must be > 0, got {ridge}")
        self.aggregate = aggregate
        self.ridge = None if ridge is None else float(ridge)
        if preserve < 0:
            raise MendError(f"preserve must be >= 0, got {preserve}")
        self.preserve, self.text_moments = float(preserve), text_moments
        if null_space is not None:
            if aggregate == "sum":
                raise MendError("null_space restricts a least-squares edit: give aggregate='ls'")
            check_null_space(null_space)  # before the text statistics are computed
        # Keys of the least-squares edits still applied: a later solve keeps their outputs
        # (the running key sum of sequential editing).
        self.remember = remember
        self.adapt_stats = adapt_stats
        self.memory = KeyMemory()
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if any(not s > 0 for s in self.boost):
            raise MendError(f"boost scales must be > 0, got {self.boost}")
        if not 0 < self.start < float("inf"):
            raise MendError(f"the check's start scale must be > 0 and finite, got {start}")
        if self.start != 1 and not self.boost:
            raise MendError("a start scale needs a check: give boost scales too")
        self.params = find_editable(model, net.names)
        self._param = {p.name: p for p in self.params}
        self.layout = layout(model)  # how this model reads a (prompt, target) pair
        if (self.preserve or null_space is not None) and self.text_moments is None:
            self.text_moments = text_key_moments(model, tokenizer, self.params)
        # {weight name: U (in, r)}, P = U U^T: depends only on C0 and the threshold
        self.null_bases = {} if null_space is None else {
            p.name: null_space_basis(self.text_moments[p.name], null_space) for p in self.params
        }  # fmt: skip
        for p in self.params:
            if p.in_out != net.shapes[p.name]:
                raise MendError(
                    f"editor was made for a different model: {p.name} is {p.in_out} "
                    f"(in, out) here but {net.shapes[p.name]} in the editor"
                )
        # Edits swap new storage in and keep the old (EditResult), so holding these aliases
        # costs nothing and stays exact; `moved()` compares storage.
        self._anchor = {p.name: p.weight.data for p in self.params}
        self.max_len = context_length(model)
        self._spares = WeightPool(protected=self._anchor.values())
        start = UpperStack.first_edited_block(model, net.names)
        self._stack = UpperStack(model, start) if start is not None else None
        head = model.get_output_embeddings()
        edits_head = any(p.module is head for p in self.params)  # its output carries hooks then
        self._argmax = None if edits_head or self._stack is None else HeadArgmax(head)
        self.editor_bf16 = bf16_is_fast(self.device) if editor_bf16 is None else editor_bf16

    @classmethod
    def from_pretrained(cls, folder: str | Path, model, tokenizer, **kwargs) -> MendEditor:
        """Bind the editor saved in `folder` (by `save_pretrained` or `mend train`) to model.

        Refuses an editor made for another model. `kwargs` go to the constructor (boost, ...).
        """
        return cls(model, tokenizer, load_editor(folder, model), **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        """Save the editor networks and the model's identity (JSON + safetensors) in `folder`."""
        save_editor(folder, self.net, model_identity(self.model, self.net.names))

    @property
    def device(self) -> torch.device:
        return self.params[0].weight.device

    def token_mask(self, batch: TokenBatch, name: str) -> torch.Tensor:
        """(R, S) bool: the real tokens of batch that the edited weight `name` reads (a seq2seq
        decoder's weights read the decoder's tokens, every other weight the input's)."""
        return batch.token_mask(self._param[name].decoder)

    def batch(self, pairs, groups=None) -> TokenBatch:
        """Tokenise (prompt, target-or-None) pairs for this model."""
        return make_batch(self.tokenizer, pairs, groups, self.max_len, self.layout).to(self.device)

    def factors(self, batch: TokenBatch, batch_size: int | None = 1, captured=None) -> Factors:
        """EditorNet-transformed gradient factors for the edit rows of `batch`.

        Args:
            batch: one row per request (prompt + target).
            batch_size: how many consecutive rows (requests) make one edit (their changes summed):
                1 gives one edit per row (G = rows), None one edit of all rows (a batched
                edit); it must divide the number of rows.
            captured: (u, delta) from `grads.capture` on batch, if already computed; rows
                whose delta is zero carry no edit.
        """
        k = len(batch) if batch_size is None else batch_size
        if k < 1 or len(batch) % k:
            raise MendError(f"cannot split {len(batch)} rows into edits of {k} rows")
        if captured is None:
            captured, _ = capture(self.model, self.params, batch, lambda lg: edit_loss(lg, batch))
        flat, masks = {}, {}
        for name, (u, delta) in captured.items():
            # Tokens that carry no gradient (padding, the last target token) are dropped:
            # the editor's shift would otherwise turn their zeros into a spurious update.
            mask = self.token_mask(batch, name) & (delta != 0).any(-1)  # (R, S)
            flat[name] = (u[mask], delta[mask])
            masks[name] = mask
        low = torch.bfloat16 if self.editor_bf16 and not torch.is_grad_enabled() else None
        if self.adapt_stats and not self.net.training:  # (training updates them itself)
            self.net.observe(flat)
        out = {}
        for name, (u_t, d_t) in self.net(flat, low).items():
            idx = masks[name].nonzero(as_tuple=True)
            u, delta = captured[name]
            u_full = u.new_zeros(u.shape).index_put(idx, u_t)  # (R, S, in)
            d_full = delta.new_zeros(delta.shape).index_put(idx, d_t)  # (R, S, out)
            if k > 1:  # (R, S, .) -> (R / k, k S, .): consecutive rows share one edit
                u_full = u_full.reshape(len(batch) // k, -1, u_full.shape[-1])
                d_full = d_full.reshape(len(batch) // k, -1, d_full.shape[-1])
            out[name] = (u_full, d_full)
        return out

    @contextmanager
    def applied(self, factors: Factors, row_group: torch.Tensor | None = None) -> Iterator[None]:
        """Run the model as if edited, without touching its weights.

        Args:
            factors: from `factors()`.
            row_group: (R,) edit group of each row of the batch run inside; None means
                group 0 for every row (a single or batched edit).
        """

        def make_hook(name: str):
            u, d = factors[name]
            alpha = self.net.alpha(name)
            dense = None

            def hook(module, inputs, output):
                nonlocal dense
                x = inputs[0].float()  # (R, S, in)
                if row_group is not None:  # (index_select: its backward is far cheaper than [])
                    coef = x @ u.index_select(0, row_group).transpose(1, 2)  # (R, S, T)
                    corr = coef @ d.index_select(0, row_group)  # (R, S, out)
                elif _dense_is_cheaper(x[..., 0].numel(), *u.shape[-2:], d.shape[-1]):
                    if dense is None:  # a large batched edit: form Delta W once
                        dense = u[0].T @ d[0]  # (in, out)
                    corr = x @ dense
                else:
                    corr = (x @ u[0].T) @ d[0]  # (R, S, T) @ (T, out)
                return output - (alpha * corr).to(output.dtype)

            return hook

        handles = [
            p.module.register_forward_hook(make_hook(p.name))
            for p in self.params
            if p.name in factors
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def weight_deltas(self, factors: Factors, group: int = 0) -> dict[str, torch.Tensor]:
        """Materialise -alpha * Delta W of one group, in each weight's storage layout."""
        return {p.name: p.outer_sum(*f) for p, f in self._factor_pairs(factors, group)}

    def _factor_pairs(self, factors: Factors, group: int = 0):
        """(param, (u, d)) per edited weight, with -alpha folded into the small factor u."""
        for p in self.params:
            if p.name in factors:
                u, d = factors[p.name][0][group], factors[p.name][1][group]  # (T, in), (T, out)
                yield p, (-self.net.alpha(p.name) * u, d)

    def _non_finite(self, factors: Factors) -> str | None:
        """The first matrix whose Delta W could hold an inf or nan, judged on its factors.

        |(alpha u^T d)_ij| <= alpha * T * max|u| * max|d|: when that bound is a finite fp32
        number, so is every entry; a nan anywhere makes the bound nan.
        """
        limit = torch.finfo(torch.float32).max
        for name, (u, d) in factors.items():
            bound = self.net.alpha(name) * u.shape[-2] * u.abs().amax() * d.abs().amax()
            if not bool(bound <= limit):
                return name
        return None

    def _capture(self, batch: TokenBatch) -> tuple[dict, Prepared | None]:
        """(u, delta) of the edit loss on batch, and its upper blocks' inputs for later checks.

        A batch of more than `CAPTURE_ROWS` requests is captured `CAPTURE_ROWS` rows at a
        time (each row's gradient depends on its own loss term only, so the parts are the
        whole), which bounds an edit's activation memory: a 1,000-request edit of
        SmolLM2-135M otherwise holds over 20 GB. Its upper blocks' inputs are not kept
        (None: a check recomputes them)."""
        if len(batch) > CAPTURE_ROWS:
            parts = []
            for start in range(0, len(batch), CAPTURE_ROWS):
                part = batch.select(list(range(start, min(start + CAPTURE_ROWS, len(batch)))))
                captured, _ = self._capture(part)
                width = {n: self.token_mask(batch, n).shape[1] for n in captured}
                parts.append(
                    {n: tuple(_pad_to(t, width[n]) for t in ud) for n, ud in captured.items()}
                )
            return {
                n: tuple(torch.cat([p[n][i] for p in parts]) for i in (0, 1)) for n in parts[0]
            }, None
        loss = lambda lg: edit_loss(lg, batch)  # noqa: E731
        if self._stack is None:
            return capture(self.model, self.params, batch, loss)[0], None
        seen = []

        def run():
            prepared, final = self._stack.record(batch)
            seen.append(prepared)
            return self._stack.project(final[batch.pos_mask])

        return capture(self.model, self.params, batch, loss, run=run)[0], seen[0]

    def reaches_target(self, factors: Factors, batch: TokenBatch, prepared=None) -> torch.Tensor:
        """(R,) bool: under the edit, every target token of each row is the argmax.

        Args:
            prepared: from `_capture`; reruns only the edited blocks instead of the model.
        """
        labels = batch.labels[batch.pos_mask]
        with self.applied(factors):
            if prepared is None or self._argmax is None:
                logits = scored_logits(self.model, batch)
                return all_correct(logits, labels, batch.pos_row, len(batch))
            hidden = self._stack.scored_hidden(prepared)
        ok = self._argmax.is_argmax(hidden, labels.clamp_min(0)) | (labels == IGNORE)
        return rows_all(ok, batch.pos_row, len(batch))

    def holds(self, requests: list[EditRequest]) -> list[bool]:
        """Whether the model as it is now answers each request with its target (every
        target token the argmax after its prompt): what the check asks, on the weights."""
        out = []
        with torch.no_grad():
            for i in range(0, len(requests), 64):  # bounded logits memory for long files
                chunk = requests[i : i + 64]
                out += self.reaches_target(
                    {}, self.batch([(r.prompt, r.target) for r in chunk])
                ).tolist()
        return out

    def _boosted(self, factors: Factors, batch: TokenBatch, prepared, finish):
        """Scale up each request's share of a batched edit until its target is the argmax.

        Each request starts at `self.start` (1: MEND's own change); every one that misses its
        target is scaled by the next of `self.boost`; one that never reaches it goes back to
        the start: the larger change bought nothing on its prompt and reaches further into
        other inputs. A request's share is its token slots of u~. `finish` turns scaled
        factors into the change that will be applied (`_shared_once`), so what is checked is
        exactly what lands.

        Returns:
            (the finished factors, each request's scale).
        """
        # (float64: the scales reported are the ones given, e.g. 0.9, not their float32)
        scale = torch.full((len(batch),), self.start, dtype=torch.float64)

        def per_slot(u: torch.Tensor) -> torch.Tensor:  # (R S, 1): S, the matrix's stack width
            slots = scale.repeat_interleave(u.shape[1] // len(batch))[:, None]
            return slots.to(u.device, u.dtype)

        def scaled() -> Factors:
            return finish({n: (u * per_slot(u), d) for n, (u, d) in factors.items()})

        current = finish(factors) if self.start == 1 else scaled()
        for s in self.boost:
            ok = self.reaches_target(current, batch, prepared).cpu()
            if bool(ok.all()):
                break
            scale[~ok] = s
            current = scaled()
        else:
            missed = ~self.reaches_target(current, batch, prepared).cpu()
            if bool(missed.any()):
                scale[missed] = self.start
                current = scaled()
        return current, scale.tolist()

    def moved(self) -> bool:
        """Whether the model's edited weights differ from the anchor (an edit is applied)."""
        return any(p.weight.data_ptr() != self._anchor[p.name].data_ptr() for p in self.params)

    def _at_anchor(self):
        """Run with the anchor weights swapped in (no copies); the current ones come back."""
        return swapped_data(
            [p.weight for p in self.params], [self._anchor[p.name] for p in self.params]
        )

    def _shared_once(self, factors: Factors, keep: float) -> Factors:
        """An edit with only `keep` of the change all edits share (1/k: counted once in k).

        With A (out, r), B (in, r) from `EditorNet.set_shared`, the shared part of one group's
        Delta W = sum_t d~_t u~_t^T is A K B^T, K = A^T Delta W B; r extra token slots
        (u = B's columns, d = -(1 - keep) A K's columns) leave `keep` of it. A batch of k
        requests keeps 1/k, the mean edit's share; an anchored edit on a model that already
        carries one keeps none.
        """
        if keep == 1 or not self.net.cfg.shared_rank:
            return factors
        out = {}
        for name, (u, d) in factors.items():
            a, b = self.net.shared(name)
            k_mat = (d @ a).transpose(1, 2) @ (u @ b)  # (G, r, r)
            u_x = b.T.expand(len(u), -1, -1)  # (G, r, in)
            d_x = -(1 - keep) * (a @ k_mat).transpose(1, 2)  # (G, r, out)
            out[name] = (torch.cat([u, u_x], 1), torch.cat([d, d_x], 1))
        return out

    def _least_squares(self, factors: Factors, captured: dict, batch: TokenBatch) -> Factors:
        """One edit whose change gives every edited token's key its own value change, keeping
        the outputs at earlier edits' keys (`remember`) and ordinary text's (`preserve`,
        `null_space`); see `mend.aggregate`. The solve depends on the keys only, so the
        check's scaled tries of one edit reuse it."""
        out = {}
        for name, (u_t, d_t) in factors.items():
            if name not in self._pending:
                u, delta = captured[name]
                mask = self.token_mask(batch, name) & (delta != 0).any(-1)  # edited
                keys = (u.float() * mask[..., None]).reshape(-1, u.shape[-1])  # (T, in)
                n = int(mask.sum())
                held = self.memory.held(name) if self.remember else None
                if self.preserve:
                    text = self.preserve * n * self.text_moments[name].to(keys)
                    held = text if held is None else held + text
                ridge = self.net.ridge(name) if self.ridge is None else self.ridge
                basis = self.null_bases.get(name)
                basis = None if basis is None else basis.to(keys)
                solved = solved_keys(keys, n, ridge, held, basis)
                self._pending[name] = (keys, solved, mask.reshape(-1))
            keys, solved, _ = self._pending[name]
            coef = (u_t[0] * keys).sum(-1, keepdim=True)  # (T, 1) u~ . k, zero on empty slots
            out[name] = ((coef * solved)[None], d_t)
        return out

    def _shield_of(self, captured: dict, batch: TokenBatch):
        """The shield of a single edit (identity when off, and for batched edits)."""
        if self.shield is None or len(batch) != 1:
            return lambda factors: factors
        u_ref = captured[self.shield.bank.ref][0]
        mask = batch.key_mask(self._param[self.shield.bank.ref].decoder)
        return self.shield.projector(first_scored_inputs(u_ref, mask))

    def edit(self, requests: list[EditRequest] | EditRequest) -> EditResult:
        """Apply one edit for all requests together (a batched edit), in place.

        Returns:
            An EditResult: `revert()` restores the exact weights, `save_pretrained()` and
            `save_delta()` write the edited model or just the change.
        """
        if isinstance(requests, EditRequest):
            requests = [requests]
        if not requests:
            raise MendError("no edit requests given")
        if self.aggregate == "singles" and len(requests) > 1:
            return self._combined_singles(requests)
        start = time.perf_counter()
        self._pending = {}  # this edit's least-squares keys and solve, per matrix
        batch = self.batch([(r.prompt, r.target) for r in requests])
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                anchored = self.anchored and self.moved()
                with self._at_anchor() if anchored else nullcontext():
                    captured, prepared = self._capture(batch)
                factors = self.factors(batch, batch_size=None, captured=captured)
                keep = 0.0 if anchored else 1 / len(requests)
                shield = self._shield_of(captured, batch)

                def finish(f: Factors) -> Factors:  # what lands: the check scores exactly it
                    if self.aggregate == "ls":
                        return shield(self._least_squares(f, captured, batch))
                    return shield(self._shared_once(f, keep))

                alone = len(requests) == 1 and not anchored  # joins no other edit
                scales = None
                if self.boost and (alone or self.check_batches):
                    # (the upper blocks' recorded inputs do not depend on the edited weights)
                    factors, scales = self._boosted(factors, batch, prepared, finish)
                else:
                    factors = finish(factors)
                bad = self._non_finite(factors)
                if bad is not None:
                    raise MendError(f"the edit is not finite at {bad} (weights left unchanged)")
                updates = {p.name: pair for p, pair in self._factor_pairs(factors)}
                result = EditResult(self.model, self.params, updates, 0.0, self._spares)
                result.scales = scales
                if self.aggregate == "ls" and self.remember:
                    edited = {n: keys[rows] for n, (keys, _, rows) in self._pending.items()}
                    self.memory.add(result, edited)
        finally:
            self.net.train(was_training)
        result.seconds = time.perf_counter() - start
        return result

    def _combined_singles(self, requests: list[EditRequest]) -> EditResult:
        """`aggregate="singles"`: every request's own single edit (checked as usual, then
        reverted), combined into one change by least squares over their keys.

        At each edited token t of request i (key k_t, the matrix's input there on the weights
        the edit is computed on) request i's single change Delta W_i moves the output by
        v_t = Delta W_i k_t. The change meeting every v_t (`aggregate.solved_keys`, with the
        earlier edits' keys and ordinary text's held as in `_least_squares`) gives each
        prompt what its single edit gave it, while the requests stay off each other's keys:
        summed, a hundred single edits break the model.
        """
        start = time.perf_counter()
        batch = self.batch([(r.prompt, r.target) for r in requests])
        with torch.no_grad():
            with self._at_anchor() if self.anchored and self.moved() else nullcontext():
                captured, _ = self._capture(batch)
            keys: dict[str, list[torch.Tensor]] = {p.name: [] for p in self.params}
            values: dict[str, list[torch.Tensor]] = {p.name: [] for p in self.params}
            singles = tqdm(requests, desc="single edits", leave=False, disable=len(requests) < 10)
            for i, request in enumerate(singles):
                single = self.edit([request])
                single.revert()
                for name, (u, d) in single.updates.items():  # Delta W_i^T = u^T d
                    k_all, delta = captured[name]
                    mask = self.token_mask(batch, name)[i] & (delta[i] != 0).any(-1)
                    k = k_all[i][mask]  # (T_i, in)
                    keys[name].append(k)
                    values[name].append((k @ u.T) @ d)
            updates, edited = {}, {}
            for name in keys:
                k, v = torch.cat(keys[name]), torch.cat(values[name])
                held = self.memory.held(name) if self.remember else None
                if self.preserve:
                    text = self.preserve * len(k) * self.text_moments[name].to(k)
                    held = text if held is None else held + text
                basis = self.null_bases.get(name)
                ridge = SINGLES_RIDGE if self.ridge is None else self.ridge
                solved = solved_keys(k.double(), len(k), ridge, _double(held), _double(basis))
                updates[name], edited[name] = (solved.float(), v), k
        result = EditResult(self.model, self.params, updates, 0.0, self._spares)
        if self.remember:
            self.memory.add(result, edited)
        result.seconds = time.perf_counter() - start
        return result


def _double(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


def fit_shared(
    editor: MendEditor, requests: list[EditRequest], rank: int = 16, progress: bool = False
):
    """Fit and store (`EditorNet.set_shared`) the part of the change that all edits share.

    A trained editor's single edits are far from independent: their mean change is close to
    low rank in every matrix and holds much of a new edit's squared norm. Summing k edits (a
    batched edit) adds that part k times; counted once instead, a batch keeps far more of each
    edit. The bases are the top `rank` singular vectors of the mean single-edit Delta W
    (out, in) over `requests`.
    """
    if not requests:
        raise MendError("fit_shared needs at least one edit")
    was_training = editor.net.training
    editor.net.eval()
    total: dict[str, torch.Tensor] = {}
    try:
        for req in tqdm(requests, desc="shared part of edits", disable=not progress):
            batch = editor.batch([(req.prompt, req.target)])
            with torch.no_grad():  # capture turns gradients on where it needs them
                for name, (u, d) in editor.factors(batch).items():
                    dw = d[0].T @ u[0]  # (out, in)
                    total[name] = total[name] + dw if name in total else dw
    finally:
        editor.net.train(was_training)
    bases = {}
    for name, dw in total.items():
        left, _, right_t = torch.linalg.svd(dw / len(requests), full_matrices=False)
        r = min(rank, left.shape[1])
        bases[name] = (left[:, :r], right_t[:r].T)
    editor.net.set_shared(bases)
    return bases
