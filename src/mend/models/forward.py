"""Run a causal LM and compute logits only at the positions that are scored."""

from __future__ import annotations

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
