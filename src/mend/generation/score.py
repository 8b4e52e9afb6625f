"""Scores of generation edits: the continuation after each edit, and held-out perplexity.

Per edit of a prefix x_e to its n-token continuation y_e (a `mend.generation.build` record),
teacher-forced unless said otherwise:
- `edit_success`: every token of y_e is the argmax after x_e and the tokens of y_e before it.
  This is MEND's own measure for GPT models on WikiText: its reference implementation counts an
  edit as a success when all target tokens are right (`multiclass_log_probs`, `edit/acc`). It
  is also whether greedy decoding after x_e gives y_e token for token (argmax ties aside):
  `greedy_exact` checks that by decoding.
- `token_acc`: the share of y_e's tokens that are the argmax.
- `nll_lowered`: the share of edits that lower y_e's mean per-token NLL; `nll_before` and
  `nll_after` are that NLL's mean over edits on the unedited and the edited model.
- perplexity on held-out text (`heldout_windows`: windows of `WINDOW` tokens of text no edit
  came from): each edit is measured on `windows_per_edit` windows, the next edit on the next ones,
  cycling through the pool. `ppl_before` and `ppl_after` are exp of the token-weighted mean NLL
  of those measurements on the unedited model and with each edit applied. `ppl_drawdown` =
  (after - before) / before; `ppl_increase` = after - before, in perplexity units, which is what
  the reference implementation prints as its drawdown (`perplexity/post - perplexity/pre`).
"""

from __future__ import annotations

import math

import torch

from mend.data.collate import make_batch
from mend.data.text import token_windows
from mend.errors import MendError
from mend.evaluate import EditMethod, evaluate
from mend.losses import token_nll
from mend.models import context_length
from mend.models.forward import scored_logits
from mend.types import EditRequest

WINDOW = 128  # tokens per held-out window
POOL = 64  # held-out windows the edits cycle through


@torch.no_grad()
def continuation_scores(model, tokenizer, request: EditRequest) -> dict:
    """How the model continues the request's prompt: its target's mean NLL, token accuracy and
    whether every token is right (teacher-forced), and whether greedy decoding gives the
    target's tokens exactly."""
    device = next(model.parameters()).device
    batch = make_batch(tokenizer, [(request.prompt, request.target)], max_len=context_length(model))
    batch = batch.to(device)
    logits = scored_logits(model, batch)  # (n target tokens, vocab)
    labels = batch.labels[batch.pos_mask]  # (n,)
    right = logits.argmax(-1) == labels
    n_prompt = int(batch.pos_mask[0].int().argmax()) + 1  # the first scored position ends it
    prompt = batch.input_ids[:, :n_prompt]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=len(labels), do_sample=False, pad_token_id=pad)  # fmt: skip
    return {
        "nll": float(token_nll(logits, labels).mean()),
        "token_acc": float(right.float().mean()),
        "all_correct": bool(right.all()),
        "greedy_exact": out[0, n_prompt:].tolist() == labels.tolist(),
    }


def heldout_windows(model, tokenizer, text: str, pool: int = POOL) -> torch.Tensor:
    """(windows, window) token ids: the first `pool` non-overlapping windows of held-out text,
    of `WINDOW` tokens or the model's context where that is shorter."""
    window = min(WINDOW, context_length(model))
    windows = token_windows(tokenizer, text, pool, window)
    if len(windows) == 0:
        raise MendError(f"held-out text shorter than one window of {window} tokens")
    return windows


@torch.no_grad()
def window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """(windows,) summed next-token NLL of each window (window - 1 predictions each)."""
    ids = windows.to(next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (w, window - 1, V)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return nll.sum(1).cpu().double()


def summarize(before: list[dict], after: list[dict], ppl: dict | None = None) -> dict:
    """The module docstring's measures from per-edit `continuation_scores` before and after
    each edit and, in `ppl`, the held-out NLL sums measured ("before", "after": per edit, the
    summed NLL of its windows; "tokens": the predictions they hold per edit)."""
    if len(before) != len(after) or not before:
        raise MendError("need the same, non-zero number of edits scored before and after")
    n = len(before)
    out = {
        "edits": n,
        "edit_success": sum(a["all_correct"] for a in after) / n,
        "greedy_exact": sum(a["greedy_exact"] for a in after) / n,
        "token_acc": sum(a["token_acc"] for a in after) / n,
        "nll_lowered": sum(a["nll"] < b["nll"] for a, b in zip(after, before, strict=True)) / n,
        "nll_before": sum(b["nll"] for b in before) / n,
        "nll_after": sum(a["nll"] for a in after) / n,
        "pre": {
            "edit_success": sum(b["all_correct"] for b in before) / n,
            "greedy_exact": sum(b["greedy_exact"] for b in before) / n,
            "token_acc": sum(b["token_acc"] for b in before) / n,
        },
    }
    if ppl is not None:
        tokens = sum(ppl["tokens"])
        ppl_before = math.exp(sum(ppl["before"]) / tokens)
        ppl_after = math.exp(sum(ppl["after"]) / tokens)
        out |= {"ppl_before": ppl_before, "ppl_after": ppl_after,
                "ppl_drawdown": ppl_after / ppl_before - 1, "ppl_increase": ppl_after - ppl_before,
                "ppl_tokens": tokens}  # fmt: skip
    return out


def evaluate_generation(
    model,
    tokenizer,
    method: EditMethod,
    requests: list[EditRequest],
    heldout_text: str | None,
    windows_per_edit: int = 4,
    progress: bool = True,
    **kwargs,
) -> dict:
    """`mend.evaluate.evaluate` of single edits, plus the generation measures (module docstring)
    under "generation": each continuation scored before and after its edit, and the held-out
    perplexity around every edit (`heldout_text` None or `windows_per_edit` 0: not measured).

    Extra keyword arguments go to `evaluate` (e.g. `ppl_text`, `ppl_windows`).
    """
    if windows_per_edit < 0:
        raise MendError(f"held-out windows per edit must be >= 0, got {windows_per_edit}")
    before = [continuation_scores(model, tokenizer, r) for r in requests]
    windows = base = None
    if heldout_text and windows_per_edit:
        windows = heldout_windows(model, tokenizer, heldout_text)
        base = window_nll(model, windows)  # (pool,)
        windows_per_edit = min(windows_per_edit, len(windows))
    after: list[dict] = []
    ppl = {"before": [], "after": [], "tokens": []}

    def measure(i: int) -> None:  # on the model with edit i applied
        after.append(continuation_scores(model, tokenizer, requests[i]))
        if windows is not None:
            pick = [(i * windows_per_edit + j) % len(windows) for j in range(windows_per_edit)]
            ppl["before"].append(float(base[pick].sum()))
            ppl["after"].append(float(window_nll(model, windows[pick]).sum()))
            ppl["tokens"].append(len(pick) * (windows.shape[1] - 1))

    report = evaluate(model, tokenizer, method, requests, batch_size=1, progress=progress,
                      after_edit=measure, **kwargs)  # fmt: skip
    report["generation"] = summarize(before, after, ppl if windows is not None else None)
    if windows is not None:
        report["generation"] |= {"heldout_windows": len(windows),
                                 "window_tokens": windows.shape[1],
                                 "windows_per_edit": windows_per_edit}  # fmt: skip
    return report


def format_generation(g: dict) -> str:
    """The generation measures as a small text table (unedited and edited where both exist)."""
    w = 28
    lines = [f"{'generation':<{w}}{'unedited':>10}{'edited':>10}"]
    for k in ("edit_success", "greedy_exact", "token_acc"):
        lines.append(f"{k:<{w}}{g['pre'][k]:>10.3f}{g[k]:>10.3f}")
    lines.append(f"{'continuation nll':<{w}}{g['nll_before']:>10.3f}{g['nll_after']:>10.3f}")
    lines.append(f"{'nll_lowered':<{w}}{'':>10}{g['nll_lowered']:>10.3f}")
    if "ppl_before" in g:
        lines.append(f"{'held-out ppl (each edit)':<{w}}{g['ppl_before']:>10.3f}"
                     f"{g['ppl_after']:>10.3f}  ({g['ppl_drawdown']:+.2%}, "
                     f"{g['ppl_increase']:+.3f})")  # fmt: skip
    return "\n".join(lines)
