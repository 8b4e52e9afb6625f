"""Batched edits made of each request's own single edit, combined by least squares
(`MendEditor(aggregate="singles")`)."""

from __future__ import annotations

import torch
from conftest import tiny_mend

from mend.types import EditRequest

# Prompts that share no first token: no key of one is a key of the other.
REQUESTS = [
    EditRequest("Alice really likes the", "red"),
    EditRequest("What Bob loves most is", "blue"),
]
LATER = [
    EditRequest("Carol really likes the", "stone"),
    EditRequest("Dave really likes the", "tiger"),
]


def _keys(editor, requests) -> dict[str, list[torch.Tensor]]:
    """{matrix: [each request's edited keys (T_i, in)]}, on the model as it is now."""
    batch = editor.batch([(r.prompt, r.target) for r in requests])
    with torch.no_grad():
        captured, _ = editor._capture(batch)
    out = {}
    for name, (u, delta) in captured.items():
        mask = editor.token_mask(batch, name) & (delta != 0).any(-1)
        out[name] = [u[i][mask[i]] for i in range(len(requests))]
    return out


def _change(editor, requests) -> dict[str, torch.Tensor]:
    """{matrix: Delta W (out, in)} of one edit of requests, reverted."""
    result = editor.edit(requests)
    result.revert()
    return {n: d.clone() for n, d in result.deltas.items()}


def test_combined_singles_give_each_request_keys_its_own_single_edit_change(tokenizer):
    """At every edited key of request i the combined change moves the output as request i's
    single edit alone does (small ridge, independent keys); the sum of the single edits does
    not, for the other edit acts on those keys too."""
    editor = tiny_mend(tokenizer, aggregate="singles", ridge=1e-10, boost=())
    editor.net.eval()
    keys = _keys(editor, REQUESTS)
    singles = [_change(editor, [r]) for r in REQUESTS]
    combined = _change(editor, REQUESTS)
    checked = 0
    for name, per_request in keys.items():
        if sum(len(k) for k in per_request) >= per_request[0].shape[1]:
            continue  # more keys than inputs: they cannot all be independent
        checked += 1
        summed = singles[0][name] + singles[1][name]
        for i, k in enumerate(per_request):
            want = k @ singles[i][name].T
            got, crosstalk = k @ combined[name].T, k @ summed.T
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale)
            assert (crosstalk - want).abs().max() > 10 * (got - want).abs().max()
    assert checked >= 3


def test_one_request_is_edited_as_the_sum_does(tokenizer):
    editor = tiny_mend(tokenizer, aggregate="singles")
    plain = tiny_mend(tokenizer, aggregate="sum")
    a, b = _change(editor, REQUESTS[:1]), _change(plain, REQUESTS[:1])
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_combined_singles_revert_bit_for_bit_and_a_later_edit_keeps_their_keys(tokenizer):
    """Reverting restores the exact weights; a later edit leaves the earlier edit's keys'
    outputs far closer to where they were when it remembers them than when it does not."""
    drift = {}
    for remember in (True, False):
        editor = tiny_mend(tokenizer, aggregate="singles", ridge=1e-8, boost=(), remember=remember)
        editor.net.eval()
        before = {p.name: p.weight.detach().clone() for p in editor.params}
        keys = _keys(editor, REQUESTS)
        first = editor.edit(REQUESTS)
        assert len(editor.memory) == (1 if remember else 0)
        second = editor.edit(LATER)
        moved = [
            float((torch.cat(keys[n]) @ second.deltas[n].T).norm()) for n in keys
        ]  # the later change at the earlier keys
        drift[remember] = sum(moved)
        second.revert()
        first.revert()
        assert all(torch.equal(p.weight, before[p.name]) for p in editor.params)
        assert len(editor.memory) == 0
    assert drift[True] < 0.1 * drift[False]
