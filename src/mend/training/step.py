"""One training step's losses, by the fast path or the reference path, and validation.

Each step edits `edits_per_step` facts side by side (every row of the batch carries its own
low-rank edit, see edit.py), so a step costs three batched forward passes of the base model:
the edit inputs (with backward through the edited blocks), the paraphrases and locality
inputs under their edits, and the locality inputs under the base model.
"""

from __future__ import annotations

import torch

from mend.config import TrainConfig
from mend.edit import MendEditor
from mend.grads import capture
from mend.losses import edit_loss, kl_base_edited, masked_nll
from mend.metrics import all_correct, argmax_unchanged
from mend.models.forward import scored_logits
from mend.models.upper import UpperStack
from mend.training.sampling import StepRows, build_rows
from mend.types import EditRequest


def forward_reference(
    editor: MendEditor, reqs: list[EditRequest], rows: StepRows, batch_size: int = 1
):
    """Straightforward path: full forward passes for the edit, the edited rows and the base rows.

    Returns:
        (factors, edited logits (P_gen + P_loc, V), base logits (P_loc, V) or None,
        the row of each scored position, its label).
    """
    edit_b = editor.batch([(r.prompt, r.target) for r in reqs])
    factors = editor.factors(edit_b, batch_size=batch_size)
    both = editor.batch(rows.gen + rows.loc, rows.gen_group + rows.loc_group)
    with editor.applied(factors, both.group):
        edited = scored_logits(editor.model, both)  # (P_gen + P_loc, V)
    base = None
    if rows.loc:
        with torch.no_grad():
            base = scored_logits(editor.model, editor.batch(rows.loc, rows.loc_group))
    return factors, edited, base, both.pos_row, both.labels[both.pos_mask]


def forward_fast(
    editor: MendEditor,
    stack: UpperStack,
    reqs: list[EditRequest],
    rows: StepRows,
    batch_size: int = 1,
):
    """Same results as `forward_reference`, running the lower blocks once, without gradients.

    The edit, paraphrase and locality rows are three tightly padded batches. A no-grad pass
    of each caches the input of the first edited block and the unedited final states; the
    edit's gradient and the edited states then rerun only the upper blocks. With the stack's
    RowCache, rows seen before skip the lower blocks altogether. One vocabulary projection
    serves the edited paraphrase and locality states and the unedited locality states.
    """
    edit_b = editor.batch([(r.prompt, r.target) for r in reqs])
    edit_p = stack.prepare(edit_b, base_logits=False)
    captured, _ = capture(
        editor.model,
        editor.params,
        edit_b,
        lambda lg: edit_loss(lg, edit_b),
        run=lambda: stack.logits(edit_p, scored_only=False),  # capture sees every position
    )
    factors = editor.factors(edit_b, batch_size=batch_size, captured=captured)
    hidden, rows_of, labels, base_hidden = [], [], [], None
    for pairs, groups, is_loc in ((rows.gen, rows.gen_group, False), (rows.loc, rows.loc_group, True)):  # fmt: skip
        if not pairs:
            continue
        b = editor.batch(pairs, groups)
        prepared = stack.prepare(b, base_logits=False)
        with editor.applied(factors, b.group):
            hidden.append(stack.scored_hidden(prepared))
        rows_of.append(b.pos_row + (len(rows.gen) if is_loc else 0))
        labels.append(b.labels[b.pos_mask])
        if is_loc:
            base_hidden = prepared.base_hidden
    n_edited = sum(len(h) for h in hidden)
    logits = stack.project_with_base(torch.cat(hidden), base_hidden)
    base = logits[n_edited:].detach() if base_hidden is not None else None
    return factors, logits[:n_edited], base, torch.cat(rows_of), torch.cat(labels)


def edit_step(
    editor: MendEditor,
    reqs: list[EditRequest],
    rows: StepRows,
    cfg: TrainConfig,
    stack: UpperStack | None = None,
    batch_size: int = 1,
):
    """Losses (and accuracies) of editing each of reqs independently, or `batch_size` at a time.

    Args:
        rows: from `build_rows` with the same `batch_size`.
        stack: an UpperStack for the fast path; None runs the reference path.
        batch_size: requests per edit (1: every edit alone).

    Returns:
        (loss with graph into the editor, dict of float statistics).
    """
    if stack is None:
        factors, logits, base, rows_of, labels = forward_reference(editor, reqs, rows, batch_size)
    else:
        factors, logits, base, rows_of, labels = forward_fast(editor, stack, reqs, rows, batch_size)
    n_gen = len(rows.gen)
    gen_pos = rows_of < n_gen
    l_edit = masked_nll(logits[gen_pos], labels[gen_pos], rows_of[gen_pos], n_gen)
    gen_ok = all_correct(logits[gen_pos], labels[gen_pos], rows_of[gen_pos], n_gen)
    stats = {"l_edit": l_edit.item()}
    is_prompt = torch.tensor(rows.gen_is_prompt, device=gen_ok.device)
    if is_prompt.any():
        stats["rewrite_acc"] = gen_ok[is_prompt].float().mean().item()
    if (~is_prompt).any():
        stats["rephrase_acc"] = gen_ok[~is_prompt].float().mean().item()
    l_loc = logits.sum() * 0
    if base is not None:
        edited = logits[~gen_pos]
        l_loc = kl_base_edited(base, edited)
        same = argmax_unchanged(base, edited, rows_of[~gen_pos] - n_gen, len(rows.loc))
        own = torch.tensor(rows.loc_own, device=same.device)
        if own.any():
            stats["locality_acc"] = same[own].float().mean().item()
        stats["l_loc"] = l_loc.item()
    loss = cfg.loss.edit * l_edit + cfg.loss.locality * l_loc
    stats["loss"] = loss.item()
    return loss, stats


def validate(
    editor: MendEditor, val: list[EditRequest], cfg: TrainConfig, stack=None
) -> dict[str, float]:
    """Mean losses and accuracies over the validation edits (editor frozen, stats fixed)."""
    editor.net.eval()
    totals: dict[str, list[float]] = {}
    n = cfg.sampling.edits_per_step
    with torch.no_grad():
        for i in range(0, len(val), n):
            reqs = val[i : i + n]
            _, stats = edit_step(
                editor, reqs, build_rows(reqs, val, cfg.sampling, None), cfg, stack
            )
            for k, v in stats.items():
                totals.setdefault(k, []).append(v * len(reqs))
    editor.net.train()
    return {k: sum(v) / len(val) for k, v in totals.items()}


def selection_key(val: dict[str, float]) -> float:
    """How good a validation result is for choosing the checkpoint; lower is better.

    One minus the mean of the rewrite, rephrase and locality accuracies, ties broken by the
    loss. (The loss alone can mislead: late in training the KL on a few locality probes may
    grow while every accuracy still rises.)
    """
    accs = [val[k] for k in ("rewrite_acc", "rephrase_acc", "locality_acc") if k in val]
    return 1 - sum(accs) / len(accs) + 1e-4 * val["loss"]
