"""WikiText as passages for generation edits: articles, their split, prefixes cut at words.

A raw WikiText file (`wiki.*.raw`) is a run of articles, each opened by a heading line
` = Title = ` (sections are ` = = Section = = `), with pre-tokenised spacing (` , `, ` @-@ `).
Here an article is its title and its paragraphs, the spacing undone (`detokenize`).

The text is split by article, never inside one:
- held out: the articles from the first heading past the middle of the text on (`heldout_start`),
  the text `mend.evaluate.ppl_text` measures perplexity on; no edit comes from them;
- the earlier articles are shuffled with a seed and dealt out to evaluation edits until those
  hold `eval_fraction` of the characters, the rest to training edits (`split_articles`).

A passage prefix is cut from a paragraph's tokens at a word boundary (the token after it begins
a new word) and decoded; it is kept only when tokenising the decoded text gives back text equal
to it, so the prefix a model is edited on is the one the edit records hold (`passages`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from mend.data.text import read_text
from mend.errors import MendError

HEADING = re.compile(r"^ = [^=].* = $", re.M)  # " = Title = ", not " = = Section = = "
SPLITS = ("train", "eval")
_SPACING = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "),
            (" ; ", "; "), (" : ", ": "), (" 's", "'s"), ("( ", "("), (" )", ")")]  # fmt: skip


@dataclass(frozen=True)
class Article:
    """One WikiText article: its title and its paragraphs (spacing undone)."""

    title: str
    paragraphs: tuple[str, ...]


@dataclass(frozen=True)
class Passage:
    """A prefix of a paragraph, cut at a word boundary.

    Attributes:
        title: the article it comes from.
        index: its place among the article's passages (with the title, a stable name).
        text: the prefix, as decoded (no leading or trailing whitespace).
    """

    title: str
    index: int
    text: str


def detokenize(line: str) -> str:
    """WikiText's pre-tokenised spacing undone: "a @-@ b , c ." -> "a-b, c."."""
    line = f" {line.strip()} "  # padded, so that a mark at either end has its spaces too
    for a, b in _SPACING:
        line = line.replace(a, b)
    return line.strip()


def heldout_start(text: str) -> int:
    """Where the held-out part begins: the first article heading past the middle of the text
    (the middle itself when no heading follows it)."""
    middle = len(text) // 2
    heading = HEADING.search(text, middle)
    return heading.start() if heading else middle


def parse_articles(text: str) -> list[Article]:
    """The articles of raw WikiText text, in order (text before the first heading is dropped)."""
    heads = list(HEADING.finditer(text))
    out = []
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        lines = text[head.end() : end].splitlines()
        paragraphs = tuple(
            detokenize(x) for x in lines if x.strip() and not x.lstrip().startswith("=")
        )
        title = detokenize(head.group().strip().strip("="))
        if paragraphs:
            out.append(Article(title, paragraphs))
    return out


def read_articles(path: str | Path) -> tuple[list[Article], list[Article]]:
    """(the articles edits may come from, the held-out articles) of a raw WikiText file.

    Raises:
        MendError: an unreadable file, or one with fewer than two articles before its
            held-out part (no split into training and evaluation articles is possible).
    """
    text = read_text(path)
    start = heldout_start(text)
    usable, heldout = parse_articles(text[:start]), parse_articles(text[start:])
    if len(usable) < 2:
        raise MendError(
            f"{path}: found {len(usable)} article(s) with text before the held-out second half; "
            "need at least 2 (raw WikiText: each article opens with a ' = Title = ' line)"
        )
    return usable, heldout


def split_articles(
    articles: list[Article], seed: int = 0, eval_fraction: float = 0.25
) -> dict[str, list[Article]]:
    """{"train": [...], "eval": [...]}: the articles shuffled with `seed`, then dealt to
    evaluation until it holds `eval_fraction` of the characters; each split gets at least one."""
    if not 0 < eval_fraction < 1:
        raise MendError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    if len({a.title for a in articles}) != len(articles):
        raise MendError("two articles share a title; the split names articles by title")
    order = list(articles)
    random.Random(seed).shuffle(order)
    total = sum(len(p) for a in order for p in a.paragraphs)
    n_eval, chars = 0, 0
    while n_eval < len(order) - 1 and (n_eval == 0 or chars < eval_fraction * total):
        chars += sum(len(p) for p in order[n_eval].paragraphs)
        n_eval += 1
    return {"eval": order[:n_eval], "train": order[n_eval:]}


def starts_word(tokenizer, ids: list[int], j: int) -> bool:
    """Whether token j of ids begins a new word: the text it adds after token j - 1 begins
    with whitespace (GPT-2's "Ġword" and SentencePiece's "▁word" alike)."""
    if j <= 0 or j >= len(ids):
        return j == 0
    before = tokenizer.decode(ids[j - 1 : j])
    both = tokenizer.decode(ids[j - 1 : j + 1])
    return both.startswith(before) and both[len(before) :][:1].isspace()


def word_cut(tokenizer, ids: list[int], at: int, low: int) -> int | None:
    """The largest j in [low, at] where ids can be cut between words, None if there is none."""
    for j in range(min(at, len(ids) - 1), max(low, 1) - 1, -1):
        if starts_word(tokenizer, ids, j):
            return j
    return None


def stable(tokenizer, text: str) -> bool:
    """Tokenising `text` and decoding the tokens gives `text` back."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return bool(text) and tokenizer.decode(ids) == text


def passages(
    tokenizer, article: Article, prefix_tokens: int = 32, skip_tokens: int = 10
) -> list[Passage]:
    """Passage prefixes of one article, at most `prefix_tokens` tokens each.

    Each paragraph is cut into consecutive windows: a prefix ends at the last word boundary
    within `prefix_tokens` tokens (at least half of them), before the paragraph's end; the
    next window starts at the first word after the `skip_tokens` tokens that follow it (the
    text's own continuation, which the edits replace). Prefixes whose decoded text does not
    survive tokenising again unchanged are dropped.
    """
    if prefix_tokens < 2:
        raise MendError(f"prefix_tokens must be >= 2, got {prefix_tokens}")
    out = []
    for paragraph in article.paragraphs:
        ids = tokenizer(paragraph, add_special_tokens=False)["input_ids"]
        start = 0
        while start is not None and start + prefix_tokens // 2 < len(ids):
            end = word_cut(tokenizer, ids, start + prefix_tokens, start + prefix_tokens // 2)
            if end is None:
                break
            text = tokenizer.decode(ids[start:end]).strip()
            if stable(tokenizer, text):
                out.append(Passage(article.title, len(out), text))
            nxt = end + skip_tokens
            start = next((j for j in range(nxt, len(ids)) if starts_word(tokenizer, ids, j)), None)
    return out


def split_text(tokenizer, text: str, at: int) -> tuple[str, str] | None:
    """(head, rest): text cut at the first word boundary at or after token `at`, both parts
    stripped of nothing but the head's trailing space (rest keeps its leading space, so
    head + rest == text); None when no boundary follows or the head is not `stable`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = next((j for j in range(max(at, 1), len(ids)) if starts_word(tokenizer, ids, j)), None)
    if cut is None:
        return None
    head = tokenizer.decode(ids[:cut]).rstrip()
    if not text.startswith(head) or not stable(tokenizer, head):
        return None
    return head, text[len(head) :]
