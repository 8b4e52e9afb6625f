"""Key statistics of ordinary text: the second moment of every edited matrix's input over
running text, computed once per model and cached.

A least-squares edit can hold these keys' outputs in place (weighted) while it moves the
edited tokens' outputs: the change then avoids the directions running text uses (MEMIT,
Meng et al. 2023). The cache lives under `cache_dir()/key_stats/`, one safetensors file per
model, matrix and text, named by a digest of everything its numbers depend on (the model's
identity and a fingerprint of its weights, the matrix's name and shape, the text and the
token count), so a changed model or text is never served stale numbers, and a method that
needs other layers computes only those.
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


def _fingerprint(t: torch.Tensor) -> list[float]:
    t = t.detach().double()
    return [float(t.norm()), float(t.flatten()[:4096].sum())]


def _digest(model, weights: list, param: EditableParam, text_path, n_tokens: int) -> str:
    """What one matrix's moments depend on: every weight from the embedding up to that
    matrix could change its keys, so the whole model's fingerprint (`weights`) is part of it."""
    ident = {
        "model": str(model.config.name_or_path), "type": model.config.model_type,
        "weights": weights, "matrix": [param.name, list(param.in_out)],
        "text": [str(text_path), text_path.stat().st_size], "tokens": n_tokens,
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
    """E[k k^T] (in, in), fp32, of each matrix's input over `n_tokens` of `text` (a data
    set name or a path): from the cache where it holds them, the rest in one pass."""
    path = resolve_data(text)
    folder = cache_dir() / "key_stats"
    device = params[0].weight.device
    weights = [_fingerprint(w) for w in model.parameters()]
    files = {
        p.name: folder / f"{_digest(model, weights, p, path, n_tokens)}.safetensors" for p in params
    }
    moments = {}
    for name, file in files.items():
        if file.is_file():
            stored = load_file(str(file))
            if set(stored) == {"moments"}:
                moments[name] = stored["moments"].to(device)
    missing = [p for p in params if p.name not in moments]
    if missing:
        batches = text_batches(tokenizer, read_text(path), n_tokens, context_length(model), device)
        bar = tqdm(batches, desc="text key statistics", disable=not progress, leave=False)
        with torch.no_grad():
            fresh = key_moments(model, missing, bar)
        for p in missing:
            m = fresh[p.name].float().contiguous()
            atomic_write(files[p.name], lambda tmp, m=m: save_file({"moments": m.cpu()}, tmp))
            moments[p.name] = m.to(device)
    return {p.name: moments[p.name] for p in params}
