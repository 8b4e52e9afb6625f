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


def _ppl_text() -> str:
    from conftest import corpus

    return " ".join(corpus())


def _summary_rows(path: Path, title: str) -> dict[tuple[str, int], list[str]]:
    """(method, k) -> the cells after `edits` of the summary.md table under heading `title`."""
    lines = path.read_text().split(f"## {title}")[1].split("\n## ")[0].splitlines()
    rows = [[c.strip() for c in x.strip("|").split("|")] for x in lines if x.startswith("| ")]
    assert rows[0][:3] == ["method", "k", "edits"]
    return {(r[0], int(r[1])): r[2:] for r in rows[1:]}


def _assert_summary_matches(compare, path: Path, setting: str, reports: dict) -> None:
    """Every number of the summary's table is its report's, rounded as printed."""
    rows = _summary_rows(path, compare.SETTINGS[setting])
    assert set(rows) == set(reports)
    metrics = ["rewrite_acc", "rephrase_acc", "locality_acc", "rewrite_gen", "rephrase_gen",
               "locality_gen", "efficacy_score", "paraphrase_score", "neighborhood_score"]  # fmt: skip
    for key, r in reports.items():
        cells = rows[key]
        assert int(cells[0]) == r["n_edits"]
        for cell, m in zip(cells[1:10], metrics, strict=True):
            assert float(cell) == pytest.approx(r[m], abs=5e-4), (key, m)
        assert float(cells[10].rstrip("%")) / 100 == pytest.approx(r["ppl_change"], abs=5e-5)
        assert float(cells[11]) == pytest.approx(r["seconds_per_batch_median"], abs=5e-5)


def test_mass_sizes_below_the_small_limit_edit_fewer_requests_in_whole_changes():
    compare = _load("compare")
    counts = compare.edits_per_size([1, 3, 10, 100, 1000], 1000)
    assert counts == {1: 100, 3: 99, 10: 100, 100: 1000, 1000: 1000}
    assert compare.edits_per_size([1, 10], 1000, explicit={1: 1000}) == {1: 1000, 10: 100}
    assert compare.edits_per_size([1, 10], 50, small=0) == {1: 50, 10: 50}
    with pytest.raises(compare.MendError, match="size 100"):
        compare.edits_per_size([100], 50)


def test_compare_mass_reports_every_method_and_size_and_summarises_them(tmp_path, tokenizer):
    import torch
    from conftest import fact_requests, tiny_model

    compare = _load("compare")
    model = tiny_model("llama", len(tokenizer))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    methods = compare.make_methods(model, tokenizer, None, ["none", "ft"], ft_steps=1)
    counts = compare.edits_per_size([1, 4], 8, small=4)  # size 1: only the first 4 edits
    ppl = {"ppl_text": _ppl_text(), "ppl_windows": 2}
    compare.run_setting(model, tokenizer, methods, fact_requests(8), "mass", [1, 4], tmp_path,
                        counts, ppl=ppl, meta={"command": "compare.py --setting mass"})  # fmt: skip
    reports = {(m, k): json.loads(compare.report_path(tmp_path, "mass", m, k).read_text())
               for m in ("none", "ft") for k in (1, 4)}  # fmt: skip
    assert {key: (r["n_edits"], r["batch_size"], r["method"]) for key, r in reports.items()} == {
        ("none", 1): (4, 1, "none"), ("none", 4): (8, 4, "none"),
        ("ft", 1): (4, 1, "ft"), ("ft", 4): (8, 4, "ft"),
    }  # fmt: skip
    none, ft = reports["none", 4], reports["ft", 4]
    assert none["ppl_change"] == 0 and none["locality_acc"] == 1.0 and none["locality_gen"] == 1.0
    assert ft["ppl_change"] != 0  # one step of ft moved the weights while the change was applied
    for k, v in model.state_dict().items():  # every change was reverted exactly
        assert torch.equal(v, original[k]), k
    compare.write_summary(tmp_path)
    _assert_summary_matches(compare, tmp_path / "summary.md", "mass", reports)
    assert "- `compare.py --setting mass`" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "mass.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "lifelong.png").exists()


def test_compare_lifelong_reports_each_methods_curve_per_batch_size(tmp_path, tokenizer):
    import torch
    from conftest import fact_requests, tiny_model

    compare = _load("compare")
    model = tiny_model("llama", len(tokenizer))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    methods = compare.make_methods(model, tokenizer, None, ["none", "ft"], ft_steps=1)
    ppl = {"ppl_text": _ppl_text(), "ppl_windows": 2}
    compare.run_setting(model, tokenizer, methods, fact_requests(8), "lifelong", [4, 1], tmp_path,
                        every=4, ppl=ppl)  # fmt: skip
    reports = {(m, k): json.loads(compare.report_path(tmp_path, "lifelong", m, k).read_text())
               for m in ("none", "ft") for k in (4, 1)}  # fmt: skip
    for (_, k), r in reports.items():
        assert r["sequential"] and r["n_edits"] == 8 and r["batch_size"] == k
        assert [p["n_edits"] for p in r["curve"]] == [4, 8]
        assert len(r["batch_seconds"]) == 8 // k
    ft = reports["ft", 1]  # the curve ends with every edit applied, the perplexity moved
    assert ft["curve"][-1]["ppl"] == ft["ppl_after"] != ft["ppl_before"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    compare.write_summary(tmp_path)
    _assert_summary_matches(compare, tmp_path / "summary.md", "lifelong", reports)
    assert (tmp_path / "lifelong.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _MustNotEdit:
    def edit(self, requests):
        raise AssertionError("an existing report was run again")


def test_compare_rerun_keeps_existing_reports_and_replot_rebuilds_summary(
    tmp_path, tokenizer, monkeypatch
):
    from conftest import fact_requests, tiny_model

    compare = _load("compare")
    model = tiny_model("llama", len(tokenizer))
    edits = fact_requests(4)
    methods = compare.make_methods(model, tokenizer, None, ["none"])
    compare.run_setting(model, tokenizer, methods, edits, "mass", [1, 4], tmp_path, {1: 4, 4: 4})
    first = {k: compare.report_path(tmp_path, "mass", "none", k).read_text() for k in (1, 4)}
    compare.run_setting(model, tokenizer, {"none": _MustNotEdit()}, edits, "mass", [1, 4],
                        tmp_path, {1: 4, 4: 4})  # fmt: skip
    assert {
        k: compare.report_path(tmp_path, "mass", "none", k).read_text() for k in (1, 4)
    } == first

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded though every report is there")

    monkeypatch.setattr(compare, "load_model", no_model)
    argv = ["--setting", "mass", "--sizes", "1", "4", "--methods", "none", "--limit", "4",
            "--out", str(tmp_path)]  # fmt: skip
    compare.main(argv)  # resumes: nothing left to run, the summary is written
    summary = (tmp_path / "summary.md").read_text()
    rows = _summary_rows(tmp_path / "summary.md", compare.SETTINGS["mass"])
    assert set(rows) == {("none", 1), ("none", 4)}
    with pytest.raises(AssertionError, match="loaded"):  # --force runs them again
        compare.main([*argv, "--force"])
    (tmp_path / "summary.md").unlink()
    (tmp_path / "mass.png").unlink()
    compare.main(["--replot", str(tmp_path)])
    assert (tmp_path / "summary.md").read_text() == summary
    assert (tmp_path / "mass.png").stat().st_size > 1000
