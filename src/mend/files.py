"""Files written whole or not at all, with the permissions a plain open() or mkdir() gives;
tensor files read back only when they are what they claim to be."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mend.errors import MendError


def _usual_mode(folder: bool) -> int:
    """The permissions a plain open() / mkdir() would give under the current umask (tempfile
    makes its files 0600 and folders 0700, which would hide checkpoints from other users)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder of `path` to fill; when the block ends without an
    error it replaces `path`, otherwise it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(_usual_mode(folder=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) on a temporary sibling of path, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _usual_mode(folder=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    atomic_write(path, write)


def read_tensors(path: str | Path, fmt: str, what: str) -> tuple[dict, dict]:
    """All tensors and the metadata of a safetensors file whose metadata says `format: fmt`.

    Raises MendError naming `what` (e.g. "mend weight delta") for a file that cannot be read, is
    corrupt or truncated, or holds something else (such as another mend file type).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:
        raise MendError(f"cannot read {what} {path}: {e}") from None
    if meta.get("format") != fmt:
        raise MendError(f"{path} is not a {what} (format {meta.get('format')!r}, not {fmt!r})")
    return tensors, meta


def read_json_format(path: Path, fmt: str, missing: str, corrupt: str) -> dict:
    """The JSON object at `path`, whose "format" must be `fmt`.

    Raises MendError "{missing}: {path} is missing" when there is no file, and one starting
    with `corrupt` when it cannot be read, is not JSON, or holds another format.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MendError(f"{missing}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MendError(f"{corrupt}: cannot read {path} ({e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise MendError(f"{corrupt}: {path} is not a {fmt} file")
    return data
