"""Find a data set by name: the shared data folder, the cache, or its public source."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from mend.config import cache_dir
from mend.errors import MendError

# name -> (path under the shared data folder, public URL of a file in a layout we read)
KNOWN: dict[str, tuple[str, str | None]] = {
    "counterfact-train": ("counterfact/counterfact-train.json", None),
    "counterfact-val": ("counterfact/counterfact-val.json", None),
    # The full CounterFact in ROME's layout, the public fallback when the EasyEdit split is absent.
    "counterfact": (
        "counterfact/counterfact.json",
        "https://rome.baulab.info/data/dsets/counterfact.json",
    ),
    "zsre-train": ("zsre/zsre_mend_train-1k.json", None),
    "zsre-eval": (
        "zsre/zsre_mend_eval_portability_gpt4.json",
        "https://rome.baulab.info/data/dsets/zsre_mem-eval.json",
    ),
    "wikitext-valid": ("wikitext/wiki.valid.raw", None),
}


def data_dirs() -> list[Path]:
    """Folders searched for named data sets, in order."""
    dirs = []
    if os.environ.get("MEND_DATA_DIR"):
        dirs.append(Path(os.environ["MEND_DATA_DIR"]))
    dirs.append(Path.cwd().parent / "shared" / "data")  # the project's checkout layout
    dirs.append(Path.cwd() / "shared" / "data")
    dirs.append(cache_dir() / "data")
    return dirs


def resolve_data(name_or_path: str | os.PathLike) -> Path:
    """Return a local file for a path or a known data set name, downloading if needed.

    Raises:
        MendError: the file is neither here nor downloadable (e.g. offline).
    """
    path = Path(name_or_path)
    if path.exists() or str(name_or_path) not in KNOWN:
        return path  # an explicit path; readers report a missing file themselves
    rel, url = KNOWN[str(name_or_path)]
    for d in data_dirs():
        if (d / rel).exists():
            return d / rel
    if url is None:
        fallback = "; try 'counterfact'" if str(name_or_path).startswith("counterfact") else ""
        raise MendError(
            f"data set {name_or_path!r} not found in {', '.join(map(str, data_dirs()))} "
            f"and it has no public download{fallback}"
        )
    dest = cache_dir() / "data" / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise MendError(
            f"data set {name_or_path!r} is not available locally and downloading {url} failed "
            f"({e}); are you offline? Put the file in $MEND_DATA_DIR/{rel}"
        ) from None
    return dest
