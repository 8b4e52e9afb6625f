"""Seq2seq LMs (T5, Flan-T5's gated MLP, mT5, BART) and classifiers (BERT, RoBERTa, DistilBERT):
the guarantees of the decoder families, on tiny random models of every such family. (Gradient
capture, the identity editor's first step and revert are held for every family in
test_edit_core.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import LABELS, fact_requests, tiny_model
from transformers import BertForSequenceClassification, T5ForConditionalGeneration

from mend.checkpoint import load_editor
from mend.config import EditorConfig, TrainConfig
from mend.data.collate import IGNORE, make_batch
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.errors import MendError
from mend.evaluate import GEN_METRICS, evaluate
from mend.grads import key_moments
from mend.models import find_editable, kind_of, load_model
from mend.models.forward import greedy, layout, scored_logits
from mend.models.upper import UpperStack
from mend.result import apply_delta
from mend.training.loop import train


def _editor(model, tokenizer, init_alpha: float = 0.1, perturb: bool = False) -> MendEditor:
    """An identity-initialised editor (or, with `perturb`, one moved off its init), unchecked."""
    params = find_editable(model)
    net = EditorNet(
        {p.name: p.in_out for p in params}, EditorConfig(rank=16, init_alpha=init_alpha)
    )
    if perturb:
        torch.manual_seed(1)
        with torch.no_grad():
            for prm in net.parameters():
                prm.add_(0.05 * torch.randn_like(prm))
    net.eval()
    return MendEditor(model, tokenizer, net, boost=())


def _pairs(reqs, rephrase: bool = False):
    return [(r.rephrases[0] if rephrase else r.prompt, r.target) for r in reqs]


def test_default_weights_are_the_last_mlps_of_each_stack(tokenizer):
    names = {f: [p.name for p in find_editable(tiny_model(f, len(tokenizer)))]
             for f in ("t5", "t5-gated", "bart", "bert", "distilbert")}  # fmt: skip
    # T5 and BART: the last 2 of 3 encoder and the last 2 of 3 decoder blocks
    assert names["t5"] == [f"{s}.block.{i}.layer.{j}.DenseReluDense.{w}"
                           for s, j in (("encoder", 1), ("decoder", 2)) for i in (1, 2)
                           for w in ("wi", "wo")]  # fmt: skip
    assert [n.rsplit(".", 1)[1] for n in names["t5-gated"][:3]] == ["wi_0", "wi_1", "wo"]
    assert len(names["t5-gated"]) == 12
    assert names["bart"] == [f"model.{s}.layers.{i}.{w}" for s in ("encoder", "decoder")
                             for i in (1, 2) for w in ("fc1", "fc2")]  # fmt: skip
    # classifiers: the last 3 of 4 blocks
    assert names["bert"] == [f"bert.encoder.layer.{i}.{w}" for i in (1, 2, 3)
                             for w in ("intermediate.dense", "output.dense")]  # fmt: skip
    assert names["distilbert"][0] == "distilbert.transformer.layer.1.ffn.lin1"
    decoder = [p.decoder for p in find_editable(tiny_model("bart", len(tokenizer)))]
    assert decoder == [False] * 4 + [True] * 4


def test_seq2seq_rows_feed_the_prompt_to_the_encoder_and_the_target_to_the_decoder(tokenizer):
    model = tiny_model("t5", len(tokenizer))
    lay = layout(model)
    assert lay.kind == "seq2seq" and lay.decoder_start == 0
    batch = make_batch(tokenizer, [("The colour loved by Bob is", "blue"), ("Alice", None)],
                       layout=lay)  # fmt: skip
    target = tokenizer(text_target="blue")["input_ids"]
    assert (
        batch.input_ids[0, : batch.attention_mask[0].sum()].tolist()
        == tokenizer("The colour loved by Bob is")["input_ids"]
    )
    n = len(target)
    assert batch.decoder_input_ids[0, :n].tolist() == [0] + target[:-1]  # teacher-forced
    assert batch.labels[0, :n].tolist() == target and batch.pos_mask[0].sum() == n
    # without a target: the decoder's first prediction, label unknown
    assert batch.decoder_input_ids[1, 0] == 0 and batch.pos_mask[1].tolist()[:1] == [True]
    assert batch.pos_mask[1].sum() == 1 and batch.labels[1, 0] == IGNORE
    assert batch.select([1]).decoder_input_ids.shape == (1, 1)


def test_classifier_rows_take_a_label_by_name_or_index(tokenizer):
    model = tiny_model("bert", len(tokenizer))
    lay = layout(model)
    batch = make_batch(tokenizer, [("Alice", "Blue"), ("Bob", "3"), ("Carol", None)], layout=lay)
    assert batch.labels[:, 0].tolist() == [1, 3, IGNORE]
    assert batch.pos_mask[:, 0].all() and batch.pos_mask.sum() == 3
    assert scored_logits(model, batch).shape == (3, len(LABELS))
    with pytest.raises(MendError, match="unknown label 'purple'"):
        make_batch(tokenizer, [("Alice", "purple")], layout=lay)


def test_functional_in_place_and_side_by_side_edits_agree(other_model, tokenizer):
    model = other_model
    editor = _editor(model, tokenizer, init_alpha=0.5, perturb=True)
    reqs = fact_requests(3)
    probe = editor.batch(_pairs(reqs, rephrase=True))
    with torch.no_grad():
        before = scored_logits(model, probe)
        factors = editor.factors(editor.batch(_pairs(reqs)), batch_size=None)
        with editor.applied(factors):
            functional = scored_logits(model, probe)
        # each row under its own edit, in one pass, equals each edit alone
        per_row = editor.factors(editor.batch(_pairs(reqs)), batch_size=1)
        with editor.applied(per_row, probe.group):
            side_by_side = scored_logits(model, probe)
        singles = []
        for r in reqs:
            one = editor.factors(editor.batch(_pairs([r])), batch_size=None)
            with editor.applied(one):
                singles.append(scored_logits(model, editor.batch(_pairs([r], rephrase=True))))
    result = editor.edit(reqs)  # a batched edit, in place
    with torch.no_grad():
        in_place = scored_logits(model, probe)
    result.revert()
    assert (functional - before).abs().max() > 1e-4  # the edit changed something
    torch.testing.assert_close(functional, in_place, rtol=1e-4, atol=1e-5)
    # (padded rows against unpadded ones: float rounding only)
    torch.testing.assert_close(side_by_side, torch.cat(singles), rtol=1e-3, atol=2e-4)


def test_batched_edit_is_the_sum_of_single_edits_and_reverts_bit_for_bit(other_model, tokenizer):
    model = other_model
    editor = _editor(model, tokenizer, perturb=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reqs = fact_requests(3)
    singles = []
    for r in reqs:
        result = editor.edit([r])
        singles.append({n: d.clone() for n, d in result.deltas.items()})
        result.revert()
    together = editor.edit(reqs)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(editor.params)
    for name, delta in together.deltas.items():  # (padded rows: float rounding only)
        scale = float(delta.abs().max())
        assert scale > 0
        torch.testing.assert_close(delta, sum(s[name] for s in singles), rtol=0, atol=1e-3 * scale)
    together.revert()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", ["t5-gated", "bart", "roberta"])
def test_editor_edited_model_and_delta_save_and_load(family, tokenizer, tmp_path):
    model = tiny_model(family, len(tokenizer))
    editor = _editor(model, tokenizer, perturb=True)
    editor.net.set_key_moments(key_moments(model, editor.params, [editor.batch(_pairs(fact_requests(8)))]))  # fmt: skip
    editor.save_pretrained(tmp_path / "editor")
    reqs = fact_requests(2, seed=7)
    probe = editor.batch(_pairs(reqs, rephrase=True))
    result = editor.edit(reqs)
    try:
        deltas = {n: d.clone() for n, d in result.deltas.items()}
        with torch.no_grad():
            edited_logits = scored_logits(model, probe)
        result.save_pretrained(tmp_path / "edited", tokenizer)
        result.save_delta(tmp_path / "delta.safetensors")
    finally:
        result.revert()
    # the editor: the same edit after a round trip
    again = MendEditor.from_pretrained(tmp_path / "editor", model, tokenizer, boost=())
    second = again.edit(reqs)
    for name, delta in second.deltas.items():
        assert torch.equal(delta, deltas[name]), name
    second.revert()
    # the edited model loads through its family's auto class and answers as edited
    loaded, tok = load_model(str(tmp_path / "edited"))
    assert type(loaded) is type(model) and kind_of(loaded) == kind_of(model)
    with torch.no_grad():
        torch.testing.assert_close(scored_logits(loaded, probe), edited_logits, rtol=0, atol=1e-6)
    # the delta on a fresh copy of the base model reproduces the edit
    fresh = tiny_model(family, len(tokenizer))
    applied = apply_delta(fresh, tmp_path / "delta.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(scored_logits(fresh, probe), edited_logits, rtol=0, atol=1e-6)
    applied.revert()
    # and an editor refuses a model of another family
    with pytest.raises(MendError):
        load_editor(tmp_path / "editor", tiny_model("distilbert", len(tokenizer)))


def test_no_fast_path_for_seq2seq_or_classifiers(other_model, tokenizer):
    names = [p.name for p in find_editable(other_model)]
    assert UpperStack.first_edited_block(other_model, names) is None


def test_evaluate_scores_a_classifier_edit_and_its_accuracy_drawdown(tokenizer):
    model = tiny_model("bert", len(tokenizer))
    editor = _editor(model, tokenizer, init_alpha=1000.0)  # a tiny random model's small gradient
    reqs = fact_requests(6, seed=3)
    report = evaluate(model, tokenizer, editor, reqs, progress=False)
    pre = report["pre"]
    assert pre["locality_acc"] == 1.0  # the unedited model agrees with itself
    assert report["accuracy_drawdown"] == pytest.approx(
        pre["locality_label_acc"] - report["locality_label_acc"]
    )
    assert all(report[k] is None for k in GEN_METRICS) and report["ppl_before"] is None
    # a large plain gradient step flips most labels to the requested ones
    assert report["rewrite_acc"] >= pre["rewrite_acc"] + 0.5
    assert report["rephrase_acc"] >= pre["rephrase_acc"] + 0.5
    assert greedy(model, tokenizer, reqs[0].prompt) in LABELS.values()


def test_load_model_picks_the_auto_class_of_the_family(tokenizer, tmp_path):
    for family, cls in (("t5", T5ForConditionalGeneration), ("bert", BertForSequenceClassification)):  # fmt: skip
        model = tiny_model(family, len(tokenizer))
        model.save_pretrained(tmp_path / family)
        tokenizer.save_pretrained(tmp_path / family)
        loaded, _ = load_model(str(tmp_path / family))
        assert type(loaded) is cls
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("family", ["t5", "bart", "distilbert"])
def test_training_beats_the_untrained_editor_on_held_out_edits(family, tokenizer, tmp_path):
    model = tiny_model(family, len(tokenizer))
    data, val, test = (
        fact_requests(200, seed=3),
        fact_requests(8, seed=4),
        fact_requests(30, seed=5),
    )
    # A tiny random model's gradients are small: a larger first step and edit weight than
    # the defaults get its editor going within 200 steps (seconds).
    cfg = TrainConfig.from_dict(dict(
        editor=EditorConfig(rank=16, init_alpha=0.1), lr=3e-3, alpha_lr=5e-2, c_edit=1.0,
        batch_size=4, max_steps=200, val_every=50, val_edits=8, loc_per_edit=2,
        warmup_steps=2, patience=100, key_text=None, shared_rank=0,
    ))  # fmt: skip
    torch.set_num_threads(1)
    train(model, tokenizer, data, val, cfg, tmp_path, progress=False)
    trained = MendEditor(model, tokenizer, load_editor(tmp_path, model))
    untrained = MendEditor(
        model, tokenizer, EditorNet({p.name: p.in_out for p in find_editable(model)}, cfg.editor)
    )
    after = evaluate(model, tokenizer, trained, test, progress=False)
    before = evaluate(model, tokenizer, untrained, test, progress=False)
    assert before["rewrite_acc"] <= 0.2
    assert after["rewrite_acc"] >= before["rewrite_acc"] + 0.4
    assert after["rephrase_acc"] >= before["rephrase_acc"] + 0.3
