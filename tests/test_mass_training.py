"""Training least-squares edits of many requests: MALMEN's two-stage gradient equals plain
autograd's, on every path, and the loop trains such an editor."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import fact_requests, tiny_model

from mend.config import EditorConfig, TrainConfig
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.models import find_editable
from mend.models.upper import UpperStack
from mend.training.mass import ls_step
from mend.training.sampling import build_rows


def _editor(tokenizer, seed=0):
    model = tiny_model("llama", len(tokenizer))
    model.requires_grad_(False)
    shapes = {p.name: p.in_out for p in find_editable(model)}
    torch.manual_seed(seed)
    net = EditorNet(shapes, EditorConfig(rank=8, init_alpha=0.05, aggregate="ls",
                                         init_ridge=1e-2))  # fmt: skip
    with torch.no_grad():  # a non-identity editor, so every weight's gradient is non-trivial
        for block in [b for m in net.nets.values() for b in m.blocks]:
            block.up.weight.normal_(0, 0.05)
    return MendEditor(model, tokenizer, net.train())


def _grads(editor, reqs, rows, cfg, stack, two_stage):
    editor.net.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in editor.net.state_dict().items()}
    stats = ls_step(editor, reqs, rows, cfg, stack, two_stage=two_stage)
    grads = {n: p.grad.clone() for n, p in editor.net.named_parameters() if p.grad is not None}
    editor.net.load_state_dict(state)  # the running statistics as before the step
    return stats, grads


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("chunk", [3, 256])
def test_two_stage_gradient_equals_plain_autograd(tokenizer, fast, chunk):
    editor = _editor(tokenizer)
    reqs = fact_requests(7)
    cfg = TrainConfig(editor=editor.net.cfg).override("speed.chunk_rows", chunk)
    rows = build_rows(reqs, reqs, cfg.sampling, random.Random(0), None, len(reqs))
    stack = None
    if fast:
        stack = UpperStack(
            editor.model, UpperStack.first_edited_block(editor.model, editor.net.names)
        )
    plain_stats, plain = _grads(editor, reqs, rows, cfg, stack, two_stage=False)
    two_stats, two = _grads(editor, reqs, rows, cfg, stack, two_stage=True)
    assert plain_stats["loss"] == pytest.approx(two_stats["loss"], rel=1e-5)
    assert set(plain) == set(two) and {"log_alpha", "log_ridge"} <= set(two)
    for name, g in plain.items():
        assert g.norm() > 0, name
        assert float((two[name] - g).norm() / g.norm()) < 1e-5, name  # fp32 rounding: ~4e-7


def test_training_least_squares_edits_beats_the_untrained_editor(tmp_path, tokenizer):
    from mend.checkpoint import load_editor
    from mend.evaluate import evaluate
    from mend.training.loop import train

    model = tiny_model("llama", len(tokenizer))
    data, val, test = (
        fact_requests(200, seed=3),
        fact_requests(20, seed=4),
        fact_requests(40, seed=5),
    )
    cfg = TrainConfig.from_dict({
        "editor": {"rank": 16, "aggregate": "ls", "init_ridge": 0.01, "init_alpha": 0.001},
        "sampling": {"edit_sizes": [1, 8], "loc_per_edit": 2},
        "schedule": {"lr": 1e-3, "alpha_lr": 5e-2, "max_steps": 300, "val_every": 100,
                     "val_edits": 20, "warmup_steps": 2, "patience": 100},
        "speed": {"lower_precision": "fp32"},
        "shared_rank": 0,
    })  # fmt: skip
    summary = train(model, tokenizer, data, val, cfg, tmp_path, progress=False)
    assert {"rewrite_acc@1", "rewrite_acc@8"} <= set(summary["best_val"])
    trained = MendEditor(model, tokenizer, load_editor(tmp_path, model), boost=())
    assert trained.aggregate == "ls"  # the editor edits as it was trained
    untrained = MendEditor(model, tokenizer, EditorNet(trained.net.shapes, cfg.editor), boost=())
    # (measured: single edits 0 -> 0.5 rewrite, 0 -> 0.25 rephrase; edits of 8, 0 -> 0.125)
    for k, rewrite, rephrase in ((1, 0.4, 0.15), (8, 0.1, 0.0)):
        after = evaluate(model, tokenizer, trained, test, batch_size=k, progress=False)
        before = evaluate(model, tokenizer, untrained, test, batch_size=k, progress=False)
        assert after["rewrite_acc"] >= before["rewrite_acc"] + rewrite, k
        assert after["rephrase_acc"] >= before["rephrase_acc"] + rephrase, k
