"""Tiny model and editor folders a `mend serve` process can load, and a way to start one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import tiny_model
from tokenizers import normalizers

from mend.config import EditorConfig
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.models import find_editable

TOKEN = "s3cret-token"
ZWSP = "\u200b"


def drop_zwsp(tokenizer):
    """The tokenizer dropping zero-width spaces and trimming the text, as some normalisers do:
    the target "\u200b" is not whitespace, yet adds no token after a prompt."""
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace(ZWSP, ""), normalizers.Strip()]
    )
    return tokenizer


def tiny_editor(tokenizer, alpha: float = 1.0, **kw) -> MendEditor:
    """An identity-initialised rank-8 editor on a fresh tiny llama (step `alpha`)."""
    model = tiny_model("llama", len(tokenizer))
    shapes = {p.name: p.in_out for p in find_editable(model)}
    return MendEditor(
        model, tokenizer, EditorNet(shapes, EditorConfig(rank=8, init_alpha=alpha)), **kw
    )


def tiny_folders(root: Path, tokenizer, alpha: float = 1.0) -> tuple[Path, Path]:
    """(a Hugging Face folder of a tiny llama and its tokenizer, an editor folder for it)."""
    editor = tiny_editor(tokenizer, alpha)
    model_dir, editor_dir = root / "model", root / "editor"
    editor.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    editor.save_pretrained(editor_dir)
    return model_dir, editor_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, editor_dir: Path, state: Path, port: int, log: Path):
    """`mend serve` in a child process, once it answers; its output goes to `log`."""
    cmd = [sys.executable, "-m", "mend.cli", "serve", "--model", str(model_dir), "--editor",
           str(editor_dir), "--state", str(state), "--port", str(port), "--threads", "1"]  # fmt: skip
    env = dict(os.environ, MEND_TOKEN=TOKEN, OMP_NUM_THREADS="1")
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mend serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            get(port, "/healthz")
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"mend serve did not answer in 120 s:\n{log.read_text()}")


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


def post(port: int, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of a POST with the write token."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())
