"""Key statistics of ordinary text: the second moment of every edited matrix's input over
running text, computed once per model and cached.

A least-squares edit can hold these keys' outputs in place (weighted) while it moves the
edited tokens' outputs: the change then avoids the directions running text uses (MEMIT,
Meng et al. 2023). The cache lives under `cache_dir()/key_stats/`, one safetensors file per
model and text, named by a digest of everything the numbers depend on (the model's identity,
each edited weight's shape and a fingerprint of its values, the text and the token count),
so a changed model or text is never served stale numbers.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mend.config import cache_dir
from mend.data.collate import IGNORE, TokenBatch
from mend.data.sources import resolve_data
from mend.data.text import read_text, token_windows
from mend.files import atomic_write
from mend.grads import key_moments
from mend.models.archs import context_length
from mend.models.params import EditableParam


def text_batches(tokenizer, text: str, n_tokens: int, max_len: int, device, window: int = 128):
    """About n_tokens of `text` as full windows of `window` tokens, 16 windows per batch."""
    window = min(window, max_len)
    x = token_windows(tokenizer, text, max(1, -(-n_tokens // window)), window)
    return [
        TokenBatch(
            rows, torch.ones_like(rows), torch.zeros_like(rows, dtype=torch.bool),
            torch.full_like(rows, IGNORE), torch.arange(len(rows)),
        ).to(device)
        for rows in x.split(16)
    ]  # fmt: skip


def _digest(model, params: list[EditableParam], text_path, n_tokens: int) -> str:
    ident = {
        "model": str(model.config.name_or_path), "type": model.config.model_type,
        "text": [str(text_path), text_path.stat().st_size], "tokens": n_tokens,
        "weights": [[p.name, list(p.in_out), float(p.weight.detach().double().norm()),
                     float(p.weight.detach().double().flatten()[:4096].sum())] for p in params],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def text_key_moments(
    model,
    tokenizer,
    params: list[EditableParam],
    text: str = "wikitext-valid",
    n_tokens: int = 32768,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """E[k k^T] (in, in), fp32, of each edited matrix's input over `n_tokens` of `text`
    (a data set name or a path), from the cache when it holds them."""
    path = resolve_data(text)
    cached = cache_dir() / "key_stats" / f"{_digest(model, params, path, n_tokens)}.safetensors"
    device = params[0].weight.device
    if cached.is_file():
        stored = load_file(str(cached))
        if set(stored) == {p.name for p in params}:
            return {name: t.to(device) for name, t in stored.items()}
    batches = text_batches(tokenizer, read_text(path), n_tokens, context_length(model), device)
    bar = tqdm(batches, desc="text key statistics", disable=not progress, leave=False)
    with torch.no_grad():
        moments = {n: m.float().contiguous() for n, m in key_moments(model, params, bar).items()}
    atomic_write(cached, lambda tmp: save_file({n: m.cpu() for n, m in moments.items()}, tmp))
    return {name: m.to(device) for name, m in moments.items()}
