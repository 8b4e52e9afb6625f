"""EditorNet checkpoints, delta files and saved edited models: exact round trips and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, fact_requests, make_tokenizer, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import mend.checkpoint
from mend.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_editor,
    model_identity,
    read_config,
    save_editor,
)
from mend.config import EditorConfig
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.errors import MendError
from mend.grads import key_moments
from mend.models import find_editable, load_model
from mend.models.forward import scored_logits
from mend.result import apply_delta


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("bpe")


def _llama_variant(vocab: int, seed: int = 0, **changes):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, **(TINY["llama"] | changes))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.config.name_or_path = "tiny-llama-variant"
    return model


def _trained_looking_editor(model, tok, seed: int = 3) -> MendEditor:
    """An editor away from its identity init, with running-norm statistics from real tokens."""
    params = find_editable(model)
    net = EditorNet({p.name: p.in_out for p in params}, EditorConfig(rank=8, init_alpha=0.1))
    torch.manual_seed(seed)
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    editor = MendEditor(model, tok, net)
    texts = [(r.prompt, r.target) for r in fact_requests(12, seed=4)]
    net.set_key_moments(key_moments(model, editor.params, [editor.batch(texts)]))
    net.train()
    with torch.no_grad():
        editor.factors(editor.batch([(r.prompt, r.target) for r in fact_requests(6, seed=5)]))
    net.eval()
    return editor


def _save(folder: Path, editor: MendEditor) -> None:
    save_editor(folder, editor.net, model_identity(editor.model, editor.net.names))


def _deltas(editor: MendEditor, reqs) -> dict[str, torch.Tensor]:
    result = editor.edit(reqs)
    out = {k: v.clone() for k, v in result.deltas.items()}
    result.revert()
    return out


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    model = tiny_model("llama", len(tok))
    editor = _trained_looking_editor(model, tok)
    folder = tmp_path_factory.mktemp("editor")
    _save(folder, editor)
    return model, editor, folder


# --------------------------------------------------------------------------- round trip


def test_round_trip_gives_bit_identical_edits(setup, tok):
    model, editor, folder = setup
    # The state is non-trivial: statistics were gathered, parameters are off their init.
    for net in editor.net.nets.values():
        assert (net.norm_u.count >= 2).all() and (net.norm_d.count >= 2).all()
        assert net.norm_u.m2.abs().sum() > 0
    loaded = load_editor(folder, model)
    assert loaded.training is False
    assert loaded.names == editor.net.names  # order matters: it indexes log_alpha
    assert loaded.cfg == editor.net.cfg
    saved, got = editor.net.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys()
    for k in saved:
        assert got[k].dtype == saved[k].dtype, k  # float64 statistics stay float64
        assert torch.equal(got[k], saved[k]), k

    reqs = fact_requests(3, seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = _deltas(editor, reqs)
    reloaded = _deltas(MendEditor(model, tok, loaded), reqs)
    assert original.keys() == reloaded.keys() == set(editor.net.names)
    for name in original:
        assert original[name].abs().max() > 0
        assert torch.equal(original[name], reloaded[name]), name
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # both edits were reverted exactly

    # The key preconditioners were saved: not the identity they start as.
    p0 = loaded.preconditioner(name=editor.net.names[0])
    assert not torch.allclose(p0, torch.eye(len(p0)))

    # The statistics matter: the same editor without them edits differently.
    blank = load_editor(folder, model)
    for net in blank.nets.values():
        net.norm_u.count.zero_()
        net.norm_d.count.zero_()
    no_stats = _deltas(MendEditor(model, tok, blank), reqs)
    name = editor.net.names[0]
    assert not torch.allclose(no_stats[name], original[name])


def test_config_records_model_identity_and_checksum(setup):
    model, editor, folder = setup
    config = read_config(folder)
    assert config["format"] == "mend-editor-v1"
    assert config["model"]["model_type"] == "llama"
    assert config["model"]["name"] == "tiny-llama"
    assert config["model"]["params"] == {
        "model.layers.1.mlp.gate_proj": [32, 48],
        "model.layers.1.mlp.up_proj": [32, 48],
        "model.layers.1.mlp.down_proj": [48, 32],
        "model.layers.2.mlp.gate_proj": [32, 48],
        "model.layers.2.mlp.up_proj": [32, 48],
        "model.layers.2.mlp.down_proj": [48, 32],
        "model.layers.3.mlp.gate_proj": [32, 48],
        "model.layers.3.mlp.up_proj": [32, 48],
        "model.layers.3.mlp.down_proj": [48, 32],
    }
    assert config["editor"]["rank"] == 8
    assert len(config["sha256"]) == 64


# --------------------------------------------------------------------------- refusals


def test_refuses_same_family_with_other_shapes(setup, tok):
    _, _, folder = setup
    other = _llama_variant(len(tok), intermediate_size=64)
    with pytest.raises(MendError, match="different model") as err:
        load_editor(folder, other)
    assert "model.layers.1.mlp.gate_proj is (32, 64) here but (32, 48)" in str(err.value)
    # Binding an editor built elsewhere is refused too.
    with pytest.raises(MendError, match="different model"):
        MendEditor(other, tok, load_editor(folder))


def test_refuses_a_model_without_the_edited_layers(setup, tok):
    _, _, folder = setup
    shallow = _llama_variant(len(tok), num_hidden_layers=2)
    with pytest.raises(MendError, match="different model .*unknown weight name"):
        load_editor(folder, shallow)


def test_refuses_another_family(setup, tok):
    _, _, folder = setup
    gpt2 = tiny_model("gpt2", len(tok))
    with pytest.raises(MendError, match="made for a llama model .* not gpt2"):
        load_editor(folder, gpt2)


# --------------------------------------------------------------------------- corrupt files


@pytest.fixture
def ckpt(setup, tmp_path):
    _, editor, _ = setup
    folder = tmp_path / "ckpt"
    _save(folder, editor)
    return folder


def test_truncated_weights(setup, ckpt):
    model = setup[0]
    weights = ckpt / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(MendError, match="does not match its checksum"):
        load_editor(ckpt, model)
    # Without a recorded checksum the reader itself must refuse the truncated file.
    config = json.loads((ckpt / CONFIG_FILE).read_text())
    del config["sha256"]
    (ckpt / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(MendError, match="corrupt editor checkpoint: cannot read"):
        load_editor(ckpt, model)


def test_weights_with_missing_tensors(setup, ckpt):
    from safetensors.torch import load_file, save_file

    weights = ckpt / WEIGHTS_FILE
    tensors = load_file(str(weights))
    tensors.pop("log_alpha")
    save_file(tensors, str(weights))
    config = json.loads((ckpt / CONFIG_FILE).read_text())
    del config["sha256"]
    (ckpt / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(MendError, match="corrupt editor checkpoint: .*log_alpha"):
        load_editor(ckpt, setup[0])


@pytest.mark.parametrize(
    "content",
    [
        b"{not json at all",
        b"\xff\xfe\x00\x81 binary garbage",
        b"[1, 2, 3]",
        b'{"format": "something-else"}',
        b'{"format": "mend-editor-v1"}',
        b'{"format": "mend-editor-v1", "editor": {}, "model": {"name": "x", "model_type": "llama", '
        b'"params": {"model.layers.1.mlp.up_proj": [32]}}}',
    ],
    ids=["not-json", "binary", "list", "other-format", "no-model", "bad-shape"],
)
def test_garbage_config(setup, ckpt, content):
    (ckpt / CONFIG_FILE).write_bytes(content)
    with pytest.raises(MendError, match="editor checkpoint") as err:
        load_editor(ckpt, setup[0])
    assert str(ckpt / CONFIG_FILE) in str(err.value)


def test_missing_files(setup, ckpt, tmp_path):
    model = setup[0]
    with pytest.raises(MendError, match="not an editor checkpoint"):
        load_editor(tmp_path / "does-not-exist", model)
    (ckpt / WEIGHTS_FILE).unlink()
    with pytest.raises(MendError, match=f"{WEIGHTS_FILE} is missing"):
        load_editor(ckpt, model)
    (ckpt / CONFIG_FILE).unlink()
    with pytest.raises(MendError, match=f"not an editor checkpoint: .*{CONFIG_FILE} is missing"):
        load_editor(ckpt, model)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_writes_leave_no_temp_files(setup, ckpt, monkeypatch):
    model, editor, _ = setup
    _save(ckpt, editor)  # overwrite in place
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    good = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def broken_save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mend.checkpoint, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        _save(ckpt, editor)
    # The failed write left neither a temp file nor a damaged checkpoint.
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == good
    load_editor(ckpt, model)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from mend.files import atomic_folder, atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.json", lambda tmp: Path(tmp).write_text("{}"))
        with atomic_folder(tmp_path / "model") as folder:
            (folder / "config.json").write_text("{}")
    finally:
        os.umask(old)
    # like open() and mkdir() under umask 022, not tempfile's private 0600 / 0700
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------- edit results


def test_save_delta_and_apply_delta_reproduce_the_edit(setup, tok, tmp_path):
    model, editor, _ = setup
    fresh = tiny_model("llama", len(tok))  # same seed: the same weights as `model`
    pristine = {k: v.clone() for k, v in fresh.state_dict().items()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, pristine[k]), k

    result = editor.edit(fact_requests(2, seed=11))
    try:
        edited = {n: editor.model.get_submodule(n).weight.detach().clone() for n in result.deltas}
        out = tmp_path / "deltas" / "d.safetensors"
        result.save_delta(out)
    finally:
        result.revert()
    assert [p.name for p in out.parent.iterdir()] == ["d.safetensors"]

    applied = apply_delta(fresh, out)
    assert set(applied.deltas) == set(editor.net.names)
    for name, weight in edited.items():
        now = fresh.get_submodule(name).weight
        assert not torch.equal(now, pristine[name + ".weight"])
        torch.testing.assert_close(now, weight, rtol=0, atol=1e-7)
    applied.revert()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, pristine[k]), k


def test_apply_delta_refuses_other_models_and_bad_files(setup, tok, tmp_path):
    model, editor, _ = setup
    result = editor.edit(fact_requests(1))
    try:
        result.save_delta(tmp_path / "d.safetensors")
    finally:
        result.revert()
    with pytest.raises(
        MendError, match=r"delta for model\.layers\.1\.mlp\.\w+ has shape .*48.* weight has .*64"
    ):
        apply_delta(_llama_variant(len(tok), intermediate_size=64), tmp_path / "d.safetensors")
    with pytest.raises(MendError, match="unknown weight name"):
        apply_delta(tiny_model("gpt2", len(tok)), tmp_path / "d.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(MendError, match="cannot read mend weight delta"):
        apply_delta(model, tmp_path / "junk.safetensors")


def test_save_pretrained_writes_a_loadable_edited_model(setup, tok, tmp_path):
    model, editor, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = editor.batch([(r.rephrases[0], r.target) for r in fact_requests(2, seed=11)])
    result = editor.edit(fact_requests(2, seed=11))
    try:
        edited = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            edited_logits = scored_logits(model, probe)
        result.save_pretrained(tmp_path / "edited", tok)
    finally:
        result.revert()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(MendError, match="reverted"):
        result.save_pretrained(tmp_path / "again", tok)
    assert not (tmp_path / "again").exists()

    m2, t2 = load_model(str(tmp_path / "edited"))
    assert (
        t2("The colour loved by Alice is")["input_ids"]
        == tok("The colour loved by Alice is")["input_ids"]
    )
    loaded = m2.state_dict()
    for name in editor.net.names:
        key = name + ".weight"
        assert not torch.equal(edited[key], before[key])
        assert torch.equal(loaded[key], edited[key]), key
    for k in loaded:
        assert torch.equal(loaded[k], edited[k]), k
    with torch.no_grad():
        torch.testing.assert_close(scored_logits(m2, probe), edited_logits, rtol=0, atol=1e-6)
