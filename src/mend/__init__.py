"""mend: fast model editing with MEND editor networks.

Train an editor once (`train`), then edit a model in a fraction of a second
(`MendEditor.edit`), with revert, save and delta export on the returned `EditResult`.
"""

from mend.checkpoint import load_editor, save_editor
from mend.config import EditorConfig, TrainConfig
from mend.data import load_requests
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.errors import MendError
from mend.evaluate import evaluate
from mend.models import load_model
from mend.result import EditResult, apply_delta
from mend.sequence import EditSequence
from mend.training.loop import train
from mend.training.recipe import load_recipe
from mend.types import EditRequest, Probe

__all__ = [
    "EditRequest",
    "EditResult",
    "EditSequence",
    "EditorNet",
    "EditorConfig",
    "MendEditor",
    "MendError",
    "Probe",
    "TrainConfig",
    "apply_delta",
    "evaluate",
    "load_editor",
    "load_model",
    "load_recipe",
    "load_requests",
    "save_editor",
    "train",
]
