"""Bad paths, devices and settings on every command: one line on stderr and exit code 2,
before a model is loaded or anything is written; slow bf16 forced by a user is warned about."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_tokenizer, tiny_model

from mend.cli import main
from mend.cli.parser import BASELINE_NAMES


def _fails(capsys, argv: list[str], *needles: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("mend: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("cmd", [["edit", "--editor", "e", "--prompt", "p", "--target", "t"],
                                 ["eval", "--editor", "e", "--data", "d", "--out", "r.json"],
                                 ["train", "--data", "d", "--out", "o"],
                                 ["apply", "--delta", __file__, "--prompt", "p"],
                                 ["fit-shared", "--editor", "e", "--data", "d"], ["demo"]])  # fmt: skip
def test_a_device_this_machine_lacks(capsys, tmp_path, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    _fails(capsys, [*cmd, "--device", "cuda"], "device 'cuda' is not available")


def test_an_unknown_device_and_bad_threads(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails(capsys, ["edit", "--editor", "e", "--prompt", "p", "--target", "t", "--device", "gpu0"],
           "unknown device 'gpu0'")  # fmt: skip
    _fails(capsys, ["edit", "--editor", "e", "--prompt", "p", "--target", "t", "--threads", "0"],
           "--threads")  # fmt: skip


def test_output_paths_of_the_wrong_kind(capsys, tmp_path, a_file):
    edit = ["edit", "--editor", "e", "--prompt", "p", "--target", "t"]
    _fails(capsys, ["train", "--data", "d", "--out", str(a_file)], "--out", "not a folder")
    _fails(capsys, ["demo", "--out", str(a_file)], "--out", "not a folder")
    _fails(capsys, [*edit, "--save-model", str(a_file)], "--save-model", "not a folder")
    _fails(capsys, [*edit, "--save-delta", str(tmp_path)], "--save-delta", "not a file")
    _fails(capsys, [*edit, "--save-delta", str(a_file / "d.safetensors")], "is a file")
    _fails(capsys, ["eval", "--editor", "e", "--data", "d", "--out", str(tmp_path)], "not a file")
    _fails(capsys, ["apply", "--delta", __file__, "--save-model", str(a_file)], "not a folder")
    assert a_file.read_text() == "not a folder"  # nothing written over it


def test_recipes_and_settings_on_the_command_line(capsys, tmp_path):
    out = str(tmp_path / "o")
    _fails(capsys, ["train", "--recipe", "nope", "--out", out], "no recipe 'nope'", "counterfact")
    _fails(capsys, ["train", "--recipe", "counterfact-batched", "--out", out], "--init")
    _fails(capsys, ["train", "--recipe", "counterfact", "--init", str(tmp_path / "x"), "--out", out],
           "--init", "not found")  # fmt: skip
    _fails(capsys, ["train", "--out", out], "--data")
    _fails(capsys, ["train", "--data", "d", "--out", out, "--set", "lr"], "KEY=VALUE")
    _fails(capsys, ["train", "--data", "d", "--out", out, "--set", "schedule.lr=-1"], "lr")
    _fails(capsys, ["train", "--data", "d", "--out", out, "--set", "schedule.lrr=1"], "unknown")
    _fails(capsys, ["train", "--data", "d", "--out", out, "--lr", "0"], "lr must be > 0")
    assert not (tmp_path / "o").exists()


def test_the_cli_lists_every_baseline_of_the_registry():
    from mend.baselines import BASELINES

    assert set(BASELINE_NAMES) == set(BASELINES)


def test_forcing_bf16_where_it_is_slow_warns(tmp_path, monkeypatch, caplog):
    import mend.models.load as load
    import mend.training.loop as loop
    from mend.config import TrainConfig

    tok = make_tokenizer("bpe")
    tok.pad_token = "<pad>"
    tiny_model("llama", len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(load, "bf16_is_fast", lambda device: False)
    monkeypatch.setattr(loop, "bf16_is_fast", lambda device: False)
    with caplog.at_level(logging.WARNING):
        model, _ = load.load_model(str(tmp_path / "m"), dtype="bf16")
        slow = TrainConfig().override("speed.lower_precision", "bf16")
        stack = loop._upper_stack(model, ["model.layers.3.mlp.down_proj"], slow, model.device)
        auto = loop._upper_stack(
            model, ["model.layers.3.mlp.down_proj"], TrainConfig(), model.device
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("bf16" in w and "slower" in w for w in warnings if "has no fast bf16" in w)
    assert len([w for w in warnings if "no fast bf16" in w]) == 2  # the model, the forced pass
    assert stack.lower_dtype == torch.bfloat16  # what the user asked for, warned
    assert auto.lower_dtype is None  # "auto" keeps fp32 where bf16 is slow


def test_sequential_evaluation_flags(capsys, tmp_path):
    base = ["eval", "--method", "none", "--data", "d", "--out", str(tmp_path / "r.json")]
    _fails(capsys, [*base, "--every", "5"], "--every needs --sequential")
    _fails(capsys, [*base, "--sequential", "--limit", "10", "--every", "20"], "--every")
    _fails(capsys, [*base, "--sequential", "--batch-size", "0"], "--batch-size")
    assert not (tmp_path / "r.json").exists()
