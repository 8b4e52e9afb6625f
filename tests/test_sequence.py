"""EditSequence: edits kept over time, reverted, saved and resumed bit for bit."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import fact_requests, tiny_mend, tiny_model
from safetensors.torch import load_file, save_file

import mend.sequence as sequence
from mend.baselines import GradEditor
from mend.edit import MendEditor
from mend.errors import MendError
from mend.sequence import STATE_FILE, EditSequence

# Five edits, two of them batched.
CHAIN = [[0], [1, 2], [3], [4, 5, 6], [7]]


def _facts():
    return fact_requests(12, seed=3)


def _weights(seq: EditSequence) -> dict[str, torch.Tensor]:
    return {p.name: p.weight.detach().clone() for p in seq.method.params}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _chain(seq: EditSequence, groups=CHAIN) -> list[dict[str, torch.Tensor]]:
    """Make the edits of `groups`; the weights before the first and after each."""
    facts = _facts()
    states = [_weights(seq)]
    for group in groups:
        seq.edit([facts[i] for i in group])
        states.append(_weights(seq))
    return states


def _key_sums(records) -> dict[str, torch.Tensor]:
    """sum k^T k over the records' keys, in their order."""
    out = {}
    for r in records:
        for name, k in r.keys.items():
            out[name] = out[name] + k.T @ k if name in out else k.T @ k
    return out


def _held(editor: MendEditor) -> dict[str, torch.Tensor]:
    return {p.name: editor.memory.held(p.name) for p in editor.params if p.name in editor.memory}


@pytest.mark.parametrize("swap_depth", [0, 1, 9], ids=["replay", "swap-1", "swap-all"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_revert_last_k_restores_the_weights_bit_for_bit(tokenizer, swap_depth, k):
    editor = tiny_mend(tokenizer, aggregate="ls", boost=())
    seq = EditSequence(editor, swap_depth=swap_depth)
    states = _chain(seq)
    assert all(not _equal(a, b) for a, b in zip(states, states[1:], strict=False))
    seq.revert_last(k)
    assert len(seq) == len(CHAIN) - k
    assert _equal(_weights(seq), states[len(CHAIN) - k])
    assert editor.moved() == (k < len(CHAIN))
    # The key memory holds exactly the kept edits' keys: the same sums as adding only them.
    assert len(editor.memory) == len(seq)
    kept = _key_sums(seq.records)
    assert _held(editor).keys() == kept.keys()
    for name, held in _held(editor).items():
        assert torch.equal(held, kept[name]), name
    seq.revert_last(len(seq))
    assert _equal(_weights(seq), states[0]) and not editor.moved()
    assert len(editor.memory) == 0


@pytest.mark.parametrize("swap_depth", [0, 1, 9])
def test_an_edit_after_a_revert_is_the_edit_of_a_sequence_that_never_made_them(
    tokenizer, swap_depth
):
    """The reverted edits leave nothing behind: not in the weights, not in the key memory."""
    facts = _facts()
    seqs = [EditSequence(tiny_mend(tokenizer, aggregate="ls", boost=()), swap_depth)]
    seqs.append(EditSequence(tiny_mend(tokenizer, aggregate="ls", boost=())))
    _chain(seqs[0])
    seqs[0].revert_last(2)
    _chain(seqs[1], CHAIN[:3])
    for seq in seqs:
        seq.edit([facts[9], facts[10]])
    assert _equal(_weights(seqs[0]), _weights(seqs[1]))
    assert [r.id for r in seqs[0].records] == [1, 2, 3, 6]  # ids are never reused


@pytest.mark.parametrize("aggregate", ["sum", "ls"])
def test_save_then_load_on_a_fresh_model_replays_and_continues_bit_for_bit(
    tokenizer, tmp_path, aggregate, caplog
):
    facts = _facts()
    live = EditSequence(tiny_mend(tokenizer, aggregate=aggregate))  # the check on: boost
    states = _chain(live, CHAIN[:4])
    live.save(tmp_path / "state")
    live.edit([facts[9], facts[10]])  # edit m + 1 without a restart
    after = _weights(live)

    fresh = tiny_mend(tokenizer, aggregate=aggregate)
    with caplog.at_level(logging.WARNING, "mend"):
        resumed = EditSequence.load(tmp_path / "state", fresh)
    assert not caplog.records  # the remade weights match the saved checksums
    assert _equal(_weights(resumed), states[-1])
    assert [r.requests for r in resumed.records] == [r.requests for r in live.records[:4]]
    assert [r.time for r in resumed.records] == [r.time for r in live.records[:4]]
    if aggregate == "ls":
        assert len(fresh.memory) == 4
        expected = _key_sums(live.records[:4])
        assert all(torch.equal(h, expected[n]) for n, h in _held(fresh).items())
    else:
        assert len(fresh.memory) == 0 and all(r.keys is None for r in resumed.records)
    resumed.edit([facts[9], facts[10]])  # edit m + 1 after it
    assert _equal(_weights(resumed), after)
    assert resumed.records[-1].id == live.records[-1].id == 5
    resumed.revert_last(2)  # an edit made before the restart, by replay
    assert _equal(_weights(resumed), states[3])


def test_a_saved_sequence_holds_factors_and_keys_and_no_weights(tokenizer, tmp_path):
    seq = EditSequence(tiny_mend(tokenizer, aggregate="ls", boost=()))
    _chain(seq, CHAIN[:2])
    seq.save(tmp_path / "state")
    factors = sum(
        sum(t.numel() * t.element_size() for t in change)
        for r in seq.records
        for change in r.updates.values()
    )
    keys = sum(k.numel() * k.element_size() for r in seq.records for k in r.keys.values())
    on_disk = sum(f.stat().st_size for f in (tmp_path / "state").iterdir() if f.is_file())
    assert factors + keys < on_disk < factors + keys + 40_000  # headers and the JSON


def test_a_dense_method_replays_too(tokenizer, tmp_path):
    model = tiny_model("gpt2", len(tokenizer))  # Conv1D, and a method adding dense deltas
    seq = EditSequence(GradEditor(model, tokenizer, lr=0.5))
    states = _chain(seq, CHAIN[:3])
    seq.revert_last(2)
    assert _equal(_weights(seq), states[1])
    seq.edit(_facts()[8])
    seq.save(tmp_path / "state")
    saved = _weights(seq)
    resumed = EditSequence.load(
        tmp_path / "state", GradEditor(tiny_model("gpt2", len(tokenizer)), tokenizer, lr=0.5)
    )
    assert _equal(_weights(resumed), saved)


def test_load_refuses_another_model_and_a_model_with_edits(tokenizer, tmp_path):
    seq = EditSequence(tiny_mend(tokenizer, aggregate="ls", boost=()))
    _chain(seq, CHAIN[:2])
    seq.save(tmp_path / "state")

    def refused(editor, *needles):
        before = {p.name: p.weight.detach().clone() for p in editor.params}
        with pytest.raises(MendError) as err:
            EditSequence.load(tmp_path / "state", editor)
        assert all(n in str(err.value) for n in needles), str(err.value)
        assert all(torch.equal(p.weight, before[p.name]) for p in editor.params)
        assert len(editor.memory) == 0

    other = tiny_mend(tokenizer)
    with torch.no_grad():  # same shapes, other weights: another checkpoint
        other.params[0].weight.add_(1e-3)
    refused(MendEditor(other.model, tokenizer, other.net), "saved on other weights")
    edited = tiny_mend(tokenizer)
    edited.edit([_facts()[0]])
    refused(edited, "already carries edits")
    gpt2 = tiny_model("gpt2", len(tokenizer))
    from mend.config import EditorConfig
    from mend.editor import EditorNet
    from mend.models import find_editable

    net = EditorNet({p.name: p.in_out for p in find_editable(gpt2)}, EditorConfig(rank=8))
    refused(MendEditor(gpt2, tokenizer, net), "saved on another model", "tiny-llama")
    with pytest.raises(MendError, match="not a folder"):
        EditSequence.open(tmp_path / "state" / STATE_FILE, tiny_mend(tokenizer))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(MendError, match="holds no saved edit sequence"):
        EditSequence.open(tmp_path / "junk", tiny_mend(tokenizer))
    assert len(EditSequence.open(tmp_path / "new", tiny_mend(tokenizer))) == 0


def test_a_corrupt_state_is_refused_and_other_bits_are_told(tokenizer, tmp_path, caplog):
    seq = EditSequence(tiny_mend(tokenizer, boost=()))
    _chain(seq, CHAIN[:2])
    seq.save(tmp_path / "state")
    path = tmp_path / "state" / STATE_FILE
    state = json.loads(path.read_text())
    state["edited_sha256"][seq.method.params[0].name] = "0" * 64
    path.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, "mend"):
        EditSequence.load(tmp_path / "state", tiny_mend(tokenizer))
    assert "differ in their last bits" in caplog.text
    weights = state["edits"][1].pop("weights")
    path.write_text(json.dumps(state))
    with pytest.raises(MendError, match="corrupt edit sequence"):
        EditSequence.load(tmp_path / "state", tiny_mend(tokenizer))
    state["edits"][1]["weights"] = weights
    path.write_text(json.dumps(state))
    factors = tmp_path / "state" / sequence.FACTORS_FILE
    tensors = load_file(factors)
    name = f"2/{seq.method.params[-1].name}/u"
    tensors[name] = tensors[name][:, 1:].contiguous()
    save_file(tensors, factors, metadata={"format": sequence.FORMAT})
    fresh = tiny_mend(tokenizer)
    base = _weights(EditSequence(fresh))
    with pytest.raises(MendError, match="edit 2's .* has other shapes"):
        EditSequence.load(tmp_path / "state", fresh)
    assert _equal(_weights(EditSequence(fresh)), base)  # no edit replayed before refusing
    factors.write_bytes(b"\x08\x00\x00")
    with pytest.raises(MendError, match="cannot read mend edit sequence"):
        EditSequence.load(tmp_path / "state", tiny_mend(tokenizer))


def test_save_replaces_the_folder_only_once_the_new_one_is_complete(
    tokenizer, tmp_path, monkeypatch
):
    seq = EditSequence(tiny_mend(tokenizer, boost=()))
    _chain(seq, CHAIN[:2])
    folder = tmp_path / "state"
    seq.save(folder)
    (folder / "stale").write_text("from before")
    saved = {f.name: f.read_bytes() for f in folder.iterdir()}
    seq.edit(_facts()[8])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sequence, "write_json", crash)  # after the tensors are written
    with pytest.raises(OSError, match="disk full"):
        seq.save(folder)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no temporary left
    monkeypatch.undo()
    seq.save(folder, save_model=True)
    assert not (folder / "stale").exists()
    assert len(json.loads((folder / STATE_FILE).read_text())["edits"]) == 3
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder / sequence.MODEL_DIR)
    assert _equal({p.name: model.get_submodule(p.name).weight for p in seq.method.params},
                  _weights(seq))  # fmt: skip
    assert (folder / sequence.MODEL_DIR / "tokenizer.json").is_file()


def test_edits_made_around_the_sequence_are_refused(tokenizer):
    editor = tiny_mend(tokenizer, boost=())
    seq = EditSequence(editor, swap_depth=1)
    first = seq.edit(_facts()[0])
    second = seq.edit(_facts()[1])
    with pytest.raises(MendError, match="released"):
        first.revert()  # only the latest edit keeps the weights from before it
    second.revert()
    with pytest.raises(MendError, match="outside this sequence"):
        seq.edit(_facts()[2])
    with pytest.raises(MendError, match="cannot revert 3 edits"):
        seq.revert_last(3)
    with pytest.raises(MendError, match="already carries edits"):
        EditSequence(editor)


@pytest.mark.parametrize("swap_depth", [0, 1, 9])
def test_removing_a_middle_edit_gives_the_weights_of_a_sequence_that_never_made_it(
    tokenizer, swap_depth
):
    """Anchored, summed edits (the default editor, its check on): A, B, C then remove B is,
    bit for bit, A then C; the next edit lands the same on both."""
    facts = _facts()
    a, b, c, d = [facts[0]], [facts[1], facts[2]], [facts[3]], [facts[9]]
    seq = EditSequence(tiny_mend(tokenizer), swap_depth)
    for group in (a, b, c):
        seq.edit(group)
    with_b = _weights(seq)
    seq.remove(2)
    assert [r.id for r in seq.records] == [1, 3]
    assert [r.requests for r in seq.records] == [a, c]
    other = EditSequence(tiny_mend(tokenizer))
    other.edit(a)
    other.edit(c)
    assert not _equal(_weights(seq), with_b)
    assert _equal(_weights(seq), _weights(other))
    seq.edit(d)
    other.edit(d)
    assert _equal(_weights(seq), _weights(other))
    assert seq.records[-1].id == 4  # ids are never reused


def test_removing_the_last_or_first_edit_and_unknown_ids(tokenizer):
    facts = _facts()
    seq = EditSequence(tiny_mend(tokenizer, boost=()))  # unchecked: the first is like the rest
    states = _chain(seq, CHAIN[:3])
    seq.remove(3)  # the last: a revert
    assert _equal(_weights(seq), states[2])
    with pytest.raises(MendError, match="no edit 3"):
        seq.remove(3)
    seq.remove(1)
    other = EditSequence(tiny_mend(tokenizer, boost=()))
    other.edit([facts[1], facts[2]])
    assert _equal(_weights(seq), _weights(other))
    seq.remove(2)
    assert len(seq) == 0 and _equal(_weights(seq), states[0])
    assert not seq.method.moved()


def test_removing_an_edit_of_a_least_squares_editor_keeps_the_later_factors(tokenizer):
    """The later edits' solved factors stay as computed; the memory forgets the removed keys."""
    seq = EditSequence(tiny_mend(tokenizer, aggregate="ls", boost=()))
    _chain(seq, CHAIN[:3])
    kept = [seq.records[0], seq.records[2]]
    factors = [dict(r.updates) for r in kept]
    seq.remove(2)
    assert [r.updates for r in seq.records] == factors
    expected = _key_sums(kept)
    held = _held(seq.method)
    assert held.keys() == expected.keys()
    assert all(torch.equal(h, expected[n]) for n, h in held.items())
    replayed = EditSequence(tiny_mend(tokenizer, aggregate="ls", boost=()))
    entries = [sequence.record_entry(r) for r in kept]
    tensors = [sequence.record_tensors(r) for r in kept]
    factors_all = {k: v for f, _ in tensors for k, v in f.items()}
    keys_all = {k: v for _, ks in tensors for k, v in ks.items()}
    replayed.restore(entries, factors_all, keys_all, next_id=4)
    assert _equal(_weights(replayed), _weights(seq))
    assert replayed.checksums() == seq.checksums()
    assert replayed.checksums()["base"] != replayed.checksums()["edited"]
