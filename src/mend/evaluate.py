"""Score any editing method over a data set: accuracies, CounterFact scores, perplexity, time.

Rewrite and rephrase probes are scored by two conventions:
- teacher-forced (`rewrite_acc`, `rephrase_acc`): every target token is the argmax after the
  prompt and the target tokens before it (`mend.metrics.all_correct`);
- generated (`rewrite_gen`, `rephrase_gen`): from the prompt alone, greedily decode as many new
  tokens as the target has (tokenised in context, as `make_batch` scores it) plus 2; success
  when the decoded continuation starts with the target text as it follows the prompt (joined by
  one space unless the target begins with whitespace, so " Paris") and the character after it,
  if any, is not a letter or digit (`mend.metrics.starts_with_word`).
They are close, not equal: a continuation spelled in other tokens passes only the generated
test, one that runs on into a longer word (" Parisian" for " Paris") only the teacher-forced one.
Locality likewise: `locality_acc`, every scored argmax of the probe unchanged by the edit;
`locality_gen`, the greedy continuation of the probe's prompt (as many tokens as its answer has,
1 without an answer, plus 2; cut after an end-of-text token) after the edit is token for token
the unedited model's.

`locality_label_acc` is the share of locality probes with a recorded answer that the model gives
(every answer token the argmax); `accuracy_drawdown` is its value on the unedited model minus
with the edit (the paper's drawdown on other inputs).

Every kind of model (`mend.models.archs`) is scored teacher-forced. The generated convention
and perplexity are a causal LM's: for a seq2seq model or a classifier they are None.

`ppl_before` / `ppl_after` are the perplexity of a fixed text (`ppl_text()`) on the unedited
model and with edits applied; `ppl_change` is after / before - 1.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections import defaultdict
from typing import Protocol

import torch
from tqdm.auto import tqdm

from mend.data.collate import IGNORE, make_batch
from mend.data.sources import resolve_data
from mend.data.text import read_text, token_windows
from mend.errors import MendError
from mend.losses import row_mean, token_nll
from mend.metrics import rows_all, starts_with_word
from mend.models import context_length, kind_of
from mend.models.forward import layout, scored_logits
from mend.result import EditResult
from mend.types import CAUSAL, EditRequest


class EditMethod(Protocol):
    """Anything that applies a batch of edits in place and returns a revertible result."""

    def edit(self, requests: list[EditRequest]) -> EditResult: ...


REWRITE, REPHRASE, LOCALITY, OTHER = "rewrite_acc", "rephrase_acc", "locality_acc", "other"
LOCALITY_LABEL = "locality_label_acc"
GENERATED = {REWRITE: "rewrite_gen", REPHRASE: "rephrase_gen", LOCALITY: "locality_gen"}
GEN_CHUNK = 64  # probe rows decoded together
SCORE_ROWS = 256  # probe rows scored per forward pass
log = logging.getLogger(__name__)


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


@torch.no_grad()
def _greedy_rows(model, tokenizer, batch, rows: list[int]) -> dict[int, list[int]]:
    """The greedy continuation (token ids) of each given row's prompt: as many new tokens as the
    row scores plus 2, cut after an end-of-text token. GEN_CHUNK rows at a time, left-padded."""
    ids, pos = batch.input_ids.cpu(), batch.pos_mask.cpu()
    n_prompt = (pos.int().argmax(1) + 1).tolist()  # the first scored position ends the prompt
    n_new = (pos.sum(1) + 2).tolist()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos, device = tokenizer.eos_token_id, batch.input_ids.device
    out = {}
    for start in range(0, len(rows), GEN_CHUNK):
        part = rows[start : start + GEN_CHUNK]
        width = max(n_prompt[r] for r in part)
        x = torch.full((len(part), width), pad, dtype=torch.long)  # (rows, width)
        mask = torch.zeros_like(x)
        for i, r in enumerate(part):  # left-padded, so that every prompt ends at the same place
            x[i, width - n_prompt[r] :] = ids[r, : n_prompt[r]]
            mask[i, width - n_prompt[r] :] = 1
        steps = max(1, min(max(n_new[r] for r in part), context_length(model) - width))
        y = model.generate(input_ids=x.to(device), attention_mask=mask.to(device),
                           max_new_tokens=steps, do_sample=False, pad_token_id=pad,
                           eos_token_id=eos)  # fmt: skip
        for r, new in zip(part, y[:, width:].tolist(), strict=True):
            new = new[: n_new[r]]
            out[r] = new[: new.index(eos) + 1] if eos in new else new
    return out


def _text_after(tokenizer, prefix: list[int], new: list[int]) -> str:
    """The text that token ids `new` add after `prefix` (decoded together: a SentencePiece
    decoder drops the leading space of a text's first token)."""
    head = tokenizer.decode(prefix, skip_special_tokens=True)
    full = tokenizer.decode(prefix + new, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head) :]
    return tokenizer.decode(new, skip_special_tokens=True)


def _generated(tokenizer, batch, kinds, continuations, base=None) -> dict[int, bool]:
    """Row -> the generated test passed (see the module docstring), given the rows' greedy
    continuations and, for locality, the unedited model's (`base`)."""
    ids, pos, labels = batch.input_ids.cpu(), batch.pos_mask.cpu(), batch.labels.cpu()
    out = {}
    for r, new in continuations.items():
        if kinds[r] == LOCALITY:
            out[r] = base is None or new == base[r]
            continue
        prompt = ids[r, : int(pos[r].int().argmax()) + 1].tolist()
        target = _text_after(tokenizer, prompt, labels[r][pos[r]].tolist()).rstrip()
        out[r] = starts_with_word(_text_after(tokenizer, prompt, new), target)
    return out


@torch.no_grad()
def _predictions(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """At every scored position of batch: the argmax token (P,) and the label's
    log-probability (P,), 0 where the label is unknown. SCORE_ROWS rows per forward pass:
    the full logits of every probe of 1,000 CounterFact edits would take gigabytes."""
    top, logp = [], []
    for start in range(0, len(batch), SCORE_ROWS):
        part = batch.select(list(range(start, min(start + SCORE_ROWS, len(batch)))))
        logits = scored_logits(model, part)
        top.append(logits.argmax(-1))
        logp.append(-token_nll(logits, part.labels[part.pos_mask]))
    return torch.cat(top), torch.cat(logp)


def _score(
    top, logp, batch, kinds, owners, comparisons, base_top=None, generated=None
) -> list[dict]:
    """Per request, per-metric lists of 0/1 outcomes from the probe batch's predictions
    (`_predictions`: argmax and label log-probability per scored position; `base_top`, the
    unedited argmax) and, in `generated`, the generated test of each decoded row."""
    rows = batch.pos_row
    labels = batch.labels[batch.pos_mask]
    n = len(batch)
    correct = rows_all((top == labels) | (labels == IGNORE), rows, n).tolist()
    logp = row_mean(logp, rows, labels != IGNORE, n)[0].tolist()
    known = (torch.zeros(n, dtype=torch.long, device=rows.device)
             .index_add_(0, rows, (labels != IGNORE).long()) > 0).tolist()  # fmt: skip
    unchanged = [True] * n
    if base_top is not None:
        unchanged = rows_all(base_top == top, rows, n).tolist()
    out = [defaultdict(list) for _ in range(max(owners, default=-1) + 1)]
    for r, kind in enumerate(kinds):
        if kind in (REWRITE, REPHRASE):
            out[owners[r]][kind].append(float(correct[r]))
        elif kind == LOCALITY:
            out[owners[r]][kind].append(float(unchanged[r]))
            if known[r]:
                out[owners[r]][LOCALITY_LABEL].append(float(correct[r]))
        if generated is not None and r in generated:
            out[owners[r]][GENERATED[kind]].append(float(generated[r]))
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
         "argmax": the probes' argmax tokens and "continuations": the greedy continuations (for a
         later `base`)}.
    """
    pairs, kinds, owners, comparisons = _probe_rows(requests)
    device = next(model.parameters()).device
    batch = make_batch(tokenizer, pairs, max_len=context_length(model), layout=layout(model))
    batch = batch.to(device)
    top, logp = _predictions(model, batch)
    decoded = [r for r, k in enumerate(kinds) if k in GENERATED] if kind_of(model) == CAUSAL else []
    continuations = _greedy_rows(model, tokenizer, batch, decoded)
    base_top = base["argmax"] if base is not None else None
    base_gen = base.get("continuations") if base is not None else None
    generated = _generated(tokenizer, batch, kinds, continuations, base_gen)
    per_request = _score(top, logp, batch, kinds, owners, comparisons, base_top, generated)
    metrics = defaultdict(list)
    for outcomes in per_request:
        for k, v in outcomes.items():
            metrics[k].extend(v)
    return {"metrics": metrics, "per_request": per_request, "argmax": top,
            "continuations": continuations}  # fmt: skip


def summarize(outcomes: dict[str, list[float]]) -> dict[str, float | None]:
    """Mean of each metric's outcomes (None where a metric had no probes)."""
    return {k: _mean(outcomes.get(k, [])) for k in (*METRICS, *GEN_METRICS)}


def ppl_text(name: str = "wikitext-valid") -> str | None:
    """The fixed perplexity text: WikiText's validation split from the first article that starts
    past its middle (its first part feeds ft-kl's locality prompts and the key statistics).

    Returns None, with a logged warning, when the data set is not here.
    """
    try:
        text = read_text(resolve_data(name))
    except MendError as e:
        log.warning("WikiText perplexity not measured: %s", e)
        return None
    middle = len(text) // 2
    header = re.compile(r"^ = [^=].* = $", re.M).search(text, middle)  # " = Title = "
    return text[header.start() if header else middle :]


def _ppl(model, tokenizer, text: str | None, n_windows: int) -> float | None:
    if not text or n_windows <= 0 or kind_of(model) != CAUSAL:
        return None
    return perplexity(model, tokenizer, text, n_windows)


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
    ppl_text: str | None = None,
    ppl_windows: int = 4,
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
        ppl_text: measure perplexity on the first `ppl_windows` windows of this text: on the
            unedited model and with the first batch applied (None or 0 windows: not measured).

    Returns:
        {"n_edits", "batch_size", every metric of METRICS and GEN_METRICS,
         "seconds_per_batch_median", "seconds_per_batch_mean" (each `edit()` call; also under
         their older names "edit_seconds_median", "edit_seconds_mean"), "ppl_before",
         "ppl_after", "ppl_change", "pre": {the metrics on the unedited model}}.
        Accuracies are means over probes; a metric with no probes is None.
    """
    post, pre, seconds, edits = defaultdict(list), defaultdict(list), [], []
    ppl_before, ppl_after = _ppl(model, tokenizer, ppl_text, ppl_windows), None
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
            if i == 0:
                ppl_after = _ppl(model, tokenizer, ppl_text, ppl_windows)
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
    ppl = (ppl_before, ppl_after)
    report = _report(len(requests), batch_size, summarize(post), summarize(pre), seconds, ppl)
    if per_edit:
        report["edits"] = edits
    return report


def _report(n: int, batch_size: int, post: dict, pre: dict, seconds: list[float], ppl) -> dict:
    """The report's summary: scores after and before, seconds per batch, perplexity."""
    median = statistics.median(seconds) if seconds else None
    mean = statistics.fmean(seconds) if seconds else None
    before, after = ppl
    change = after / before - 1 if before is not None and after is not None else None
    was, now = pre.get(LOCALITY_LABEL), post.get(LOCALITY_LABEL)
    drawdown = was - now if was is not None and now is not None else None
    return (
        {"n_edits": n, "batch_size": batch_size}
        | post
        | {"accuracy_drawdown": drawdown}
        | {"seconds_per_batch_median": median, "seconds_per_batch_mean": mean,
           "edit_seconds_median": median, "edit_seconds_mean": mean,  # older names, same values
           "ppl_before": before, "ppl_after": after, "ppl_change": change, "pre": pre}
    )  # fmt: skip


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
    ppl_text: str | None = None,
    ppl_windows: int = 4,
) -> dict:
    """Apply the requests `batch_size` at a time, one batch after another, keeping each.

    Every edit made so far is re-scored after every `every` edits (a curve) and at the end;
    locality compares with the unedited model. Afterwards the first batch is reverted, which
    restores the weights exactly and undoes the later ones (only it keeps the weights from
    before it, so a long sequence holds one copy of them). Perplexity on `ppl_text` (as in `evaluate`) is
    measured before any edit, with all batches applied, and at each point of the curve (a few
    windows cost less than re-scoring every edit so far).

    Returns:
        The final scores of all edits (as `evaluate`'s report), plus "curve": a list of
        {"n_edits", metrics..., "ppl"} and "batch_seconds": each batch's edit time.
    """
    if batch_size < 1:
        raise MendError(f"batch_size must be >= 1, got {batch_size}")
    if every is not None and not 1 <= every <= len(requests):
        raise MendError(f"every must be between 1 and the number of edits ({len(requests)})")
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    bases = [  # the unedited model, per batch
        score(model, tokenizer, b)
        for b in tqdm(batches, desc="scoring the unedited model", disable=not progress, leave=False)
    ]
    ppl_before = _ppl(model, tokenizer, ppl_text, ppl_windows)
    results, curve, scored = [], [], {}

    def rescore(n: int) -> list[dict]:  # every edit of the first n batches, as the model is now
        if n not in scored:  # (the curve's last point is the final score: scored once)
            pairs = list(zip(batches[:n], bases[:n], strict=True))
            scored[n] = [
                score(model, tokenizer, b, base)
                for b, base in tqdm(
                    pairs, desc=f"re-scoring {n} batches", disable=not progress, leave=False
                )  # fmt: skip
            ]
        return scored[n]

    try:
        for n, batch in enumerate(tqdm(batches, desc="sequential edits", disable=not progress,
                                       leave=False), start=1):  # fmt: skip
            results.append(method.edit(batch))
            if n > 1:  # the first edit's revert restores the weights: drop the later copies
                results[-1].release()
            done = min(n * batch_size, len(requests))
            if every is not None and (done % every < len(batch) or done == len(requests)):
                ppl = _ppl(model, tokenizer, ppl_text, ppl_windows)
                curve.append({"n_edits": done} | _merged(rescore(n)) | {"ppl": ppl})
        final = rescore(len(batches))
        # the curve's last point has every edit applied
        ppl_after = curve[-1]["ppl"] if curve else _ppl(model, tokenizer, ppl_text, ppl_windows)
    finally:
        if results:
            results[0].revert()
            for result in results[1:]:
                result.undone_with(results[0])
    seconds = [r.seconds for r in results]
    ppl = (ppl_before, ppl_after)
    report = _report(len(requests), batch_size, _merged(final), _merged(bases), seconds, ppl)
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


METRICS = ["rewrite_acc", "rephrase_acc", "locality_acc", LOCALITY_LABEL, "efficacy_score",
           "paraphrase_score", "neighborhood_score"]  # fmt: skip
GEN_METRICS = list(GENERATED.values())  # the generated convention (module docstring)


def format_report(report: dict) -> str:
    """A small text table: unedited vs edited, per metric; perplexity; seconds per batch."""
    w = 28
    lines = [f"{'metric':<{w}}{'unedited':>10}{'edited':>10}"]
    for k in (*METRICS, *GEN_METRICS):
        pre, post = report["pre"].get(k), report.get(k)
        if post is not None:
            lines.append(f"{k:<{w}}{pre:>10.3f}{post:>10.3f}")
    if report.get("accuracy_drawdown") is not None:
        lines.append(f"{'accuracy drawdown':<{w}}{report['accuracy_drawdown']:>20.4f}")
    before, after = report.get("ppl_before"), report.get("ppl_after")
    label = "all batches" if report.get("sequential") else "1st batch"
    if before is None or after is None:
        lines.append(f"{'wikitext ppl':<{w}}{'not measured':>20}")
    else:
        change = f"  ({report['ppl_change']:+.1%})"
        ppl = f"{before:>10.3f} {after:>9.3f}"  # a wrecked model's millions keep a space
        lines.append(f"{f'wikitext ppl ({label})':<{w}}{ppl}{change}")
    lines.append(f"{'edits':<{w}}{report['n_edits']:>20}")
    for stat in ("median", "mean"):
        value = report.get(f"seconds_per_batch_{stat}", report.get(f"edit_seconds_{stat}"))
        lines.append(f"{f'seconds per batch ({stat})':<{w}}{value:>20.4f}")
    return "\n".join(lines)
