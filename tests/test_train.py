"""Training: resume is exact, a short run beats the untrained editor, the loop's guards work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fact_requests, tiny_model

from mend.checkpoint import load_editor, load_train_state
from mend.config import EditorConfig, Sampling, TrainConfig
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.evaluate import evaluate
from mend.models import find_editable
from mend.training.logs import LOG_FILE
from mend.training.loop import train
from mend.training.optim import WeightAverage


def _cfg(**kw) -> TrainConfig:
    base = dict(editor=EditorConfig(rank=16), lr=1e-3, alpha_lr=5e-2, batch_size=4,
                max_steps=8, val_every=4, val_edits=8, loc_per_edit=2, warmup_steps=2,
                # fp32 below the edited blocks: a bf16 pass rounds a row a little differently
                # in another batch, and a resumed run meets some rows in other batches
                lower_precision="fp32")  # fmt: skip
    return TrainConfig.from_dict(base | kw)  # flat names, as earlier training states wrote them


def _losses(folder) -> list[float]:
    lines = [json.loads(x) for x in (folder / LOG_FILE).read_text().splitlines()]
    return [x["loss"] for x in lines if "val" not in x]


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, tokenizer, ema):
    data, val = fact_requests(60, seed=1), fact_requests(8, seed=2)
    cfg = _cfg(max_steps=8, val_every=4, ema=ema)
    torch.set_num_threads(1)
    full = train(
        tiny_model("llama", len(tokenizer)),
        tokenizer,
        data,
        val,
        cfg,
        tmp_path / "a",
        progress=False,
    )
    assert full["steps"] == 8
    # Interrupted after step 4 (the checkpoint written at the validation), then resumed.
    train(tiny_model("llama", len(tokenizer)), tokenizer, data, val,
          _cfg(max_steps=4, val_every=4, ema=ema), tmp_path / "b", progress=False)  # fmt: skip
    train(tiny_model("llama", len(tokenizer)), tokenizer, data, val, cfg, tmp_path / "b",
          resume=True, progress=False)  # fmt: skip
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 8
    assert len(set(a)) > 1  # the loss actually moves
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-6, atol=1e-7)
    # The saved (averaged, with ema) weights agree too.
    model = tiny_model("llama", len(tokenizer))
    for x, y in zip(load_editor(tmp_path / "a" / "last", model).parameters(),
                    load_editor(tmp_path / "b" / "last", model).parameters(), strict=True):  # fmt: skip
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


def test_weight_average_follows_its_recurrence_and_swaps_back():
    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    average = WeightAverage(module, decay=0.5)
    expected = torch.ones(1, 2)
    for n, value in enumerate([3.0, -1.0, 5.0], start=1):
        with torch.no_grad():
            module.weight.fill_(value)
        average.update()
        d = min(0.5, (1 + n) / (10 + n))  # 2/11, 3/12, then 0.5
        expected = d * expected + (1 - d) * value
    raw = module.weight.detach().clone()
    with average.swapped():
        torch.testing.assert_close(module.weight.data, expected)
        assert not torch.equal(module.weight.data, raw)
    assert torch.equal(module.weight.data, raw)  # the raw weights come back exactly
    restored = WeightAverage(module, 0.5, average.state_dict())
    assert restored.n == 3 and torch.equal(restored.avg[0], average.avg[0])


def test_training_with_an_average_saves_it_and_keeps_the_raw_weights_to_resume(tmp_path, tokenizer):
    data, val = fact_requests(60, seed=1), fact_requests(8, seed=2)
    model = tiny_model("llama", len(tokenizer))
    train(model, tokenizer, data, val, _cfg(max_steps=6, val_every=3, ema=0.9), tmp_path,
          progress=False)  # fmt: skip
    state = load_train_state(tmp_path / "last")
    saved = list(load_editor(tmp_path / "last", model).parameters())
    avg, raw = state["ema"]["avg"], state["raw"]
    assert len(saved) == len(avg) == len(raw) and state["ema"]["n"] == 6
    assert all(torch.equal(s, a) for s, a in zip(saved, avg, strict=True))
    assert any(not torch.equal(a, r) for a, r in zip(avg, raw, strict=True))


def test_training_beats_the_untrained_editor_on_held_out_edits(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    data, val, test = (
        fact_requests(200, seed=3),
        fact_requests(8, seed=4),
        fact_requests(30, seed=5),
    )
    cfg = _cfg(max_steps=150, val_every=50, patience=100)
    train(model, tokenizer, data, val, cfg, tmp_path, progress=False)
    trained = MendEditor(model, tokenizer, load_editor(tmp_path, model))
    names = find_editable(model)
    untrained = MendEditor(
        model, tokenizer, EditorNet({p.name: p.in_out for p in names}, cfg.editor)
    )
    after = evaluate(model, tokenizer, trained, test, progress=False)
    before = evaluate(model, tokenizer, untrained, test, progress=False)
    assert before["rewrite_acc"] <= 0.1
    assert after["rewrite_acc"] >= before["rewrite_acc"] + 0.5
    assert after["rephrase_acc"] >= before["rephrase_acc"] + 0.3


def test_best_checkpoint_and_early_stopping(tmp_path, tokenizer):
    data, val = fact_requests(40, seed=1), fact_requests(8, seed=2)
    # A huge learning rate makes validation loss worse after the first check.
    cfg = _cfg(max_steps=40, val_every=2, patience=2, lr=1.0, alpha_lr=1.0)
    summary = train(
        tiny_model("llama", len(tokenizer)), tokenizer, data, val, cfg, tmp_path, progress=False
    )
    assert summary["stop"] == "early_stop"
    assert summary["steps"] < 40
    log = [json.loads(x) for x in (tmp_path / LOG_FILE).read_text().splitlines()]
    vals = [(x["step"], x["val"]["loss"]) for x in log if "val" in x]
    best_step = min(vals, key=lambda v: v[1])[0]
    saved = json.loads((tmp_path / "editor_config.json").read_text())
    assert saved["best_step"] == best_step
    assert best_step < summary["steps"]  # the best is not simply the last


def test_best_checkpoint_by_accuracy(tmp_path, tokenizer):
    data, val = fact_requests(60, seed=1), fact_requests(8, seed=2)
    cfg = _cfg(max_steps=30, val_every=3, patience=100, lr=3e-3)
    summary = train(
        tiny_model("llama", len(tokenizer)), tokenizer, data, val, cfg, tmp_path, progress=False
    )
    log = [json.loads(x) for x in (tmp_path / LOG_FILE).read_text().splitlines()]
    vals = [(x["step"], x["val"]) for x in log if "val" in x]
    mean_acc = [(v["rewrite_acc"] + v["rephrase_acc"] + v["locality_acc"]) / 3 for _, v in vals]
    # The first validation reaching the highest mean accuracy (or, among equals, the lowest loss).
    best = max(range(len(vals)), key=lambda i: (mean_acc[i], -vals[i][1]["loss"], -i))
    saved = json.loads((tmp_path / "editor_config.json").read_text())
    assert saved["best_step"] == vals[best][0]
    assert summary["best_val"] == vals[best][1]
    assert len(set(mean_acc)) > 1  # the choice was not trivial


def test_non_finite_gradients_skip_the_step(tmp_path, tokenizer, monkeypatch):
    import importlib

    train_mod = importlib.import_module("mend.training.loop")

    real = train_mod.edit_step
    calls = {"n": 0}

    def poisoned(editor, reqs, rows, cfg, stack=None, batch_size=1):
        loss, stats = real(editor, reqs, rows, cfg, stack, batch_size)
        calls["n"] += 1
        if calls["n"] == 2 and editor.net.training:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(train_mod, "edit_step", poisoned)
    data, val = fact_requests(40, seed=1), fact_requests(4, seed=2)
    summary = train(tiny_model("llama", len(tokenizer)), tokenizer, data, val,
                    _cfg(max_steps=4, val_every=4), tmp_path, progress=False)  # fmt: skip
    assert summary["skipped_steps"] == 1
    net = load_editor(tmp_path / "last")
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_time_budget_counts_the_passes_before_the_first_step(tmp_path, tokenizer, monkeypatch):
    import importlib
    import time

    train_mod = importlib.import_module("mend.training.loop")
    real = train_mod.nearest_records

    def slow(*args, **kwargs):  # stands in for the minute CounterFact's prompt keys take
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "nearest_records", slow)
    data, val = fact_requests(40, seed=1), fact_requests(4, seed=2)
    cfg = _cfg(max_steps=50, val_every=50, hard_locality="nearest", minutes=0.4 / 60)
    summary = train(tiny_model("llama", len(tokenizer)), tokenizer, data, val, cfg, tmp_path,
                    progress=False)  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert lines[0]["seconds"] >= 0.5  # the clock ran before the first step
    assert summary["stop"] == "time_budget" and summary["steps"] == 1


@pytest.mark.parametrize(
    "bad",
    [
        dict(lr=0),
        dict(batch_size=0),
        dict(c_loc=-1),
        dict(joint_edits=3),
        dict(joint_edits=0),
        dict(joint_fraction=1.5),
        dict(c_loc_late=-1),
        dict(late_fraction=1.5),
        dict(hard_locality="subject"),
        dict(nearest_k=1),
        dict(hard_locality_late="subject", c_loc_late=2),
        dict(hard_locality_late="answer"),  # no late part of the run
        dict(ema=1.0),
        dict(ema=-0.1),
    ],  # fmt: skip
)
def test_config_rejects_bad_values(bad):
    from mend.errors import MendError

    with pytest.raises(MendError):
        _cfg(**bad)


def test_key_statistics_mix_training_texts_and_general_text(tmp_path, tokenizer, caplog):
    from mend.training.prepare import key_batches, key_pairs

    model = tiny_model("llama", len(tokenizer))
    data = fact_requests(20, seed=1)
    net = EditorNet({p.name: p.in_out for p in find_editable(model)}, EditorConfig(rank=8))
    editor = MendEditor(model, tokenizer, net)
    text = tmp_path / "general.txt"
    text.write_text("The river flows north through the old town and into the sea. " * 400)

    def tokens(batches):
        return sum(int(b.attention_mask.sum()) for b in batches)

    only = key_batches(editor, data, None)
    assert tokens(only) == sum(len(tokenizer(p + " " + t)["input_ids"]) for p, t in key_pairs(data))
    mixed = key_batches(editor, data, str(text))
    windows = mixed[len(only) :]
    width = min(128, editor.max_len)  # 128-token windows, or the tiny model's whole context
    assert windows and all(b.input_ids.shape[1] == width for b in windows)
    # About as many general-text tokens as training-text tokens (whole windows).
    assert tokens(only) <= tokens(windows) < tokens(only) + width
    # General text that cannot be read: a warning, and the training texts alone.
    missing = key_batches(editor, data, str(tmp_path / "absent.txt"))
    assert tokens(missing) == tokens(only)
    assert "training texts only" in caplog.text


def test_late_hard_locality_draws_from_its_own_index(tmp_path, tokenizer, monkeypatch):
    import importlib

    mt = importlib.import_module("mend.training.loop")
    cfg = _cfg(max_steps=8, c_loc_late=2.0, late_fraction=0.5, hard_locality="relation",
               hard_locality_late="answer")  # fmt: skip
    assert [mt.step_config(s, cfg).sampling.hard_locality for s in range(8)] == (
        ["relation"] * 4 + ["answer"] * 4
    )
    seen = []

    def spy(reqs, pool, sampling, rng=None, similar=None, batch_size=1):
        if rng is not None:  # a training step: its mode, and the kinds of group in its index
            kinds = sorted({k.split(":")[0] for k in similar})
            seen.append((sampling.hard_locality, kinds))
        return build_rows(reqs, pool, sampling, rng, similar, batch_size)

    def step_spy(editor, reqs, rows, scfg, stack=None, batch_size=1):
        if editor.net.training:
            weights.append(scfg.loss.locality)
        return edit_step(editor, reqs, rows, scfg, stack, batch_size)

    build_rows, edit_step, weights = mt.build_rows, mt.edit_step, []
    monkeypatch.setattr(mt, "build_rows", spy)
    monkeypatch.setattr(mt, "edit_step", step_spy)
    data, val = fact_requests(40, seed=1), fact_requests(4, seed=2)
    mt.train(tiny_model("llama", len(tokenizer)), tokenizer, data, val, cfg, tmp_path,
             progress=False)  # fmt: skip
    assert seen == [("relation", ["relation"])] * 4 + [("answer", ["answer", "relation"])] * 4
    assert weights == [1.0] * 4 + [2.0] * 4


def test_hard_locality_inputs_share_the_relation_or_the_true_answer():
    import random

    from mend.training.sampling import build_rows, relation_key, similar_index
    from mend.types import EditRequest

    # 40 records: prompts in 4 endings, true answers in 5 values, crossed so that neither
    # grouping implies the other; one record's true answer is unknown.
    endings = ("is located in", "speaks the language", "plays the", "works for")
    answers = ("French", "Paris", "piano", "Google", "jazz")
    pool = [
        EditRequest(f"Subject {i} {endings[i % 4]}", "X", target_true=answers[(i // 4) % 5])
        for i in range(40)
    ] + [EditRequest("Subject 40 plays the", "X")]
    for by, same in (
        ("relation", lambda a, b: relation_key(a.prompt) == relation_key(b.prompt)),
        ("answer", lambda a, b: a.target_true == b.target_true),
    ):
        cfg = Sampling(loc_per_edit=40, hard_locality=by)  # 20 hard, 20 at random
        rows = build_rows(pool, pool, cfg, random.Random(0), similar_index(pool, by))
        by_prompt = {r.prompt: r for r in pool}
        alike = drawn_all = 0
        for i, r in enumerate(pool[:40]):
            mine = [pair for pair, g in zip(rows.loc, rows.loc_group, strict=True) if g == i]
            drawn = [by_prompt[p] for p, _ in mine]
            assert all(d.prompt != r.prompt for d in drawn)
            assert all(a == d.target_true for (_, a), d in zip(mine, drawn, strict=True))
            alike += sum(same(r, d) for d in drawn)
            drawn_all += len(drawn)
        # Half the draws come from the record's group (less the record itself, dropped), the
        # other half at random (1 in 4 or 5 alike): ~0.55 of the draws alike, ~0.2 by chance.
        assert 0.5 < alike / drawn_all < 0.65, (by, alike / drawn_all)
    # Without a true answer, "answer" falls back to the relation.
    rows = build_rows(pool[40:], pool, cfg, random.Random(0), similar_index(pool, "answer"))
    assert sum(p.endswith("plays the") for p, _ in rows.loc) >= 17


def test_nearest_hard_locality_ranks_by_the_edited_input_same_answer_first(tokenizer):
    import random

    from conftest import tiny_mend

    from mend.errors import MendError
    from mend.grads import capture, first_scored_inputs
    from mend.training.prepare import nearest_records
    from mend.training.sampling import build_rows, similar_index

    editor = tiny_mend(tokenizer)
    pool = fact_requests(60)
    k = 5
    near = nearest_records(editor, pool, k, chunk=7, progress=False)  # batches of mixed lengths
    # The keys, one padded batch at a time, are the first edited weight's inputs that
    # `capture` sees at the prompt's last token, row by row.
    batch = editor.batch([(r.prompt, None) for r in pool])
    captured, _ = capture(editor.model, editor.params, batch, lambda lg: lg.sum())
    u = first_scored_inputs(captured[editor.params[0].name][0], batch.pos_mask)
    unit = u / u.norm(dim=-1, keepdim=True)
    for i, r in enumerate(pool):
        assert len(near[i]) == k and i not in near[i]
        same = [j for j in range(len(pool)) if j != i and pool[j].target_true == r.target_true]
        others = [j for j in range(len(pool)) if j != i and j not in same]
        cos = (unit @ unit[i]).tolist()
        want = sorted(same, key=lambda j: -cos[j])[:k]
        want += sorted(others, key=lambda j: -cos[j])[: k - len(want)]
        # the same records in the same order, but for near-ties of cosine (bf16-free here)
        assert [round(cos[j], 4) for j in near[i]] == [round(cos[j], 4) for j in want]
    # 60 records over 10 true answers: some have >= k others sharing theirs, some fewer.
    counts = [sum(q.target_true == r.target_true for q in pool) - 1 for r in pool]
    assert min(counts) < k <= max(counts)
    # Training draws half its extra locality inputs from those lists.
    cfg = Sampling(loc_per_edit=8, hard_locality="nearest", nearest_k=k)
    kept = [list(n) for n in near]
    index = similar_index(pool, "nearest", near)
    assert near == kept  # (not extended in place)
    assert all(index[f"prompt:{r.prompt}"] == kept[i] for i, r in enumerate(pool))
    rows = build_rows(pool, pool, cfg, random.Random(0), index)
    index = {r.prompt: i for i, r in enumerate(pool)}
    hits = sum(index[p] in near[g] for (p, _), g in zip(rows.loc, rows.loc_group, strict=True))
    assert hits >= 4 * len(pool) * 0.9, hits  # 4 hard draws per edit (a few random ones hit)
    with pytest.raises(MendError, match="nearest"):
        similar_index(pool, "nearest")


def test_batch_fraction_spreads_batched_steps_evenly():
    from mend.training.schedule import batch_size_at

    for frac, want in ((1.0, [4] * 8), (0.0, [1] * 8), (0.5, [1, 4] * 4), (0.25, [1, 1, 1, 4] * 2)):
        cfg = _cfg(joint_edits=4, joint_fraction=frac)
        assert [batch_size_at(s, cfg) for s in range(8)] == want


def test_init_starts_from_a_trained_editor(tmp_path, tokenizer):
    data, val = fact_requests(60, seed=1), fact_requests(8, seed=2)
    model = tiny_model("llama", len(tokenizer))
    train(model, tokenizer, data, val, _cfg(max_steps=4), tmp_path / "a", progress=False)
    trained = load_editor(tmp_path / "a", model)
    # a near-zero learning rate: the continued editor must still be the trained one
    cfg = _cfg(max_steps=2, val_every=2, lr=1e-12, alpha_lr=1e-12, init_editor=str(tmp_path / "a"),
               joint_edits=2, joint_fraction=0.5)  # fmt: skip
    train(model, tokenizer, data, val, cfg, tmp_path / "b", progress=False)
    again = load_editor(tmp_path / "b", model)
    fresh = EditorNet(trained.shapes, trained.cfg)
    weights = lambda e: {n: p for n, p in e.named_parameters()}  # noqa: E731
    assert again.cfg.rank == trained.cfg.rank
    for name, p in weights(trained).items():
        torch.testing.assert_close(weights(again)[name], p, rtol=0, atol=1e-8)
    moved = max((p - weights(fresh)[n]).abs().max() for n, p in weights(trained).items())
    assert moved > 1e-3  # so the check above could fail
    log = [json.loads(x) for x in (tmp_path / "b" / LOG_FILE).read_text().splitlines()]
    assert [x["step"] for x in log if "val" not in x] == [1, 2]


def test_late_locality_weight_starts_at_its_fraction_of_the_run(tmp_path, tokenizer):
    from mend.training.schedule import step_config

    cfg = _cfg(
        max_steps=8,
        c_loc=1.0,
        c_loc_late=3.0,
        late_fraction=0.75,
        editor=EditorConfig(rank=16, init_alpha=1.0),
    )  # large edits: a visible l_loc
    assert [step_config(s, cfg).loss.locality for s in range(8)] == [1.0] * 6 + [3.0] * 2
    assert {step_config(s, _cfg(max_steps=8)).loss.locality for s in range(8)} == {1.0}
    data, val = fact_requests(60, seed=1), fact_requests(8, seed=2)
    train(tiny_model("llama", len(tokenizer)), tokenizer, data, val, cfg, tmp_path, progress=False)
    log = [json.loads(x) for x in (tmp_path / LOG_FILE).read_text().splitlines()]
    steps = [x for x in log if "val" not in x]
    for x in steps:  # the logged loss is c_edit * l_edit + c_loc(step) * l_loc
        c_loc = 3.0 if x["step"] > 6 else 1.0
        assert x["loss"] == pytest.approx(
            cfg.loss.edit * x["l_edit"] + c_loc * x["l_loc"], rel=1e-5
        )
    assert all(x["l_loc"] > 1e-4 * x["loss"] for x in steps[6:])  # so the weight shows in it


def test_late_locality_weight_restarts_the_checkpoint_choice(tmp_path, tokenizer, monkeypatch):
    import sys

    # Validation accuracy falls once the late weight starts (it trades edits for locality):
    # the best checkpoint must still be one it shaped. It shapes steps 7 and 8 (0-based 6
    # and 7), so of the validations after steps 2, 4, 6 and 8 only the last qualifies.
    accs = iter([0.9, 0.8, 0.5, 0.6])

    def validate(*args, **kwargs):
        a = next(accs)
        return {"loss": 1.0, "rewrite_acc": a, "rephrase_acc": a, "locality_acc": a}

    monkeypatch.setattr(sys.modules["mend.training.loop"], "validate", validate)
    cfg = _cfg(max_steps=8, val_every=2, c_loc_late=3.0, late_fraction=0.75)
    data, val = fact_requests(60, seed=1), fact_requests(8, seed=2)
    train(tiny_model("llama", len(tokenizer)), tokenizer, data, val, cfg, tmp_path / "a",
          progress=False)  # fmt: skip
    assert json.loads((tmp_path / "a" / "editor_config.json").read_text())["best_step"] == 8
    accs = iter([0.9, 0.8, 0.5, 0.6])  # without a late weight the first stays best
    train(tiny_model("llama", len(tokenizer)), tokenizer, data, val, _cfg(max_steps=8, val_every=2),
          tmp_path / "b", progress=False)  # fmt: skip
    assert json.loads((tmp_path / "b" / "editor_config.json").read_text())["best_step"] == 2
