"""A training step for one least-squares edit of many requests, in memory that does not grow
with their number.

The step edits n requests with one change per matrix (`mend.aggregate`): every edited token t
(key k_t, editor output u~_t, d~_t) asks for the output change v_t = -alpha (u~_t . k_t) d~_t,
and the change is S^T = (K A^-1)^T V, A = K^T K + lambda I: the ridge least-squares change whose
output at each key is nearest its value (MALMEN, Tan et al. 2024). MALMEN's two stages keep the
editor's graph out of the model's:

1. Without autograd, capture every request's keys and gradients, run the editor and solve.
   Run the paraphrase and locality rows through the model under S, chunk by chunk, each chunk
   backpropagating its share of the loss only as far as S (a leaf). With G = dL/dS^T,
   dL/dv_t = G^T (A^-1 k_t) and dL/d(A^-1 k_t) = G v_t.
2. The ridge's gradient from a re-solve with autograd; the editor's from rerunning it over the
   captured tokens, chunk by chunk, with the proxy loss sum_t <dL/dv_t, v_t>.

`two_stage=False` computes the same losses in one autograd graph through the editor and the
solve: the plain reference the tests hold the two stages to.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from mend.aggregate import solved_keys
from mend.config import TrainConfig
from mend.edit import MendEditor
from mend.grads import capture
from mend.losses import edit_loss, kl_base_edited, row_nll
from mend.metrics import all_correct, argmax_unchanged
from mend.models.forward import scored_logits
from mend.models.upper import UpperStack
from mend.training.sampling import StepRows, build_rows

# {weight name: (keys (T, in), output gradients (T, out))} of every edited token of a step
Tokens = dict[str, tuple[torch.Tensor, torch.Tensor]]


def edited_tokens(editor: MendEditor, reqs, stack: UpperStack | None, chunk: int) -> Tokens:
    """The keys and edit-loss gradients of every token that carries a gradient, per matrix,
    captured `chunk` requests at a time (each request's gradient is its own: the edit loss
    sums over rows)."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i in range(0, len(reqs), chunk):
        b = editor.batch([(r.prompt, r.target) for r in reqs[i : i + chunk]])
        run = None
        if stack is not None:
            prepared = stack.prepare(b, base_logits=False)
            run = lambda p=prepared: stack.logits(p, scored_only=False)  # noqa: E731
        captured, _ = capture(editor.model, editor.params, b, lambda lg, b=b: edit_loss(lg, b), run)
        for name, (u, delta) in captured.items():
            mask = editor.token_mask(b, name) & (delta != 0).any(-1)
            parts.setdefault(name, []).append((u[mask], delta[mask]))
    return {
        n: (torch.cat([k for k, _ in p]), torch.cat([d for _, d in p])) for n, p in parts.items()
    }


def value_changes(editor: MendEditor, tokens: Tokens) -> dict[str, torch.Tensor]:
    """v_t = -alpha (u~_t . k_t) d~_t (T, out) per matrix: each token's own change at its key."""
    out = {}
    for name, (u_t, d_t) in editor.net(tokens).items():
        coef = (u_t * tokens[name][0]).sum(-1, keepdim=True)
        out[name] = -editor.net.alpha(name) * coef * d_t
    return out


@contextmanager
def changed(editor: MendEditor, dwt: dict[str, torch.Tensor]):
    """Run the model with each edited output moved by x @ dwt[name] (dwt: (in, out) = S^T)."""

    def make_hook(change: torch.Tensor):
        def hook(module, inputs, output):
            return output + (inputs[0].float() @ change).to(output.dtype)

        return hook

    handles = [p.module.register_forward_hook(make_hook(dwt[p.name]))
               for p in editor.params if p.name in dwt]  # fmt: skip
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _scored(editor: MendEditor, stack, pairs, dwt, with_base: bool):
    """(edited logits at the scored positions, unedited ones or None, the batch)."""
    b = editor.batch(pairs)
    if stack is None:
        base = None
        if with_base:
            with torch.no_grad():
                base = scored_logits(editor.model, b)
        with changed(editor, dwt):
            return scored_logits(editor.model, b), base, b
    prepared = stack.prepare(b, base_logits=False)
    with changed(editor, dwt):
        hidden = stack.scored_hidden(prepared)
    if not with_base:
        return stack.project(hidden), None, b
    logits = stack.project_with_base(hidden, prepared.base_hidden)
    return logits[: len(hidden)], logits[len(hidden) :].detach(), b


def _row_losses(editor, stack, rows: StepRows, dwt, cfg: TrainConfig, backward: Callable):
    """Run the step's rows under the change chunk by chunk; `backward(loss share)` after each.

    Returns the statistics of the whole step (losses as if computed in one batch)."""
    chunk = cfg.speed.chunk_rows
    n_gen = len(rows.gen)
    stats: dict[str, float] = {"l_edit": 0.0}
    ok_prompt, ok_reph = [], []
    for i in range(0, n_gen, chunk):
        logits, _, b = _scored(editor, stack, rows.gen[i : i + chunk], dwt, with_base=False)
        labels = b.labels[b.pos_mask]
        l_edit = row_nll(logits, labels, b.pos_row, len(b)).sum() / n_gen
        backward(cfg.loss.edit * l_edit)
        stats["l_edit"] += l_edit.item()
        ok = all_correct(logits.detach(), labels, b.pos_row, len(b)).tolist()
        for good, is_prompt in zip(ok, rows.gen_is_prompt[i : i + chunk], strict=True):
            (ok_prompt if is_prompt else ok_reph).append(good)
    loss = cfg.loss.edit * stats["l_edit"]
    if rows.loc:
        batches = [editor.batch(rows.loc[i : i + chunk]) for i in range(0, len(rows.loc), chunk)]
        total = sum(int(b.pos_mask.sum()) for b in batches)
        stats["l_loc"], same = 0.0, []
        for i in range(0, len(rows.loc), chunk):
            edited, base, b = _scored(editor, stack, rows.loc[i : i + chunk], dwt, with_base=True)
            l_loc = kl_base_edited(base, edited) * (len(edited) / total)
            backward(cfg.loss.locality * l_loc)
            stats["l_loc"] += l_loc.item()
            same += argmax_unchanged(base, edited.detach(), b.pos_row, len(b)).tolist()
        own = [s for s, is_own in zip(same, rows.loc_own, strict=True) if is_own]
        if own:
            stats["locality_acc"] = sum(own) / len(own)
        loss += cfg.loss.locality * stats["l_loc"]
    if ok_prompt:
        stats["rewrite_acc"] = sum(ok_prompt) / len(ok_prompt)
    if ok_reph:
        stats["rephrase_acc"] = sum(ok_reph) / len(ok_reph)
    stats["loss"] = loss
    return stats


def ls_step(
    editor: MendEditor,
    reqs,
    rows: StepRows,
    cfg: TrainConfig,
    stack: UpperStack | None = None,
    train: bool = True,
    two_stage: bool = True,
) -> dict[str, float]:
    """One least-squares edit of all of reqs, its losses on rows, and (train) the gradients
    of the editor's weights, step sizes and ridges, accumulated into their `.grad`.

    Args:
        rows: from `build_rows` with batch_size = len(reqs) (every row under the one edit).
        stack: an UpperStack for the fast path; None runs the reference path.
        train: backpropagate (False: validation, statistics only; the editor's running
            statistics are not updated).
        two_stage: MALMEN's two stages (memory flat in len(reqs)); False: one graph.

    Returns:
        The step's statistics (losses, accuracies, edit size).
    """
    net = editor.net
    chunk = cfg.speed.chunk_rows
    tokens = edited_tokens(editor, reqs, stack, chunk)
    graph = train and not two_stage
    with torch.set_grad_enabled(graph):
        values = value_changes(editor, tokens)  # (training mode: updates the running stats)
        solved = {n: solved_keys(k, len(k), net.ridge(n)) for n, (k, _) in tokens.items()}
        dwt = {n: solved[n].T @ values[n] for n in tokens}  # (in, out) = S^T
    if graph:  # the reference: one graph from the losses back to the editor
        stats = _row_losses(editor, stack, rows, dwt, cfg, lambda x: x.backward(retain_graph=True))
        return stats | {"edit_size": len(reqs)}
    if not train:
        with torch.no_grad():
            stats = _row_losses(editor, stack, rows, dwt, cfg, lambda x: None)
        return stats | {"edit_size": len(reqs)}
    # Stage 1: the losses' gradient with respect to each change S^T, chunk by chunk.
    leaves = {n: w.detach().requires_grad_(True) for n, w in dwt.items()}
    stats = _row_losses(editor, stack, rows, leaves, cfg, lambda x: x.backward())
    # Stage 2: through the solve to the values and the ridge, then into the editor.
    grad_values = {}
    for n, leaf in leaves.items():
        g = leaf.grad  # (in, out)
        grad_values[n] = solved[n] @ g  # dL/dv_t (T, out)
        keys = tokens[n][0]
        with torch.enable_grad():
            again = solved_keys(keys, len(keys), net.ridge(n))
            (again * (values[n] @ g.T)).sum().backward()  # dL/d(A^-1 k_t) = G v_t
    was_training = net.training
    net.eval()  # the running statistics were updated once, in stage 1
    try:
        longest = max(len(k) for k, _ in tokens.values())
        for i in range(0, longest, chunk * 16):
            part = {n: (k[i : i + chunk * 16], d[i : i + chunk * 16])
                    for n, (k, d) in tokens.items() if i < len(k)}  # fmt: skip
            proxy = sum((grad_values[n][i : i + chunk * 16] * v).sum()
                        for n, v in value_changes(editor, part).items())  # fmt: skip
            proxy.backward()
    finally:
        net.train(was_training)
    return stats | {"edit_size": len(reqs)}


def validate_ls(editor: MendEditor, val, cfg: TrainConfig, stack=None) -> dict[str, float]:
    """Mean losses and accuracies of least-squares edits of each size in
    `sampling.edit_sizes` (at least 32 edits of each size that the validation edits allow),
    averaged over the sizes; each size's own accuracies as e.g. "rewrite_acc@100"."""
    was_training = editor.net.training
    editor.net.eval()
    per_size: dict[int, dict[str, float]] = {}
    try:
        for n in [n for n in cfg.sampling.edit_sizes if n <= len(val)]:
            count = n * max(1, min(len(val), 32) // n)
            totals: dict[str, float] = {}
            for i in range(0, count, n):
                reqs = val[i : i + n]
                rows = build_rows(reqs, val, cfg.sampling, None, None, n)
                for k, v in ls_step(editor, reqs, rows, cfg, stack, train=False).items():
                    totals[k] = totals.get(k, 0.0) + v * n / count
            per_size[n] = totals
    finally:
        editor.net.train(was_training)
    keys = set.intersection(*(set(s) for s in per_size.values()))
    out = {k: sum(s[k] for s in per_size.values()) / len(per_size) for k in keys}
    for n, s in per_size.items():
        out |= {f"{k}@{n}": v for k, v in s.items() if k.endswith("_acc")}
    return out
