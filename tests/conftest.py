"""Tiny random models of every supported family, and an offline tokenizer trained on the spot."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mend.types import EditRequest, Probe

SUBJECTS = [
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
    "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yvonne",
    "Zara", "Quentin", "Uma", "Xavier", "Liam", "Emma", "Noah", "Ava", "Mason", "Mia",
]  # fmt: skip
OBJECTS = ["red", "blue", "green", "apple", "river", "stone", "tiger", "piano", "paper", "cloud"]
TEMPLATES = [
    ("The favourite thing of {} is", "{} really likes the"),
    ("The colour loved by {} is", "What {} loves most is"),
]


def corpus() -> list[str]:
    lines = []
    for s in SUBJECTS:
        for t, r in TEMPLATES:
            for o in OBJECTS:
                lines.append(f"{t.format(s)} {o}. {r.format(s)} {o}.")
    return lines


def make_tokenizer(style: str = "bpe") -> PreTrainedTokenizerFast:
    """A small tokenizer: byte-level BPE (GPT-2 style) or Metaspace (SentencePiece style)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>" if style != "bpe" else None))
    if style == "bpe":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


TINY = {
    "llama": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4, n_positions=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                     max_position_embeddings=64),
    "gptj": dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, rotary_dim=4),
    "gpt_neo": dict(hidden_size=32, num_layers=4, num_heads=4, max_position_embeddings=64,
                    attention_types=[[["global", "local"], 2]], window_size=16),
}  # fmt: skip
FAMILIES = list(TINY)


def tiny_model(model_type: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, **TINY[model_type])
    for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout"):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.config.name_or_path = f"tiny-{model_type}"
    return model


def tiny_mend(tokenizer, cls=None, **kw):
    """A MendEditor (or subclass `cls`, with its extra `kw`) for a fresh tiny llama, with an
    identity-initialised rank-8 editor whose step alpha is 0.05."""
    from mend.config import EditorConfig
    from mend.edit import MendEditor
    from mend.editor import EditorNet
    from mend.models import find_editable

    model = tiny_model("llama", len(tokenizer))
    shapes = {p.name: p.in_out for p in find_editable(model)}
    net = EditorNet(shapes, EditorConfig(rank=8, init_alpha=0.05))
    return (cls or MendEditor)(model, tokenizer, net, **kw)


def fact_requests(n: int, seed: int = 0) -> list[EditRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = SUBJECTS[i % len(SUBJECTS)]
        t, r = TEMPLATES[(i // len(SUBJECTS)) % len(TEMPLATES)]
        new, old = rng.sample(OBJECTS, 2)
        other = SUBJECTS[(i + 7) % len(SUBJECTS)]
        out.append(
            EditRequest(
                prompt=t.format(s),
                target=new,
                rephrases=(r.format(s),),
                locality=(Probe(t.format(other), old),),
                target_true=old,
                neighborhood=(t.format(other),),
            )
        )
    return out


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer("bpe")


@pytest.fixture(params=FAMILIES)
def family_model(request, tokenizer):
    return tiny_model(request.param, len(tokenizer))
