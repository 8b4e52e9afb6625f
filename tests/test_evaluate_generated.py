"""The generated-answer metrics, perplexity before and after, and seconds per batch in reports."""

from __future__ import annotations

import importlib
import json
import logging
import re

import pytest
import torch
from conftest import SUBJECTS, TEMPLATES, corpus, fact_requests, tiny_model

from mend.baselines import GradEditor, NoEdit
from mend.evaluate import GEN_METRICS, METRICS, evaluate, evaluate_sequential, score, summarize
from mend.metrics import starts_with_word
from mend.types import EditRequest, Probe

ev = importlib.import_module("mend.evaluate")  # the package's `mend.evaluate` is the function
TEXT = " ".join(corpus())  # plenty of 64-token windows for the tiny models
PROMPTS = [t.format(s) for s in SUBJECTS for pair in TEMPLATES for t in pair]


def test_starts_with_word_needs_the_target_then_no_letter_or_digit():
    assert starts_with_word(" Paris", " Paris")
    assert starts_with_word(" Paris. It is", " Paris")
    assert starts_with_word(" Paris-based", " Paris")
    assert not starts_with_word(" Parisian", " Paris")  # runs on into a longer word
    assert not starts_with_word(" Paris2", " Paris")
    assert not starts_with_word(" Pari", " Paris")  # stopped short
    assert not starts_with_word("Paris", " Paris")  # the leading space is part of the answer
    assert not starts_with_word(" London", " Paris")
    assert not starts_with_word(" anything", "")


def _greedy_ids(model, tok, prompt: str, n: int = 6) -> list[int]:
    x = torch.tensor([tok(prompt)["input_ids"]])
    y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                       do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
    return y[0, x.shape[1] :].tolist()


def _own_answer(model, tok, runs_on: bool) -> EditRequest | None:
    """A request whose target is the first words of the model's own greedy continuation, spelled
    in the very tokens the model produces; the next character continues the last word (runs_on)
    or does not."""
    for prompt in PROMPTS:
        new = _greedy_ids(model, tok, prompt)
        for k in range(1, len(new) - 1):
            text = tok.decode(new[:k])
            after = tok.decode(new[: k + 1])[len(text) :]
            if not re.fullmatch(r"( [A-Za-z]+)+", text) or not after:
                continue
            if after[0].isalnum() != runs_on:
                continue
            if tok(f"{prompt}{text}")["input_ids"] == tok(prompt)["input_ids"] + new[:k]:
                return EditRequest(prompt, text.strip())
    return None


def _scores(model, tok, request) -> dict:
    return summarize(score(model, tok, [request])["metrics"])


def test_generated_metric_counts_the_models_own_greedy_answer_and_differs_from_teacher_forcing(
    tokenizer,
):
    found = {}
    for seed in range(8):  # random models babble; find one that says words of both kinds
        model = tiny_model("llama", len(tokenizer), seed=seed)
        found = {k: _own_answer(model, tokenizer, k) for k in (False, True)}
        if all(found.values()):
            break
    assert all(found.values()), "no tiny model said a clean word; widen the search"
    own, runs_on = found[False], found[True]

    s = _scores(model, tokenizer, own)
    assert s["rewrite_gen"] == 1.0 and s["rewrite_acc"] == 1.0
    # the same target's greedy continuation runs on into a longer word: every target token is
    # the argmax (teacher-forced success), yet the generated answer is another word
    s = _scores(model, tokenizer, runs_on)
    assert s["rewrite_acc"] == 1.0 and s["rewrite_gen"] == 0.0

    assert not tokenizer.decode(_greedy_ids(model, tokenizer, own.prompt)).startswith(" piano")
    other = EditRequest(own.prompt, "piano", rephrases=(own.prompt,))
    s = _scores(model, tokenizer, other)
    assert s["rewrite_gen"] == 0.0 and s["rephrase_gen"] == 0.0
    # a rephrase that is the prompt itself scores as the prompt does
    s = _scores(model, tokenizer, EditRequest(own.prompt, own.target, rephrases=(own.prompt,)))
    assert s["rewrite_gen"] == s["rephrase_gen"] == 1.0


def test_batched_decoding_gives_each_row_its_own_greedy_continuation(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))  # learned positions: left padding must not shift
    reqs = fact_requests(4)
    got = score(model, tokenizer, reqs)["continuations"]
    pairs, kinds, _, _ = ev._probe_rows(reqs)
    decoded = [i for i, k in enumerate(kinds) if k in ev.GENERATED]
    assert sorted(got) == decoded
    for i in decoded:
        prompt, target = pairs[i]
        n = len(tokenizer(f"{prompt} {target}")["input_ids"]) - len(tokenizer(prompt)["input_ids"])
        assert got[i] == _greedy_ids(model, tokenizer, prompt, n + 2)


def test_no_op_edit_keeps_every_generated_locality_and_perplexity(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    reqs = fact_requests(6)
    report = evaluate(model, tokenizer, NoEdit(model, tokenizer), reqs, batch_size=2,
                      progress=False, ppl_text=TEXT, ppl_windows=2)  # fmt: skip
    assert report["locality_gen"] == 1.0 and report["pre"]["locality_gen"] == 1.0
    for k in (*METRICS, *GEN_METRICS):
        assert report[k] == report["pre"][k], k
    assert report["ppl_before"] > 1.0
    assert report["ppl_after"] == report["ppl_before"] and report["ppl_change"] == 0.0
    assert report["seconds_per_batch_median"] == report["edit_seconds_median"]
    assert report["seconds_per_batch_mean"] == report["edit_seconds_mean"]


def test_perplexity_after_a_weight_change_differs_and_is_measured_with_the_edit_applied(
    tokenizer,
):
    model = tiny_model("llama", len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = GradEditor(model, tokenizer, lr=1.0)  # large steps: visible in every score
    reqs = fact_requests(4)
    report = evaluate(model, tokenizer, method, reqs, batch_size=2, progress=False,
                      ppl_text=TEXT, ppl_windows=2)  # fmt: skip
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # reverted
    assert report["ppl_before"] == pytest.approx(ev.perplexity(model, tokenizer, TEXT, 2))
    assert report["ppl_after"] != report["ppl_before"]
    assert report["ppl_change"] == pytest.approx(report["ppl_after"] / report["ppl_before"] - 1)
    result = method.edit(reqs[:2])  # the first batch, as evaluate applied it
    try:
        assert report["ppl_after"] == pytest.approx(ev.perplexity(model, tokenizer, TEXT, 2))
    finally:
        result.revert()
    assert report["locality_gen"] < 1.0  # such steps change some greedy continuations


def test_sequential_perplexity_at_each_point_of_the_curve(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    reqs = fact_requests(6)
    kept = evaluate_sequential(model, tokenizer, GradEditor(model, tokenizer, lr=1.0), reqs,
                               batch_size=2, every=4, progress=False, ppl_text=TEXT,
                               ppl_windows=2)  # fmt: skip
    assert [c["n_edits"] for c in kept["curve"]] == [4, 6]
    assert kept["ppl_after"] == kept["curve"][-1]["ppl"] != kept["ppl_before"]
    assert kept["curve"][0]["ppl"] != kept["ppl_before"]
    none = evaluate_sequential(model, tokenizer, NoEdit(model, tokenizer), reqs, batch_size=3,
                               progress=False, ppl_text=TEXT, ppl_windows=2)  # fmt: skip
    assert none["ppl_after"] == none["ppl_before"] == kept["ppl_before"]
    assert none["locality_gen"] == 1.0
    off = evaluate_sequential(model, tokenizer, NoEdit(model, tokenizer), reqs, batch_size=3,
                              progress=False)  # fmt: skip
    assert off["ppl_before"] is off["ppl_after"] is off["ppl_change"] is None
    assert "not measured" in ev.format_report(off)


def test_format_report_prints_generated_rows_perplexity_and_seconds_per_batch(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    reqs = [EditRequest(r.prompt, r.target, r.rephrases, (Probe(r.locality[0].prompt),))
            for r in fact_requests(2)]  # a locality probe without an answer  # fmt: skip
    report = evaluate(model, tokenizer, GradEditor(model, tokenizer, lr=1.0), reqs,
                      progress=False, ppl_text=TEXT, ppl_windows=2)  # fmt: skip
    text = ev.format_report(report)
    for k in ("rewrite_gen", "rephrase_gen", "locality_gen", "wikitext ppl (1st batch)",
              "seconds per batch (median)", "seconds per batch (mean)"):  # fmt: skip
        assert k in text, k
    assert f"({report['ppl_change']:+.1%})" in text


def test_ppl_text_is_a_fixed_slice_from_an_article_past_the_middle(tmp_path, monkeypatch, caplog):
    arts = [
        f" = Article {i} = \n\n Body of article {i} . \n\n = = Section = = \n" for i in range(6)
    ]
    path = tmp_path / "wiki.valid.raw"
    path.write_text("".join(arts))
    monkeypatch.setattr(ev, "resolve_data", lambda name: path)
    text = ev.ppl_text()
    assert text.startswith(" = Article 3 = ") and text == ev.ppl_text()
    assert text == "".join(arts[3:])
    monkeypatch.setattr(ev, "resolve_data", lambda name: tmp_path / "absent.raw")
    with caplog.at_level(logging.WARNING, logger="mend.evaluate"):
        assert ev.ppl_text() is None
    assert "perplexity not measured" in caplog.text


def test_eval_cli_reports_perplexity_or_says_it_was_not_measured(tokenizer, tmp_path, monkeypatch,
                                                                 capsys):  # fmt: skip
    from mend.cli import main

    model_dir = tmp_path / "model"
    tiny_model("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": r.prompt, "target": r.target}) + "\n"
                            for r in fact_requests(4)))  # fmt: skip
    monkeypatch.setattr(ev, "ppl_text", lambda: TEXT)  # no shared data in unit tests
    argv = ["eval", "--model", str(model_dir), "--method", "grad", "--grad-lr", "1",
            "--data", str(data), "--batch-size", "2", "--out"]  # fmt: skip
    assert main([*argv, str(tmp_path / "r.json"), "--ppl-windows", "2"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ppl_before"] > 1.0 and report["ppl_after"] != report["ppl_before"]
    assert {"rewrite_gen", "seconds_per_batch_median"} <= report.keys()
    assert "seconds per batch (median)" in capsys.readouterr().out
    assert main([*argv, str(tmp_path / "off.json"), "--ppl-windows", "0", "--sequential"]) == 0
    assert json.loads((tmp_path / "off.json").read_text())["ppl_before"] is None
    assert "not measured" in capsys.readouterr().out
    assert main([*argv, str(tmp_path / "bad.json"), "--ppl-windows", "-1"]) == 2


def test_scoring_in_parts_gives_the_scores_of_one_pass(tokenizer, monkeypatch):
    """Probes are scored a few rows per forward pass (the logits of every probe of many
    edits would not fit in memory); the scores do not depend on the split."""
    model = tiny_model("gpt2", len(tokenizer))
    reqs = fact_requests(5)
    whole = score(model, tokenizer, reqs)
    monkeypatch.setattr(importlib.import_module("mend.evaluate"), "SCORE_ROWS", 2)
    parts = score(model, tokenizer, reqs, base=whole)
    assert torch.equal(parts["argmax"], whole["argmax"])
    assert parts["metrics"]["rewrite_acc"] == whole["metrics"]["rewrite_acc"]
    assert parts["metrics"]["efficacy_score"] == whole["metrics"]["efficacy_score"]
    assert all(v == 1.0 for v in parts["metrics"]["locality_acc"])  # nothing changed
