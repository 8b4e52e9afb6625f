"""Run only the top of the model: the blocks from the first edited one, the final norm, the head.

Edits touch only the last few blocks, so everything below them is the same with or without an
edit. `UpperStack.prepare` runs the whole model once without gradients, keeping the hidden state
that enters the first edited block and the exact arguments each upper block was called with;
`UpperStack.logits` then reruns just those blocks (with gradients, under any edit hooks).

Training sees the same rows (a prompt with its target) again and again: every epoch, and as
locality inputs of other edits. With a `RowCache`, the hidden state entering the first upper
block is kept per row, and a batch whose rows are all known skips the lower blocks entirely:
they are swapped for pass-throughs while the model's own forward still builds the masks and
position embeddings each upper block needs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mend.models.archs import arch_for
from mend.models.head import project, project_with_base
from mend.types import CAUSAL


@dataclass
class Prepared:
    """A batch whose lower blocks have run: the top's input and each upper block's call."""

    hidden: torch.Tensor  # (R, S, hidden) input of the first upper block
    calls: list[tuple[tuple, dict]]  # (args, kwargs) each upper block was called with
    pos_mask: torch.Tensor  # (R, S) scored positions
    base_hidden: torch.Tensor | None = None  # (P, hidden) unedited final states at scored positions
    base_logits: torch.Tensor | None = None  # (P, V) their projection, when asked for


class RowCache:
    """Per row: the hidden states entering the first upper block and leaving the final norm.

    Keyed by the row's token ids, so a hit is exact. The second tensor gives the unedited
    logits of a row without running any block. Stops storing (but keeps serving) once
    `max_bytes` is reached.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.rows: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0
        self.full = False  # a row did not fit

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.rows.get(key)

    def put(self, key: tuple[int, ...], first: torch.Tensor, final: torch.Tensor) -> None:
        size = (first.numel() + final.numel()) * first.element_size()
        if self.bytes + size <= self.max_bytes:
            self.rows[key] = (first.clone(), final.clone())
            self.bytes += size
        else:
            self.full = True


def _pass_through(n_outputs: int | None):
    """A stand-in for a skipped block: returns its input hidden state in the block's format."""

    def forward(*args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return h if n_outputs is None else (h,) + (None,) * (n_outputs - 1)

    return forward


@contextmanager
def _swapped(forwards: dict):
    """Run with each module's `forward` replaced by the given function; restored on exit."""
    saved = {m: m.__dict__.get("forward") for m in forwards}
    try:
        for m, forward in forwards.items():
            m.forward = forward
        yield
    finally:
        for m, f in saved.items():
            if f is None:
                del m.forward
            else:
                m.forward = f


def _at_positions(forward, order: torch.Tensor):
    """A position-wise module's forward computed only at `order` (R, W) of each row.

    The other positions of its output are zeros: fine wherever nothing reads them.
    """

    def run(x, *args, **kwargs):
        idx = order[..., None]
        y = forward(x.gather(1, idx.expand(-1, -1, x.shape[-1])), *args, **kwargs)
        out = y.new_zeros(*x.shape[:-1], y.shape[-1])
        return out.scatter(1, idx.expand(-1, -1, y.shape[-1]), y)

    return run


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matrix products beat fp32 here: a bf16-capable GPU, or a CPU with bf16
    units (oneDNN's check, e.g. avx512_bf16 or AMX); elsewhere bf16 is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def _autocast(forward, device_type: str, dtype: torch.dtype):
    """A block's forward with its matrix products in `dtype` (autocast)."""

    def run(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    return run


class UpperStack:
    """Cache below block `start`, rerun from there.

    Args:
        model: a causal LM of a family in the architecture table.
        start: index of the first block to rerun.
        cache: a RowCache to reuse the lower blocks' output across calls (None: no reuse).
        lower_dtype: run the lower blocks' matrix products in this dtype (e.g. bfloat16,
            faster where the hardware has bf16 units). The upper blocks and everything
            computed from the cached hidden state stay in the model's dtype, so base and
            edited logits share the same input and an empty edit still changes nothing.
    """

    def __init__(
        self,
        model,
        start: int,
        cache: RowCache | None = None,
        lower_dtype: torch.dtype | None = None,
    ):
        arch = arch_for(model)
        self.lower_dtype = lower_dtype
        self.model = model
        all_blocks = list(model.get_submodule(arch.blocks))
        self.lower, self.blocks = all_blocks[:start], all_blocks[start:]
        self.norm = model.get_submodule(arch.final_norm)
        self.head = model.get_output_embeddings()
        self.cache = cache
        # The last block's MLP feeds only the final norm and the head, which read just the
        # scored positions: `scored_hidden` runs it there alone (a third of the upper MLPs).
        mlp = arch.mlp[0].rpartition(".")[0]
        self._last_mlp = self.blocks[-1].get_submodule(mlp) if mlp and self.blocks else None
        self._n_outputs: int | None = None  # a block's output: a tensor (None) or a tuple
        self._format_known = False  # set by the first full forward

    @staticmethod
    def first_edited_block(model, names: list[str]) -> int | None:
        """Index of the lowest block holding an edited weight; None if one lies outside blocks
        or the model is not a causal LM (seq2seq models and classifiers run the plain full
        forward: their rows are short and the fast path knows one stack of blocks)."""
        arch = arch_for(model)
        if arch.kind != CAUSAL:
            return None
        prefix = arch.blocks + "."
        indices = []
        for name in names:
            if not name.startswith(prefix):
                return None
            indices.append(int(name[len(prefix) :].split(".")[0]))
        return min(indices)

    @torch.no_grad()
    def prepare(self, batch, base_logits: bool = True) -> Prepared:
        """No-grad forward of batch, keeping what `logits` needs.

        Args:
            base_logits: also project `base_hidden` to the unedited logits. Callers that
                project other states too can leave it off and project everything in one call.
        """
        if self.cache is None or not self.lower:
            return self._finish(*self._run(batch), base_logits)
        lengths = batch.attention_mask.sum(1).tolist()
        keys = [tuple(batch.input_ids[r, :n].tolist()) for r, n in enumerate(lengths)]
        rows = [self.cache.get(k) for k in keys]
        missing = [r for r, row in enumerate(rows) if row is None]
        self.cache.hits += len(keys) - len(missing)
        self.cache.misses += len(missing)
        if missing or not self._format_known:  # (a shared cache can be new to this stack)
            everything = len(missing) == len(keys) or not self._format_known
            sub = batch if everything else batch.select(missing)
            fresh, final = self._run(sub)
            for i, r in enumerate(range(len(keys)) if everything else missing):
                rows[r] = (fresh.hidden[i, : lengths[r]], final[i, : lengths[r]])
                self.cache.put(keys[r], *rows[r])
            if everything:
                return self._finish(fresh, final, base_logits)
        first, final = (self._pad([row[i] for row in rows], lengths) for i in (0, 1))
        prepared, _ = self._run(batch, first)
        return self._finish(prepared, final, base_logits)

    def _finish(self, prepared: Prepared, final: torch.Tensor, base_logits: bool) -> Prepared:
        prepared.base_hidden = final[prepared.pos_mask]
        if base_logits:
            prepared.base_logits = self.project(prepared.base_hidden)
        return prepared

    @staticmethod
    def _pad(rows: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
        out = rows[0].new_zeros(len(rows), max(lengths), rows[0].shape[-1])
        for r, h in enumerate(rows):
            out[r, : lengths[r]] = h
        return out

    def record(self, batch) -> tuple[Prepared, torch.Tensor]:
        """A plain forward of batch (with gradients where the caller's mode allows) that also
        records what `logits` needs to rerun the upper blocks on it later.

        Returns:
            (Prepared, final normed hidden states (R, S, hidden)).
        """
        prepared, final = self._run(batch)
        prepared.hidden = prepared.hidden.detach()
        return prepared, final

    def _run(self, batch, first: torch.Tensor | None = None):
        """The model's forward, recording each upper block's call.

        Without `first`, a plain forward; returns (Prepared, final normed hidden states).
        With `first` (the cached input of the first upper block), every block is a
        pass-through: the forward only builds what each upper block is called with (masks,
        position embeddings), and `first` is recorded as the upper blocks' input.
        """
        calls = []

        def grab(module, args, kwargs):
            calls.append((args, kwargs))

        def shape(module, args, output):
            self._n_outputs = len(output) if isinstance(output, tuple) else None
            self._format_known = True

        handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in self.blocks]
        if first is None:
            handles.append(self.blocks[0].register_forward_hook(shape))
        if first is not None:
            swapped = {b: _pass_through(self._n_outputs) for b in self.lower + self.blocks}
        elif self.lower_dtype is not None:
            device = batch.input_ids.device.type
            swapped = {b: _autocast(b.forward, device, self.lower_dtype) for b in self.lower}
        else:
            swapped = {}
        try:
            with _swapped(swapped):
                out = self.model.base_model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                )
        finally:
            for h in handles:
                h.remove()
        if first is None:
            args, kwargs = calls[0]
            first = args[0] if args else kwargs["hidden_states"]
        return Prepared(first, calls, batch.pos_mask), out.last_hidden_state

    def logits(self, prepared: Prepared, scored_only: bool = True) -> torch.Tensor:
        """Scored logits (P, V) of a prepared batch, running only the upper blocks."""
        return self.project(self.scored_hidden(prepared, scored_only))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The vocabulary projection of final normed hidden states, as fp32 logits.

        For a small model it is a large share of a step, and it costs about the same for a
        few positions as for tens of them (it reads the whole matrix): callers batch positions
        into one call.
        """
        return project(self.head, hidden)

    def project_with_base(self, hidden: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """`project` of hidden and base stacked, with a gradient into hidden only."""
        return project_with_base(self.head, hidden, base)

    def scored_hidden(self, prepared: Prepared, scored_only: bool = True) -> torch.Tensor:
        """Final normed hidden states (P, d) at the scored positions, running the upper blocks.

        Args:
            scored_only: run the last block's MLP at the scored positions alone (the others
                feed nothing that is read). Off for callers that hook every position of that
                MLP's weights, such as gradient capture.
        """
        swapped = {}
        if scored_only and self._last_mlp is not None and bool(prepared.pos_mask.any()):
            mask = prepared.pos_mask
            width = int(mask.sum(1).max())  # scored positions first, in order; then padding
            order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices
            swapped[self._last_mlp] = _at_positions(self._last_mlp.forward, order[:, :width])
        h = prepared.hidden
        with _swapped(swapped):
            for block, (args, kwargs) in zip(self.blocks, prepared.calls, strict=True):
                if args:
                    out = block(h, *args[1:], **kwargs)
                else:
                    out = block(**(kwargs | {"hidden_states": h}))
                h = out[0] if isinstance(out, tuple) else out
        return self.norm(h)[prepared.pos_mask]
