"""End to end through `mend.cli.main`: train, eval and edit on a tiny local model folder, and
bad inputs that must fail with exit code 2, one line on stderr and no output written."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, fact_requests, make_tokenizer, tiny_model
from safetensors.torch import load_file
from tokenizers import normalizers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from mend.checkpoint import WEIGHTS_FILE, model_identity, save_editor
from mend.cli import main
from mend.config import EditorConfig
from mend.editor import EditorNet
from mend.evaluate import GEN_METRICS, METRICS
from mend.models import find_editable, load_model
from mend.result import apply_delta

PROMPT, TARGET = "The colour loved by Alice is", "piano"
ZWSP = "\u200b"  # dropped by the test tokenizer's normaliser: a target that adds no token


def _record(r) -> dict:
    return {
        "prompt": r.prompt,
        "target": r.target,
        "rephrases": list(r.rephrases),
        "locality": [{"prompt": p.prompt, "answer": p.answer} for p in r.locality],
        "target_true": r.target_true,
        "neighborhood": list(r.neighborhood),
    }


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("cli")
    tok = make_tokenizer("bpe")
    # Like many real normalisers: drop zero-width spaces and trim the text.
    tok.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace(ZWSP, ""), normalizers.Strip()]
    )
    tok.pad_token = "<pad>"
    model_dir = root / "model"
    tiny_model("llama", len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    records = [_record(r) for r in fact_requests(40)]
    data = _write_jsonl(root / "train.jsonl", records)
    return {"root": root, "model": str(model_dir), "data": str(data), "records": records}


@pytest.fixture(scope="module")
def trained(env):
    out = env["root"] / "editor"
    code = main(
        ["train", "--model", env["model"], "--data", env["data"], "--out", str(out),
         "--max-steps", "6", "--set", "schedule.val_every=3", "--rank", "8", "--edits-per-step", "2",
         "--threads", "1"]
    )  # fmt: skip
    assert code == 0
    return out


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI expecting a one-line bad-input error that contains every needle."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mend: error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


# --------------------------------------------------------------------------- the happy path


def test_train_writes_checkpoint_log_and_plot(env, trained, capsys):
    out = trained
    for name in ("editor_config.json", "editor.safetensors", "train_log.jsonl", "train_curves.png"):
        assert (out / name).is_file(), name
    assert (out / "train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "val" not in x]
    vals = [x for x in lines if "val" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5, 6]
    assert [x["step"] for x in vals] == [3, 6]
    for x in steps:
        assert x["loss"] == pytest.approx(0.1 * x["l_edit"] + 1.0 * x["l_loc"], rel=1e-5)
    config = json.loads((out / "editor_config.json").read_text())
    assert config["editor"]["rank"] == 8
    assert config["model"]["model_type"] == "llama"
    assert config["best_step"] in (3, 6)
    assert config["editor"]["shared_rank"] == 16  # fitted for the best checkpoint at the end
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_fit_shared_refits_an_editor_in_place_and_batched_eval_uses_it(env, trained, tmp_path):
    import shutil

    editor = tmp_path / "editor"
    shutil.copytree(trained, editor)
    before = json.loads((editor / "editor_config.json").read_text())
    argv = ["fit-shared", "--model", env["model"], "--editor", str(editor), "--data", env["data"],
            "--limit", "5", "--rank", "2", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    after = json.loads((editor / "editor_config.json").read_text())
    assert after["editor"]["shared_rank"] == 2
    assert after["best_step"] == before["best_step"] and after["val"] == before["val"]
    assert after["sha256"] != before["sha256"]
    report = tmp_path / "r.json"
    assert main(_eval_argv(env, editor, report) + ["--batch-size", "3"]) == 0
    assert json.loads(report.read_text())["n_edits"] == 3


def test_build_shield_stores_a_bank_that_eval_and_edit_shield_with(env, trained, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    editor = tmp_path / "editor"
    shutil.copytree(trained, editor)
    plain_out, shielded_out = tmp_path / "plain", tmp_path / "shielded"
    assert main(_edit_argv(env, editor, plain_out, env["records"][0]["prompt"])) == 0
    _fails(capsys, _eval_argv(env, editor, tmp_path / "r.json") + ["--shield", "1"], "no key bank")
    argv = ["build-shield", "--model", env["model"], "--editor", str(editor), "--data", env["data"],
            "--limit", "20", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    assert "key bank of 20 facts" in capsys.readouterr().out
    assert (editor / "key_bank.safetensors").is_file()
    probes = {x["locality"][0]["prompt"] for x in env["records"][:3]}
    n_out = sum(x["prompt"] in probes for x in env["records"][:20])
    assert n_out > 0  # (the data must hold such facts for this check to mean anything)
    assert main(argv + ["--leave-out", str(tmp_path / "first3.jsonl")]) == 2  # a missing file
    (tmp_path / "first3.jsonl").write_text("\n".join(json.dumps(x) for x in env["records"][:3]))
    assert main(argv + ["--leave-out", str(tmp_path / "first3.jsonl")]) == 0
    out = capsys.readouterr().out
    assert f"key bank of {20 - n_out} facts" in out and f"{n_out} left out" in out
    _fails(capsys, _eval_argv(env, editor, tmp_path / "r.json") + ["--shield", "0"], "beta")
    assert not (tmp_path / "r.json").exists()
    report = tmp_path / "shielded.json"
    assert main(_eval_argv(env, editor, report) + ["--shield", "0.5"]) == 0
    assert json.loads(report.read_text())["n_edits"] == 3
    argv = _edit_argv(env, editor, shielded_out, env["records"][0]["prompt"])
    assert main(argv + ["--shield", "1", "--shield-facts", "4"]) == 0
    a, b = (load_file(str(out / "d.safetensors")) for out in (plain_out, shielded_out))
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a)  # the shield changed every matrix


def test_eval_reports_every_metric(env, trained, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    argv = ["eval", "--model", env["model"], "--editor", str(trained), "--data", env["data"],
            "--limit", "5", "--out", str(report_path)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["n_edits"] == 5
    assert report["batch_size"] == 1
    for key in [*METRICS, "edit_seconds_median"]:
        assert key in report
    for key in METRICS:
        assert 0.0 <= report[key] <= 1.0, key
        assert 0.0 <= report["pre"][key] <= 1.0, key
    assert set(report["pre"]) == set(METRICS) | set(GEN_METRICS)
    assert report["pre"]["locality_acc"] == 1.0  # the unedited model agrees with itself
    assert report["edit_seconds_median"] > 0
    assert "rewrite_acc" in capsys.readouterr().out

    batched = tmp_path / "batched.json"
    assert main([*argv[:-1], str(batched), "--batch-size", "5"]) == 0
    report5 = json.loads(batched.read_text())
    assert report5["n_edits"] == 5
    assert report5["batch_size"] == 5
    # One batched edit: its time is both the median and the mean.
    assert report5["edit_seconds_median"] == report5["edit_seconds_mean"]
    # The unedited scores do not depend on how edits are grouped.
    for key in METRICS:
        assert report5["pre"][key] == pytest.approx(report["pre"][key]), key

    # --skip 2 --limit 3 scores records 3-5: the same edits, one by one, as the first run's.
    skipped = tmp_path / "skipped.json"
    assert main([*argv[:-1], str(skipped), "--limit", "3", "--skip", "2"]) == 0
    tail = json.loads(skipped.read_text())["edits"]
    assert [e["prompt"] for e in tail] == [e["prompt"] for e in report["edits"][2:]]
    for key in ("rewrite_acc", "locality_acc", "efficacy_score"):
        assert [e[key] for e in tail] == pytest.approx([e[key] for e in report["edits"][2:]])
    bad = tmp_path / "bad.json"
    _fails(capsys, [*argv[:-1], str(bad), "--skip", "-1"], "--skip")
    _fails(capsys, [*argv[:-1], str(bad), "--skip", "500"], "no records left", "--skip 500")
    assert not bad.exists()


def test_edit_prints_and_saves_model_and_delta(env, trained, tmp_path, capsys, caplog):
    m2, delta = tmp_path / "m2", tmp_path / "d.safetensors"
    argv = ["edit", "--model", env["model"], "--editor", str(trained), "--prompt", PROMPT,
            "--target", TARGET, "--save-model", str(m2), "--save-delta", str(delta)]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"prompt: {PROMPT}" in out
    assert "before: '" in out and "after:  '" in out
    assert (m2 / "config.json").is_file() and delta.is_file()

    base, _ = load_model(env["model"])
    edited, _ = load_model(str(m2))
    names = {p.name for p in find_editable(base)}
    changed = {
        k.removesuffix(".weight")
        for k, v in edited.state_dict().items()
        if not torch.equal(v, base.state_dict()[k])
    }
    assert changed == names  # exactly the editor's weights changed
    with caplog.at_level(logging.WARNING, "mend"):
        applied = apply_delta(base, delta)
    assert not caplog.records  # the model the delta was made for
    for name in names:
        torch.testing.assert_close(
            base.get_submodule(name).weight, edited.get_submodule(name).weight, rtol=0, atol=1e-7
        )
    applied.revert()
    base.config.name_or_path = "someone/another-model"  # same shapes, another model's name
    with caplog.at_level(logging.WARNING, "mend"):
        apply_delta(base, delta).revert()
    assert "was made for model" in caplog.text and "another-model" in caplog.text


def test_unshared_editor_trains_saves_and_edits(env, tmp_path, capsys):
    from mend.checkpoint import load_editor

    out = tmp_path / "run"
    assert main(_train_argv(env, out, None, "--set", "editor.share=false")) == 0
    assert json.loads((out / "editor_config.json").read_text())["editor"]["share"] is False
    base, _ = load_model(env["model"])
    net = load_editor(out, base)
    assert sorted(net.nets) == [f"m{i}" for i in range(len(net.names))]  # one per matrix
    capsys.readouterr()
    assert main(_edit_argv(env, out, tmp_path)) == 0
    assert "after:  '" in capsys.readouterr().out


def test_apply_adds_saved_deltas_without_the_editor(env, trained, tmp_path, capsys):
    delta = tmp_path / "d.safetensors"
    argv = ["edit", "--model", env["model"], "--editor", str(trained), "--prompt", PROMPT,
            "--target", TARGET, "--save-delta", str(delta), "--max-new-tokens", "4"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    edit_lines = capsys.readouterr().out.splitlines()
    # Applied twice: the prompt's answers, and the saved model holds base + 2 * delta.
    m3 = tmp_path / "m3"
    argv = ["apply", "--model", env["model"], "--delta", str(delta), str(delta), "--prompt",
            PROMPT, "--max-new-tokens", "4", "--save-model", str(m3)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "added 2 delta(s) to" in out and f"saved the model to {m3}" in out
    before = next(x for x in edit_lines if x.startswith("before: "))
    assert before in out.splitlines()  # the same unedited answer as `mend edit` printed
    base, _ = load_model(env["model"])
    twice, _ = load_model(str(m3))
    names = {p.name for p in find_editable(base)}
    saved = load_file(str(delta))
    for name in names:
        expected = base.get_submodule(name).weight + 2 * saved[name + ".weight"]
        torch.testing.assert_close(twice.get_submodule(name).weight, expected, rtol=0, atol=1e-6)
    for k, v in twice.state_dict().items():
        if k.removesuffix(".weight") not in names:
            assert torch.equal(v, base.state_dict()[k]), k
    # Once, with the answer only: the same after-answer as the edit itself printed.
    assert main(["apply", "--model", env["model"], "--delta", str(delta), "--prompt", PROMPT,
                 "--max-new-tokens", "4"]) == 0  # fmt: skip
    after = next(x for x in edit_lines if x.startswith("after: "))
    assert after.split("  (target")[0] in capsys.readouterr().out.splitlines()


def test_apply_rejects_bad_deltas(env, trained, tmp_path, capsys):
    head = ["apply", "--model", env["model"]]
    out = tmp_path / "never"
    _fails(capsys, head + ["--delta", str(tmp_path / "missing.safetensors"), "--prompt", "x"],
           "delta file not found", "missing.safetensors")  # fmt: skip
    _fails(capsys, head + ["--delta", str(trained / "editor.safetensors"), "--save-model",
           str(out)], "not a mend weight delta")  # fmt: skip
    (tmp_path / "cut.safetensors").write_bytes(b"\x08\x00\x00")
    _fails(capsys, head + ["--delta", str(tmp_path / "cut.safetensors"), "--save-model",
           str(out)], "cannot read mend weight delta")  # fmt: skip
    _fails(capsys, head + ["--delta", str(trained / "editor.safetensors")], "nothing to do")
    assert not out.exists()


def test_edit_requests_from_a_file_at_once_or_one_by_one(env, trained, tmp_path, capsys):
    facts = _write_jsonl(tmp_path / "facts.jsonl", env["records"][:3])
    base, _ = load_model(env["model"])
    names = [p.name for p in find_editable(base)]
    changes = {}
    for mode in ("batched", "one-by-one"):
        out = tmp_path / mode
        argv = ["edit", "--model", env["model"], "--editor", str(trained), "--requests",
                str(facts), "--save-model", str(out / "m"), "--save-delta", str(out / "d")]  # fmt: skip
        capsys.readouterr()
        assert main(argv + (["--one-by-one"] if mode == "one-by-one" else [])) == 0
        printed = capsys.readouterr().out
        assert printed.count("prompt: ") == printed.count("after:  ") == 3
        reached = int(printed.split("targets reached: ")[1].split(" of 3")[0])
        assert reached + printed.count("(target not reached)") == 3
        edited, _ = load_model(str(out / "m"))
        changes[mode] = {
            n: edited.get_submodule(n).weight - base.get_submodule(n).weight for n in names
        }
        applied = apply_delta(base, out / "d")  # the delta file holds the whole change
        for n in names:
            torch.testing.assert_close(
                base.get_submodule(n).weight, edited.get_submodule(n).weight, rtol=0, atol=1e-6
            )
        applied.revert()
    diff = max((changes["batched"][n] - changes["one-by-one"][n]).abs().max() for n in names)
    assert diff > 1e-4  # the two modes are different edits


def test_edit_needs_one_fact_or_a_file(env, trained, tmp_path, capsys):
    head = ["edit", "--model", env["model"], "--editor", str(trained)]
    facts = str(_write_jsonl(tmp_path / "facts.jsonl", env["records"][:2]))
    _fails(capsys, [*head, "--prompt", PROMPT], "--prompt and --target")
    _fails(capsys, [*head, "--prompt", PROMPT, "--target", TARGET, "--requests", facts], "either")
    _fails(capsys, [*head, "--prompt", PROMPT, "--target", TARGET, "--one-by-one"], "--requests")
    _fails(capsys, [*head, "--requests", str(tmp_path / "missing.jsonl")], "missing.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.jsonl"]


# --------------------------------------------------------------------------- bad inputs


def _train_argv(env, out: Path, data: str | None = None, *extra: str) -> list[str]:
    return ["train", "--model", env["model"], "--data", data or env["data"], "--out", str(out),
            "--max-steps", "2", "--rank", "4", "--threads", "1", *extra]  # fmt: skip


def _eval_argv(env, editor: Path, report: Path, data: str | None = None) -> list[str]:
    return ["eval", "--model", env["model"], "--editor", str(editor), "--data",
            data or env["data"], "--limit", "3", "--out", str(report)]  # fmt: skip


def _edit_argv(env, editor: Path, out: Path, prompt: str = PROMPT, target: str = TARGET):
    return ["edit", "--model", env["model"], "--editor", str(editor), "--prompt", prompt,
            "--target", target, "--save-model", str(out / "m"),
            "--save-delta", str(out / "d.safetensors")]  # fmt: skip


def test_train_missing_data_file(env, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, _train_argv(env, out, str(tmp_path / "nope.jsonl")), "data file not found")
    assert not out.exists()


def test_train_record_missing_key(env, tmp_path, capsys):
    records = [dict(r) for r in env["records"][:10]]
    del records[4]["target"]
    data = _write_jsonl(tmp_path / "d.jsonl", records)
    out = tmp_path / "run"
    _fails(capsys, _train_argv(env, out, str(data)), "record 4", "missing required key 'target'")
    assert not out.exists()


def test_train_empty_prompt(env, tmp_path, capsys):
    records = env["records"][:10] + [dict(env["records"][0], prompt="")]
    data = _write_jsonl(tmp_path / "d.jsonl", records)
    out = tmp_path / "run"
    _fails(capsys, _train_argv(env, out, str(data)), "record 10: empty prompt")
    assert not out.exists()


def test_train_unknown_weight_name(env, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _train_argv(env, out, None, "--edit-modules", "model.layers.0.mlp.nope")
    _fails(capsys, argv, "unknown weight name 'model.layers.0.mlp.nope'")
    assert not out.exists()


def test_eval_empty_prompt_and_nothing_target_in_data(env, trained, tmp_path, capsys):
    report = tmp_path / "sub" / "r.json"
    data = _write_jsonl(
        tmp_path / "d.jsonl", [env["records"][0], dict(env["records"][1], prompt="  ")]
    )
    _fails(capsys, _eval_argv(env, trained, report, str(data)), "record 1: empty prompt")
    data = _write_jsonl(
        tmp_path / "d.jsonl", [env["records"][0], dict(env["records"][1], target=ZWSP)]
    )
    _fails(capsys, _eval_argv(env, trained, report, str(data)), "record 1", "tokenises to nothing")
    assert not report.parent.exists()


def test_eval_input_longer_than_context(env, trained, tmp_path, capsys):
    report = tmp_path / "r.json"
    long_rephrase = " ".join(["Alice"] * 80)
    records = [env["records"][0], dict(env["records"][1], rephrases=[long_rephrase])]
    data = _write_jsonl(tmp_path / "d.jsonl", records)
    _fails(
        capsys,
        _eval_argv(env, trained, report, str(data)),
        "record 1",
        "longer than the model's context of 64",
    )
    assert not report.exists()


def test_edit_empty_target(env, trained, tmp_path, capsys):
    _fails(capsys, _edit_argv(env, trained, tmp_path, target=""), "empty target")
    _fails(capsys, _edit_argv(env, trained, tmp_path, target="   "), "empty target")
    assert list(tmp_path.iterdir()) == []


def test_edit_target_that_tokenises_to_nothing(env, trained, tmp_path, capsys):
    _fails(capsys, _edit_argv(env, trained, tmp_path, target=ZWSP), "tokenises to nothing")
    assert list(tmp_path.iterdir()) == []


def test_edit_prompt_longer_than_context(env, trained, tmp_path, capsys):
    prompt = " ".join(["The colour loved by Alice is"] * 20)
    _fails(
        capsys,
        _edit_argv(env, trained, tmp_path, prompt=prompt),
        "longer than the model's context of 64",
    )
    assert list(tmp_path.iterdir()) == []


def _foreign_editor(folder: Path, model) -> Path:
    names = [p.name for p in find_editable(model)]
    ident = model_identity(model, names)
    save_editor(folder, EditorNet(ident["params"], EditorConfig(rank=4)), ident)
    return folder


def test_editor_for_another_family(env, tmp_path, capsys):
    editor = _foreign_editor(tmp_path / "gpt2-editor", tiny_model("gpt2", 300))
    report = tmp_path / "r.json"
    _fails(capsys, _eval_argv(env, editor, report), "made for a gpt2 model", "not llama")
    assert not report.exists()
    out = tmp_path / "edit-out"
    _fails(capsys, _edit_argv(env, editor, out), "made for a gpt2 model")
    assert not out.exists()


def test_editor_for_other_shapes(env, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=300, **(TINY["llama"] | {"intermediate_size": 64})
    )
    editor = _foreign_editor(tmp_path / "wide-editor", AutoModelForCausalLM.from_config(cfg))
    report = tmp_path / "r.json"
    _fails(capsys, _eval_argv(env, editor, report), "different model", "(32, 48) here but (32, 64)")
    assert not report.exists()


def test_truncated_editor_weights(env, trained, tmp_path, capsys):
    editor = tmp_path / "editor"
    shutil.copytree(trained, editor)
    data = (editor / WEIGHTS_FILE).read_bytes()
    (editor / WEIGHTS_FILE).write_bytes(data[: len(data) - 100])
    report = tmp_path / "r.json"
    _fails(capsys, _eval_argv(env, editor, report), "corrupt editor checkpoint")
    assert not report.exists()
    out = tmp_path / "edit-out"
    _fails(capsys, _edit_argv(env, editor, out), "corrupt editor checkpoint")
    assert not out.exists()


def test_missing_editor(env, tmp_path, capsys):
    report = tmp_path / "r.json"
    _fails(capsys, _eval_argv(env, tmp_path / "no-editor", report), "not an editor checkpoint")
    assert not report.exists()


def test_edit_non_finite_editor(env, trained, tmp_path, capsys):
    from safetensors.torch import load_file

    from mend.checkpoint import load_editor, model_identity, save_editor
    from mend.models import load_model

    net = load_editor(trained)
    with torch.no_grad():
        net.log_alpha.fill_(float("inf"))
    model, _ = load_model(env["model"])
    bad = tmp_path / "nan-editor"
    save_editor(bad, net, model_identity(model, net.names))
    assert torch.isinf(load_file(str(bad / WEIGHTS_FILE))["log_alpha"]).all()
    out = tmp_path / "out"
    argv = ["edit", "--model", env["model"], "--editor", str(bad), "--prompt", PROMPT,
            "--target", TARGET, "--save-model", str(out)]  # fmt: skip
    _fails(capsys, argv, "not finite")
    assert not out.exists()


def test_edit_bad_boost_scale_and_unboosted_edit(env, trained, tmp_path, capsys):
    out = tmp_path / "e"
    _fails(capsys, _edit_argv(env, trained, out) + ["--boost", "1.5", "-1"], "boost scales")
    assert not out.exists()
    _fails(capsys, _edit_argv(env, trained, out) + ["--start", "0"], "start scale")
    _fails(capsys, _edit_argv(env, trained, out) + ["--start", "0.9", "--boost"], "needs a check")
    assert not out.exists()
    assert main(_edit_argv(env, trained, out) + ["--boost"]) == 0  # no scales: MEND unchecked
    assert (out / "d.safetensors").exists()


@pytest.mark.parametrize("flag, bf16", [([], None), (["--editor-fp32"], False)])
def test_editor_fp32_flag_keeps_edits_off_bf16(env, trained, tmp_path, flag, bf16):
    from mend.cli.commands import _mend_editor
    from mend.cli.parser import build_parser
    from mend.models.upper import bf16_is_fast

    args = build_parser().parse_args(_edit_argv(env, trained, tmp_path) + flag)
    model, tok = load_model(args.model)
    editor = _mend_editor(args, model, tok)
    assert editor.editor_bf16 is (bf16_is_fast(editor.device) if bf16 is None else bf16)
