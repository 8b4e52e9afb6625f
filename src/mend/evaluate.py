"""Score any editing method over a data set: accuracies, CounterFact scores, edit time."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Protocol

import torch
from tqdm.auto import tqdm

from mend.data.collate import make_batch
from mend.data.text import token_windows
from mend.errors import MendError
from mend.metrics import all_correct, argmax_unchanged, mean_logprob
from mend.models import context_length
from mend.models.forward import scored_logits
from mend.result import EditResult
from mend.types import EditRequest


class EditMethod(Protocol):
    """Anything that applies a batch of edits in place and returns a revertible result."""

    def edit(self, requests: list[EditRequest]) -> EditResult: ...


REWRITE, REPHRASE, LOCALITY, OTHER = "rewrite_acc", "rephrase_acc", "locality_acc", "other"


def _probe_rows(reqs: list[EditRequest]):
    """Every probe of the given edits.

    Returns:
        (pairs, kinds, owners, comparisons): the (prompt, target) rows, what each row scores,
        the index of the request each row belongs to, and the CounterFact comparisons as
        (metric, row that should be likelier, row it is compared to).
    """
    pairs, kinds, owners, comparisons = [], [], [], []

    def add(prompt, target, kind, i) -> int:
        pairs.append((prompt, target))
        kinds.append(kind)
        owners.append(i)
        return len(pairs) - 1

    for i, r in enumerate(reqs):
        rewrite = add(r.prompt, r.target, REWRITE, i)
        rephrase = [add(p, r.target, REPHRASE, i) for p in r.rephrases]
        for probe in r.locality:
            add(probe.prompt, probe.answer, LOCALITY, i)
        if r.target_true:
            comparisons.append(("efficacy_score", rewrite, add(r.prompt, r.target_true, OTHER, i)))
            for p, new in zip(r.rephrases, rephrase, strict=True):
                comparisons.append(("paraphrase_score", new, add(p, r.target_true, OTHER, i)))
            for p in r.neighborhood:
                true = add(p, r.target_true, OTHER, i)
                comparisons.append(("neighborhood_score", true, add(p, r.target, OTHER, i)))
    return pairs, kinds, owners, comparisons


def _score(logits, batch, kinds, owners, comparisons, base_logits=None) -> list[dict]:
    """Per request, per-metric lists of 0/1 outcomes for one forward pass of the probe batch."""
    rows = batch.pos_row
    labels = batch.labels[batch.pos_mask]
    n = len(batch)
    correct = all_correct(logits, labels, rows, n).tolist()
    logp = mean_logprob(logits, labels, rows, n).tolist()
    unchanged = [True] * n
    if base_logits is not None:
        unchanged = argmax_unchanged(base_logits, logits, rows, n).tolist()
    out = [defaultdict(list) for _ in range(max(owners, default=-1) + 1)]
    for r, kind in enumerate(kinds):
        if kind in (REWRITE, REPHRASE):
            out[owners[r]][kind].append(float(correct[r]))
        elif kind == LOCALITY:
            out[owners[r]][kind].append(float(unchanged[r]))
    for metric, win, lose in comparisons:
        out[owners[win]][metric].append(float(logp[win] > logp[lose]))
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def score(model, tokenizer, requests: list[EditRequest], base: dict | None = None) -> dict:
    """Score the model as it is now on every probe of `requests`.

    Args:
        base: an earlier `score(...)` result for the same requests on the unedited model;
            needed for locality (predictions unchanged).

    Returns:
        {"metrics": {metric: [0/1 per probe]}, "per_request": the same for each request,
         "logits": the probe logits (for later `base`)}.
    """
    pairs, kinds, owners, comparisons = _probe_rows(requests)
    device = next(model.parameters()).device
    batch = make_batch(tokenizer, pairs, max_len=context_length(model)).to(device)
    with torch.no_grad():
        logits = scored_logits(model, batch)
    base_logits = base["logits"] if base is not None else None
    per_request = _score(logits, batch, kinds, owners, comparisons, base_logits)
    metrics = defaultdict(list)
    for outcomes in per_request:
        for k, v in outcomes.items():
            metrics[k].extend(v)
    return {"metrics": metrics, "per_request": per_request, "logits": logits}


def summarize(outcomes: dict[str, list[float]]) -> dict[str, float | None]:
    """Mean of each metric's outcomes (None where a metric had no probes)."""
    return {k: _mean(outcomes.get(k, [])) for k in METRICS}


def evaluate(
    model,
    tokenizer,
    method: EditMethod,
    requests: list[EditRequest],
    batch_size: int = 1,
    progress: bool = True,
    after_edit=None,
    desc: str = "eval",
    unedited: dict | None = None,
    per_edit: bool = False,
) -> dict:
    """Edit `batch_size` requests at a time, score before and after, revert, repeat.

    Args:
        after_edit: optional callback run on the edited model (before revert) of each batch,
            e.g. to measure perplexity on some of them.
        desc: the progress bar's label.
        unedited: a dict shared by calls on the same requests (any method): the unedited
            model's scores are computed by the first call and reused by the others. Valid
            because every method reverts to the exact weights after each batch.
        per_edit: also list, under "edits", each request's prompt, target, metrics (means
            over its probes), its batch's edit time and, where the method scaled it up to
            reach its target (`EditResult.scales`), the scale.

    Returns:
        {"n_edits", "rewrite_acc", "rephrase_acc", "locality_acc", "efficacy_score",
         "paraphrase_score", "neighborhood_score", "edit_seconds_median", "pre": {...}}.
        Accuracies are means over probes; a metric with no probes is None.
    """
    post, pre, seconds, edits = defaultdict(list), defaultdict(list), [], []
    chunks = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    for i, chunk in enumerate(tqdm(chunks, desc=desc, disable=not progress, leave=False)):
        key = (batch_size, i)
        base = unedited.get(key) if unedited is not None else None
        if base is None:
            base = score(model, tokenizer, chunk)
            if unedited is not None:
                unedited[key] = base
        result = method.edit(chunk)
        try:
            edited = score(model, tokenizer, chunk, base)
            if after_edit is not None:
                after_edit(i)
        finally:
            result.revert()
        seconds.append(result.seconds)
        for k, v in base["metrics"].items():
            pre[k].extend(v)
        for k, v in edited["metrics"].items():
            post[k].extend(v)
        if per_edit:
            scales = getattr(result, "scales", None) or [None] * len(chunk)
            for r, outcomes, scale in zip(chunk, edited["per_request"], scales, strict=True):
                edits.append({"prompt": r.prompt, "target": r.target} | summarize(outcomes)
                             | {"edit_seconds": result.seconds, "scale": scale})  # fmt: skip
    report = _report(len(requests), batch_size, summarize(post), summarize(pre), seconds)
    if per_edit:
        report["edits"] = edits
    return report


def _report(n: int, batch_size: int, post: dict, pre: dict, seconds: list[float]) -> dict:
    """The report's summary: scores after and before, edit times."""
    return (
        {"n_edits": n, "batch_size": batch_size}
        | post
        | {
            "edit_seconds_median": statistics.median(seconds) if seconds else None,
            "edit_seconds_mean": statistics.fmean(seconds) if seconds else None,
            "pre": pre,
        }
    )


def _merged(scores: list[dict]) -> dict[str, float | None]:
    outcomes = defaultdict(list)
    for one in scores:
        for k, v in one["metrics"].items():
            outcomes[k].extend(v)
    return summarize(outcomes)


def evaluate_sequential(
    model,
    tokenizer,
    method: EditMethod,
    requests: list[EditRequest],
    batch_size: int = 1,
    every: int | None = None,
    progress: bool = True,
) -> dict:
    """Apply the requests `batch_size` at a time, one batch after another, keeping each.

    Every edit made so far is re-scored after every `every` edits (a curve) and at the end;
    locality compares with the unedited model. Afterwards every batch is reverted, last
    first, which restores the weights exactly.

    Returns:
        The final scores of all edits (as `evaluate`'s report), plus "curve": a list of
        {"n_edits", metrics...} and "batch_seconds": each batch's edit time.
    """
    if batch_size < 1:
        raise MendError(f"batch_size must be >= 1, got {batch_size}")
    if every is not None and not 1 <= every <= len(requests):
        raise MendError(f"every must be between 1 and the number of edits ({len(requests)})")
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    bases = [score(model, tokenizer, b) for b in batches]  # the unedited model, per batch
    results, curve = [], []

    def rescore(n: int) -> list[dict]:  # every edit of the first n batches, as the model is now
        return [
            score(model, tokenizer, b, base) for b, base in zip(batches[:n], bases[:n], strict=True)
        ]

    try:
        for n, batch in enumerate(tqdm(batches, desc="sequential edits", disable=not progress,
                                       leave=False), start=1):  # fmt: skip
            results.append(method.edit(batch))
            done = min(n * batch_size, len(requests))
            if every is not None and (done % every < len(batch) or done == len(requests)):
                curve.append({"n_edits": done} | _merged(rescore(n)))
        final = rescore(len(batches))
    finally:
        for result in reversed(results):
            result.revert()
    seconds = [r.seconds for r in results]
    report = _report(len(requests), batch_size, _merged(final), _merged(bases), seconds)
    report["sequential"] = True
    report["curve"] = curve
    report["batch_seconds"] = seconds
    return report


@torch.no_grad()
def perplexity(model, tokenizer, text: str, n_windows: int = 8, window: int = 512) -> float:
    """Perplexity on the first n_windows non-overlapping windows of `window` tokens of text."""
    x = token_windows(tokenizer, text, n_windows, min(window, context_length(model)))
    n = len(x)
    if n == 0:
        raise ValueError("text shorter than one window")
    x = x.to(next(model.parameters()).device)
    nll = 0.0
    for row in x:
        out = model(input_ids=row[None], use_cache=False)
        logits = out.logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, row[1:]).item()
    return float(torch.tensor(nll / n).exp())


METRICS = ["rewrite_acc", "rephrase_acc", "locality_acc", "efficacy_score", "paraphrase_score",
           "neighborhood_score"]  # fmt: skip


def format_report(report: dict) -> str:
    """A small text table: unedited vs edited, per metric."""
    lines = [f"{'metric':<20}{'unedited':>10}{'edited':>10}"]
    for k in METRICS:
        pre, post = report["pre"].get(k), report.get(k)
        if post is not None:
            lines.append(f"{k:<20}{pre:>10.3f}{post:>10.3f}")
    lines.append(f"{'edits':<20}{report['n_edits']:>20}")
    lines.append(f"{'edit seconds (med)':<20}{report['edit_seconds_median']:>20.4f}")
    return "\n".join(lines)
