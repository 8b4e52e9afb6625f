"""Tokenise (prompt, target) pairs into right-padded batches with scored positions.

How a pair becomes a row depends on the model's kind (`mend.types.Layout`):
- causal: the target is tokenised *in context*: we tokenise "prompt target" as one string and
  take the target to be everything after the longest common prefix with the tokenised prompt.
  The first target token is then exactly the token the model would predict after the prompt,
  whatever the tokenizer does with leading spaces (GPT-2 BPE "ĠParis" vs SentencePiece
  "▁Paris").
- seq2seq: the prompt is the encoder's input; the target's own tokens are the decoder's labels,
  teacher-forced: the decoder reads the start token and every label but the last.
- classifier: the prompt is the input; the target names a label, scored at position 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mend.errors import MendError
from mend.types import CAUSAL, CLASSIFIER, SEQ2SEQ, Layout

IGNORE = -100


def encode(tokenizer, prompt: str, target: str | None, max_len: int) -> tuple[list[int], int]:
    """Token ids of prompt (+ " " + target) and the number of prompt tokens (causal kind).

    Raises:
        MendError: empty prompt or target, a target that adds no tokens, or too long an input.
    """
    if not prompt or not prompt.strip():
        raise MendError("empty prompt")
    prompt = prompt.rstrip()
    prompt_ids = tokenizer(prompt)["input_ids"]
    if target is None:
        ids, n_prompt = prompt_ids, len(prompt_ids)
    else:
        if not target.strip():
            raise MendError(f"empty target for prompt {prompt[:60]!r}")
        sep = "" if target[0].isspace() else " "
        ids = tokenizer(prompt + sep + target)["input_ids"]
        n_prompt = 0
        for a, b in zip(prompt_ids, ids, strict=False):
            if a != b:
                break
            n_prompt += 1
        if n_prompt >= len(ids):
            raise MendError(f"target {target!r} tokenises to nothing after {prompt[:60]!r}")
    if n_prompt == 0:
        raise MendError(f"prompt {prompt[:60]!r} tokenises to nothing")
    _check_length(len(ids), max_len, prompt)
    return ids, n_prompt


def _check_length(n: int, max_len: int, prompt: str) -> None:
    if n > max_len:
        raise MendError(
            f"input of {n} tokens is longer than the model's context of {max_len}: {prompt[:60]!r}"
        )


@dataclass
class Row:
    """One tokenised pair.

    Attributes:
        ids: the input (a seq2seq model's encoder input).
        scored: positions whose logits are scored (in `decoder` for seq2seq).
        labels: the label at each scored position (IGNORE: unknown).
        decoder: a seq2seq decoder's input ids, else None.
    """

    ids: list[int]
    scored: list[int]
    labels: list[int]
    decoder: list[int] | None = None

    def __len__(self) -> int:
        return len(self.ids) + len(self.decoder or ())


def _causal_row(tokenizer, prompt: str, target: str | None, max_len: int, layout) -> Row:
    ids, n_prompt = encode(tokenizer, prompt, target, max_len)
    if target is None:
        return Row(ids, [n_prompt - 1], [IGNORE])
    # logits at position p predict token p + 1
    return Row(ids, list(range(n_prompt - 1, len(ids) - 1)), ids[n_prompt:])


def _input_ids(tokenizer, prompt: str, max_len: int) -> list[int]:
    """A seq2seq or classifier input: the prompt on its own, with the tokenizer's specials."""
    if not prompt or not prompt.strip():
        raise MendError("empty prompt")
    ids = tokenizer(prompt.strip())["input_ids"]
    if not ids:
        raise MendError(f"prompt {prompt[:60]!r} tokenises to nothing")
    _check_length(len(ids), max_len, prompt)
    return ids


def _seq2seq_row(tokenizer, prompt: str, target: str | None, max_len: int, layout) -> Row:
    ids = _input_ids(tokenizer, prompt, max_len)
    if layout.decoder_start is None:
        raise MendError("a seq2seq layout needs the decoder's start token")
    if target is None:  # the decoder's first prediction, label unknown
        return Row(ids, [0], [IGNORE], [layout.decoder_start])
    if not target.strip():
        raise MendError(f"empty target for prompt {prompt[:60]!r}")
    labels = tokenizer(text_target=target.strip())["input_ids"]
    if not labels:
        raise MendError(f"target {target!r} tokenises to nothing")
    _check_length(len(labels), max_len, target)
    return Row(ids, list(range(len(labels))), labels, [layout.decoder_start] + labels[:-1])


def _classifier_row(tokenizer, prompt: str, target: str | None, max_len: int, layout) -> Row:
    ids = _input_ids(tokenizer, prompt, max_len)
    if target is None:
        return Row(ids, [0], [IGNORE])
    label = layout.label_index(target)
    if label is None:
        names = ", ".join(name for name, _ in layout.labels)
        raise MendError(f"unknown label {target!r}: the model's labels are {names}")
    return Row(ids, [0], [label])


_ROWS = {CAUSAL: _causal_row, SEQ2SEQ: _seq2seq_row, CLASSIFIER: _classifier_row}


def encode_row(tokenizer, prompt: str, target: str | None, max_len: int, layout=None) -> Row:
    """One (prompt, target-or-None) pair as the model of `layout` (default: causal) reads it.

    Raises:
        MendError: an empty prompt or target, an unknown label, or too long an input.
    """
    layout = layout or Layout()
    return _ROWS[layout.kind](tokenizer, prompt, target, max_len, layout)


@dataclass
class TokenBatch:
    """Rows of token ids plus which positions are scored.

    Attributes:
        input_ids: (R, S) right-padded ids (a seq2seq model's encoder input).
        attention_mask: (R, S) 1 on real tokens.
        pos_mask: (R, S') True where the logits predict a scored next token (S' = S, or the
            decoder's width for seq2seq; a classifier scores position 0 of every row).
        labels: (R, S') the scored next token (a classifier's class) at pos_mask, IGNORE where
            unknown or unscored.
        group: (R,) which edit (of the current set) each row belongs to.
        decoder_input_ids: (R, S') a seq2seq decoder's right-padded input, else None.
        decoder_attention_mask: (R, S') 1 on its real tokens, else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pos_mask: torch.Tensor
    labels: torch.Tensor
    group: torch.Tensor
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def pos_row(self) -> torch.Tensor:
        """(P,) the row of every scored position, in pos_mask order."""
        return self.pos_mask.nonzero()[:, 0]

    def token_mask(self, decoder: bool = False) -> torch.Tensor:
        """(R, width) bool: the real tokens a weight of the encoder (or only stack) or, with
        `decoder`, of a seq2seq decoder reads. A batch without decoder input (running text)
        feeds the decoder its own input, shifted (`models.forward.decoder_inputs`)."""
        if decoder and self.decoder_attention_mask is not None:
            return self.decoder_attention_mask.bool()
        return self.attention_mask.bool()

    def key_mask(self, decoder: bool = False) -> torch.Tensor:
        """(R, width) bool: the positions whose inputs at a weight stand for each row's prompt:
        the scored positions on their own stack; on a seq2seq encoder, the last real token."""
        if decoder or self.decoder_input_ids is None:
            return self.pos_mask
        last = self.attention_mask.sum(1) - 1  # (R,)
        mask = torch.zeros_like(self.attention_mask, dtype=torch.bool)
        return mask.scatter(1, last[:, None], True)

    def to(self, device) -> TokenBatch:
        return TokenBatch(
            *(None if (t := getattr(self, f)) is None else t.to(device) for f in _FIELDS)
        )

    def select(self, rows: list[int]) -> TokenBatch:
        """The given rows only, trimmed to their longest input."""
        idx = torch.tensor(rows, device=self.input_ids.device)
        width = int(self.attention_mask[idx].sum(1).max())
        enc = [getattr(self, f)[idx][:, :width] for f in ("input_ids", "attention_mask")]
        if self.decoder_input_ids is None:
            scored = [getattr(self, f)[idx][:, :width] for f in ("pos_mask", "labels")]
            return TokenBatch(*enc, *scored, self.group[idx])
        dec_width = int(self.decoder_attention_mask[idx].sum(1).max())
        dec = [getattr(self, f)[idx][:, :dec_width] for f in _DECODER_FIELDS]
        return TokenBatch(*enc, *dec[:2], self.group[idx], *dec[2:])


_FIELDS = tuple(TokenBatch.__dataclass_fields__)
_DECODER_FIELDS = ("pos_mask", "labels", "decoder_input_ids", "decoder_attention_mask")


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (R, width) right-padded with `pad`, attention mask (R, width))."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return ids, mask


def make_batch(
    tokenizer,
    pairs: list[tuple[str, str | None]],
    groups: list[int] | None = None,
    max_len: int = 1 << 30,
    layout: Layout | None = None,
) -> TokenBatch:
    """Tokenise (prompt, target-or-None) pairs into one right-padded batch.

    With a target, its tokens (a classifier's label) are scored (teacher forcing). Without
    one, the single position after the prompt (the decoder's first, a classifier's only) is
    scored with an unknown label (used for KL / unchanged-argmax checks).

    Args:
        layout: how the model reads a pair (`models.forward.layout`); default: causal.
    """
    if not pairs:
        raise MendError("empty batch")
    encoded = [encode_row(tokenizer, p, t, max_len, layout) for p, t in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, attention = _padded([row.ids for row in encoded], pad)
    decoder = decoder_mask = None
    if encoded[0].decoder is not None:
        decoder, decoder_mask = _padded([row.decoder for row in encoded], pad)
    scored_shape = decoder.shape if decoder is not None else input_ids.shape
    pos_mask = torch.zeros(scored_shape, dtype=torch.bool)
    labels = torch.full(scored_shape, IGNORE, dtype=torch.long)
    for r, row in enumerate(encoded):
        pos_mask[r, row.scored] = True
        labels[r, row.scored] = torch.tensor(row.labels)
    group = torch.tensor(
        groups if groups is not None else list(range(len(pairs))), dtype=torch.long
    )
    return TokenBatch(input_ids, attention, pos_mask, labels, group, decoder, decoder_mask)


def check_requests(tokenizer, requests, max_len: int, layout: Layout | None = None) -> None:
    """Tokenise every prompt, target and probe once, so bad records fail before any work starts."""
    for i, r in enumerate(requests):
        try:
            encode_row(tokenizer, r.prompt, r.target, max_len, layout)
            for p in r.rephrases:
                encode_row(tokenizer, p, r.target, max_len, layout)
            for probe in r.locality:
                encode_row(tokenizer, probe.prompt, probe.answer, max_len, layout)
        except MendError as e:
            raise MendError(f"record {i}: {e}") from None
