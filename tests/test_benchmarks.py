"""Benchmark scripts stay runnable: the GPU scale script's --tiny mode on CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_scale_tiny_runs_on_cpu_and_reports_every_model(tmp_path):
    out = tmp_path / "scale.json"
    _load("gpu_scale").main(["--tiny", "--steps", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["gpt2-tiny", "llama-tiny"]
    for r in rows:
        assert r["train_step_s"] > 0 and r["edit_s"] > 0 and r["editor_params_m"] > 0
