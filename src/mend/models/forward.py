"""Run a model of any kind: logits only at the positions that are scored, greedy and sampled
text. How a batch meets the model depends on its kind (`mend.models.archs`): a causal LM's
scored positions are read off its last hidden states, a seq2seq model's off its decoder's, and
a classifier's one row of class logits is its row's scored position."""

from __future__ import annotations

import inspect

import torch

from mend.errors import MendError
from mend.models.archs import kind_of
from mend.models.head import project
from mend.types import CAUSAL, CLASSIFIER, SEQ2SEQ, Layout


def layout(model) -> Layout:
    """How `model` reads edit rows (`mend.data.collate.make_batch`): its kind, a seq2seq
    decoder's start token, a classifier's label names."""
    kind, cfg = kind_of(model), model.config
    if kind == SEQ2SEQ:
        start = getattr(cfg, "decoder_start_token_id", None)
        if start is None:
            start = getattr(model.generation_config, "decoder_start_token_id", None)
        if start is None:
            raise MendError("the seq2seq model's config names no decoder_start_token_id")
        return Layout(kind, decoder_start=int(start))
    if kind == CLASSIFIER:
        names = {int(i): str(name) for i, name in cfg.id2label.items()}
        return Layout(kind, labels=tuple((name, i) for i, name in sorted(names.items())))
    return Layout(kind)


def decoder_inputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A seq2seq batch's decoder input ids and mask; a batch of running text without them
    (key statistics) feeds the decoder its own input, shifted right after the start token."""
    if batch.decoder_input_ids is not None:
        return batch.decoder_input_ids, batch.decoder_attention_mask
    return model.prepare_decoder_input_ids_from_labels(labels=batch.input_ids), batch.attention_mask


def _seq2seq(model, batch):
    dec_ids, dec_mask = decoder_inputs(model, batch)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask, use_cache=False)  # fmt: skip


def forward_blocks(model, batch) -> None:
    """Run every block of the model on batch (for hooks that read edited weights' inputs),
    without the head where the family allows it."""
    kind = kind_of(model)
    if kind == SEQ2SEQ:
        _seq2seq(model, batch)
    elif kind == CLASSIFIER:
        model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    else:
        model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )


def scored_logits(model, batch) -> torch.Tensor:
    """Logits at batch.pos_mask only: (P, vocab or classes), in fp32 (batch: a
    mend.data.TokenBatch).

    Skipping the vocabulary projection at unscored positions matters: for small models the
    head is a large share of the cost. A seq2seq model's targets are short, and it projects
    every decoder position; a classifier's rows each hold one scored position.
    """
    kind = kind_of(model)
    if kind == SEQ2SEQ:
        return _seq2seq(model, batch).logits[batch.pos_mask].float()
    if kind == CLASSIFIER:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return out.logits[batch.pos_mask.any(1)].float()  # (rows with a scored position, C)
    out = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    hidden = out.last_hidden_state[batch.pos_mask]  # (P, hidden)
    return project(model.get_output_embeddings(), hidden)


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """The model's greedy answer to prompt: a causal LM's continuation (new text only), a
    seq2seq model's decoded output, a classifier's predicted label name."""
    kind = kind_of(model)
    text = prompt.rstrip() if kind == CAUSAL else prompt.strip()
    ids = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        if kind == CLASSIFIER:
            label = int(model(**ids).logits[0].argmax())
            return str(model.config.id2label.get(label, label))
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    start = 0 if kind == SEQ2SEQ else ids["input_ids"].shape[1]
    return tokenizer.decode(out[0, start:], skip_special_tokens=True)


def _stop_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def cache_argument(model) -> str:
    """The name of the forward argument that takes the key-value cache: "cache" from
    transformers 5, "past_key_values" before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """A sampled continuation of prompt (new text only), the same for the same seed.

    Each token is drawn from the softmax of the last logits over `temperature`, kept to the
    smallest set of most likely tokens whose probability reaches `top_p`. The draws come from
    a generator of this call's own, seeded with `seed`, so calls running at once neither share
    nor move torch's global random state. It stops at an end-of-sequence token.
    """
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = next(model.parameters()).device
    ids = tokenizer(prompt.rstrip(), return_tensors="pt")["input_ids"].to(device)
    generator = torch.Generator().manual_seed(seed)
    stop, new, past = _stop_ids(model, tokenizer), [], None
    name = cache_argument(model)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, use_cache=True, **{name: past})
            past = out.past_key_values
            probs = torch.softmax(out.logits[0, -1].float().cpu() / temperature, -1)
            if top_p < 1:
                ranked, order = probs.sort(descending=True)
                drop = ranked.cumsum(0) - ranked >= top_p  # past the nucleus
                probs = torch.zeros_like(probs).scatter_(0, order, ranked.masked_fill(drop, 0))
            token = int(torch.multinomial(probs, 1, generator=generator))
            if token in stop:
                break
            new.append(token)
            ids = torch.tensor([[token]], device=device)
    return tokenizer.decode(new, skip_special_tokens=True)
