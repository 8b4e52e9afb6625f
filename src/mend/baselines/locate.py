"""Locate-then-edit peers: ROME, MEMIT and AlphaEdit.

All three write a fact into the output matrix of one or more MLPs (down_proj, c_proj,
dense_4h_to_h, fc_out), at the key the subject's last token gives that matrix:

1. **Target hidden state.** A vector delta_i added to block L's output (the last edited
   block) at the subject's last token is optimised so the new target's NLL falls, over the
   prompt alone and after a few short prefixes of the model's own text, with a KL term
   keeping "<subject> is a"'s next-token distribution, a weight decay and a norm clamp
   (Meng et al. 2022, 2023). Block L's output there, plus delta_i, is z_i.
2. **Keys.** k_i: the edited matrix's input at the subject's last token, averaged over the
   same prompts.
3. **Closed-form change.** ROME (one block): W += r k^T C0^-1 / (k^T C0^-1 k), r = delta, a
   rank-one change with C0 = E[k k^T] over ordinary text. MEMIT (several blocks, lowest
   first): what z_i still lacks at block L, split evenly over the blocks left, is written by
   R K^T (mom2_weight C0 + K K^T)^-1. AlphaEdit: the same residuals, the change restricted
   to the null space of C0 and solved to also leave the keys of earlier edits in place.

C0 comes from `key_stats.text_key_moments` (cached per model and matrix). Every change is
kept as low-rank factors (u_i = the solved key, d_i = r_i), so an edit applies, reverts,
saves and exports like any other `EditResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from mend.aggregate import KeyMemory, null_space_basis, solved_keys
from mend.data.collate import make_batch
from mend.errors import MendError
from mend.key_stats import text_key_moments
from mend.losses import row_nll
from mend.models import context_length
from mend.models.archs import arch_for
from mend.models.params import find_editable
from mend.models.upper import UpperStack
from mend.result import EditResult
from mend.types import EditRequest

log = logging.getLogger(__name__)
STARTS = ("The", "Therefore", "Because", "I", "You")  # the prefixes' openings (ROME's)


@dataclass(frozen=True)
class LocateConfig:
    """Settings of the locate-then-edit methods (defaults: ROME's and MEMIT's published ones,
    except where noted).

    Attributes:
        layers: the edited blocks (ROME: one); their MLP output matrices change.
        steps: Adam steps optimising each target (MEMIT: 25 on GPT-J).
        lr: their learning rate.
        kl_weight: weight of the "<subject> is a" KL term.
        weight_decay: weight of |delta|^2 / |h|^2.
        clamp: |delta| is kept below clamp * |h| (h: block L's output there, unedited).
        stop_nll: steps stop once every prompt's mean target NLL is below this.
        prefixes: how many short prefixes of the model's own text (each `prefix_tokens`
            long) join the bare prompt (ROME: 10, MEMIT: 5 of 10 tokens).
        mom2_weight: MEMIT's weight of C0 against the edited keys (15,000 on GPT-J).
        null_space: AlphaEdit: the share of C0's energy the change may meet (see
            `aggregate.null_space_basis`).
        ridge: AlphaEdit's ridge, relative to the keys' mean squared norm.
        text, text_tokens: the text C0 is estimated on, and how many tokens of it.
    """

    layers: tuple[int, ...]
    steps: int = 25
    lr: float = 0.5
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    stop_nll: float = 0.05
    prefixes: int = 5
    prefix_tokens: int = 10
    mom2_weight: float = 15000.0
    null_space: float = 0.02
    ridge: float = 0.1
    text: str = "wikitext-valid"
    text_tokens: int = 100_000

    @classmethod
    def published(cls, method: str, layers: tuple[int, ...], **changes) -> LocateConfig:
        """The published settings of `method` on `layers`, ROME's (GPT-2 XL: 20 steps, norm
        clamp 4) or MEMIT's and AlphaEdit's (GPT-J: 25 steps, clamp 0.75), with 5 prefixes
        (MEMIT's count; ROME used 10) and `changes` on top."""
        if method == "rome":
            base = cls(layers=layers, steps=20, clamp=4.0, prefixes=5)
        else:
            base = cls(layers=layers, steps=25, clamp=0.75, prefixes=5)
        return dataclasses.replace(base, **changes)


def subject_position(tokenizer, text: str, subject: str | None) -> int:
    """Index of the token that ends the subject's last occurrence in text (the last token of
    text when the subject is unknown or absent)."""
    end = -1
    if subject:
        at = text.rfind(subject)
        if at < 0:
            at = text.lower().rfind(subject.lower())
        end = at + len(subject) if at >= 0 else -1
    if end < 0:
        end = len(text.rstrip())
    return len(tokenizer(text[:end])["input_ids"]) - 1


class LocateEditor:
    """ROME, MEMIT or AlphaEdit on a causal LM of the architecture table.

    Args:
        method: "rome" (one block, one rank-one change per request, in turn), "memit" or
            "alphaedit" (all requests of an edit at once, over every block of the window).
        config: LocateConfig; its `layers` default to `default_layers(model, method)`.
        text_moments: {matrix name: C0}, when already at hand (else read from the cache or
            computed once).
    """

    def __init__(self, model, tokenizer, method: str = "memit", config: LocateConfig | None = None,
                 text_moments: dict[str, torch.Tensor] | None = None, progress: bool = True):  # fmt: skip
        if method not in ("rome", "memit", "alphaedit"):
            raise MendError(f"unknown locate-then-edit method {method!r}")
        self.model, self.tokenizer, self.method = model, tokenizer, method
        config = config or LocateConfig.published(method, default_layers(model, method))
        self.config = config = dataclasses.replace(config, layers=tuple(sorted(set(config.layers))))
        layers = config.layers
        n_blocks = len(model.get_submodule(arch_for(model).blocks))
        if not layers or any(not 0 <= i < n_blocks for i in layers):
            raise MendError(f"layers {layers} are not blocks of this {n_blocks}-block model")
        if method == "rome" and len(layers) != 1:
            raise MendError(f"ROME edits one block, got layers {layers}")
        if max(layers) == n_blocks - 1:
            raise MendError(
                "the last block cannot be the last edited one (its output is the head's input)"
            )
        arch = arch_for(model)
        self.params = find_editable(model, [f"{arch.blocks}.{i}.{arch.mlp[-1]}" for i in layers])
        self.block = model.get_submodule(f"{arch.blocks}.{max(layers)}")
        self.stack = UpperStack(model, max(layers) + 1)
        self.max_len = context_length(model)
        self.moments = text_moments or text_key_moments(
            model, tokenizer, self.params, self.config.text, self.config.text_tokens, progress
        )  # fmt: skip
        self.basis = None
        if method == "alphaedit":
            self.basis = {
                p.name: null_space_basis(self.moments[p.name], self.config.null_space)
                for p in self.params
            }  # fmt: skip
        self.memory = KeyMemory()  # AlphaEdit: the keys of earlier edits still applied
        self._templates: list[str] | None = None

    # -- the pieces ----------------------------------------------------------------------

    def templates(self) -> list[str]:
        """ "{}" and the prefixed forms "<prefix>. {}" of a prompt (the prefixes: greedy
        continuations of ROME's openings by the unedited model, made once)."""
        if self._templates is None:
            out = ["{}"]
            device = self.params[0].weight.device
            for start in STARTS[: self.config.prefixes]:
                ids = self.tokenizer(start, return_tensors="pt")["input_ids"].to(device)
                with torch.no_grad():
                    gen = self.model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=self.config.prefix_tokens,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )  # fmt: skip
                text = self.tokenizer.decode(gen[0], skip_special_tokens=True)
                out.append(text.replace("{", " ").replace("}", " ").strip() + ". {}")
            self._templates = out
        return self._templates

    def _rows(self, requests: list[EditRequest], targets: bool):
        """Every request's prompt in every template (and, with targets, each request's
        "<subject> is a"): the batch, each row's request and subject-token position."""
        pairs, owner, pos = [], [], []
        for i, r in enumerate(requests):
            for t in self.templates():
                text = t.format(r.prompt)
                pairs.append((text, r.target if targets else None))
                owner.append(i)
                pos.append(subject_position(self.tokenizer, text, r.subject))
        if targets:  # KL rows, scored at their last token with an unknown label
            for i, r in enumerate(requests):
                text = f"{r.subject or r.prompt} is a"
                pairs.append((text, None))
                owner.append(i)
                pos.append(subject_position(self.tokenizer, text, r.subject))
        device = self.params[0].weight.device
        batch = make_batch(self.tokenizer, pairs, max_len=self.max_len).to(device)
        return batch, torch.tensor(owner, device=device), torch.tensor(pos, device=device)

    def target_deltas(self, requests: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta (n, hidden), h (n, hidden)): what to add to block L's output at each
        subject's last token of the bare prompt, and that output unedited."""
        n = len(requests)
        batch, owner, pos = self._rows(requests, targets=True)
        rows = torch.arange(len(batch), device=owner.device)
        prepared = self.stack.prepare(batch)
        base = prepared.hidden.detach()
        bare = rows[: len(rows) - n].reshape(n, -1)[:, 0]
        h = base[bare, pos[bare]]  # (n, hidden)
        delta = torch.zeros_like(h, requires_grad=True)
        frozen = [w for w in self.model.parameters() if w.requires_grad]
        for w in frozen:  # (only delta needs a gradient)
            w.requires_grad_(False)
        try:
            return self._optimise(delta, h, base, rows, pos, owner, prepared, batch, n)
        finally:
            for w in frozen:
                w.requires_grad_(True)

    def _optimise(self, delta, h, base, rows, pos, owner, prepared, batch, n):
        cfg = self.config
        opt = torch.optim.Adam([delta], lr=cfg.lr)
        scored_row = batch.pos_row
        labels = batch.labels[batch.pos_mask]
        is_kl = scored_row >= len(rows) - n
        target_rows = len(rows) - n
        kl_base = prepared.base_logits[is_kl]
        for _ in range(cfg.steps):
            hidden = base.index_put((rows, pos), base[rows, pos] + delta[owner])
            logits = self.stack.logits(dataclasses.replace(prepared, hidden=hidden))
            nll = row_nll(logits[~is_kl], labels[~is_kl], scored_row[~is_kl], target_rows)
            nll = nll.reshape(n, -1).mean(1)  # (n,) over each request's prompts
            kl = kl_rows(kl_base, logits[is_kl])
            decay = (delta.norm(dim=1) / h.norm(dim=1)) ** 2
            loss = nll + cfg.kl_weight * kl + cfg.weight_decay * decay
            if float(nll.detach().max()) < cfg.stop_nll:
                break
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            with torch.no_grad():  # the norm clamp
                limit = cfg.clamp * h.norm(dim=1, keepdim=True)
                delta.mul_((limit / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1))
        return delta.detach(), h

    @torch.no_grad()
    def keys_and_outputs(self, requests: list[EditRequest]):
        """({matrix: keys (n, in)} averaged over the templates, block L's output (n, hidden)
        at each bare prompt's subject token), under the weights as they are now."""
        batch, owner, pos = self._rows(requests, targets=False)
        n, found = len(requests), {}
        rows = torch.arange(len(batch), device=owner.device)

        def grab(name):
            def hook(module, inputs, output):
                found[name] = inputs[0][rows, pos].float()

            return hook

        def grab_out(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            found["out"] = out[rows, pos].float()

        handles = [p.module.register_forward_hook(grab(p.name)) for p in self.params]
        handles.append(self.block.register_forward_hook(grab_out))
        try:
            self.model.base_model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            )
        finally:
            for h in handles:
                h.remove()
        keys = {p.name: found[p.name].reshape(n, -1, p.in_out[0]).mean(1) for p in self.params}
        return keys, found["out"].reshape(n, -1, found["out"].shape[-1])[:, 0]

    # -- edits ---------------------------------------------------------------------------

    def edit(self, requests: list[EditRequest]) -> EditResult:
        if not requests:
            raise MendError("no edit requests")
        start = time.perf_counter()
        if self.method == "rome":
            pieces, applied = [], []
            try:  # one request after another, each on the model the last one left
                for r in requests:
                    pieces.append(self._rome(r))
                    applied.append(EditResult(self.model, self.params, pieces[-1], 0.0))
            finally:
                for result in reversed(applied):
                    result.revert()
            updates = {
                name: tuple(torch.cat([piece[name][j] for piece in pieces]) for j in (0, 1))
                for name in pieces[0]
            }  # fmt: skip
            keys = {}
        else:
            updates, keys = self._memit(requests)
        result = EditResult(self.model, self.params, updates, time.perf_counter() - start)
        if self.method == "alphaedit":
            self.memory.add(result, keys)
        return result

    def _rome(self, request: EditRequest) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One request's rank-one change, as factors (u (1, in), d (1, out))."""
        delta, _ = self.target_deltas([request])
        keys, _ = self.keys_and_outputs([request])
        (p,) = self.params
        k = keys[p.name].double()  # (1, in)
        c_inv_k = torch.linalg.solve(self.moments[p.name].double(), k.T).T  # (1, in)
        u = (c_inv_k / (c_inv_k * k).sum()).float()
        return {p.name: (u, delta.float())}

    def _memit(self, requests: list[EditRequest]):
        """The window's changes, lowest block first, each applied before the next block's
        keys are read; all taken back at the end and returned as factors."""
        delta, h = self.target_deltas(requests)
        z = h + delta  # (h: block L's output there, unedited: what the first block sees)
        updates, used_keys, applied = {}, {}, []
        try:
            for left, p in zip(range(len(self.params), 0, -1), self.params, strict=True):
                keys, now = self.keys_and_outputs(requests)
                k = keys[p.name]  # (n, in)
                resid = (z - now) / left  # (n, hidden)
                if self.method == "memit":
                    held = self.config.mom2_weight * self.moments[p.name]
                    u = solved_keys(k.double(), len(k), 0.0, held.double()).float()
                else:
                    held = self.memory.held(p.name)
                    u = solved_keys(
                        k.double(), len(k), self.config.ridge,
                        None if held is None else held.double(), self.basis[p.name].double(),
                    ).float()  # fmt: skip
                updates[p.name], used_keys[p.name] = (u, resid.float()), k
                applied.append(EditResult(self.model, [p], {p.name: updates[p.name]}, 0.0))
        finally:
            for result in reversed(applied):
                result.revert()
        return updates, used_keys


def kl_rows(base_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_edited) of each row (n, V) -> (n,)."""
    base = torch.log_softmax(base_logits, -1)
    return (base.exp() * (base - torch.log_softmax(edited_logits, -1))).sum(-1)


def default_layers(model, method: str) -> tuple[int, ...]:
    """The edited blocks when none are given: for a model of n blocks, a window of
    max(1, round(5 n / 28)) blocks ending at round(8 n / 28) (MEMIT's GPT-J window, blocks
    3-8 of 28, scaled); ROME takes the window's last block."""
    n = len(model.get_submodule(arch_for(model).blocks))
    last = min(n - 1, max(0, round(8 * n / 28)))
    width = max(1, round(5 * n / 28))
    window = tuple(range(max(0, last - width + 1), last + 1))
    return window[-1:] if method == "rome" else window
