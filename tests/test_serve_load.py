"""benchmarks/serve_load.py stays runnable: a short load on the tiny model, no errors, and the
service holds exactly the edits it acknowledged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from serve_helpers import free_port, tiny_folders

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def test_a_short_load_on_the_tiny_model(tokenizer, tmp_path):
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_dir, editor_dir = tiny_folders(tmp_path, tokenizer)
    out = tmp_path / "load.json"
    argv = ["--model", str(model_dir), "--editor", str(editor_dir), "--clients", "6",
            "--seconds", "3", "--edit-share", "0.3", "--port", str(free_port()), "--out", str(out)]  # fmt: skip
    report = module.main(argv)
    assert json.loads(out.read_text()) == report
    assert report["errors"] == 0 and report["requests"] > 10
    assert report["by_kind"]["edit"]["n"] == report["edits_acknowledged"] > 0
    assert report["held_equals_acknowledged"]
    assert report["all"]["p50_ms"] <= report["all"]["p99_ms"]
