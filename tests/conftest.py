"""Tiny random models of every supported family, and an offline tokenizer trained on the spot."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
)

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
FAMILIES = list(TINY)  # the decoder-only families

# Encoder-decoder and classifier families; the tokenizer's ids: <pad> 0, <eos> 1. A T5 decoder
# starts from <pad>, a BART decoder from its end-of-sequence token (as the released models do).
_T5 = dict(
    d_model=32,
    d_ff=48,
    num_layers=3,
    num_decoder_layers=3,
    num_heads=4,
    d_kv=8,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
_BERT = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
)
TINY_OTHER = {
    "t5": ("t5", _T5),
    "t5-gated": ("t5", _T5 | {"feed_forward_proj": "gated-gelu"}),  # Flan-T5's MLP
    "mt5": ("mt5", _T5),
    "bart": ("bart", dict(d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                          max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                          eos_token_id=1, decoder_start_token_id=1, forced_bos_token_id=None)),
    "bert": ("bert", _BERT),
    "roberta": ("roberta", _BERT | {"max_position_embeddings": 66}),  # positions start at 2
    "distilbert": ("distilbert", dict(dim=32, hidden_dim=48, n_layers=4, n_heads=4,
                                      max_position_embeddings=64, pad_token_id=0)),
}  # fmt: skip
SEQ2SEQ_FAMILIES = ["t5", "t5-gated", "mt5", "bart"]
CLASSIFIER_FAMILIES = ["bert", "roberta", "distilbert"]
# A tiny classifier's labels: the objects of the toy facts, so `fact_requests` serve every kind.
LABELS = dict(enumerate(OBJECTS))


def tiny_model(model_type: str, vocab_size: int, seed: int = 0):
    """A tiny random model: a family of TINY (causal LM) or of TINY_OTHER (seq2seq LM or
    classifier, named as there, e.g. "t5-gated")."""
    torch.manual_seed(seed)
    if model_type in TINY:
        cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, **TINY[model_type])
        auto = AutoModelForCausalLM
    else:
        family, kw = TINY_OTHER[model_type]
        cfg = AutoConfig.for_model(family, vocab_size=vocab_size, **kw)
        auto = AutoModelForSeq2SeqLM
        if model_type in CLASSIFIER_FAMILIES:
            cfg.id2label, cfg.label2id = LABELS, {v: k for k, v in LABELS.items()}
            auto = AutoModelForSequenceClassification
    for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout",
                "dropout", "dropout_rate", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "activation_dropout", "seq_classif_dropout", "classifier_dropout"):  # fmt: skip
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    model = auto.from_config(cfg).eval()
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


@pytest.fixture(params=SEQ2SEQ_FAMILIES + CLASSIFIER_FAMILIES)
def other_model(request, tokenizer):
    """A tiny seq2seq LM or classifier of every such family."""
    return tiny_model(request.param, len(tokenizer))


@pytest.fixture(params=FAMILIES + SEQ2SEQ_FAMILIES + CLASSIFIER_FAMILIES)
def any_model(request, tokenizer):
    """A tiny model of every supported family, of every kind."""
    return tiny_model(request.param, len(tokenizer))
