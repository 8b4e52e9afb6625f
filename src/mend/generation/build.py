"""Generation edits from WikiText: a passage prefix, and a continuation sampled from a model.

MEND's WikiText setting (Mitchell et al., Fast Model Editing at Scale): x_e a WikiText passage,
y_e a 10-token sample of a language model after it, locality on other passages. A record here:
- "prompt": a passage prefix of one split's articles (`mend.data.wikitext.passages`);
- "target": `n_tokens` tokens sampled from `model` after the prompt's tokens at `temperature`
  (no top-k or top-p), decoded as the text they add. Each passage's draws come from a torch
  generator of its own, seeded from (seed, article title, passage index); prompts of one token
  length run side by side, in a fixed order, so the records are the same for the same file,
  model, settings and seed. Special tokens are never drawn, and the first token is drawn among
  those that open a new word: a target is tokenised in context after a space
  (`mend.data.collate.encode`), so one that began with "," could not be scored as sampled. A
  draw whose text, tokenised after the prompt, does not give back the sampled tokens is drawn
  again (up to `TRIES` draws, then the passage is left out);
- "rephrases": the prompt without its first half (cut at a word), MEND's own stand-in for a
  paraphrase of a passage (the reference implementation drops leading tokens);
- "locality": `locality` passages of other articles of the same split, each cut after about a
  quarter of its tokens into a prompt and the rest of its own text as the answer, so the
  locality check and the KL cover every later token;
- "article": the article's title (splits are disjoint by article).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mend.data.collate import encode
from mend.data.wikitext import SPLITS, Passage, passages, read_articles, split_articles, split_text
from mend.errors import MendError
from mend.files import atomic_write
from mend.models import context_length
from mend.models.forward import cache_argument

TRIES = 4  # draws per passage before it is left out
BATCH = 16  # prompts sampled side by side


@dataclass(frozen=True)
class BuildConfig:
    """How generation edit records are made (`build_records`).

    Attributes:
        split: "train" or "eval" (articles disjoint, `mend.data.wikitext.split_articles`).
        seed: the article split, the order of the records, the locality passages and the draws.
        prefix_tokens: the longest prefix, in tokens of the model's tokenizer (cut at a word).
        n_tokens: tokens sampled after each prefix.
        temperature: the sampling temperature (1: the model's own distribution).
        locality: locality passages per record.
        eval_fraction: the share of the edit articles' characters that go to evaluation.
        limit: at most this many records (the first of the shuffled passages); None: all.
    """

    split: str = "train"
    seed: int = 0
    prefix_tokens: int = 32
    n_tokens: int = 10
    temperature: float = 1.0
    locality: int = 1
    eval_fraction: float = 0.25
    limit: int | None = None

    def __post_init__(self):
        checks = [
            (self.split in SPLITS, f"split must be one of {', '.join(SPLITS)}, got {self.split!r}"),
            (self.prefix_tokens >= 4, f"prefix tokens must be >= 4, got {self.prefix_tokens}"),
            (self.n_tokens >= 1, f"continuation tokens must be >= 1, got {self.n_tokens}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.locality >= 0, f"locality passages must be >= 0, got {self.locality}"),
            (0 < self.eval_fraction < 1, f"eval fraction must be in (0, 1), got {self.eval_fraction}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise MendError(message)


def word_start_mask(tokenizer, vocab: int) -> torch.Tensor:
    """(vocab,) bool: the tokens whose text, after a word, is a space and then a non-space
    character (tokens that open a new word); special tokens and ids past the tokenizer's are
    False."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    head = tokenizer.decode(anchor)
    special = set(tokenizer.all_special_ids)
    mask = torch.zeros(vocab, dtype=torch.bool)
    for i in range(min(vocab, len(tokenizer))):
        if i in special:
            continue
        text = tokenizer.decode(anchor + [i])
        rest = text[len(head) :] if text.startswith(head) else ""
        mask[i] = len(rest) > 1 and rest[0] == " " and not rest[1].isspace()
    return mask


def banned_mask(tokenizer, vocab: int) -> torch.Tensor:
    """(vocab,) bool: tokens never sampled: special tokens and ids the tokenizer lacks."""
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[[i for i in tokenizer.all_special_ids if i < vocab]] = True
    mask[len(tokenizer) :] = True
    return mask


@torch.no_grad()
def sample_rows(model, prompts: list[list[int]], n, temperature, generators, first_ok, banned):
    """n token ids drawn after each of the prompts (all of one length, so no padding), one at
    a time from softmax(logits / temperature), row i with generators[i]: the first among the
    `first_ok` tokens, none of the `banned` ones ((vocab,) bool masks). Returns (rows, n) ids."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)  # (rows, prompt length)
    name, past, new = cache_argument(model), None, []
    for step in range(n):
        out = model(input_ids=ids, use_cache=True, **{name: past})
        past = out[name]  # the cache, under the same name as the argument
        logits = out.logits[:, -1].float().cpu()  # (rows, vocab)
        allowed = ~banned & (first_ok if step == 0 else True)
        logits = logits.masked_fill(~allowed[: logits.shape[1]], float("-inf"))
        probs = torch.softmax(logits / temperature, -1)
        drawn = [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, generators, strict=True)]  # fmt: skip
        new.append(drawn)
        ids = torch.tensor(drawn, device=device)[:, None]
    return [list(row) for row in zip(*new, strict=True)]


def passage_seed(seed: int, passage: Passage) -> int:
    """A generator seed of the passage's own, from the build seed and the passage's name."""
    digest = hashlib.sha256(f"{seed}\0{passage.title}\0{passage.index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _target(tokenizer, prompt: str, prompt_ids: list[int], new: list[int], max_len: int):
    """The text that `new` adds after prompt, if tokenising it in context gives `new` back."""
    head, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new)
    if not full.startswith(head) or not full[len(head) :][:1].isspace():
        return None
    target = full[len(head) :]
    ids, n_prompt = encode(tokenizer, prompt, target, max_len)
    return target if n_prompt == len(prompt_ids) and ids == prompt_ids + new else None


def continuations(model, tokenizer, prompts: list[str], seeds: list[int], cfg: BuildConfig,
                  masks, bar=None) -> list[str | None]:  # fmt: skip
    """The sampled target of each prompt (module docstring), None where no draw of `TRIES`
    tokenises back in context. Prompts of one token length are sampled `BATCH` at a time."""
    max_len = context_length(model)
    ids = [encode(tokenizer, p, None, max_len)[0] for p in prompts]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out: list[str | None] = [None] * len(prompts)
    todo = list(range(len(prompts)))
    for _ in range(TRIES):
        by_length: dict[int, list[int]] = {}
        for i in todo:
            by_length.setdefault(len(ids[i]), []).append(i)
        todo = []
        for rows in by_length.values():
            for start in range(0, len(rows), BATCH):
                chunk = rows[start : start + BATCH]
                drawn = sample_rows(model, [ids[i] for i in chunk], cfg.n_tokens, cfg.temperature,
                                    [generators[i] for i in chunk], *masks)  # fmt: skip
                for i, new in zip(chunk, drawn, strict=True):
                    out[i] = _target(tokenizer, prompts[i], ids[i], new, max_len)
                    if out[i] is None:
                        todo.append(i)
                    elif bar is not None:
                        bar.update()
        if not todo:
            break
    return out


def _in_context(tokenizer, model, prompt: str, target: str, n: int) -> bool:
    """The target adds exactly n tokens after prompt, tokenised in context."""
    ids, n_prompt = encode(tokenizer, prompt, target, context_length(model))
    return len(ids) - n_prompt == n


def _locality(tokenizer, others: list[Passage], rng: random.Random, k: int) -> list[dict]:
    probes = []
    for other in rng.sample(others, min(k, len(others))):
        n = len(tokenizer(other.text, add_special_tokens=False)["input_ids"])
        cut = split_text(tokenizer, other.text, max(2, n // 4))
        if cut is not None:
            probes.append({"prompt": cut[0], "answer": cut[1]})
    return probes


def _record(tokenizer, model, passage: Passage, target: str, pool: list[Passage], cfg) -> dict:
    """One JSONL record: the passage's prefix and target, its rephrase and locality probes."""
    rng = random.Random(passage_seed(cfg.seed + 1, passage))
    n = len(tokenizer(passage.text, add_special_tokens=False)["input_ids"])
    half = split_text(tokenizer, passage.text, n // 2)
    rephrases = [half[1].lstrip()] if half else []
    rephrases = [r for r in rephrases if _in_context(tokenizer, model, r, target, cfg.n_tokens)]
    others = [p for p in pool if p.title != passage.title]
    return {"prompt": passage.text, "target": target, "rephrases": rephrases,
            "locality": _locality(tokenizer, others, rng, cfg.locality), "article": passage.title}  # fmt: skip


def build_records(model, tokenizer, text_path: str | Path, cfg: BuildConfig,
                  progress: bool = True) -> tuple[list[dict], dict]:  # fmt: skip
    """Generation edit records of one split of a raw WikiText file (module docstring).

    Returns:
        (records, summary): the JSONL records and what made them (split, articles, counts,
        the settings).
    """
    usable, heldout = read_articles(text_path)
    articles = split_articles(usable, cfg.seed, cfg.eval_fraction)[cfg.split]
    pool = [p for a in articles for p in passages(tokenizer, a, cfg.prefix_tokens, cfg.n_tokens)]
    if len({p.title for p in pool}) < 2:
        raise MendError(f"{text_path}: the {cfg.split} split has passages from fewer than 2 "
                        "articles; locality needs passages of another article")  # fmt: skip
    order = list(pool)
    random.Random(cfg.seed).shuffle(order)
    vocab = model.get_output_embeddings().weight.shape[0]
    masks = (word_start_mask(tokenizer, vocab), banned_mask(tokenizer, vocab))
    records, dropped, pos = [], 0, 0
    want = len(order) if cfg.limit is None else min(cfg.limit, len(order))
    bar = tqdm(total=want, desc=f"wikitext {cfg.split} edits", disable=not progress)
    while len(records) < want and pos < len(order):
        chunk, pos = order[pos : pos + want - len(records)], pos + want - len(records)
        seeds = [passage_seed(cfg.seed, p) for p in chunk]
        targets = continuations(model, tokenizer, [p.text for p in chunk], seeds, cfg, masks, bar)
        for passage, target in zip(chunk, targets, strict=True):
            if target is None:
                dropped += 1
            else:
                records.append(_record(tokenizer, model, passage, target, pool, cfg))
    bar.close()
    summary = {
        "split": cfg.split,
        "records": len(records),
        "articles": sorted({r["article"] for r in records}),
        "split_articles": len(articles),
        "heldout_articles": len(heldout),
        "passages": len(pool),
        "dropped": dropped,
        "model": getattr(model.config, "name_or_path", None),
        "settings": cfg.__dict__,
    }
    return records, summary


def write_records(path: str | Path, records: list[dict]) -> None:
    """Write records as JSONL, atomically (a failed build leaves no file behind)."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    atomic_write(path, write)
