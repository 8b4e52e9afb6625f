"""Architecture table keyed on `config.model_type`: where the blocks are, what MEND edits, and
how long an input the model takes."""

from __future__ import annotations

from dataclasses import dataclass

from mend.errors import MendError


@dataclass(frozen=True)
class ArchSpec:
    """What MEND needs to know about one decoder-only family.

    Attributes:
        blocks: dotted path of the ModuleList of transformer blocks.
        mlp: MLP weight modules inside one block, in forward order.
        final_norm: dotted path of the norm applied after the last block.
    """

    blocks: str
    mlp: tuple[str, ...]
    final_norm: str

    def default_modules(self, n_blocks: int, last: int = 3) -> tuple[str, ...]:
        """The MLP matrices of the last `last` blocks: what MEND edits by default (Mitchell et al.,
        Fast Model Editing at Scale)."""
        first = max(0, n_blocks - last)
        return tuple(f"{self.blocks}.{i}.{m}" for i in range(first, n_blocks) for m in self.mlp)


_LLAMA = ArchSpec("model.layers", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "model.norm")

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


def context_length(model) -> int:
    """The longest input the model accepts, from whichever config key its family uses."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30
