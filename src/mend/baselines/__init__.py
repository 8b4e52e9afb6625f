"""Editing methods to compare MEND against; each has `.edit(requests) -> EditResult`.

`BASELINES` maps a method's name (as `mend eval --method` and `benchmarks/compare.py` take it)
to a function building it for a model: `make_baseline(name, model, tokenizer, **options)`.
Adding a method is one file here and one entry in the table.
"""

from __future__ import annotations

from collections.abc import Callable

from mend.baselines.ft import FTEditor, kl_prompts
from mend.baselines.locate import LocateConfig, LocateEditor, default_layers
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


def _locate(method: str):
    def build(model, tokenizer, layers=None, mom2_weight: float | None = None,
              null_space: float | None = None, stats_text: str | None = None, **_):  # fmt: skip
        given = {"mom2_weight": mom2_weight, "null_space": null_space, "text": stats_text}
        config = LocateConfig.published(
            method, tuple(layers) if layers else default_layers(model, method),
            **{k: v for k, v in given.items() if v is not None},
        )  # fmt: skip
        return LocateEditor(model, tokenizer, method, config)

    return build


def _none(model, tokenizer, **_):
    return NoEdit(model, tokenizer)


# name -> builder(model, tokenizer, **options); options a builder does not use are ignored
BASELINES: dict[str, Callable] = {
    "ft": _ft, "ft-kl": _ft_kl, "grad": _grad, "ls": _ls, "none": _none,
    "rome": _locate("rome"), "memit": _locate("memit"), "alphaedit": _locate("alphaedit"),
}  # fmt: skip


# every option some baseline builder reads (`mend eval` and compare.py flags of these names)
OPTIONS = ("ft_lr", "ft_steps", "grad_lr", "ls_lr", "preserve", "null_space", "loc_data",
           "layers", "mom2_weight", "stats_text")  # fmt: skip


def make_baseline(name: str, model, tokenizer, **options):
    """The baseline method `name` for model, with its options (ft_lr, ft_steps, grad_lr, ls_lr,
    preserve, null_space, loc_data; layers, mom2_weight for rome, memit and alphaedit)."""
    if name not in BASELINES:
        raise MendError(f"unknown method {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name](model, tokenizer, **options)


__all__ = [
    "BASELINES", "OPTIONS", "FTEditor", "GradEditor", "LocateConfig", "LocateEditor", "NoEdit",
    "kl_prompts", "least_squares_editor", "make_baseline",
]  # fmt: skip
