"""The training log: one JSON object per line, a step's statistics or a validation's."""

from __future__ import annotations

import json
from pathlib import Path

LOG_FILE = "train_log.jsonl"


class JsonlLog:
    """Appends records to a JSONL file; `truncate` drops what a resumed run will rewrite."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Keep only the lines of steps up to `step` (the checkpoint a run resumes from)."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        keep = [line for line in lines if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))
