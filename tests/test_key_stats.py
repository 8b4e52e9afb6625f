"""Ordinary text's key statistics: computed once, cached, never served for another model;
a least-squares edit that holds them moves ordinary text's outputs less."""

from __future__ import annotations

import torch
from conftest import fact_requests, tiny_mend, tiny_model

from mend.grads import key_moments
from mend.key_stats import text_batches, text_key_moments
from mend.models import find_editable

TEXT = "The river flows north through the old town and into the sea, past the mills. " * 300


def test_text_key_moments_are_cached_per_model_and_matrix(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("MEND_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    model = tiny_model("llama", len(tokenizer))
    params = find_editable(model)
    first = text_key_moments(model, tokenizer, params, str(text), n_tokens=512, progress=False)
    folder = tmp_path / "cache" / "key_stats"
    files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime_ns)
    assert len(files) == len(params)  # one file per matrix
    # the cached numbers are the moments themselves
    batches = text_batches(tokenizer, TEXT, 512, 64, "cpu")
    with torch.no_grad():
        want = key_moments(model, params, batches)
    for p in params:
        torch.testing.assert_close(first[p.name], want[p.name].float())
    # a second call reads the files (poisoned copies show they were read, not recomputed)
    from safetensors.torch import load_file, save_file

    for f in files:
        save_file({"moments": load_file(str(f))["moments"] + 1}, str(f))
    again = text_key_moments(model, tokenizer, params, str(text), n_tokens=512, progress=False)
    assert all(torch.equal(again[n], first[n] + 1) for n in first)
    # one matrix asked for alone is its own cached file; a matrix not yet seen is computed
    last = params[-1:]
    alone = text_key_moments(model, tokenizer, last, str(text), n_tokens=512, progress=False)
    assert torch.equal(alone[last[0].name], first[last[0].name] + 1)
    # another model (other weights) gets its own numbers, never the cached ones
    other = tiny_model("llama", len(tokenizer), seed=1)
    theirs = text_key_moments(other, tokenizer, find_editable(other), str(text), 512, False)
    assert len(list(folder.glob("*.safetensors"))) == 2 * len(params)
    assert not any(torch.equal(theirs[n], first[n] + 1) for n in first)


def test_holding_ordinary_text_keeps_its_outputs_closer(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    params = find_editable(model)
    batches = text_batches(tokenizer, TEXT, 1024, 64, "cpu")
    with torch.no_grad():
        moments = {n: m.float() for n, m in key_moments(model, params, batches).items()}
    reqs = fact_requests(6)
    probe = batches[0]

    def text_change(preserve: float) -> float:
        editor = tiny_mend(tokenizer, aggregate="ls", preserve=preserve, text_moments=moments)
        editor.model.load_state_dict(model.state_dict())
        with torch.no_grad():
            before = editor.model(input_ids=probe.input_ids).logits
            result = editor.edit(reqs)
            after = editor.model(input_ids=probe.input_ids).logits
        result.revert()
        return float((after - before).norm() / before.norm())

    free, held = text_change(0.0), text_change(10.0)
    assert free > 0 and held < 0.5 * free, (free, held)
