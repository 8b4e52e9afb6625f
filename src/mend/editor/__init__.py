"""The editor hypernetwork: plain torch, no knowledge of transformers."""

from mend.editor.net import Editor, EditorNet, LowRankBlock
from mend.editor.norm import RunningNorm

__all__ = ["Editor", "EditorNet", "LowRankBlock", "RunningNorm"]
