"""Editing methods to compare MEND against; each has `.edit(requests) -> EditResult`.

`BASELINES` maps a method's name (as `mend eval --method` and `benchmarks/compare.py` take it)
to a function building it for a model: `make_baseline(name, model, tokenizer, **options)`.
Adding a method is one file here and one entry in the table.
"""

from __future__ import annotations

from collections.abc import Callable

from mend.baselines.ft import FTEditor, kl_prompts
from mend.baselines.ls import least_squares_editor
from mend.baselines.simple import GradEditor, NoEdit
from mend.errors import MendError


def _ft(model, tokenizer, ft_lr: float = 5e-4, ft_steps: int = 40, **_):
    return FTEditor(model, tokenizer, lr=ft_lr, max_steps=ft_steps)


def _ft_kl(model, tokenizer, ft_lr: float = 5e-4, ft_steps: int = 40,
           loc_data: str = "wikitext-valid", **_):  # fmt: skip
    loc = kl_prompts(loc_data)
    return FTEditor(model, tokenizer, lr=ft_lr, max_steps=ft_steps, kl_weight=1.0, loc_prompts=loc)


def _grad(model, tokenizer, grad_lr: float = 1e-3, **_):
    return GradEditor(model, tokenizer, lr=grad_lr)


def _ls(model, tokenizer, ls_lr: float = 0.003, preserve: float = 0.0,
        null_space: float | None = None, **_):  # fmt: skip
    return least_squares_editor(model, tokenizer, lr=ls_lr, preserve=preserve,
                                null_space=null_space)  # fmt: skip


def _none(model, tokenizer, **_):
    return NoEdit(model, tokenizer)


# name -> builder(model, tokenizer, **options); options a builder does not use are ignored
BASELINES: dict[str, Callable] = {
    "ft": _ft, "ft-kl": _ft_kl, "grad": _grad, "ls": _ls, "none": _none,
}  # fmt: skip


def make_baseline(name: str, model, tokenizer, **options):
    """The baseline method `name` for model, with its options (ft_lr, ft_steps, grad_lr, ls_lr, preserve, null_space, loc_data)."""
    if name not in BASELINES:
        raise MendError(f"unknown method {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name](model, tokenizer, **options)


__all__ = [
    "BASELINES", "FTEditor", "GradEditor", "NoEdit", "kl_prompts", "least_squares_editor",
    "make_baseline",
]  # fmt: skip
