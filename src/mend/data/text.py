"""Plain text (WikiText) as locality prompts and perplexity windows."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mend.errors import MendError

_UNESCAPE = [(" @-@ ", "-"), (" @.@ ", "."), (" @,@ ", ","), (" , ", ", "), (" 's", "'s"),
             (" ( ", " ("), (" ) ", ") "), (" ; ", "; "), (" : ", ": ")]  # fmt: skip


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MendError(f"text file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MendError(f"cannot read text file {path}: {e}") from None


def wikitext_prompts(path: str | Path, n: int, words: int = 12) -> list[str]:
    """The first `words` words of the first n long-enough WikiText sentences (headers skipped)."""
    out = []
    for line in read_text(path).splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r" \. ", line):
            for a, b in _UNESCAPE:
                sentence = sentence.replace(a, b)
            tokens = sentence.split()
            if len(tokens) > words:
                out.append(" ".join(tokens[:words]))
                if len(out) == n:
                    return out
    if not out:
        raise MendError(f"{path}: no usable sentences")
    return out


def token_windows(tokenizer, text: str, n_windows: int, window: int) -> torch.Tensor:
    """The first (up to) n_windows non-overlapping windows of `window` tokens of text: (n, window)."""
    ids = tokenizer(text[: n_windows * window * 8])["input_ids"]  # ~8 characters per token, ample
    n = min(n_windows, len(ids) // window)
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)
