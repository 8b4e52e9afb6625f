"""`ls`: the training-free control for many edits: an identity editor with the least-squares solve.

Each edited token asks for the output change a plain gradient step would make at its own key,
v_t = -lr |k_t|^2 delta_t, and one ridge least-squares change per matrix meets all of them
(`MendEditor(aggregate="ls")`). A trained editor that does not beat it has not earned its
training (UltraEdit's control, Gu et al. 2025).
"""

from __future__ import annotations

from mend.config import EditorConfig
from mend.edit import MendEditor
from mend.editor.net import EditorNet
from mend.models.params import find_editable


def least_squares_editor(
    model, tokenizer, lr: float = 0.003, ridge: float = 1e-4, preserve: float = 0.0,
    text_moments=None, edit_modules=(), null_space: float | None = None,
):  # fmt: skip
    """A MendEditor whose editor is the identity (u~ = k, delta~ = delta, step `lr`), solving
    (with `preserve` > 0, holding the keys of ordinary text in place; with `null_space`,
    changing only what text's keys leave out: `MendEditor`)."""
    shapes = {p.name: p.in_out for p in find_editable(model, edit_modules)}
    config = EditorConfig(n_blocks=0, init_alpha=lr, precondition=None, edit_modules=edit_modules)
    return MendEditor(model, tokenizer, EditorNet(shapes, config), boost=(), aggregate="ls",
                      ridge=ridge, preserve=preserve, text_moments=text_moments,
                      null_space=null_space, editor_bf16=False)  # fmt: skip
