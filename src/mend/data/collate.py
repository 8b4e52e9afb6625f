"""Tokenise (prompt, target) pairs into right-padded batches with scored positions.

The target is tokenised *in context*: we tokenise "prompt target" as one string and take the
target to be everything after the longest common prefix with the tokenised prompt. The first
target token is then exactly the token the model would predict after the prompt, whatever the
tokenizer does with leading spaces (GPT-2 BPE "ĠParis" vs SentencePiece "▁Paris").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mend.errors import MendError

IGNORE = -100


def encode(tokenizer, prompt: str, target: str | None, max_len: int) -> tuple[list[int], int]:
    """Token ids of prompt (+ " " + target) and the number of prompt tokens.

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
    if len(ids) > max_len:
        raise MendError(
            f"input of {len(ids)} tokens is longer than the model's context of {max_len}: "
            f"{prompt[:60]!r}"
        )
    return ids, n_prompt


@dataclass
class TokenBatch:
    """Rows of token ids plus which positions are scored.

    Attributes:
        input_ids: (R, S) right-padded ids.
        attention_mask: (R, S) 1 on real tokens.
        pos_mask: (R, S) True where the logits predict a scored next token.
        labels: (R, S) the scored next token at pos_mask, IGNORE where unknown or unscored.
        group: (R,) which edit (of the current set) each row belongs to.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pos_mask: torch.Tensor
    labels: torch.Tensor
    group: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def pos_row(self) -> torch.Tensor:
        """(P,) the row of every scored position, in pos_mask order."""
        return self.pos_mask.nonzero()[:, 0]

    def to(self, device) -> TokenBatch:
        return TokenBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def select(self, rows: list[int]) -> TokenBatch:
        """The given rows only, trimmed to their longest input."""
        idx = torch.tensor(rows, device=self.input_ids.device)
        width = int(self.attention_mask[idx].sum(1).max())
        return TokenBatch(
            *(
                getattr(self, f)[idx][:, :width]
                for f in ("input_ids", "attention_mask", "pos_mask", "labels")
            ),
            self.group[idx],
        )


def make_batch(
    tokenizer,
    pairs: list[tuple[str, str | None]],
    groups: list[int] | None = None,
    max_len: int = 1 << 30,
) -> TokenBatch:
    """Tokenise (prompt, target-or-None) pairs into one right-padded batch.

    With a target, its tokens are scored (teacher forcing). Without one, the single position
    after the prompt is scored with an unknown label (used for KL / unchanged-argmax checks).
    """
    if not pairs:
        raise MendError("empty batch")
    encoded = [encode(tokenizer, p, t, max_len) for p, t in pairs]
    width = max(len(ids) for ids, _ in encoded)
    n = len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    pos_mask = torch.zeros((n, width), dtype=torch.bool)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for r, ((ids, n_prompt), (_, target)) in enumerate(zip(encoded, pairs, strict=True)):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        if target is None:
            pos_mask[r, n_prompt - 1] = True
        else:
            # logits at position p predict token p + 1
            pos_mask[r, n_prompt - 1 : len(ids) - 1] = True
            labels[r, n_prompt - 1 : len(ids) - 1] = torch.tensor(ids[n_prompt:])
    group = torch.tensor(groups if groups is not None else list(range(n)), dtype=torch.long)
    return TokenBatch(input_ids, attention, pos_mask, labels, group)


def check_requests(tokenizer, requests, max_len: int) -> None:
    """Tokenise every prompt, target and probe once, so bad records fail before any work starts."""
    for i, r in enumerate(requests):
        try:
            encode(tokenizer, r.prompt, r.target, max_len)
            for p in r.rephrases:
                encode(tokenizer, p, r.target, max_len)
            for probe in r.locality:
                encode(tokenizer, probe.prompt, probe.answer, max_len)
        except MendError as e:
            raise MendError(f"record {i}: {e}") from None
