"""Architecture table keyed on `config.model_type`: what kind of model a family is, where its
blocks are, what MEND edits, and how long an input the model takes.

Three kinds of model share one editing algorithm and differ only in how a (prompt, target)
pair becomes tensors and logits (`mend.data.collate`, `mend.models.forward`):
- "causal": a decoder-only LM; the target is scored after the prompt in one sequence.
- "seq2seq": an encoder-decoder LM; the prompt is the encoder's input, the target the
  decoder's labels (teacher-forced after the decoder start token).
- "classifier": an encoder with a sequence-classification head; the target is a label.
"""

from __future__ import annotations

from dataclasses import dataclass

from mend.errors import MendError
from mend.types import CAUSAL, CLASSIFIER, KINDS, SEQ2SEQ


@dataclass(frozen=True)
class ArchSpec:
    """What MEND needs to know about one family.

    Attributes:
        blocks: dotted path of the ModuleList of transformer blocks (a seq2seq model's
            encoder blocks).
        mlp: MLP weight modules inside one block, in forward order. A name a block lacks is
            skipped: T5's plain MLP has `wi`, its gated one (Flan-T5, mT5) `wi_0` and `wi_1`.
        final_norm: dotted path of the norm applied after the last block (causal kind only:
            the fast path of `models/upper.py` reruns it).
        kind: "causal", "seq2seq" or "classifier" (module docstring).
        decoder_blocks: a seq2seq model's decoder blocks.
        decoder_mlp: MLP weight modules inside one decoder block.
        last: how many blocks of each stack are edited by default.
    """

    blocks: str
    mlp: tuple[str, ...]
    final_norm: str | None = None
    kind: str = CAUSAL
    decoder_blocks: str | None = None
    decoder_mlp: tuple[str, ...] = ()
    last: int = 3

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == SEQ2SEQ) != (self.decoder_blocks is not None):
            raise ValueError("a seq2seq family names its decoder blocks, and only it")

    @property
    def decoder(self) -> str | None:
        """Dotted path of the decoder (seq2seq): the modules below it read decoder tokens."""
        return self.decoder_blocks.rpartition(".")[0] if self.decoder_blocks else None

    def stacks(self) -> list[tuple[str, tuple[str, ...]]]:
        """(blocks path, MLP names) of each stack of blocks: one, or encoder and decoder."""
        both = [(self.blocks, self.mlp), (self.decoder_blocks, self.decoder_mlp)]
        return [(b, m) for b, m in both if b is not None]

    def default_modules(self, model) -> tuple[str, ...]:
        """The MLP matrices of the last `last` blocks of every stack: what MEND edits by
        default (Mitchell et al., Fast Model Editing at Scale: the last 3 blocks of a
        decoder; the last 2 encoder and last 2 decoder blocks of T5 and BART)."""
        out = []
        for path, mlp in self.stacks():
            try:
                blocks = model.get_submodule(path)
            except AttributeError as e:
                raise MendError(f"model has no block list at {path!r}") from e
            for i in range(max(0, len(blocks) - self.last), len(blocks)):
                present = [m for m in mlp if _has(blocks[i], m)]
                if not present:
                    raise MendError(f"block {path}.{i} has none of the MLP weights {mlp}")
                out += [f"{path}.{i}.{m}" for m in present]
        return tuple(out)


def _has(module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


_LLAMA = ArchSpec("model.layers", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "model.norm")
_T5_MLP = tuple(f"DenseReluDense.{w}" for w in ("wi", "wi_0", "wi_1", "wo"))
# T5's encoder block is [self-attention, MLP], its decoder block [self-, cross-attention, MLP].
_T5 = ArchSpec("encoder.block", tuple(f"layer.1.{m}" for m in _T5_MLP), kind=SEQ2SEQ,
               decoder_blocks="decoder.block", decoder_mlp=tuple(f"layer.2.{m}" for m in _T5_MLP),
               last=2)  # fmt: skip
# Classifiers: the last 3 blocks, as for decoders: an edit of one input's label has the
# width of three blocks' MLPs to land in (MiniLM-L6 edits half its blocks).
_BERT_MLP = ("intermediate.dense", "output.dense")

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": ArchSpec("transformer.h", ("mlp.c_fc", "mlp.c_proj"), "transformer.ln_f"),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers", ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), "gpt_neox.final_layer_norm"
    ),
    "gptj": ArchSpec("transformer.h", ("mlp.fc_in", "mlp.fc_out"), "transformer.ln_f"),
    "gpt_neo": ArchSpec("transformer.h", ("mlp.c_fc", "mlp.c_proj"), "transformer.ln_f"),
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
    "bart": ArchSpec(
        "model.encoder.layers",
        ("fc1", "fc2"),
        kind=SEQ2SEQ,
        decoder_blocks="model.decoder.layers",
        decoder_mlp=("fc1", "fc2"),
        last=2,
    ),  # fmt: skip
    "bert": ArchSpec("bert.encoder.layer", _BERT_MLP, kind=CLASSIFIER),
    "roberta": ArchSpec("roberta.encoder.layer", _BERT_MLP, kind=CLASSIFIER),
    "distilbert": ArchSpec(
        "distilbert.transformer.layer", ("ffn.lin1", "ffn.lin2"), kind=CLASSIFIER
    ),
}


def arch_for(model) -> ArchSpec:
    """Look up the model's family by `config.model_type`."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHS:
        raise MendError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))} "
            "(add an entry to mend.models.archs.ARCHS)"
        )
    return ARCHS[model_type]


def kind_of(model_or_config) -> str:
    """The kind of a model (or its config): its family's, "causal" for a family not in the
    table (which `arch_for` refuses where the blocks must be known)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    spec = ARCHS.get(getattr(cfg, "model_type", None))
    return spec.kind if spec is not None else CAUSAL


def context_length(model) -> int:
    """The longest input the model accepts, from whichever config key its family uses."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30
