"""Shielded edits: the nearest known facts' inputs keep their outputs; banks round-trip."""

from __future__ import annotations

import pytest
import torch
from conftest import fact_requests, tiny_mend

from mend.edit import MendEditor
from mend.errors import MendError
from mend.shield import KeyBank, Shield


def _setup(tokenizer):
    plain = tiny_mend(tokenizer, boost=())
    facts = fact_requests(8)
    pairs = [(r.prompt, r.target_true) for r in facts[4:]]
    bank = KeyBank.build(plain.model, tokenizer, plain.params, pairs, plain.max_len)
    return plain, facts, bank


def _deltas(editor: MendEditor, req) -> dict[str, torch.Tensor]:
    result = editor.edit([req])
    out = {n: d.clone() for n, d in result.deltas.items()}
    result.revert()
    return out


def test_a_full_shield_leaves_the_nearest_facts_inputs_unchanged(tokenizer):
    plain, facts, bank = _setup(tokenizer)
    shielded = MendEditor(plain.model, tokenizer, plain.net, boost=(),
                          shield=Shield(bank, m=4, beta=1.0, lam=1e-6))  # fmt: skip
    for req in facts[:2]:  # the bank's 4 facts are every edit's 4 nearest
        before, after = _deltas(plain, req), _deltas(shielded, req)
        for name, k in bank.keys.items():
            moved = float((before[name] @ k.float().T).norm())
            assert float((after[name] @ k.float().T).norm()) < 1e-3 * moved
            assert float(after[name].norm()) > 0.1 * float(before[name].norm())  # not erased


def test_half_a_shield_removes_half_the_action_and_the_check_sees_it(tokenizer):
    plain, facts, bank = _setup(tokenizer)
    seen = []

    class Recording(MendEditor):
        def reaches_target(self, factors, batch, prepared=None):
            seen.append({n: self.weight_deltas(factors)[n] for n in factors})
            return super().reaches_target(factors, batch, prepared)

    editor = Recording(plain.model, tokenizer, plain.net, boost=(1.5,),
                   shield=Shield(bank, m=4, beta=0.5, lam=1e-6))  # fmt: skip
    result = editor.edit([facts[0]])
    landed = {n: d.clone() for n, d in result.deltas.items()}
    result.revert()
    before = _deltas(plain, facts[0])
    checked = seen[0]
    for name, k in bank.keys.items():
        k = k.float()
        ratio = float((checked[name] @ k.T).norm() / (before[name] @ k.T).norm())
        assert abs(ratio - 0.5) < 1e-3  # the check scored the shielded change
        boosted = [torch.allclose(landed[name], s * checked[name], atol=1e-7) for s in (1, 1.5)]
        assert any(boosted)  # and that change (or its boost) landed


def test_the_edited_fact_itself_is_never_shielded(tokenizer):
    plain, facts, _ = _setup(tokenizer)
    own = KeyBank.build(plain.model, tokenizer, plain.params, [(facts[0].prompt, facts[0].target_true)]
                        + [(r.prompt, r.target_true) for r in facts[4:]], plain.max_len)  # fmt: skip
    far = KeyBank.build(plain.model, tokenizer, plain.params,
                        [(r.prompt, r.target_true) for r in facts[4:]], plain.max_len)  # fmt: skip
    a = _deltas(MendEditor(plain.model, tokenizer, plain.net, boost=(),
                           shield=Shield(own, m=4, beta=1.0)), facts[0])  # fmt: skip
    b = _deltas(MendEditor(plain.model, tokenizer, plain.net, boost=(),
                           shield=Shield(far, m=4, beta=1.0)), facts[0])  # fmt: skip
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    alone = KeyBank.build(plain.model, tokenizer, plain.params,
                          [(facts[0].prompt, facts[0].target_true)], plain.max_len)  # fmt: skip
    c = _deltas(MendEditor(plain.model, tokenizer, plain.net, boost=(),
                           shield=Shield(alone, m=4, beta=1.0)), facts[0])  # fmt: skip
    d = _deltas(plain, facts[0])
    for name in c:  # a bank of the edited fact alone shields nothing
        assert torch.equal(c[name], d[name])


def test_a_saved_bank_shields_exactly_as_the_built_one(tokenizer, tmp_path):
    plain, facts, bank = _setup(tokenizer)
    bank.save(tmp_path / "bank.safetensors")
    loaded = KeyBank.load(tmp_path / "bank.safetensors", plain.params)
    torch.testing.assert_close(loaded.owner, bank.owner)
    bf16 = KeyBank({n: k.to(torch.bfloat16) for n, k in bank.keys.items()}, bank.owner, bank.ref)
    a, c = (_deltas(MendEditor(plain.model, tokenizer, plain.net, boost=(), shield=Shield(b)),
                    facts[0]) for b in (bf16, loaded))  # the file keeps the keys in bf16  # fmt: skip
    for name in a:
        assert torch.equal(a[name], c[name])


def test_bad_banks_and_settings_are_errors(tokenizer, tmp_path):
    plain, facts, bank = _setup(tokenizer)
    with pytest.raises(MendError, match="no key bank"):
        KeyBank.load(tmp_path / "missing.safetensors", plain.params)
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank")
    with pytest.raises(MendError, match="cannot read mend key bank"):
        KeyBank.load(tmp_path / "junk.safetensors", plain.params)
    edited = plain.edit([facts[0]])
    edited.save_delta(tmp_path / "delta.safetensors")  # the same weight names, another format
    edited.revert()
    with pytest.raises(MendError, match="is not a mend key bank"):
        KeyBank.load(tmp_path / "delta.safetensors", plain.params)
    bank.save(tmp_path / "bank.safetensors")
    with pytest.raises(MendError, match="does not fit"):
        KeyBank.load(tmp_path / "bank.safetensors", plain.params[:3])
    with pytest.raises(MendError, match="beta"):
        Shield(bank, beta=0.0)


def test_batched_edits_are_not_shielded(tokenizer):
    plain, facts, bank = _setup(tokenizer)
    shielded = MendEditor(plain.model, tokenizer, plain.net, boost=(),
                          shield=Shield(bank, m=4, beta=1.0))  # fmt: skip
    unshielded = plain.edit(facts[:3])
    a = {n: d.clone() for n, d in unshielded.deltas.items()}
    unshielded.revert()
    b = shielded.edit(facts[:3])
    for name in a:
        assert torch.equal(a[name], b.deltas[name])
    b.revert()


def test_bank_keys_are_the_captured_inputs_at_the_answer_positions(tokenizer):
    from mend.data.collate import make_batch
    from mend.grads import capture

    plain, facts, bank = _setup(tokenizer)
    pairs = [(r.prompt, r.target_true) for r in facts[4:]]
    batch = make_batch(tokenizer, pairs, None, plain.max_len)
    captured, _ = capture(plain.model, plain.params, batch, lambda lg: lg.logsumexp(-1).sum())
    assert bank.keys.keys() == captured.keys()
    for name, (u, _) in captured.items():  # the bank's forward-only pass, capture's inputs
        assert bank.keys[name].shape == (int(batch.pos_mask.sum()), u.shape[-1])
        torch.testing.assert_close(bank.keys[name], u[batch.pos_mask], rtol=0, atol=1e-6)
    assert bank.owner.tolist() == batch.pos_row.tolist()
