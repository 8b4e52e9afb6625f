"""Recipes: the training choices behind a result, as JSON files shipped with the package.

A recipe names its data (a data set name or path, optionally sliced: "zsre-eval[600:]"), its
validation data (None: held out from the training data) and the settings that differ from
`TrainConfig`'s defaults, grouped as in `TrainConfig.to_dict`. `mend train --recipe NAME`
(a shipped name or a path to such a file) runs it; flags override single settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mend.config import TrainConfig
from mend.errors import MendError

RECIPES = Path(__file__).parent / "recipes"
_KEYS = {"description", "data", "val", "needs_init", "config"}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    config: TrainConfig
    data: str | None = None
    val: str | None = None
    needs_init: bool = False  # it fine-tunes a trained editor (`init_editor`)


def recipe_names() -> list[str]:
    """The shipped recipes, by name."""
    return sorted(p.stem for p in RECIPES.glob("*.json"))


def read_recipe_file(
    name_or_path: str | Path, folder: Path, keys: set[str], what: str
) -> tuple[Path, dict]:
    """(path, the JSON object) of a recipe file: `name_or_path` as a path, else a recipe
    shipped in `folder` by name. `what` names the kind of recipe in errors.

    Raises:
        MendError: no such recipe, unreadable JSON, not an object with a 'config' object, or
            keys outside `keys`.
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = folder / f"{name_or_path}.json"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in folder.glob("*.json")))
            raise MendError(f"no {what} {str(name_or_path)!r}: give a file or one of {names}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MendError(f"{what} {path}: cannot read it ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("config", {}), dict):
        raise MendError(f"{what} {path}: expected an object with a 'config' object")
    unknown = set(raw) - keys
    if unknown:
        raise MendError(f"{what} {path}: unknown keys {sorted(unknown)}")
    return path, raw


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name, or a recipe file by path; validated.

    Raises:
        MendError: no such recipe, unreadable JSON, unknown keys or invalid settings.
    """
    path, raw = read_recipe_file(name_or_path, RECIPES, _KEYS, "recipe")
    try:
        config = TrainConfig.from_dict(raw.get("config", {}))
    except (MendError, TypeError) as e:
        raise MendError(f"recipe {path}: {e}") from None
    return Recipe(path.stem, raw.get("description", ""), config, raw.get("data"),
                  raw.get("val"), bool(raw.get("needs_init", False)))  # fmt: skip
