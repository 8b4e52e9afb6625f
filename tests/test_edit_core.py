"""The algorithm's core identities, on a tiny random model of every supported family (of every
kind where the identity does not involve the decoder-only fast path)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import fact_requests, tiny_mend, tiny_model

from mend.config import EditorConfig
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.errors import MendError
from mend.evaluate import evaluate
from mend.grads import capture, key_moments
from mend.losses import edit_loss
from mend.models import find_editable
from mend.models.forward import scored_logits


def _editor_for(model, tokenizer, boost=(), **kw) -> MendEditor:
    """An identity-initialised editor; `boost` off by default, so edits are MEND's change as is."""
    params = find_editable(model)
    net = EditorNet({p.name: p.in_out for p in params}, EditorConfig(rank=16, **kw))
    return MendEditor(model, tokenizer, net, boost=boost)


def test_captured_factors_reproduce_autograd_weight_gradient(any_model, tokenizer):
    model = any_model
    editor = _editor_for(model, tokenizer)
    batch = editor.batch([(r.prompt, r.target) for r in fact_requests(3)])
    captured, _ = capture(model, editor.params, batch, lambda lg: edit_loss(lg, batch))

    for p in editor.params:
        p.weight.requires_grad_(True)
    model.zero_grad()
    edit_loss(scored_logits(model, batch), batch).backward()
    for p in editor.params:
        u, delta = captured[p.name]  # (R, S, in), (R, S, out)
        u2, d2 = u.reshape(-1, u.shape[-1]), delta.reshape(-1, delta.shape[-1])
        # Conv1D stores (in, out): the sum of outer products must come out transposed.
        rebuilt = u2.T @ d2 if p.transposed else d2.T @ u2
        assert rebuilt.shape == p.weight.shape
        torch.testing.assert_close(rebuilt, p.weight.grad, rtol=1e-5, atol=1e-7)
        assert p.weight.grad.abs().max() > 1e-6  # a real, non-trivial gradient


def test_identity_editor_at_init_is_a_plain_gradient_step(any_model, tokenizer):
    model = any_model
    editor = _editor_for(model, tokenizer, init_alpha=1e-2)
    req = fact_requests(2)
    batch = editor.batch([(r.prompt, r.target) for r in req])
    for p in editor.params:
        p.weight.requires_grad_(True)
    edit_loss(scored_logits(model, batch), batch).backward()
    expected = {p.name: p.weight.detach() - 1e-2 * p.weight.grad for p in editor.params}
    for p in editor.params:
        p.weight.requires_grad_(False)
        p.weight.grad = None

    result = editor.edit(req)
    for p in editor.params:
        torch.testing.assert_close(p.weight.detach(), expected[p.name], rtol=1e-5, atol=1e-7)
    result.revert()


@pytest.mark.parametrize("dense", [False, True], ids=["low-rank", "dense"])
def test_functional_and_in_place_edits_give_the_same_logits(
    family_model, tokenizer, monkeypatch, dense
):
    # A functional edit applies (x u^T) d, or x Delta W for large batched edits.
    monkeypatch.setattr("mend.edit._dense_is_cheaper", lambda *shape: dense)
    model = family_model
    editor = _editor_for(model, tokenizer, init_alpha=0.5)
    # Perturb the editor away from identity so the test exercises the network too.
    torch.manual_seed(1)
    with torch.no_grad():
        for prm in editor.net.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    editor.net.eval()
    reqs = fact_requests(3)
    probe = editor.batch([(r.rephrases[0], r.target) for r in reqs])
    with torch.no_grad():
        before = scored_logits(model, probe)
        factors = editor.factors(
            editor.batch([(r.prompt, r.target) for r in reqs]), batch_size=None
        )
        with editor.applied(factors):
            functional = scored_logits(model, probe)
    result = editor.edit(reqs)
    with torch.no_grad():
        in_place = scored_logits(model, probe)
    result.revert()
    assert (functional - before).abs().max() > 1e-3  # the edit changed something
    torch.testing.assert_close(functional, in_place, rtol=1e-4, atol=1e-5)


def test_revert_restores_bit_identical_weights(any_model, tokenizer):
    model = any_model
    editor = _editor_for(model, tokenizer, init_alpha=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = editor.edit(fact_requests(4))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(editor.params)
    result.revert()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_edits_reuse_reverted_tensors_and_stack_revert_in_order(tokenizer):
    from conftest import tiny_model

    model = tiny_model("gpt2", len(tokenizer))  # Conv1D: the transposed layout
    editor = _editor_for(model, tokenizer, init_alpha=0.1)
    before = {p.name: p.weight.detach().clone() for p in editor.params}
    a = editor.edit(fact_requests(2, seed=1))
    first = {p.name: (p.weight.data_ptr(), p.weight.detach().clone()) for p in editor.params}
    for p in editor.params:  # the applied change is W + Delta W, Delta W = result.deltas
        torch.testing.assert_close(p.weight, before[p.name] + a.deltas[p.name], rtol=0, atol=1e-6)
    a.revert()
    again = editor.edit(fact_requests(2, seed=1))  # the same edit, into the spare tensors
    for p in editor.params:
        ptr, weight = first[p.name]
        assert p.weight.data_ptr() == ptr  # no new allocation
        assert torch.equal(p.weight, weight)  # and the same result
    b = editor.edit(fact_requests(2, seed=2))  # a second edit on top of the first
    b.revert()
    for p in editor.params:
        assert torch.equal(p.weight, first[p.name][1])
    again.revert()
    for p in editor.params:
        assert torch.equal(p.weight, before[p.name])


def test_per_row_groups_equal_separate_single_edits(tokenizer):
    from conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    editor = _editor_for(model, tokenizer, init_alpha=0.3)
    editor.net.eval()
    reqs = fact_requests(3)
    probe_pairs = [(r.rephrases[0], r.target) for r in reqs]
    with torch.no_grad():
        factors = editor.factors(editor.batch([(r.prompt, r.target) for r in reqs]), batch_size=1)
        together = editor.batch(probe_pairs)
        with editor.applied(factors, together.group):
            side_by_side = scored_logits(model, together)
        singles = []
        for i, r in enumerate(reqs):
            f_i = editor.factors(editor.batch([(r.prompt, r.target)]), batch_size=None)
            with editor.applied(f_i):
                singles.append(scored_logits(model, editor.batch([probe_pairs[i]])))
    torch.testing.assert_close(side_by_side, torch.cat(singles), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("broken", ["nan-net", "overflowing-alpha"])
def test_non_finite_edit_is_refused_and_leaves_weights_alone(tokenizer, broken):
    from conftest import tiny_model

    from mend.errors import MendError

    model = tiny_model("gpt2", len(tokenizer))
    editor = _editor_for(model, tokenizer)
    with torch.no_grad():
        if broken == "nan-net":
            next(iter(editor.net.nets.values())).blocks[0].up.weight.fill_(float("nan"))
        else:  # alpha itself is finite (1.6e38); alpha * u^T delta is not
            editor.net.log_alpha.fill_(88.0)
            assert torch.isfinite(editor.net.log_alpha.exp()).all()
            factors = editor.factors(
                editor.batch([(fact_requests(1)[0].prompt, "x")]), batch_size=None
            )
            assert not all(torch.isfinite(d).all() for d in editor.weight_deltas(factors).values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MendError, match="not finite"):
        editor.edit(fact_requests(1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_key_preconditioner_is_the_ridge_inverse_and_interferes_less(tokenizer):
    """u~ is multiplied by P = (C/m + lambda I)^-1, and P does what ROME's C^-1 does.

    For an update along direction v of a matrix with input x, the change at the edited key k
    is proportional to k.v and at another input x to x.v. Over the inputs C was estimated on,
    P k gives a smaller mean squared interference E[(x.v)^2] / (k.v)^2 than k itself.
    """
    from conftest import tiny_model

    model = tiny_model("llama", len(tokenizer), seed=1).requires_grad_(False)
    plain = _editor_for(model, tokenizer, precondition=None)
    pre = _editor_for(model, tokenizer, precondition=0.1)
    pre.net.load_state_dict(plain.net.state_dict(), strict=False)
    texts = [(r.prompt, r.target) for r in fact_requests(60, seed=2)]
    batches = [pre.batch(texts[i : i + 20]) for i in (0, 20, 40)]
    moments = key_moments(model, pre.params, batches)
    pre.net.set_key_moments(moments)

    for p in pre.params:
        c = moments[p.name] / moments[p.name].diagonal().mean()
        want = torch.linalg.inv(c + 0.1 * torch.eye(len(c), dtype=c.dtype)).float()
        torch.testing.assert_close(pre.net.preconditioner(p.name), want, rtol=1e-5, atol=1e-6)
    name = pre.params[0].name
    u, d = torch.randn(5, pre.params[0].in_out[0]), torch.randn(5, pre.params[0].in_out[1])
    (u_plain, d_plain), (u_pre, d_pre) = (m.net({name: (u, d)})[name] for m in (plain, pre))
    torch.testing.assert_close(u_pre, u_plain @ pre.net.preconditioner(name))
    torch.testing.assert_close(d_pre, d_plain)

    for p in pre.params:
        xs: list[torch.Tensor] = []
        hook = p.module.register_forward_hook(lambda m, i, o, xs=xs: xs.append(i[0]))
        for b in batches:
            scored_logits(model, b)
        hook.remove()
        x = torch.cat([xi[b.attention_mask.bool()] for xi, b in zip(xs, batches, strict=True)])
        x = x.double()
        keys = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:20]]
        for k in keys:
            v_plain, v_pre = k, pre.net.preconditioner(p.name).double() @ k
            inter = [((x @ v) ** 2).mean() / (k @ v) ** 2 for v in (v_plain, v_pre)]
            assert inter[1] < inter[0], (p.name, inter)


def test_the_edit_check_on_the_upper_blocks_matches_a_full_forward(family_model, tokenizer):
    """`edit()` captures gradients and checks its targets rerunning only the edited blocks."""
    model = family_model
    editor = _editor_for(model, tokenizer, init_alpha=0.05)
    batch = editor.batch([(r.prompt, r.target) for r in fact_requests(3)])
    with torch.no_grad():
        captured, prepared = editor._capture(batch)
        plain, _ = capture(model, editor.params, batch, lambda lg: edit_loss(lg, batch))
        for name, (u, delta) in plain.items():
            torch.testing.assert_close(captured[name][0], u)
            torch.testing.assert_close(captured[name][1], delta, rtol=1e-5, atol=1e-8)
        factors = editor.factors(batch, batch_size=None, captured=captured)
        unedited = scored_logits(model, batch)
        with editor.applied(factors):
            full = scored_logits(model, batch)
            upper = editor._stack.logits(prepared)
    assert (full - unedited).abs().max() > 1e-3
    torch.testing.assert_close(upper, full, rtol=1e-4, atol=1e-5)
    # the check (upper blocks, bf16 head with exact near-ties) decides as a full fp32 forward;
    # row 0's target becomes the unedited prediction, so some answers are yes
    labels = batch.labels.clone()
    first = batch.pos_mask.clone()
    first[1:] = False
    labels[first] = unedited[batch.pos_row == 0].argmax(-1)
    batch = dataclasses.replace(batch, labels=labels)
    seen = []
    for s in (0.0, 1.0, 4.0, 16.0, 64.0):
        scaled = {n: (u * s, d) for n, (u, d) in factors.items()}
        with torch.no_grad():
            quick = editor.reaches_target(scaled, batch, prepared)
            assert torch.equal(quick, editor.reaches_target(scaled, batch))
        seen += quick.tolist()
    assert True in seen and False in seen


def _delta_of(editor: MendEditor, reqs) -> dict[str, torch.Tensor]:
    before = {p.name: p.weight.detach().clone() for p in editor.params}
    result = editor.edit(reqs)
    delta = {p.name: p.weight.detach() - before[p.name] for p in editor.params}
    result.revert()
    return delta


def _reaches_at(editor: MendEditor, batch, scales) -> list[bool]:
    """Whether the editor's plain change, scaled by each of `scales`, makes the target the argmax."""
    with torch.no_grad():  # (in training mode: sets the normalisers' running statistics)
        factors = editor.factors(batch, batch_size=None)
        return [
            bool(editor.reaches_target({n: (u * s, d) for n, (u, d) in factors.items()}, batch))
            for s in scales
        ]


def test_boost_scales_a_missed_request_by_the_first_scale_that_reaches_its_target(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    req = fact_requests(3)[1:2]
    plain = _editor_for(model, tokenizer, init_alpha=1e-3)
    batch = plain.batch([(req[0].prompt, req[0].target)])
    # MEND's own change misses; 4x reaches the target
    assert _reaches_at(plain, batch, (1, 2, 4)) == [False, False, True]
    boosted = MendEditor(model, tokenizer, plain.net, boost=(2, 4, 8))
    base, more = _delta_of(plain, req), _delta_of(boosted, req)
    scales = []
    for editor in (boosted, plain):
        result = editor.edit(req)
        result.revert()
        scales.append(result.scales)
    assert scales == [[4.0], None]  # (an unchecked edit has none)
    # mend eval's per-edit list shows the scale; its metrics average to the report's.
    reqs = fact_requests(4)
    report = evaluate(model, tokenizer, boosted, reqs, progress=False, per_edit=True)
    edits = report["edits"]
    assert [e["prompt"] for e in edits] == [r.prompt for r in reqs] and edits[1]["scale"] == 4.0
    for k in ("rewrite_acc", "rephrase_acc", "locality_acc", "efficacy_score"):
        assert abs(sum(e[k] for e in edits) / 4 - report[k]) < 1e-9  # (one probe of each)
    assert "edits" not in evaluate(model, tokenizer, boosted, reqs, progress=False)
    for name in base:
        assert base[name].abs().max() > 0
        # (deltas read back from fp32 weights: rounding at the weights' scale)
        atol = 1e-4 * base[name].abs().max().item()
        torch.testing.assert_close(more[name], 4 * base[name], rtol=1e-4, atol=atol)
    # One that no scale brings to its target gets MEND's own change back, exactly.
    short = MendEditor(model, tokenizer, plain.net, boost=(1.5, 2))
    result = short.edit(req)
    result.revert()
    assert result.scales == [1.0]
    assert all(torch.equal(d, base[n]) for n, d in _delta_of(short, req).items())
    # A request that its plain change already reaches is left exactly as MEND made it.
    plain = _editor_for(model, tokenizer, init_alpha=1e-2)
    boosted = MendEditor(model, tokenizer, plain.net, boost=(2, 4, 8))
    with torch.no_grad():
        assert bool(plain.reaches_target(plain.factors(batch, batch_size=None), batch))
    base, more = _delta_of(plain, req), _delta_of(boosted, req)
    assert all(torch.equal(more[n], base[n]) for n in base)
    with pytest.raises(MendError, match="boost"):
        MendEditor(model, tokenizer, plain.net, boost=(2, 0))


def test_check_start_scales_the_first_try_and_the_fallback(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    req = fact_requests(3)[1:2]
    plain = _editor_for(model, tokenizer, init_alpha=1e-3)
    batch = plain.batch([(req[0].prompt, req[0].target)])
    assert _reaches_at(plain, batch, (0.5, 1, 2, 4)) == [False, False, False, True]
    base = _delta_of(plain, req)

    def edited(start, boost):
        editor = MendEditor(model, tokenizer, plain.net, boost=boost, start=start)
        result = editor.edit(req)
        result.revert()
        return result.scales, _delta_of(editor, req)

    for start, boost, want in ((0.5, (1, 4), 4.0), (0.5, (1, 2), 0.5), (0.9, (2,), 0.9)):
        scales, delta = edited(start, boost)
        assert scales == [want]  # the first scale that reaches it; none: back to the start
        for name in base:
            atol = 1e-4 * base[name].abs().max().item()
            torch.testing.assert_close(delta[name], want * base[name], rtol=1e-4, atol=atol)
    # A change that reaches its target at the start is applied at the start, not at 1.
    strong = _editor_for(model, tokenizer, init_alpha=1e-2)
    assert _reaches_at(strong, batch, (0.8,)) == [True]
    result = MendEditor(model, tokenizer, strong.net, boost=(1, 2), start=0.8).edit(req)
    result.revert()
    assert result.scales == [0.8]
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(MendError, match="start scale"):
            MendEditor(model, tokenizer, plain.net, start=bad)
    with pytest.raises(MendError, match="needs a check"):
        MendEditor(model, tokenizer, plain.net, boost=(), start=0.9)


def test_batched_edits_are_unchecked_unless_asked(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    reqs = fact_requests(3)[:2]
    plain = _editor_for(model, tokenizer, init_alpha=1e-3)  # its changes miss their targets
    base = _delta_of(plain, reqs)
    default = _delta_of(MendEditor(model, tokenizer, plain.net, boost=(2, 4)), reqs)
    assert all(torch.equal(default[n], base[n]) for n in base)
    with torch.no_grad():  # (a training-mode pass sets the normalisers' running statistics)
        plain.factors(plain.batch([(r.prompt, r.target) for r in reqs]), batch_size=None)
    base = _delta_of(plain, reqs)
    checked = MendEditor(model, tokenizer, plain.net, boost=(2, 4), check_batches=True)
    result = checked.edit(reqs)
    result.revert()
    # The second request reaches its target at 4x; the first at no scale, so it keeps 1x.
    assert result.scales == [1.0, 4.0]
    scaled = _delta_of(checked, reqs)
    assert all(scaled[n].abs().max() > 1.5 * base[n].abs().max() for n in base)


@pytest.mark.parametrize("bias", [False, True])
def test_head_argmax_from_bf16_matches_the_exact_argmax_on_near_ties(bias):
    from mend.models.head import HeadArgmax

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 5000, bias=bias)
    hidden = 3 * torch.randn(6, 64)
    with torch.no_grad():
        for p in range(6):  # token 10 + p trails (even rows) or leads (odd rows) 100 by 1e-4
            t, j = 100, 10 + p
            step = (1e-4 if p % 2 else -1e-4) * hidden[p] / hidden[p].dot(hidden[p])
            head.weight[j] = head.weight[t] + step.float()
            if bias:
                head.bias[j] = head.bias[t]
            head.weight[t] += 50 * hidden[p] / hidden[p].dot(hidden[p])  # make 100 the top
            head.weight[j] += 50 * hidden[p] / hidden[p].dot(hidden[p])
    # the reference: float64 logits
    exact = hidden.double() @ head.weight.double().T + (head.bias.double() if bias else 0)
    top, second = exact.topk(2, -1).indices.T
    fast = HeadArgmax(head)
    assert fast.is_argmax(hidden, top).all()
    assert not fast.is_argmax(hidden, second).any()
    far = torch.tensor([0, 1, 2, 3, 4, 4999])  # tokens that surely lose: no exact pass needed
    assert not fast.is_argmax(hidden, far).any()
    # bf16 logits alone cannot tell these apart: the exact fallback is what decides
    z16 = (hidden.bfloat16() @ head.weight.bfloat16().T).float()
    assert (z16.argmax(-1) != top).any() or (z16.topk(2).values.diff().abs() < 1e-3).any()
    # weights changed in place are seen (the bf16 copy is rebuilt)
    with torch.no_grad():
        head.weight.mul_(-1)
    flipped = hidden.double() @ head.weight.double().T + (head.bias.double() if bias else 0)
    flipped = flipped.argmax(-1)
    assert fast.is_argmax(hidden, flipped).all() and not fast.is_argmax(hidden, top).any()
    # ... and so is new storage swapped in (as an edit of the head does), even one whose
    # version counter happens to read the same
    swapped = -head.weight.data
    while swapped._version < head.weight._version:
        swapped.add_(0)
    head.weight.data = swapped
    assert fast.is_argmax(hidden, top).all() and not fast.is_argmax(hidden, flipped).any()


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("vocab, rows", [(3000, 5), (2048, 1), (3000, 1), (500, 3)])
def test_head_projection_equals_the_linear_layer_with_its_gradients(bias, vocab, rows):
    from mend.models import head as head_mod

    # 3000 rows: two chunks of 1024 and a tail; 2048: chunks only; 500: the plain product
    torch.manual_seed(0)
    head = torch.nn.Linear(64, vocab, bias=bias)
    hidden = torch.randn(rows, 64, requires_grad=True)
    weights = torch.randn(rows, vocab)
    ours = head_mod.project(head, hidden)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), hidden)
    ref = head(hidden)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), hidden)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-5)
    assert ours.dtype == torch.float32 and ours.shape == (rows, vocab)
    # The head's own gradient: formed when asked for (backward), skipped when not (above).
    calls = []
    real = head_mod._WeightGrad.backward
    head_mod._WeightGrad.backward = staticmethod(lambda ctx, g: calls.append(1) or real(ctx, g))
    try:
        torch.autograd.grad((head_mod.project(head, hidden) * weights).sum(), hidden)
        assert calls == []
        (head_mod.project(head, hidden) * weights).sum().backward()
        assert calls == [1]
    finally:
        head_mod._WeightGrad.backward = real
    w_ours = head.weight.grad.clone()
    head.zero_grad()
    (head(hidden) * weights).sum().backward()
    torch.testing.assert_close(w_ours, head.weight.grad, rtol=1e-5, atol=1e-5)


def test_fit_shared_finds_the_mean_edit_and_batches_count_it_once(tokenizer, tmp_path):
    from mend.checkpoint import load_editor, model_identity, save_editor
    from mend.edit import fit_shared

    model = tiny_model("llama", len(tokenizer))
    editor = _editor_for(model, tokenizer, init_alpha=0.3)
    reqs = fact_requests(6)
    single, batched = _delta_of(editor, reqs[:1]), _delta_of(editor, reqs[3:6])
    # the mean single-edit change over the fitting edits, computed independently
    mean = {n: sum(_delta_of(editor, [r])[n] for r in reqs[:3]) / 3 for n in single}

    bases = fit_shared(editor, reqs[:3], rank=2)
    for name, (a, b) in bases.items():  # llama weights are (out, in): no transpose
        torch.testing.assert_close(a.T @ a, torch.eye(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(b.T @ b, torch.eye(2), atol=1e-5, rtol=0)
        top_left, _, top_right = torch.linalg.svd(mean[name])
        assert abs(float(a[:, 0] @ top_left[:, 0])) > 0.999
        assert abs(float(b[:, 0] @ top_right[0])) > 0.999

    # a single edit is unchanged; a batch of 3 keeps a third of its shared part
    after = _delta_of(editor, reqs[:1])
    assert all(torch.equal(after[n], single[n]) for n in single)
    now = _delta_of(editor, reqs[3:6])
    for name, (a, b) in bases.items():
        dw = batched[name]
        expected = dw - (2 / 3) * a @ (a.T @ dw @ b) @ b.T
        torch.testing.assert_close(now[name], expected, rtol=1e-4, atol=1e-6)
        shared_before = (a.T @ dw @ b).norm()
        assert (a.T @ now[name] @ b).norm() == pytest.approx(float(shared_before) / 3, rel=1e-3)

    # the bases travel with the checkpoint
    save_editor(tmp_path, editor.net, model_identity(model, editor.net.names))
    again = MendEditor(model, tokenizer, load_editor(tmp_path, model), boost=())
    assert again.net.cfg.shared_rank == 2
    reloaded = _delta_of(again, reqs[3:6])
    assert all(torch.equal(reloaded[n], now[n]) for n in now)


def test_anchored_edits_take_their_gradient_from_the_anchor_and_add_no_second_shared_part(
    tokenizer,
):
    from mend.edit import fit_shared

    model = tiny_model("llama", len(tokenizer))
    editor = _editor_for(model, tokenizer, init_alpha=0.3)
    reqs = fact_requests(5)
    bases = fit_shared(editor, reqs[2:5], rank=2)
    originals = {p.name: p.weight.detach().clone() for p in editor.params}
    alone = _delta_of(editor, reqs[1:2])  # edit B on the unedited model

    paper = MendEditor(model, tokenizer, editor.net, boost=(), anchored=False)
    for each, anchored in ((editor, True), (paper, False)):
        first = each.edit(reqs[0])  # edit A stays applied
        assert each.moved()
        b = _delta_of(each, reqs[1:2])
        first.revert()
        assert not each.moved()
        for name, (a, bb) in bases.items():
            without_shared = alone[name] - a @ (a.T @ alone[name] @ bb) @ bb.T
            close = torch.allclose(b[name], without_shared, rtol=1e-4, atol=1e-6)
            assert close == anchored, (name, anchored)
        if anchored:  # B's shared part left out entirely: A already carries one
            assert all(float((a.T @ b[n] @ bb).norm()) < 1e-4 for n, (a, bb) in bases.items())
    for p in editor.params:
        assert torch.equal(p.weight, originals[p.name])

    # Reverting out of order never hands the anchor's storage out as a spare to overwrite.
    first, second = editor.edit(reqs[0]), editor.edit(reqs[1])
    first.revert()
    second.revert()  # the anchor goes back to the pool here, which refuses it
    editor.edit(reqs[2]).revert()
    editor.edit(reqs[3])
    assert all(torch.equal(editor._anchor[n], originals[n]) for n in originals)


def _record_checks(editor: MendEditor) -> list:
    """Make `editor` record (factors, verdict) of every `reaches_target` call, in order."""
    checks, real = [], editor.reaches_target

    def recording(factors, batch, prepared=None):
        checks.append((factors, real(factors, batch, prepared)))
        return checks[-1][1]

    editor.reaches_target = recording
    return checks


def test_the_check_sees_exactly_the_change_that_lands(tokenizer):
    """The check scores the change as applied: with its shared part left out of an anchored
    edit on a moved model, and counted once in a batch (checking the change before that, as
    an earlier version did, passed anchored edits that then did not hold)."""
    from mend.edit import fit_shared

    model = tiny_model("llama", len(tokenizer))
    # boost=(1.0,): exactly one check, of the change that is then applied
    editor = _editor_for(model, tokenizer, boost=(1.0,), init_alpha=0.3)
    editor.check_batches = True
    reqs = fact_requests(6)
    bases = fit_shared(editor, reqs[3:6], rank=2)
    checks = _record_checks(editor)

    def landed_as_checked(edit_reqs):
        before = {p.name: p.weight.detach().clone() for p in editor.params}
        result = editor.edit(edit_reqs)
        expected = editor.weight_deltas(checks[-1][0])
        for p in editor.params:
            landed = p.weight.detach() - before[p.name]
            torch.testing.assert_close(landed, expected[p.name], rtol=1e-4, atol=1e-6)
        return result, expected

    first, _ = landed_as_checked([reqs[0]])
    for edit_reqs in ([reqs[1]], reqs[1:3]):  # anchored on the moved model: no shared part
        result, expected = landed_as_checked(edit_reqs)
        assert all(
            float((a.T @ expected[n] @ b).norm().detach()) < 1e-4 for n, (a, b) in bases.items()
        )
        result.revert()
    first.revert()
    result, expected = landed_as_checked(reqs[1:3])  # unmoved: a batch keeps 1/2 of it
    assert all(float((a.T @ expected[n] @ b).norm().detach()) > 1e-3 for n, (a, b) in bases.items())
    result.revert()


def test_anchored_edits_on_an_edited_model_are_unchecked_by_default(tokenizer):
    """A later anchored edit joins the ones applied, like a request in a batch: by default it
    gets MEND's change as it comes, while the first edit is scaled up by the check."""
    model = tiny_model("llama", len(tokenizer))
    reqs = fact_requests(2)
    checked = _editor_for(model, tokenizer, boost=(1.5, 2.0), init_alpha=3e-3)
    with torch.no_grad():  # (a training-mode pass sets the normalisers' running statistics)
        checked.factors(checked.batch([(reqs[0].prompt, reqs[0].target)]), batch_size=None)
    plain = MendEditor(model, tokenizer, checked.net, boost=())
    first = checked.edit(reqs[0])
    first.revert()
    assert first.scales[0] > 1  # the check scales the first edit up (it reaches its target)
    assert not _delta_equal(_delta_of(checked, reqs[:1]), _delta_of(plain, reqs[:1]))
    later = []
    for editor in (checked, plain):
        first = editor.edit(reqs[0])
        later.append(_delta_of(editor, reqs[1:2]))
        first.revert()
    assert _delta_equal(*later)


def _delta_equal(a, b) -> bool:
    return all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-8) for n in a)


def test_holds_reads_on_the_edited_weights_what_the_check_read_under_the_edit(tokenizer):
    """`holds` (a plain forward of the edited model) agrees with the check's verdict on the
    functional edit (upper blocks rerun from recorded inputs), whether the target is reached
    or not."""
    model = tiny_model("llama", len(tokenizer))
    seen = set()
    for alpha in (1e-3, 0.3, 3.0):
        editor = _editor_for(model, tokenizer, boost=(1.0,), init_alpha=alpha)  # one check
        checks = _record_checks(editor)
        for req in fact_requests(4):
            result = editor.edit(req)
            checked = bool(checks[-1][1][0])
            assert editor.holds([req]) == [checked]
            seen.add(checked)
            result.revert()
    assert seen == {True, False}


def test_edits_run_the_editor_in_bf16_only_where_asked_and_stay_close(tokenizer):
    from mend.models.upper import bf16_is_fast

    model = tiny_model("llama", len(tokenizer))
    net = _editor_for(model, tokenizer).net
    with torch.no_grad():  # a trained-like editor: its low-rank branches carry the change
        for matrix_net in net.nets.values():
            for block in matrix_net.blocks:
                block.up.weight.normal_(0, 0.1)
    net.eval()
    fast = MendEditor(model, tokenizer, net, boost=(), editor_bf16=True)
    exact = MendEditor(model, tokenizer, net, boost=(), editor_bf16=False)
    assert MendEditor(model, tokenizer, net).editor_bf16 == bf16_is_fast(exact.device)
    reqs = fact_requests(2)
    d_exact, d_fast = _delta_of(exact, reqs), _delta_of(fast, reqs)
    for name, d in d_exact.items():
        assert 0 < float((d_fast[name] - d).norm() / d.norm()) < 1e-2
    # fp32 throughout is the editor's own output, bit for bit; training never takes bf16.
    batch = exact.batch([(r.prompt, r.target) for r in reqs])
    with torch.no_grad():
        plain = exact.factors(batch, batch_size=None)
    with torch.enable_grad():
        graded = fast.factors(batch, batch_size=None)
    for name, (u, d) in plain.items():
        assert torch.equal(u, graded[name][0]) and torch.equal(d, graded[name][1])
        assert graded[name][0].requires_grad


def test_an_edit_of_a_bf16_model_adds_the_change_within_bf16_rounding(tokenizer):
    model = tiny_model("llama", len(tokenizer)).to(torch.bfloat16)
    editor = _editor_for(model, tokenizer, init_alpha=1e-2)
    with torch.no_grad():
        for net in editor.net.nets.values():
            for block in net.blocks:
                block.up.weight.normal_(0, 0.1)
    before = {p.name: p.weight.detach().clone() for p in editor.params}
    result = editor.edit(fact_requests(1))
    sizes = []
    for p in editor.params:
        w, delta = before[p.name].float(), result.deltas[p.name].float()  # fp32 Delta W
        assert p.weight.dtype == torch.bfloat16
        sizes.append(float(delta.norm() / w.norm()))
        err = (p.weight.detach().float() - (w + delta)).norm() / (w + delta).norm()
        assert err < 2**-7  # bf16 rounding of the factors and of the sum
    assert max(sizes) > 0.3 and min(sizes) > 1e-3  # real changes
    result.revert()
    assert all(torch.equal(p.weight, before[p.name]) for p in editor.params)


def test_least_squares_edit_gives_every_edited_key_its_value_change(tokenizer):
    """With independent keys and a small ridge, the solved change S meets each edited token's
    requested value change v_t = -alpha (u~_t . k_t) d~_t at its key (and the sum does not).
    (Rows that share a prefix share its keys, so one row keeps the keys independent.)"""
    from conftest import tiny_mend

    editor = tiny_mend(tokenizer, aggregate="ls", ridge=1e-8)
    editor.net.eval()
    reqs = fact_requests(1)  # one row: distinct keys, fewer than a matrix's inputs
    batch = editor.batch([(r.prompt, r.target) for r in reqs])
    with torch.no_grad():
        captured, _ = editor._capture(batch)
        factors = editor.factors(batch, batch_size=None, captured=captured)
        solved = editor._least_squares(factors, captured, batch)
    checked = 0
    for p in editor.params:
        u, delta = captured[p.name]
        mask = batch.attention_mask.bool() & (delta != 0).any(-1)
        keys = u[mask].float()  # (n, in)
        if len(keys) >= keys.shape[1]:  # (every position carries a gradient)
            continue
        checked += 1
        alpha = editor.net.alpha(p.name).detach()
        u_t, d_t = (f[0][mask.reshape(-1)] for f in factors[p.name])
        want = -alpha * (u_t * keys).sum(-1, keepdim=True) * d_t  # (n, out)
        s = -alpha * solved[p.name][1][0].T @ solved[p.name][0][0]  # (out, in)
        summed = -alpha * factors[p.name][1][0].T @ factors[p.name][0][0]
        got, crosstalk = keys @ s.T, keys @ summed.T
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
        assert (crosstalk - want).abs().max() > 10 * (got - want).abs().max()
    assert checked >= 3


def test_least_squares_edits_apply_revert_and_the_ls_control_lands(tokenizer):
    from conftest import tiny_model

    from mend.baselines import make_baseline

    model = tiny_model("llama", len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    control = make_baseline("ls", model, tokenizer, ls_lr=50.0)
    reqs = fact_requests(4)
    result = control.edit(reqs)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all("mlp" in n for n in moved)
    result.revert()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(MendError, match="aggregate"):
        tiny_mend_with(tokenizer, aggregate="mean")


def tiny_mend_with(tokenizer, **kw):
    from conftest import tiny_mend

    return tiny_mend(tokenizer, **kw)


def test_sequential_evaluation_keeps_batches_applied_then_restores_the_weights(tokenizer):
    from mend.baselines import GradEditor
    from mend.evaluate import evaluate, evaluate_sequential

    model = tiny_model("llama", len(tokenizer))
    method = GradEditor(model, tokenizer, lr=1.0)  # large steps: visible in every score
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reqs = fact_requests(6)
    report = evaluate_sequential(model, tokenizer, method, reqs, batch_size=2, every=4,
                                 progress=False)  # fmt: skip
    assert [c["n_edits"] for c in report["curve"]] == [4, 6] and len(report["batch_seconds"]) == 3
    assert report["curve"][-1]["efficacy_score"] == report["efficacy_score"]  # the end, once more
    assert report["pre"]["locality_acc"] == 1.0 and report["efficacy_score"] > 0.5
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # kept applied, the batches disturb each other: worse locality than batch by batch
    apart = evaluate(model, tokenizer, method, reqs, batch_size=2, progress=False)
    assert report["locality_acc"] <= apart["locality_acc"]
    with pytest.raises(MendError, match="every"):
        evaluate_sequential(model, tokenizer, method, reqs, batch_size=2, every=7)


def test_least_squares_edits_in_sequence_keep_the_earlier_keys(tokenizer):
    """A later solved edit leaves the outputs at the keys of earlier edits still applied (with
    memory), moves them without; a reverted edit's keys are forgotten."""
    from conftest import tiny_mend

    first, second = fact_requests(8)[0], fact_requests(8)[5]
    name = "model.layers.3.mlp.down_proj"

    def drift(remember: bool, revert_first: bool = False) -> float:
        editor = tiny_mend(tokenizer, aggregate="ls", remember=remember, boost=())
        p = next(q for q in editor.params if q.name == name)
        batch = editor.batch([(first.prompt, first.target)])
        with torch.no_grad():
            captured, _ = editor._capture(batch)
        u, delta = captured[name]
        keys = u[batch.attention_mask.bool() & (delta != 0).any(-1)].float()
        r1 = editor.edit([first])
        if revert_first:
            r1.revert()
        w1 = p.weight.detach().clone()
        editor.edit([second])
        change = p.weight.detach() - w1  # (out, in), llama's Linear
        assert (name in editor.memory) == remember
        return float((keys @ change.T).norm() / (keys.norm() * change.norm()))

    kept, moved = drift(True), drift(False)
    assert kept < 0.1 * moved, (kept, moved)
    assert drift(True, revert_first=True) > 0.5 * moved  # nothing left to keep


def _low_rank_text(tokenizer, seed: int = 0):
    """Synthetic text key moments C0 = Q diag(1..2) Q^T of rank in/4 per edited matrix, and
    each one's dominant span Q (in, in/4): its null space is exactly the other 3/4."""
    gen = torch.Generator().manual_seed(seed)
    moments, spans = {}, {}
    for p in find_editable(tiny_model("llama", len(tokenizer))):
        d_in = p.in_out[0]
        q = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen)).Q[:, : d_in // 4]
        moments[p.name] = q @ torch.diag(torch.linspace(1.0, 2.0, d_in // 4)) @ q.T
        spans[p.name] = q
    return moments, spans


def _edited_keys(editor, requests):
    """{weight name: (n, in)} keys of the edited tokens of one batched edit of requests."""
    batch = editor.batch([(r.prompt, r.target) for r in requests])
    with torch.no_grad():
        captured, _ = editor._capture(batch)
    out = {}
    for name, (u, delta) in captured.items():
        out[name] = u[batch.attention_mask.bool() & (delta != 0).any(-1)].float()
    return out


def test_null_space_edit_leaves_the_outputs_of_text_keys_unchanged(tokenizer):
    """Restricted to C0's null space, a batched edit changes W k by nothing (to float
    rounding) for keys in C0's dominant span, which the unrestricted edit moves; the solve is
    AlphaEdit's (P A + lambda I)^-1 P k_t."""
    from conftest import tiny_mend

    from mend.aggregate import null_space_basis, solved_keys

    moments, spans = _low_rank_text(tokenizer)
    reqs = fact_requests(4)
    gen = torch.Generator().manual_seed(1)

    def relative_moves(null_space):
        editor = tiny_mend(tokenizer, aggregate="ls", boost=(), ridge=1e-4,
                           text_moments=moments, null_space=null_space)  # fmt: skip
        before = {p.name: p.weight.detach().clone() for p in editor.params}
        editor.edit(reqs)
        out = {}
        for p in editor.params:
            change = p.weight.detach() - before[p.name]  # (out, in), llama's Linear
            k_o = spans[p.name] @ torch.randn(spans[p.name].shape[1], 20, generator=gen)
            assert change.norm() > 0
            out[p.name] = float((change @ k_o).norm() / (change.norm() * k_o.norm()))
        return out

    kept, moved = relative_moves(1e-3), relative_moves(None)
    assert max(kept.values()) < 1e-5, kept
    assert min(moved.values()) > 1e-2, moved

    name = "model.layers.3.mlp.down_proj"
    basis = null_space_basis(moments[name], 1e-3)  # (in, r)
    assert basis.shape[1] == spans[name].shape[0] - spans[name].shape[1]
    keys = torch.randn(10, basis.shape[0], generator=gen, dtype=torch.float64)
    held = torch.randn(basis.shape[0], 30, generator=gen, dtype=torch.float64)
    held = held @ held.T
    got = solved_keys(keys, 10, 1e-2, held, basis.double())
    proj = basis.double() @ basis.double().T
    gram = keys.T @ keys
    lam = 1e-2 * gram.trace() / 10
    dense = torch.linalg.solve(proj @ (gram + held) + lam * torch.eye(len(proj)).double(),
                               proj @ keys.T).T  # fmt: skip
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-9)


def test_null_space_edit_still_gives_the_edited_keys_their_value_changes(tokenizer):
    """Restricted to the null space, the edited tokens' keys still reach value changes close
    to the asked ones v_t = -alpha (u~_t . k_t) d~_t (one row: fewer keys than the null space
    has directions, so the projected keys can all be met)."""
    from conftest import tiny_mend

    moments, _ = _low_rank_text(tokenizer)
    editor = tiny_mend(tokenizer, aggregate="ls", boost=(), ridge=1e-6, text_moments=moments,
                       null_space=1e-3)  # fmt: skip
    editor.net.eval()
    req = fact_requests(1)
    batch = editor.batch([(r.prompt, r.target) for r in req])
    with torch.no_grad():
        captured, _ = editor._capture(batch)
        factors = editor.factors(batch, batch_size=None, captured=captured)
    before = {p.name: p.weight.detach().clone() for p in editor.params}
    editor.edit(req)
    for p in editor.params:
        u, delta = captured[p.name]
        mask = batch.attention_mask.bool() & (delta != 0).any(-1)
        k = u[mask].float()  # (n, in)
        assert len(k) < editor.null_bases[p.name].shape[1]
        u_t, d_t = (f[0][mask.reshape(-1)] for f in factors[p.name])
        want = -editor.net.alpha(p.name).detach() * (u_t * k).sum(-1, keepdim=True) * d_t
        got = k @ (p.weight.detach() - before[p.name]).T  # (n, out)
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cos > 0.99, (p.name, float(cos))


def test_null_space_edits_in_sequence_keep_the_earlier_keys(tokenizer):
    """With the null space and the memory of earlier edits, a second edit leaves the outputs
    at the first edit's keys nearly unchanged; without the memory it moves them."""
    from conftest import tiny_mend

    moments, _ = _low_rank_text(tokenizer)
    first, second = fact_requests(8)[0], fact_requests(8)[5]
    name = "model.layers.3.mlp.down_proj"

    def drift(remember: bool) -> float:
        editor = tiny_mend(tokenizer, aggregate="ls", boost=(), remember=remember,
                           text_moments=moments, null_space=1e-3)  # fmt: skip
        p = next(q for q in editor.params if q.name == name)
        keys = _edited_keys(editor, [first])[name]
        editor.edit([first])
        w1 = p.weight.detach().clone()
        editor.edit([second])
        change = p.weight.detach() - w1
        return float((keys @ change.T).norm() / (keys.norm() * change.norm()))

    kept, moved = drift(True), drift(False)
    assert kept < 0.1 * moved, (kept, moved)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_null_space_thresholds_outside_a_share_of_key_energy_are_refused(tokenizer, threshold):
    from conftest import tiny_mend

    moments, _ = _low_rank_text(tokenizer)
    with pytest.raises(MendError, match="null-space threshold"):
        tiny_mend(tokenizer, aggregate="ls", text_moments=moments, null_space=threshold)
    with pytest.raises(MendError, match="aggregate='ls'"):
        tiny_mend(tokenizer, aggregate="sum", text_moments=moments, null_space=1e-3)
    flat = {n: torch.eye(len(m)) for n, m in moments.items()}  # every direction 1/in of it
    with pytest.raises(MendError, match="null space is empty"):
        tiny_mend(tokenizer, aggregate="ls", text_moments=flat, null_space=0.01)


def test_key_memory_keeps_a_dropped_edit_keys_but_not_its_weights(tokenizer):
    """The memory holds results weakly: an edit whose result nobody keeps stays applied (its
    keys are held) and the weights it replaced are freed; a reverted one is forgotten."""
    import gc
    import weakref

    from conftest import tiny_mend

    editor = tiny_mend(tokenizer, aggregate="ls", boost=())
    first, second = fact_requests(2)
    ref = weakref.ref(editor.edit([first]))
    gc.collect()
    assert ref() is None and len(editor.memory) == 1
    editor.edit([second]).revert()
    assert len(editor.memory) == 1


def test_adapted_statistics_take_in_each_edit_tokens_and_only_then(tokenizer):
    from conftest import tiny_mend

    counts = {}
    for adapt in (False, True):
        editor = tiny_mend(tokenizer, boost=(), adapt_stats=adapt)
        norms = [m.norm_u for m in editor.net.nets.values()]
        before = [n.count.clone() for n in norms]
        batch = editor.batch([(r.prompt, r.target) for r in fact_requests(3)])
        with torch.no_grad():
            captured, _ = editor._capture(batch)
        tokens = {name: int(((d != 0).any(-1) & batch.attention_mask.bool()).sum())
                  for name, (_, d) in captured.items()}  # fmt: skip
        editor.edit(fact_requests(3))
        counts[adapt] = [int((n.count - b).sum()) for n, b in zip(norms, before, strict=True)]
    assert counts[False] == [0] * len(counts[False])
    assert sum(counts[True]) == sum(tokens.values())  # every edited token of every matrix


@pytest.mark.parametrize("aggregate", ["sum", "ls"])
def test_a_large_batched_edit_captured_in_parts_equals_one_capture(
    tokenizer, monkeypatch, aggregate
):
    """Gradients of a many-request edit are captured a few rows at a time (bounded memory);
    each row's gradient depends on its own loss only, so the change is the same."""
    import mend.edit

    reqs = fact_requests(7)
    changes = {}
    for rows in (100, 3):
        monkeypatch.setattr(mend.edit, "CAPTURE_ROWS", rows)
        editor = tiny_mend(tokenizer, aggregate=aggregate)
        result = editor.edit(reqs)
        changes[rows] = {n: d.clone() for n, d in result.deltas.items()}
        result.revert()
    for name, whole in changes[100].items():
        torch.testing.assert_close(changes[3][name], whole, rtol=1e-4, atol=1e-6)
