"""EditorNet checkpoints (JSON config + safetensors) and training state, written atomically.

A checkpoint folder holds:
    editor_config.json   format, EditorConfig, the base model's identity, sha256 of the weights
    editor.safetensors   editor networks, normalisation statistics and log step sizes
    train_state.pt       (resume checkpoints only) optimiser state and loop counters,
                         read back with torch.load(weights_only=True)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mend.config import EditorConfig
from mend.editor.net import EditorNet
from mend.errors import MendError
from mend.files import atomic_write, read_json_format, write_json
from mend.models.params import find_editable

FORMAT = "mend-editor-v1"
CONFIG_FILE = "editor_config.json"
WEIGHTS_FILE = "editor.safetensors"
STATE_FILE = "train_state.pt"


def model_identity(model, names: list[str]) -> dict[str, Any]:
    """What an editor must match: the model family and the names and shapes of edited weights."""
    params = find_editable(model, names)
    return {
        "name": str(model.config.name_or_path),
        "model_type": model.config.model_type,
        "params": {p.name: list(p.in_out) for p in params},
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def save_editor(folder: str | Path, net: EditorNet, identity: dict[str, Any], extra=None) -> None:
    """Write editor_config.json and editor.safetensors into folder (each file atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(
        folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT})
    )
    config = {
        "format": FORMAT,
        "editor": net.cfg.to_dict(),
        "model": identity,
        "sha256": _sha256(folder / WEIGHTS_FILE),
    } | (extra or {})
    write_json(folder / CONFIG_FILE, config)


def resave_editor(folder: str | Path, net: EditorNet) -> None:
    """Rewrite folder's editor (e.g. after `edit.fit_shared`), keeping the config's model
    identity and its other entries (best_step, val)."""
    config = read_config(folder)
    extra = {k: v for k, v in config.items() if k not in ("format", "editor", "model", "sha256")}
    save_editor(folder, net, config["model"], extra)


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    config = read_json_format(path, FORMAT, "not an editor checkpoint", "corrupt editor checkpoint")
    model, editor = config.get("model"), config.get("editor")
    params = model.get("params") if isinstance(model, dict) else None
    if (
        not isinstance(editor, dict)
        or not isinstance(params, dict)
        or not params
        or not all(isinstance(model.get(k), str) for k in ("name", "model_type"))
        or not all(
            isinstance(s, list) and len(s) == 2 and all(type(d) is int and d > 0 for d in s)
            for s in params.values()
        )
    ):
        raise MendError(f"corrupt editor checkpoint: {path} lacks a valid 'editor' or 'model'")
    return config


def load_editor(folder: str | Path, model=None) -> EditorNet:
    """Rebuild an EditorNet from a checkpoint folder; with `model`, refuse one made for another model."""
    folder = Path(folder)
    config = read_config(folder)
    ident = config["model"]
    shapes = {name: tuple(shape) for name, shape in ident["params"].items()}
    if model is not None:
        if model.config.model_type != ident["model_type"]:
            raise MendError(
                f"editor was made for a {ident['model_type']} model ({ident['name']}), "
                f"not {model.config.model_type}"
            )
        try:
            here = model_identity(model, list(shapes))["params"]
        except MendError as e:
            raise MendError(
                f"editor was made for a different model ({ident['name']}): {e}"
            ) from None
        for name, shape in shapes.items():
            if tuple(here[name]) != shape:
                raise MendError(
                    f"editor was made for a different model ({ident['name']}): {name} is "
                    f"{tuple(here[name])} here but {shape} in the editor"
                )
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        raise MendError(f"corrupt editor checkpoint: {weights} is missing")
    if config.get("sha256") and _sha256(weights) != config["sha256"]:
        raise MendError(f"corrupt editor checkpoint: {weights} does not match its checksum")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise MendError(f"corrupt editor checkpoint: cannot read {weights} ({e})") from None
    net = EditorNet(shapes, EditorConfig.from_dict(config["editor"]))
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise MendError(f"corrupt editor checkpoint: {' '.join(str(e).split())}") from None
    net.eval()
    return net


def save_train_state(folder: str | Path, state: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_train_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise MendError(f"cannot resume: {path} is missing") from None
    except Exception as e:
        raise MendError(f"cannot resume: {path} is corrupt ({e})") from None
