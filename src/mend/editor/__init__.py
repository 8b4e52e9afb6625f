"""The editor hypernetwork: plain torch, no knowledge of transformers."""

from mend.editor.net import EditorNet, LowRankBlock, MatrixNet
from mend.editor.norm import RunningNorm

__all__ = ["EditorNet", "LowRankBlock", "MatrixNet", "RunningNorm"]
