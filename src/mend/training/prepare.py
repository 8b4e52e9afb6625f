"""The passes before the first step: key statistics, nearest records, the row-cache warm-up."""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from mend.data.collate import TokenBatch, encode_row
from mend.data.sources import resolve_data
from mend.data.text import read_text
from mend.edit import MendEditor
from mend.errors import MendError
from mend.grads import prompt_keys
from mend.key_stats import text_batches
from mend.models.upper import UpperStack
from mend.shield import unit_rows
from mend.training.sampling import as_probe, record_rows
from mend.types import EditRequest

log = logging.getLogger(__name__)


def by_tokens(editor: MendEditor, pairs: list[tuple[str, str | None]]):
    """(order, sizes): the pairs' indices shortest first by token count, and those counts.

    Batches of equal token length waste little on padding (ordered by characters, over a
    third of CounterFact's warm-up tokens were padding).
    """
    tok, n, layout = editor.tokenizer, editor.max_len, editor.layout
    lengths = [len(encode_row(tok, p, t, n, layout)) for p, t in pairs]
    order = sorted(range(len(pairs)), key=lengths.__getitem__)
    return order, [lengths[i] for i in order]


def nearest_records(
    editor: MendEditor,
    pool: list[EditRequest],
    k: int,
    lower: torch.dtype | None = None,
    chunk: int = 64,
    progress: bool = True,
) -> list[list[int]]:
    """Per pool record, the k other records an edit of it most easily spills onto, nearest first.

    Nearness is the cosine of the prompts' inputs to the first edited weight at the prompt's
    last token (the input an edit's rank-one change acts on in proportion), and records with
    the same true answer (the one the edit takes away) come first: the k nearest of them,
    topped up with the nearest others when fewer share it.

    Args:
        lower: dtype to autocast the base model's forward passes to (e.g. bf16), or None.
    """
    param = editor.params[0]
    order, _ = by_tokens(editor, [(r.prompt, None) for r in pool])
    chunks = range(0, len(order), chunk)
    batches = (editor.batch([(pool[j].prompt, None) for j in order[i : i + chunk]]) for i in chunks)
    bar = tqdm(batches, total=len(chunks), desc="prompt keys", disable=not progress, leave=False)
    device = editor.device.type
    with torch.autocast(device, dtype=lower or torch.bfloat16, enabled=lower is not None):
        sorted_keys = prompt_keys(editor.model, param, bar)
    keys = torch.empty_like(sorted_keys)
    keys[torch.tensor(order, dtype=torch.long, device=keys.device)] = sorted_keys
    unit = unit_rows(keys)
    answers: dict[str, int] = {}
    answer = torch.tensor([answers.setdefault(r.target_true, len(answers)) if r.target_true
                           else -1 for r in pool])  # fmt: skip
    near = []
    for i in range(0, len(pool), 1024):
        sims = unit[i : i + 1024] @ unit.T  # (rows, pool), cosines in [-1, 1]
        rows = answer[i : i + 1024, None]
        sims = sims + 2.0 * ((rows == answer[None]) & (rows >= 0))  # same answer first
        sims[torch.arange(len(sims)), torch.arange(i, i + len(sims))] = float("-inf")
        near += sims.topk(min(k, len(pool) - 1), dim=1).indices.tolist()
    return near


def key_pairs(data: list[EditRequest], n_records: int = 512) -> list[tuple[str, str | None]]:
    """Texts whose edited-layer inputs estimate the key moments: the first records' rows."""
    return [pair for r in data[:n_records] for pair in record_rows(r)]


def text_windows(
    editor: MendEditor, text: str, n_tokens: int, window: int = 128
) -> list[TokenBatch]:
    """About n_tokens of `text` as full windows of `window` tokens, 16 windows per batch."""
    return text_batches(editor.tokenizer, text, n_tokens, editor.max_len, editor.device, window)


def key_batches(
    editor: MendEditor, data: list[EditRequest], key_text: str | None
) -> list[TokenBatch]:
    """The inputs whose edited-layer keys estimate C for the preconditioner.

    The training texts are the inputs an edit must leave alone most nearly (other subjects
    of the same relation). `key_text` adds as many tokens of general text in 128-token
    windows: keys from short prompts alone leave directions that long running text uses
    unmeasured, and P = (C/m + lambda I)^-1 then amplifies exactly those, raising the
    perplexity of running text after an edit.
    """
    pairs = key_pairs(data)
    batches = [editor.batch(pairs[i : i + 64]) for i in range(0, len(pairs), 64)]
    if key_text:
        try:
            text = read_text(resolve_data(key_text))
        except MendError as e:
            log.warning("%s; estimating key statistics from the training texts only", e)
        else:
            n_tokens = sum(int(b.attention_mask.sum()) for b in batches)
            batches += text_windows(editor, text, n_tokens)
    return batches


def warm_rows(
    editor: MendEditor,
    stack: UpperStack,
    data: list[EditRequest],
    batch_rows: int = 64,
    budget_s: float | None = None,
    progress: bool = True,
) -> bool:
    """Fill the stack's RowCache with every row a step can draw from data, before training.

    That is each record's own rows and the record as another edit's locality input. Met a
    few at a time in the first epoch's steps, a new row costs several times the lower-block
    time it costs here, in batches of equal token length. Shortest rows first, until the
    cache is full. Deterministic, so a resumed run fills the same cache.

    Args:
        budget_s: give up (leaving the rows to be cached as steps meet them) as soon as the
            whole warm-up is projected, from the tokens done so far, to take longer than this.

    Returns:
        Whether every row (or as many as the cache holds) was warmed.
    """
    probes = (as_probe(r) for r in data)
    pairs = list(dict.fromkeys(
        [pair for r in data for pair in record_rows(r)] + [(q.prompt, q.answer) for q in probes]
    ))  # fmt: skip
    order, size = by_tokens(editor, pairs)
    todo = [pairs[i] for i in order]
    total, done, start = sum(size), 0, time.perf_counter()
    chunks = range(0, len(todo), batch_rows)
    for i in tqdm(chunks, desc="cache rows", unit="batch", disable=not progress, leave=False):
        if stack.cache.full:
            break
        if budget_s is not None and done:
            projected = (time.perf_counter() - start) * total / done
            if projected > budget_s:
                log.info("row cache warm-up skipped (%.0f s projected)", projected)
                return False
        stack.prepare(editor.batch(todo[i : i + batch_rows]), base_logits=False)
        done += sum(size[i : i + batch_rows])
    return True
