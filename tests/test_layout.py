"""The import direction of docs/ARCHITECTURE.md, held by parsing every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mend"

# A module may import only modules of a strictly lower layer (or its own sub-package).
LAYER = {
    "errors": 0, "config": 1, "types": 1, "files": 1, "derived": 1,
    "models": 2, "editor": 2, "data": 2,
    "losses": 3, "grads": 3, "result": 3,
    "metrics": 4, "shield": 4, "checkpoint": 4, "key_stats": 4, "aggregate": 4,
    "edit": 5,
    "plots": 5,
    "sequence": 5,
    "evaluate": 6, "training": 6, "baselines": 6,
    "demo": 7, "generation": 7,
    "serve": 8,
    "cli": 9,
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _top(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def test_every_module_is_in_the_layer_table():
    tops = {_top(p) for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC}
    assert tops <= set(LAYER), tops - set(LAYER)


def test_imports_point_down_only():
    bad = []
    for path in SRC.rglob("*.py"):
        if path.parent == SRC and path.name == "__init__.py":
            continue
        mine = _top(path)
        for name in _imports(path):
            if not name.startswith("mend."):
                continue
            other = name.split(".")[1]
            if other != mine and LAYER[other] >= LAYER[mine]:
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, bad


def test_editor_is_plain_torch():
    for path in (SRC / "editor").rglob("*.py"):
        assert not any(n.startswith("transformers") for n in _imports(path)), path


def test_architecture_knowledge_lives_in_models_only():
    """No `if "llama" in name` dispatch outside the architecture table."""
    for path in SRC.rglob("*.py"):
        if path.parent.name == "models":
            continue
        text = path.read_text()
        for family in ("gpt_neox", "gptj", "gate_proj", "c_fc"):
            assert family not in text, f"{family!r} mentioned in {path.relative_to(SRC)}"
