"""ROME, MEMIT and AlphaEdit on tiny models: the properties their closed forms promise."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, SUBJECTS, fact_requests, tiny_model

from mend.aggregate import KeyMemory
from mend.baselines import LocateConfig, LocateEditor
from mend.baselines.locate import subject_position
from mend.data.collate import make_batch
from mend.errors import MendError
from mend.evaluate import evaluate
from mend.grads import key_moments
from mend.key_stats import text_batches
from mend.models.archs import arch_for
from mend.models.forward import scored_logits
from mend.models.params import find_editable
from mend.types import EditRequest

TEXT = "The river flows north through the old town and into the sea, past the mills. " * 300


def _requests(n: int) -> list[EditRequest]:
    """fact_requests with their subject named (the word after "of", or the first word)."""
    out = []
    for r in fact_requests(n):
        words = r.prompt.split()
        subject = words[words.index("of") + 1] if "of" in words else words[0]
        out.append(EditRequest(r.prompt, r.target, r.rephrases, r.locality, r.target_true,
                               r.neighborhood, subject))  # fmt: skip
    return out


def _editor(model, tokenizer, method: str, layers, **config) -> LocateEditor:
    arch = arch_for(model)
    params = find_editable(model, [f"{arch.blocks}.{i}.{arch.mlp[-1]}" for i in layers])
    with torch.no_grad():
        batches = text_batches(tokenizer, TEXT, 2048, 64, "cpu")
        moments = {n: m.float() for n, m in key_moments(model, params, batches).items()}
    config = {"prefixes": 2, "prefix_tokens": 4} | config
    cfg = LocateConfig(layers=tuple(layers), **config)
    return LocateEditor(model, tokenizer, method, cfg, text_moments=moments, progress=False)


def test_subject_position_is_the_subject_last_token(tokenizer):
    text = "The favourite thing of Alice is"
    pos = subject_position(tokenizer, text, "Alice")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids[: pos + 1]).endswith("Alice")
    assert subject_position(tokenizer, text, None) == len(ids) - 1  # unknown: the last token
    assert subject_position(tokenizer, text, "Bob") == len(ids) - 1  # absent: the last token


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_makes_its_target_the_argmax_and_reverts_bit_exactly(tokenizer, family):
    """The key is the prompt's last token here (no subject given): a random tiny model's
    attention carries little from a subject token to the answer, a trained model's does.
    Its head is scaled up so that its logits can express a confident answer at all, and the
    target search runs without weight decay or KL (ROME's regularisers assume real logits)."""
    model = tiny_model(family, len(tokenizer))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    before = {n: w.clone() for n, w in model.state_dict().items()}
    prompt = "The favourite thing of {} is"
    words = {tokenizer.decode([i]).strip() for i in range(len(tokenizer))}
    single = sorted(w for w in words if w.isalpha() and len(w) > 2
                    and len(tokenizer(prompt.format("Alice") + " " + w)["input_ids"])
                    == len(tokenizer(prompt.format("Alice"))["input_ids"]) + 1)  # fmt: skip
    requests = [
        EditRequest(prompt.format(s), t) for s, t in zip(SUBJECTS[5:9], single[:4], strict=True)
    ]
    rome = _editor(model, tokenizer, "rome", [1], weight_decay=0.0, kl_weight=0.0, clamp=20.0)
    report = evaluate(model, tokenizer, rome, requests, progress=False)
    assert report["pre"]["rewrite_acc"] == 0.0
    assert report["rewrite_acc"] == 1.0, report["rewrite_acc"]
    assert all(torch.equal(before[n], w) for n, w in model.state_dict().items())


def test_memit_on_one_block_is_the_rank_one_closed_form(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    req = _requests(1)
    weight = 3.0
    memit = _editor(model, tokenizer, "memit", [1], mom2_weight=weight)
    (p,) = memit.params
    delta, _ = memit.target_deltas(req)
    keys, _ = memit.keys_and_outputs(req)
    k = keys[p.name].double()[0]
    c_inv_k = torch.linalg.solve(memit.moments[p.name].double(), k)
    # r k^T (w C0 + k k^T)^-1 = r (C0^-1 k)^T / (w + k^T C0^-1 k) (Sherman-Morrison)
    want = torch.outer(delta[0].double(), c_inv_k) / (weight + k @ c_inv_k)
    result = memit.edit(req)
    got = result.deltas[p.name].double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    result.revert()
    # with C0's weight near 0 it is ROME's change (which meets the key exactly: Delta k = r)
    rome = _editor(model, tokenizer, "rome", [1])
    near = _editor(model, tokenizer, "memit", [1], mom2_weight=1e-6)
    r1, r2 = rome.edit(req), None
    a = r1.deltas[p.name].clone()
    r1.revert()
    r2 = near.edit(req)
    torch.testing.assert_close(r2.deltas[p.name], a, rtol=1e-3, atol=1e-5 * float(a.abs().max()))
    torch.testing.assert_close((a.double() @ k).float(), delta[0], rtol=1e-4, atol=1e-5)
    r2.revert()


def test_alphaedit_leaves_the_preserved_keys_outputs_in_place(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    alpha = _editor(model, tokenizer, "alphaedit", [0, 1], null_space=0.05)
    result = alpha.edit(_requests(3))
    for p in alpha.params:
        basis = alpha.basis[p.name]  # the null space: the change lives in its span
        values, vectors = torch.linalg.eigh(alpha.moments[p.name].double())
        preserved = vectors[:, basis.shape[1] :].float()  # the directions text's keys use
        change = result.deltas[p.name]
        moved = change @ preserved  # (out, kept): the change's effect on those keys
        assert float(moved.norm()) <= 1e-5 * float(change.norm()) * preserved.shape[1] ** 0.5
        assert float(change.norm()) > 0
    # the next edit also holds the first edit's keys (AlphaEdit's running sum)
    assert len(alpha.memory) == 1
    result.revert()
    assert len(alpha.memory) == 0


def test_alphaedit_keeps_a_later_batch_off_earlier_edits_keys(tokenizer):
    """The running sum of earlier keys: the second batch's change meets the first batch's
    keys far less than the same change solved without it."""
    reqs = _requests(8)

    def reach(remember: bool) -> float:
        model = tiny_model("llama", len(tokenizer))
        ed = _editor(model, tokenizer, "alphaedit", [0, 1], null_space=0.5, ridge=1e-3)
        keys, _ = ed.keys_and_outputs(reqs[:4])  # the first batch's keys
        ed.edit(reqs[:4])
        if not remember:
            ed.memory = KeyMemory()
        second = ed.edit(reqs[4:])
        return sum(
            float((second.deltas[p.name] @ keys[p.name].T).norm() / second.deltas[p.name].norm())
            for p in ed.params
        )  # fmt: skip

    held, free = reach(True), reach(False)
    assert held < 0.3 * free, (held, free)


def test_locate_methods_are_baselines_with_bad_layers_refused(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    with pytest.raises(MendError, match="ROME edits one block"):
        LocateEditor(model, tokenizer, "rome", LocateConfig(layers=(0, 1)), text_moments={})
    with pytest.raises(MendError, match="not blocks"):
        LocateEditor(model, tokenizer, "memit", LocateConfig(layers=(9,)), text_moments={})
    with pytest.raises(MendError, match="unknown"):
        LocateEditor(model, tokenizer, "pmet", LocateConfig(layers=(1,)), text_moments={})
    batch = make_batch(tokenizer, [("The favourite thing of Alice is", None)])
    with torch.no_grad():
        base = scored_logits(model, batch)
    ed = _editor(model, tokenizer, "memit", [0, 1])
    result = ed.edit(_requests(2))
    assert not torch.equal(scored_logits(model, batch), base)
    result.revert()
    assert torch.equal(scored_logits(model, batch), base)
