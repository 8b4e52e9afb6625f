"""The fast training path (lower blocks cached, upper blocks rerun) equals the reference path."""

from __future__ import annotations

import random

import torch
from conftest import fact_requests

from mend.config import EditorConfig, Sampling, Speed, TrainConfig
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.models import find_editable
from mend.models.forward import scored_logits
from mend.models.upper import RowCache, UpperStack
from mend.training.sampling import build_rows
from mend.training.step import edit_step


def _perturbed_editor(model, tokenizer, cfg: EditorConfig, **kw) -> MendEditor:
    """An editor moved off its identity start (seeded), so every parameter gets a gradient."""
    torch.manual_seed(0)
    net = EditorNet({p.name: p.in_out for p in find_editable(model)}, cfg)
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    return MendEditor(model, tokenizer, net, **kw)


def test_upper_stack_reproduces_the_full_forward(family_model, tokenizer):
    from mend.data.collate import make_batch

    names = [p.name for p in find_editable(family_model)]
    stack = UpperStack(family_model, UpperStack.first_edited_block(family_model, names))
    batch = make_batch(
        tokenizer, [(r.prompt, r.target) for r in fact_requests(3)] + [("Bob is", None)]
    )
    prepared = stack.prepare(batch)
    full = prepared.base_logits
    torch.testing.assert_close(stack.logits(prepared), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, scored_logits(family_model, batch), rtol=0, atol=0)


def test_last_mlp_runs_at_scored_positions_only_and_changes_nothing(family_model, tokenizer):
    from mend.data.collate import make_batch
    from mend.models.head import project, project_with_base

    names = [p.name for p in find_editable(family_model)]
    stack = UpperStack(family_model, UpperStack.first_edited_block(family_model, names))
    pairs = [(r.prompt, r.target) for r in fact_requests(3)] + [("Bob is", " a")]
    prepared = stack.prepare(make_batch(tokenizer, pairs))
    last = find_editable(family_model)[-1].module  # a weight of the last block's MLP
    seen = []
    hook = last.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        full = stack.scored_hidden(prepared, scored_only=False)
        fast = stack.scored_hidden(prepared)
    finally:
        hook.remove()
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    width = int(prepared.pos_mask.sum(1).max())
    assert (
        seen == [prepared.pos_mask.numel(), len(pairs) * width]
        and width < prepared.pos_mask.shape[1]
    )
    assert "forward" not in stack._last_mlp.__dict__  # restored

    # Edited and unedited states projected together: same logits, gradient into `hidden` only.
    hidden = full.detach().requires_grad_()
    base = prepared.base_hidden
    head = family_model.get_output_embeddings()
    z = project_with_base(head, hidden, base)
    torch.testing.assert_close(z, project(head, torch.cat([hidden, base])), rtol=0, atol=0)
    weights = torch.randn_like(z)
    (got,) = torch.autograd.grad((z * weights).sum(), hidden)
    (want,) = torch.autograd.grad((project(head, hidden) * weights[: len(hidden)]).sum(), hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_lower_blocks_stay_close_and_an_empty_edit_changes_nothing(family_model, tokenizer):
    from mend.data.collate import make_batch

    names = [p.name for p in find_editable(family_model)]
    start = UpperStack.first_edited_block(family_model, names)
    exact = UpperStack(family_model, start)
    fast = UpperStack(family_model, start, RowCache(1 << 30), lower_dtype=torch.bfloat16)
    batch = make_batch(tokenizer, [(r.prompt, r.target) for r in fact_requests(4)])
    want, got = exact.prepare(batch), fast.prepare(batch)
    assert got.hidden.dtype == want.hidden.dtype == torch.float32
    # bf16 products below the edited blocks: the logits move, but by little (relative to
    # their spread: tiny random models have near-uniform logits).
    err = (got.base_logits - want.base_logits).abs().max() / want.base_logits.std()
    assert 0 < err < 0.05, err
    # Base and rerun logits come from the same cached input, so they agree exactly as before.
    torch.testing.assert_close(fast.logits(got), got.base_logits, rtol=1e-5, atol=1e-5)
    again = fast.prepare(batch)  # from the cache
    torch.testing.assert_close(again.base_logits, got.base_logits, rtol=0, atol=0)
    # The autocast wrappers were removed: the model runs in fp32 again.
    assert all("forward" not in b.__dict__ for b in fast.lower + fast.blocks)
    torch.testing.assert_close(scored_logits(family_model, batch), want.base_logits)


def test_row_cache_skips_the_lower_blocks_and_changes_nothing(family_model, tokenizer):
    from mend.data.collate import make_batch

    names = [p.name for p in find_editable(family_model)]
    start = UpperStack.first_edited_block(family_model, names)
    plain = UpperStack(family_model, start)
    cache = RowCache(max_bytes=1 << 30)
    cached = UpperStack(family_model, start, cache)
    pairs = [(r.prompt, r.target) for r in fact_requests(6)] + [("Bob is", None)]
    # A pass-through skips the block's insides: count the rows reaching a matrix of the
    # lowest and of the highest block.
    calls = []
    counters = [
        next(m for m in block.modules() if getattr(m, "weight", None) is not None
             and m.weight.dim() == 2).register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
        for block in (cached.lower[0], cached.blocks[-1])
    ]  # fmt: skip
    # None cached, then a mix (4 known rows, 3 new, in a new order), then all known.
    for rows, lower_rows in (([0, 1, 2, 3], 4), ([5, 2, 4, 0, 6, 1, 3], 3), ([6, 3, 0], 0)):
        batch = make_batch(tokenizer, [pairs[i] for i in rows])
        want = plain.prepare(batch)
        calls.clear()
        got = cached.prepare(batch)
        assert sum(calls) == 2 * lower_rows  # only unknown rows go through the blocks
        torch.testing.assert_close(got.base_logits, want.base_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached.logits(got), want.base_logits, rtol=1e-5, atol=1e-5)
        # A second time every row is known: no block runs, and the results are unchanged.
        calls.clear()
        again = cached.prepare(batch, base_logits=len(rows) % 2 == 0)
        assert sum(calls) == 0
        if again.base_logits is not None:
            torch.testing.assert_close(again.base_logits, want.base_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached.logits(again), want.base_logits, rtol=1e-5, atol=1e-5)
    assert len(cache) == 7 and cache.hits == (0 + 4) + (4 + 7) + (3 + 3)
    # The pass-throughs were removed again: a plain forward still runs every block.
    calls.clear()
    scored_logits(family_model, make_batch(tokenizer, pairs[:2]))
    for c in counters:
        c.remove()
    assert sum(calls) == 2 * 2


def test_fast_and_reference_steps_give_the_same_losses_and_editor_gradients(
    family_model, tokenizer
):
    model = family_model.requires_grad_(False)
    params = find_editable(model)
    cfg = TrainConfig(
        editor=EditorConfig(rank=8, init_alpha=0.05), sampling=Sampling(loc_per_edit=2)
    )
    editor = _perturbed_editor(model, tokenizer, cfg.editor)
    net = editor.net
    pool = fact_requests(30)
    reqs = pool[:3]
    stack = UpperStack(model, UpperStack.first_edited_block(model, [p.name for p in params]))

    results = []
    for path in (None, stack):
        rows = build_rows(reqs, pool, cfg.sampling, random.Random(7))
        net.eval()  # frozen normalisation, so both paths see the same statistics
        net.zero_grad()
        loss, stats = edit_step(editor, reqs, rows, cfg, path)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append((stats, grads))
    (ref_stats, ref_grads), (fast_stats, fast_grads) = results
    assert ref_stats.keys() == fast_stats.keys() and "l_loc" in ref_stats
    for k in ref_stats:
        assert abs(ref_stats[k] - fast_stats[k]) <= 1e-5 * max(1.0, abs(ref_stats[k])), k
    assert ref_grads.keys() == fast_grads.keys() and len(ref_grads) > 4
    for n in ref_grads:
        # Tolerance: same math, different padding widths and summation order (fp32).
        torch.testing.assert_close(fast_grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert max(g.abs().max() for g in ref_grads.values()) > 1e-4


def test_lower_precision_setting():
    import pytest

    from mend.errors import MendError
    from mend.models.upper import bf16_is_fast

    with pytest.raises(MendError, match="lower_precision"):
        Speed(lower_precision="fp16")
    assert TrainConfig().speed.lower_precision == "auto"  # bf16 only where it is fast
    assert bf16_is_fast(torch.device("meta")) is False
    assert isinstance(bf16_is_fast(torch.device("cpu")), bool)


def test_batched_training_rows_see_exactly_the_batched_edit(tokenizer):
    """Training with batch_size=2 scores each pair's rows under the pair's summed edit: the
    same logits as `MendEditor.edit` of the pair in place, on both paths."""
    from conftest import tiny_model

    from mend.training.step import forward_fast, forward_reference

    model = tiny_model("llama", len(tokenizer)).requires_grad_(False)
    params = find_editable(model)
    cfg = TrainConfig(editor=EditorConfig(rank=8, init_alpha=0.05),
                      sampling=Sampling(loc_per_edit=2, batch_size=2))  # fmt: skip
    editor = _perturbed_editor(model, tokenizer, cfg.editor, boost=())
    editor.net.eval()
    pool = fact_requests(30)
    reqs = pool[:4]
    rows = build_rows(reqs, pool, cfg.sampling, random.Random(3), batch_size=2)
    assert rows.gen_group == [0, 0, 0, 0, 1, 1, 1, 1]  # prompt + rephrase of edits 0-1, 2-3
    stack = UpperStack(model, UpperStack.first_edited_block(model, [p.name for p in params]))
    with torch.no_grad():
        fast = forward_fast(editor, stack, reqs, rows, batch_size=2)[1]
        ref = forward_reference(editor, reqs, rows, batch_size=2)[1]
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    gen = editor.batch(rows.gen, rows.gen_group)
    first_pair = gen.group[gen.pos_row] == 0
    result = editor.edit(reqs[:2])
    with torch.no_grad():
        in_place = scored_logits(model, gen)
    result.revert()
    n_gen = int(gen.pos_mask.sum())
    torch.testing.assert_close(fast[:n_gen][first_pair], in_place[first_pair], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        unedited = scored_logits(model, gen)
    assert (in_place[first_pair] - unedited[first_pair]).abs().max() > 1e-2  # the edit took


def test_warmed_cache_serves_every_row_training_draws(tokenizer):
    from conftest import tiny_model

    from mend.training.prepare import warm_rows
    from mend.training.sampling import similar_index

    model = tiny_model("llama", len(tokenizer))
    data, val = fact_requests(30, seed=1), fact_requests(8, seed=2)
    cfg = TrainConfig(editor=EditorConfig(rank=8), sampling=Sampling(loc_per_edit=4))
    editor = _perturbed_editor(model, tokenizer, cfg.editor)
    editor.net.eval()  # frozen normalisation: both paths see the same statistics
    start = UpperStack.first_edited_block(model, [p.name for p in editor.params])
    cache = RowCache(1 << 30)
    stack = UpperStack(model, start, cache)
    warm_rows(editor, stack, data + val, batch_rows=8, progress=False)
    warmed = len(cache)
    assert warmed == cache.misses > len(data) * 3  # edit, paraphrase, own probe, as a probe
    similar = similar_index(data)
    for step in range(12):  # training steps (random paraphrase, own and drawn probes) ...
        rng = random.Random(step)
        reqs = rng.sample(data, cfg.sampling.edits_per_step)
        rows = build_rows(reqs, data, cfg.sampling, rng, similar)
        got, _ = edit_step(editor, reqs, rows, cfg, stack)
        want, _ = edit_step(editor, reqs, rows, cfg, None)  # the reference path, no cache
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for i in range(0, len(val), 4):  # ... and validation steps
        edit_step(
            editor, val[i : i + 4], build_rows(val[i : i + 4], val, cfg.sampling, None), cfg, stack
        )
    # never a new row
    assert cache.misses == warmed and cache.hits > 12 * 3 * cfg.sampling.edits_per_step
    # A full cache stops the warm-up after the batch that filled it.
    small = RowCache(cache.bytes // 4)
    warm_rows(editor, UpperStack(model, start, small), data + val, batch_rows=8, progress=False)
    assert small.full and small.misses <= len(small) + 8 < warmed
    # A warm-up that would outlast its budget stops after its first batch.
    slow = RowCache(1 << 30)
    assert not warm_rows(
        editor, UpperStack(model, start, slow), data, 8, budget_s=1e-9, progress=False
    )
    assert len(slow) == 8
    # Rows are batched shortest first by token count, so a batch pads little: every batch's
    # longest row is no longer than the next batch's shortest.
    seen, plain = [], UpperStack(model, start, RowCache(1 << 30))
    prepare = plain.prepare
    plain.prepare = lambda b, **kw: (
        seen.append(b.attention_mask.sum(1).tolist()) or prepare(b, **kw)
    )
    warm_rows(editor, plain, data + val, batch_rows=8, progress=False)
    assert len(seen) > 3 and all(max(a) <= min(b) for a, b in zip(seen, seen[1:], strict=False))
    assert len({n for batch in seen for n in batch}) > 1  # (rows of several lengths)
