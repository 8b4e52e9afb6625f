"""Everything that knows about model architectures and loading lives here."""

from mend.models.archs import ARCHS, ArchSpec, arch_for, context_length, kind_of
from mend.models.load import load_model
from mend.models.params import EditableParam, find_editable

__all__ = [
    "ARCHS",
    "ArchSpec",
    "EditableParam",
    "arch_for",
    "context_length",
    "find_editable",
    "kind_of",
    "load_model",
]
