"""Editing methods to compare MEND against; each has `.edit(requests) -> EditResult`."""

from mend.baselines.ft import FTEditor, kl_prompts
from mend.baselines.simple import GradEditor, NoEdit

__all__ = ["FTEditor", "GradEditor", "NoEdit", "kl_prompts"]
