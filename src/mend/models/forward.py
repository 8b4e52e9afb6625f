"""Run a causal LM: logits only at the positions that are scored, greedy and sampled text."""

from __future__ import annotations

import inspect

import torch

from mend.models.head import project


def scored_logits(model, batch) -> torch.Tensor:
    """Logits at batch.pos_mask only: (P, vocab), in fp32 (batch: a mend.data.TokenBatch).

    Skipping the vocabulary projection at unscored positions matters: for small models the
    head is a large share of the cost.
    """
    out = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    hidden = out.last_hidden_state[batch.pos_mask]  # (P, hidden)
    return project(model.get_output_embeddings(), hidden)


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """The model's greedy continuation of prompt (new text only)."""
    ids = tokenizer(prompt.rstrip(), return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _stop_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


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
    # the key-value cache's argument: "cache" from transformers 5, "past_key_values" before
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
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
