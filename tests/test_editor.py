"""EditorNet networks: running normalisation, identity initialisation, sharing by shape."""

from __future__ import annotations

import pytest
import torch

from mend.config import EditorConfig
from mend.editor import EditorNet, LowRankBlock, RunningNorm
from mend.errors import MendError


def test_running_norm_matches_batch_statistics_and_freezes_in_eval():
    torch.manual_seed(0)
    norm = RunningNorm(n_layers=2, dim=5).train()
    chunks = [torch.randn(n, 5) * 3 + 7 for n in (4, 9, 1, 6)]
    for x in chunks:
        norm(x, torch.zeros(len(x), dtype=torch.long))
    allx = torch.cat(chunks).double()
    mean, std = norm.stats()
    torch.testing.assert_close(mean[0], allx.mean(0))
    torch.testing.assert_close(std[0], allx.std(0))
    norm.eval()
    # Layer 1 saw nothing: passed through unchanged.
    x = torch.randn(3, 5)
    torch.testing.assert_close(norm(x, torch.ones(3, dtype=torch.long)), x)
    before = norm.count.clone()
    out = norm(x, torch.zeros(3, dtype=torch.long))
    assert torch.equal(norm.count, before)
    torch.testing.assert_close(out, ((x.double() - allx.mean(0)) / allx.std(0)).float())


def test_running_norm_clips_inputs_far_outside_what_it_saw():
    torch.manual_seed(0)
    norm = RunningNorm(n_layers=1, dim=4, clip=10.0).train()
    norm(torch.randn(500, 4), torch.zeros(500, dtype=torch.long))
    norm.eval()
    ids = torch.zeros(2, dtype=torch.long)
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1e4, -1e4, 3.0, 0.0]])
    out = norm(x, ids)
    unclipped = RunningNorm(n_layers=1, dim=4).eval()
    unclipped.load_state_dict(norm.state_dict())
    plain = unclipped(x, ids)
    torch.testing.assert_close(out[0], plain[0])  # ordinary inputs are untouched
    assert plain[1, :2].abs().min() > 1000
    torch.testing.assert_close(out[1, :2], torch.tensor([10.0, -10.0]))
    torch.testing.assert_close(out[1, 2:], plain[1, 2:])


def test_editor_config_refuses_a_bad_input_clip():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(MendError, match="input_clip"):
            EditorConfig(input_clip=bad)
    assert EditorConfig(input_clip=None).input_clip is None
    assert EditorConfig.from_dict({}).input_clip == 100.0  # editors saved before it: clipped


def test_low_rank_block_starts_as_identity_and_has_live_gradients():
    block = LowRankBlock(dim=12, rank=4, n_layers=3)
    z = torch.randn(7, 12)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    out = block(z, ids)
    torch.testing.assert_close(out, z)
    out.pow(2).sum().backward()
    assert block.up.weight.grad.abs().sum() > 0  # zero-initialised U still learns
    assert block.shift.grad.abs().sum() > 0


def test_one_network_per_shape_and_film_index_per_matrix():
    shapes = {"a": (4, 6), "b": (4, 6), "c": (6, 4), "d": (4, 6)}
    ed = EditorNet(shapes, EditorConfig(rank=3))
    assert set(ed.nets) == {"4x6", "6x4"}
    assert [ed.layer_index[n] for n in "abcd"] == [0, 1, 0, 2]
    assert ed.nets["4x6"].blocks[0].scale.shape == (3, 10)
    unshared = EditorNet(shapes, EditorConfig(rank=3, share=False))
    assert len(unshared.nets) == 4
    torch.testing.assert_close(ed.alpha("c"), torch.tensor(1e-4))


def test_editor_output_routes_tokens_back_to_their_matrix():
    torch.manual_seed(0)
    ed = EditorNet({"a": (4, 6), "b": (4, 6)}, EditorConfig(rank=3)).eval()
    with torch.no_grad():
        ed.nets["4x6"].blocks[0].up.weight.normal_()
        ed.nets["4x6"].blocks[0].scale[1].mul_(3)
    ua, da, ub, db = torch.randn(2, 4), torch.randn(2, 6), torch.randn(5, 4), torch.randn(5, 6)
    both = ed({"a": (ua, da), "b": (ub, db)})
    alone = ed({"b": (ub, db)})
    assert both["a"][0].shape == (2, 4) and both["b"][1].shape == (5, 6)
    torch.testing.assert_close(both["b"][0], alone["b"][0])
    # Same inputs through matrix a's and matrix b's FiLM parameters differ.
    via_a = ed({"a": (ub, db)})["a"][0]
    assert (via_a - alone["b"][0]).abs().max() > 1e-3


def test_configs_saved_before_preconditioning_load_as_plain_mend():
    assert EditorConfig().precondition == 0.1
    assert EditorConfig.from_dict({"rank": 8}).precondition is None
    assert EditorConfig.from_dict(EditorConfig().to_dict()) == EditorConfig()
    plain = EditorNet({"w": (3, 4)}, EditorConfig(precondition=None))
    assert plain.preconditioner("w") is None
    assert not any(k.startswith("precond") for k in plain.state_dict())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bf16_branch_is_close_to_fp32_and_follows_weight_changes():
    torch.manual_seed(0)
    ed = EditorNet({"a": (48, 64), "b": (64, 48)}, EditorConfig(rank=32, share=False)).eval()
    blocks = [b for net in ed.nets.values() for b in net.blocks]
    with torch.no_grad():
        for b in blocks:
            b.up.weight.normal_(0, 0.2)
    captured = {"a": (torch.randn(5, 48), torch.randn(5, 64)), "b": (torch.randn(3, 64), torch.randn(3, 48))}  # fmt: skip

    def both():
        with torch.no_grad():
            return ed(captured), ed(captured, torch.bfloat16)

    exact, low = both()
    for n in captured:
        for e, lo in zip(exact[n], low[n], strict=True):
            assert lo.dtype == torch.float32
            assert 0 < _rel_err(lo, e) < 1e-2  # really bf16 products, yet within ~0.5%
    # Weights changed by a fused Adam step (which bumps no version counter) in training mode:
    # back in eval, the bf16 copy follows them.
    ed.train()
    opt = torch.optim.Adam(ed.parameters(), lr=0.05, fused=True)
    sum(x.square().sum() for pair in ed(captured).values() for x in pair).backward()
    opt.step()
    ed.eval()
    new_exact, new_low = both()
    for n in captured:
        assert _rel_err(new_exact[n][0], exact[n][0]) > 0.05
        assert _rel_err(new_low[n][0], new_exact[n][0]) < 1e-2
    # ... and so it does after an in-place change in eval mode, and for new storage.
    with torch.no_grad():
        blocks[0].up.weight.mul_(2)
        blocks[1].down.weight.data = blocks[1].down.weight.data * 0.5
    new_exact, new_low = both()
    for n in captured:
        assert _rel_err(new_low[n][0], new_exact[n][0]) < 1e-2
    with pytest.raises(RuntimeError, match="no gradient"):
        ed(captured, torch.bfloat16)
