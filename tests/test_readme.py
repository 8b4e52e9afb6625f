"""The README's Python examples run as written, on a tiny model in place of SmolLM2-135M."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import fact_requests, make_tokenizer, tiny_model

import mend

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_trains_then_edits(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks()
    assert len(blocks) == 2  # train, then edit
    tok = make_tokenizer("bpe")
    monkeypatch.setattr(mend, "load_model", lambda name: (tiny_model("llama", len(tok)), tok))
    facts = fact_requests(300, seed=1)
    facts[0] = mend.EditRequest("The Eiffel Tower is located in", "Rome")  # the example's fact
    monkeypatch.setattr(mend, "load_requests", lambda name: facts)
    real_train = mend.train

    def short(model, tokenizer, data, val, config, out):  # the recipe, for a few steps
        config = config.override("schedule.minutes", None).override("schedule.max_steps", 4)
        config = config.override("schedule.val_every", 4).override("schedule.val_edits", 8)
        config = config.override("key_text", None).override("speed.lower_precision", "fp32")
        return real_train(model, tokenizer, data, val, config, out, progress=False)

    monkeypatch.setattr(mend, "train", short)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    exec(blocks[0], {})
    assert (tmp_path / "runs" / "cf" / "editor.safetensors").is_file()
    exec(blocks[1], {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed in ("[True]", "[False]")  # a four-step editor need not land it
    assert (tmp_path / "runs" / "edited" / "config.json").is_file()
    assert (tmp_path / "runs" / "eiffel.safetensors").is_file()
