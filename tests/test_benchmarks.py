"""Benchmark and experiment scripts stay runnable: gpu_scale --tiny on CPU, compare.py's runs and
merging, experiments/check_variants.py's check variant."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
EXPERIMENTS = ROOT / "experiments"


def _load(name: str, folder: Path = BENCH):
    if str(BENCH) not in sys.path:  # the scripts import each other (compare.fmt_row)
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: the base model's dtype on a GPU
def test_gpu_scale_tiny_runs_on_cpu_and_reports_every_model(tmp_path, dtype):
    out = tmp_path / "scale.json"
    args = ["--tiny", "--steps", "1", "--reference-steps", "1", "--repeats", "1", "--dtype", dtype]
    _load("gpu_scale").main([*args, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["failed"] == {}
    assert report["dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[dtype]
    rows = report["rows"]
    assert [r["model"] for r in rows] == ["gpt2-tiny", "llama-tiny"]
    for r in rows:
        assert r["fast"]["step_s"] > 0 and r["reference"]["step_s"] > 0
        assert r["fast"]["peak_gib"] > 0.1 and r["reference"]["peak_gib"] > 0.1  # RSS: torch too
        assert r["speedup"] == r["reference"]["step_s"] / r["fast"]["step_s"]
        assert r["edit_s"] > 0 and r["forward_s"] > 0 and r["editor_params_m"] > 0
        assert r["unchecked_over_forward"] == r["unchecked_edit_s"] / r["forward_s"]
        assert len(r["edited"]) == {"gpt2-tiny": 6, "llama-tiny": 9}[r["model"]]  # last 3 MLPs
    table = out.with_suffix(".md").read_text().splitlines()
    assert "peak RSS" in table[2] and [x.split(" | ")[0] for x in table[4:]] == ["| gpt2-tiny", "| llama-tiny"]  # fmt: skip


def test_compare_merges_its_parts_and_mend_eval_rows_into_one_table(tmp_path, monkeypatch):
    compare = _load("compare")
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    row = {"n_edits": 3, "rewrite_acc": 1.0, "rephrase_acc": 0.5, "locality_acc": 0.75,
           "efficacy_score": 1.0, "paraphrase_score": 0.5, "neighborhood_score": None,
           "edit_seconds_median": 0.25}  # fmt: skip
    part = {"command": "python compare.py --methods grad", "model": "m",
            "single": {"zsre": {"grad": row | {"ppl_pre": 20.0, "ppl_post": 21.5}}}}  # fmt: skip
    (tmp_path / "part.json").write_text(json.dumps(part))
    ev = row | {
        "rewrite_acc": 0.9,
        "model": "m",
        "method": "mend",
        "editor": "runs/z",
        "data": "z.json",
    }
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    compare.merge([str(tmp_path / "part.json"), f"zsre:mend={tmp_path / 'eval.json'}"], "both")
    merged = json.loads((tmp_path / "both.json").read_text())
    assert list(merged["single"]["zsre"]) == ["grad", "mend"]
    assert merged["single"]["zsre"]["mend"]["rewrite_acc"] == 0.9
    assert (
        "mend eval --model m --method mend --editor runs/z --data z.json --limit 3"
        in merged["command"]
    )
    table = (tmp_path / "both.md").read_text()
    assert (
        "| zsre | grad | 1.000 | 0.500 | 0.750 | 1.000 | 0.500 | - | 20.00 | 21.50 | 0.2500 |"
        in table
    )
    assert "| zsre | mend | 0.900 | 0.500 | 0.750 | 1.000 | 0.500 | - | - | - | 0.2500 |" in table


def test_compare_sequential_and_batched_runs_score_every_checkpoint(tokenizer):
    import torch
    from conftest import fact_requests, tiny_mend

    from mend.baselines import FTEditor

    compare = _load("compare")
    mend = tiny_mend(tokenizer)
    model = mend.model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    edits = fact_requests(4)
    seq = compare.run_sequential(model, tokenizer, {"mend": mend}, edits, every=2)
    assert list(seq) == ["mend", "mend-unanchored"]  # ft only when asked for
    assert all([row["n"] for row in curve] == [2, 4] for curve in seq.values())
    methods = {"mend": mend, "ft": FTEditor(model, tokenizer, max_steps=3)}
    batched = compare.run_batched(model, tokenizer, methods, edits, ks=[1, 2])
    assert {m: sorted(r) for m, r in batched.items()} == {"mend": [1, 2], "ft": [1, 2]}
    assert all(0 <= r["rewrite_acc"] <= 1 for rows in batched.values() for r in rows.values())
    for k, v in model.state_dict().items():  # every run reverted its edits exactly
        assert torch.equal(v, original[k]), k


def test_check_variants_start_below_scale_one_and_still_edit(tokenizer):
    from conftest import fact_requests, tiny_mend

    variant = _load("check_variants", EXPERIMENTS).CheckVariant
    editor = tiny_mend(tokenizer, variant, start=0.5, boost=(1.0, 1.5))
    plain = tiny_mend(tokenizer, boost=())  # MEND's change, unchecked
    plain.net.load_state_dict(editor.net.state_dict())
    req = fact_requests(1)
    a = editor.edit(req)
    variant_deltas = {n: d.clone() for n, d in a.deltas.items()}
    a.revert()
    b = plain.edit(req)
    ratios = {float(d.norm() / b.deltas[n].norm()) for n, d in variant_deltas.items()}
    # one scale for every weight: 0.5, then 1.0 and 1.5 of the plain change
    assert len({round(r, 4) for r in ratios}) == 1
    ratio = next(iter(ratios))
    assert min(abs(ratio - s) for s in (0.5, 1.0, 1.5)) < 1e-4
