"""Baselines behind MEND's interface: FT, FT+KL, one gradient step, no edit."""

from __future__ import annotations

import torch
from conftest import SUBJECTS, fact_requests, tiny_model

from mend.baselines import FTEditor, GradEditor, NoEdit
from mend.evaluate import evaluate
from mend.losses import edit_loss
from mend.models import find_editable
from mend.models.forward import scored_logits


def _loc_prompts():
    return [f"{s} went to the" for s in SUBJECTS]


def test_ft_reaches_the_target_and_reverts(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    ft = FTEditor(model, tokenizer, lr=1e-2, max_steps=50)
    report = evaluate(model, tokenizer, ft, fact_requests(6), progress=False)
    assert report["pre"]["rewrite_acc"] == 0.0
    assert report["rewrite_acc"] == 1.0
    assert 0 < ft.last_steps < 50  # stopped early once every target token was the argmax


def test_ft_kl_changes_locality_logits_less_than_ft(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    probes = [("The favourite thing of Zara is", None), ("Liam went to the", None)]
    from mend.data.collate import make_batch

    batch = make_batch(tokenizer, probes)
    with torch.no_grad():
        base = scored_logits(model, batch)
    shifts = {}
    for kl in (0.0, 10.0):
        ed = FTEditor(model, tokenizer, lr=1e-2, max_steps=15, kl_weight=kl,
                      loc_prompts=_loc_prompts(), n_loc=16)  # fmt: skip
        result = ed.edit(fact_requests(3))
        with torch.no_grad():
            shifts[kl] = (scored_logits(model, batch) - base).abs().mean().item()
        result.revert()
    assert shifts[10.0] < 0.7 * shifts[0.0], shifts


def test_grad_is_one_manual_gradient_step(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    params = find_editable(model)
    reqs = fact_requests(2)
    g = GradEditor(model, tokenizer, lr=0.3)
    from mend.data.collate import make_batch

    batch = make_batch(tokenizer, [(r.prompt, r.target) for r in reqs])
    for p in params:
        p.weight.requires_grad_(True)
    edit_loss(scored_logits(model, batch), batch).backward()
    expected = {p.name: (p.weight - 0.3 * p.weight.grad).detach() for p in params}
    for p in params:
        p.weight.requires_grad_(False)
    result = g.edit(reqs)
    for p in params:
        torch.testing.assert_close(p.weight.detach(), expected[p.name], rtol=1e-5, atol=1e-7)
    result.revert()


def test_none_changes_nothing(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = evaluate(model, tokenizer, NoEdit(model), fact_requests(4), progress=False)
    assert report["locality_acc"] == 1.0
    assert report["rewrite_acc"] == report["pre"]["rewrite_acc"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_methods_can_share_the_unedited_scores(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    reqs = fact_requests(4)
    shared: dict = {}
    first = evaluate(model, tokenizer, GradEditor(model, tokenizer, lr=10.0), reqs, batch_size=2,
                     progress=False, unedited=shared)  # fmt: skip
    assert sorted(shared) == [(2, 0), (2, 1)]  # one unedited score per batch of edits
    ft = FTEditor(model, tokenizer, lr=1e-2, max_steps=20)
    alone = evaluate(model, tokenizer, ft, reqs, batch_size=2, progress=False)
    reused = evaluate(model, tokenizer, ft, reqs, batch_size=2, progress=False, unedited=shared)
    assert reused["pre"] == alone["pre"] == first["pre"]
    for k in ("rewrite_acc", "rephrase_acc", "locality_acc"):
        assert reused[k] == alone[k], k


def test_ft_rerunning_only_the_edited_blocks_matches_full_forward_passes(tokenizer):
    # Same optimisation either way: the lower blocks' output does not depend on the delta.
    model = tiny_model("llama", len(tokenizer))
    params = find_editable(model)
    before = [p.weight.detach().clone() for p in params]
    moved = {}
    for fast in (True, False):
        ed = FTEditor(model, tokenizer, lr=1e-2, max_steps=6, kl_weight=1.0,
                      loc_prompts=_loc_prompts(), n_loc=4, fast=fast)  # fmt: skip
        assert (ed._stack is not None) == fast
        result = ed.edit(fact_requests(2))
        moved[fast] = [p.weight.detach() - w for p, w in zip(params, before, strict=True)]
        steps = ed.last_steps
        result.revert()
    assert steps == 6
    for a, b in zip(moved[True], moved[False], strict=True):
        assert a.abs().max() > 1e-3  # the edit did move the weights
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
