"""`mend edit --state DIR`: edits kept in a folder across runs, resumed and reverted bit for bit,
and its bad inputs: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fact_requests, make_tokenizer, tiny_model
from test_cli_inputs import _fails
from transformers.utils import logging as hf_logging

from mend.checkpoint import model_identity, save_editor
from mend.cli import main
from mend.config import EditorConfig
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.models import find_editable, load_model
from mend.sequence import STATE_FILE, EditSequence


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("cli-sequence")
    tok = make_tokenizer("bpe")
    tok.pad_token = "<pad>"
    for name, seed in (("model", 0), ("other", 1)):  # the same shapes, other weights
        model = tiny_model("llama", len(tok), seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    model = tiny_model("llama", len(tok))
    names = [p.name for p in find_editable(model)]
    net = EditorNet({p.name: p.in_out for p in find_editable(model)}, EditorConfig(rank=8))
    save_editor(root / "editor", net, model_identity(model, names))
    facts = fact_requests(6, seed=5)
    rows = [{"prompt": r.prompt, "target": r.target} for r in facts]
    for i, part in ((0, rows[1:3]), (1, rows[3:5])):
        (root / f"facts{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"root": root, "facts": facts, "head": ["edit", "--model", str(root / "model"),
            "--editor", str(root / "editor"), "--aggregate", "ls"]}  # fmt: skip


def _editor(env) -> MendEditor:
    from mend.checkpoint import load_editor

    model, tok = load_model(str(env["root"] / "model"))
    return MendEditor(model, tok, load_editor(env["root"] / "editor", model), aggregate="ls")


def _weights(model) -> dict[str, torch.Tensor]:
    return {p.name: p.weight.detach().clone() for p in find_editable(model)}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_edits_kept_in_a_folder_continue_and_revert_as_in_one_run(env, tmp_path, capsys):
    state, head, facts = tmp_path / "state", env["head"], env["facts"]
    root = env["root"]
    runs = [["--prompt", facts[0].prompt, "--target", facts[0].target],
            ["--requests", str(root / "facts0.jsonl")],
            ["--requests", str(root / "facts1.jsonl"), "--one-by-one",
             "--save-model", str(tmp_path / "m")]]  # fmt: skip
    for run in runs:
        capsys.readouterr()
        assert main([*head, "--state", str(state), *run]) == 0
    assert "saved the 4 edit(s) of the model to" in capsys.readouterr().out

    seq = EditSequence(_editor(env))  # the same edits in one run
    after, groups = [], ([facts[0]], facts[1:3], [facts[3]], [facts[4]])
    for group in groups:
        seq.edit(group)
        after.append(_weights(seq.model))
    edited, _ = load_model(str(tmp_path / "m"))
    assert _same(_weights(edited), after[-1])
    resumed = EditSequence.load(state, _editor(env))
    prompts = [[q.prompt for q in r.requests] for r in resumed.records]
    assert prompts == [[f.prompt for f in group] for group in groups]
    assert _same(_weights(resumed.model), after[-1])

    assert main([*head, "--state", str(state), "--revert", "3", "--save-model",
                 str(tmp_path / "m1")]) == 0  # fmt: skip
    assert "reverted the last 3 edit(s)" in capsys.readouterr().out
    reverted, _ = load_model(str(tmp_path / "m1"))
    assert _same(_weights(reverted), after[0])
    assert len(json.loads((state / STATE_FILE).read_text())["edits"]) == 1


def test_bad_state_and_revert_flags(env, tmp_path, capsys):
    head, fact = env["head"], ["--prompt", "The colour loved by Bob is", "--target", "red"]
    state, taken, full = tmp_path / "state", tmp_path / "taken", tmp_path / "full"
    taken.write_text("a file")
    full.mkdir()
    (full / "x").write_text("other things")
    _fails(capsys, [*head, "--revert", "1"], "--revert needs --state")
    _fails(capsys, [*head, "--state", str(state), "--revert", "0"], "--revert must be >= 1")
    _fails(capsys, [*head, "--state", str(state), "--revert", "1"], "no saved edits to revert")
    _fails(capsys, [*head, "--state", str(state), "--revert", "1", *fact], "no --prompt")
    _fails(capsys, [*head, "--state", str(state), "--revert", "1", "--save-delta",
                    str(tmp_path / "d")], "--save-delta")  # fmt: skip
    _fails(capsys, [*head, "--state", str(taken), *fact], "--state", "not a folder")
    _fails(capsys, [*head, "--state", str(full), *fact], "holds no saved edits")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "taken"]

    assert main([*head, "--state", str(state), *fact]) == 0
    saved = {f.name: f.read_bytes() for f in state.iterdir()}
    _fails(capsys, [*head, "--state", str(state), "--revert", "2"], "cannot revert 2 edits")
    other = [*head[:2], str(env["root"] / "other"), *head[3:]]
    _fails(capsys, [*other, "--state", str(state), *fact], "saved on other weights")
    assert {f.name: f.read_bytes() for f in state.iterdir()} == saved
