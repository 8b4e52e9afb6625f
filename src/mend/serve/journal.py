"""The journal of a served model's edits: SQLite, one transaction per accepted change.

Every accepted edit is one row holding its requests and its factors (safetensors bytes), and
every removal one row naming the edit it removed; both are committed before the service
answers. `PRAGMA synchronous=FULL` in WAL mode makes a commit durable once it returns, so an
acknowledged change survives a crash of the process or the machine. Rows are only ever
appended; the edits still applied are those without a removal row, in the order they were
made. An edit's row id is its number in the `EditSequence` (`UNIQUE (kind, edit_id)`), so
no edit can be journaled, or replayed, twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors

from mend.errors import MendError

JOURNAL_FILE = "journal.sqlite3"
FORMAT = "mend-journal-v1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('edit', 'remove')),
    edit_id INTEGER NOT NULL,
    entry TEXT,     -- JSON: the edit's id, time, weights and requests (record_entry)
    factors BLOB,   -- safetensors: its factors, named as a saved EditSequence names them
    keys BLOB,      -- safetensors: its KeyMemory keys (least-squares editors), else empty
    UNIQUE (kind, edit_id)
);
"""


class Journal:
    """The SQLite file `folder/journal.sqlite3`, made where missing.

    Writes come from one writer at a time (the service's write lock); the connection is
    shared across threads under its own lock.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise MendError(f"{folder}: an existing file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / JOURNAL_FILE
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            with self._db:
                self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise MendError(f"{self.path}: not a usable journal ({e})") from None
        if mode.lower() != "wal":
            raise MendError(f"{self.path}: this file system does not allow SQLite's WAL mode")
        fmt = self.meta("format")
        if fmt is None:
            self.set_meta("format", FORMAT)
        elif fmt != FORMAT:
            raise MendError(f"{self.path}: a journal of format {fmt!r}, not {FORMAT!r}")

    def meta(self, key: str):
        """The JSON value stored under `key`, or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value))
            )

    def add_edit(
        self, entry: dict, factors: dict[str, torch.Tensor], keys: dict[str, torch.Tensor]
    ) -> None:
        """Commit one edit (durable when this returns)."""
        row = (
            "edit",
            int(entry["id"]),
            json.dumps(entry),
            dump_tensors(factors, metadata={"format": FORMAT}),
            dump_tensors(keys, metadata={"format": FORMAT}) if keys else b"",
        )
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO log (kind, edit_id, entry, factors, keys) VALUES (?, ?, ?, ?, ?)", row
            )

    def add_removal(self, edit_id: int) -> None:
        """Commit the removal of edit `edit_id` (durable when this returns)."""
        with self._lock, self._db:
            self._db.execute("INSERT INTO log (kind, edit_id) VALUES ('remove', ?)", (edit_id,))

    def live(self) -> tuple[list[dict], dict, dict, int]:
        """(the edits still applied, in order, as `record_entry` gives them; their factors;
        their keys; the number the next edit gets)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, edit_id, entry, factors, keys FROM log ORDER BY row"
            ).fetchall()
        live: dict[int, tuple] = {}
        last = 0
        for kind, edit_id, entry, factors, keys in rows:
            if kind == "edit":
                live[edit_id] = (entry, factors, keys)
                last = max(last, edit_id)
            elif live.pop(edit_id, None) is None:
                raise MendError(f"corrupt journal {self.path}: edit {edit_id} removed unmade")
        entries, factors_all, keys_all = [], {}, {}
        try:
            for entry, factors, keys in live.values():
                entries.append(json.loads(entry))
                factors_all |= load_tensors(factors)
                keys_all |= load_tensors(keys) if keys else {}
        except (ValueError, TypeError) as e:
            raise MendError(f"corrupt journal {self.path}: {e}") from None
        return entries, factors_all, keys_all, last + 1

    def count(self) -> dict[str, int]:
        """{"edit": rows, "remove": rows}: how many of each the journal holds."""
        with self._lock:
            rows = self._db.execute("SELECT kind, COUNT(*) FROM log GROUP BY kind").fetchall()
        return {"edit": 0, "remove": 0} | dict(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
