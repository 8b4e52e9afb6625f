"""Generation edits from WikiText: the article split, passage prefixes, records sampled from a
tiny model (disjoint articles, targets that tokenise back in context, determinism), bad input,
and the generation measures on hand-built numbers and a tiny model."""

from __future__ import annotations

import json
import math
import os
import random
import re

import pytest
import torch
from conftest import corpus, make_tokenizer, tiny_model

from mend.baselines import FTEditor, NoEdit
from mend.cli import main
from mend.data.collate import encode
from mend.data.formats import load_requests
from mend.data.wikitext import (
    detokenize,
    heldout_start,
    passages,
    read_articles,
    split_articles,
    stable,
)
from mend.errors import MendError
from mend.evaluate import ppl_text
from mend.generation.build import BuildConfig, build_records, word_start_mask, write_records
from mend.generation.score import continuation_scores, evaluate_generation, summarize
from mend.types import EditRequest

N_ARTICLES = 10


def raw_wikitext(n_articles: int = N_ARTICLES, seed: int = 0) -> str:
    """Raw WikiText of the tiny corpus's sentences: ' = Title = ' articles, a section heading,
    pre-tokenised spacing (' , ', ' . ', ' @-@ ')."""
    rng = random.Random(seed)
    sentences = [s.replace(".", " .") for line in corpus() for s in line.split(". ") if s]
    out = []
    for a in range(n_articles):
        out.append(f" = Article {a} @-@ {a + 1} = \n \n")
        for p in range(3):
            if p == 1:
                out.append(" = = Section = = \n \n")
            words = " , ".join(s.rstrip(" .") for s in rng.sample(sentences, 6)) + " . "
            out.append(f" {words}\n")
        out.append(" \n")
    return "".join(out)


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wikitext") / "wiki.raw"
    path.write_text(raw_wikitext())
    return path


@pytest.fixture(scope="module")
def lm():
    """A tiny random llama whose head favours tokens of whole letters: a random model's nearly
    uniform draws are mostly stray bytes that decode to no text."""
    tok = make_tokenizer("bpe")
    model = tiny_model("llama", len(tok))
    with torch.no_grad():
        for i in range(len(tok)):
            text = tok.decode([i])
            wordy = re.fullmatch(r"[A-Za-z ]+", text) is not None and len(text.strip()) > 1
            model.lm_head.weight[i] *= 30.0 if wordy else 0.0
    return model, tok


CFG = BuildConfig(prefix_tokens=12, n_tokens=10)


def test_detokenize_undoes_wikitext_spacing():
    assert detokenize(" The A @-@ 1 road , built in 1 @,@ 200 ( or 1 @.@ 5 ) , is Bob 's . ") == (
        "The A-1 road, built in 1,200 (or 1.5), is Bob's."
    )


def test_articles_split_by_title_disjoint_and_before_the_heldout_half(raw_file):
    text = raw_file.read_text()
    usable, heldout = read_articles(raw_file)
    assert len(usable) + len(heldout) == N_ARTICLES
    assert [a.title for a in usable + heldout] == [f"Article {a}-{a + 1}" for a in range(10)]
    # the held-out part is the text the evaluation measures perplexity on
    assert ppl_text(str(raw_file)) == text[heldout_start(text) :]
    assert heldout_start(text) >= len(text) // 2 and usable and heldout
    assert all(not p.startswith("=") and " , " not in p for a in usable for p in a.paragraphs)
    split = split_articles(usable, seed=0)
    train, evl = ({a.title for a in split[k]} for k in ("train", "eval"))
    assert train and evl and not train & evl and train | evl == {a.title for a in usable}
    assert split_articles(usable, seed=0) == split  # deterministic
    others = [split_articles(usable, seed=s)["eval"] for s in range(1, 6)]
    assert any(o != split["eval"] for o in others)  # and the seed matters


def test_passages_are_short_stable_prefixes_cut_between_words(raw_file, lm):
    _, tok = lm
    usable, _ = read_articles(raw_file)
    found = passages(tok, usable[0], prefix_tokens=12)
    assert len(found) >= 3
    for p in found:
        ids = tok(p.text, add_special_tokens=False)["input_ids"]
        assert 6 <= len(ids) <= 12 and stable(tok, p.text)
        assert p.text == p.text.strip()
        paragraph = next(x for x in usable[0].paragraphs if p.text in x)
        after = paragraph[paragraph.index(p.text) + len(p.text) :]
        assert after[:1] == " "  # the prefix ends where a word ends
    assert [p.index for p in found] == list(range(len(found)))


def test_records_come_from_disjoint_articles_with_targets_that_tokenise_back(raw_file, lm):
    model, tok = lm
    train, summary = build_records(model, tok, raw_file, CFG, progress=False)
    evl, _ = build_records(model, tok, raw_file, BuildConfig(**(CFG.__dict__ | {"split": "eval"})),
                           progress=False)  # fmt: skip
    usable, heldout = read_articles(raw_file)
    pool: dict[str, set[str]] = {}  # passage text -> the articles holding it
    for a in usable:
        for p in passages(tok, a, 12):
            pool.setdefault(p.text, set()).add(a.title)
    assert len(train) >= 20 and len(evl) >= 5 and summary["records"] == len(train)
    train_titles, eval_titles = {r["article"] for r in train}, {r["article"] for r in evl}
    assert not train_titles & eval_titles
    assert not (train_titles | eval_titles) & {a.title for a in heldout}
    for r in train + evl:
        ids, n_prompt = encode(tok, r["prompt"], r["target"], 64)
        assert len(ids) - n_prompt == 10 and r["target"][0] == " " and not r["target"][1].isspace()
        assert ids[:n_prompt] == tok(r["prompt"])["input_ids"]
        for p in r["rephrases"]:
            assert r["prompt"].endswith(p) and len(p) < len(r["prompt"])
            ids, n_prompt = encode(tok, p, r["target"], 64)
            assert len(ids) - n_prompt == 10
        for probe in r["locality"]:  # another passage of the same split, its rest scored
            titles = pool[probe["prompt"] + probe["answer"]] - {r["article"]}
            assert any((t in train_titles) == (r in train) for t in titles)


def test_records_are_deterministic_for_a_seed_and_readable(raw_file, lm, tmp_path):
    model, tok = lm
    cfg = BuildConfig(**(CFG.__dict__ | {"limit": 12}))
    first, _ = build_records(model, tok, raw_file, cfg, progress=False)
    again, _ = build_records(model, tok, raw_file, cfg, progress=False)
    other, _ = build_records(model, tok, raw_file, BuildConfig(**(cfg.__dict__ | {"seed": 1})),
                             progress=False)  # fmt: skip
    assert first == again and len(first) == 12
    assert [r["target"] for r in other] != [r["target"] for r in first]
    write_records(tmp_path / "edits.jsonl", first)
    requests = load_requests(tmp_path / "edits.jsonl")
    assert [(q.prompt, q.target) for q in requests] == [(r["prompt"], r["target"]) for r in first]
    assert all(p.answer for q in requests for p in q.locality)


def test_sampling_draws_only_word_starts_first_and_follows_the_temperature(raw_file, lm):
    model, tok = lm
    mask = word_start_mask(tok, len(tok))
    names = tok.convert_ids_to_tokens(list(range(len(tok))))  # byte-level BPE: "Ġ" is a space
    starts = [n.startswith("Ġ") and len(n) > 1 and n[1] not in "ĠĊĉ" for n in names]
    assert mask.tolist() == starts and sum(starts) >= 10
    assert not mask[tok.eos_token_id] and not mask[tok.convert_tokens_to_ids(",")]
    cold = BuildConfig(**(CFG.__dict__ | {"temperature": 0.05, "limit": 6}))
    records, _ = build_records(model, tok, raw_file, cold, progress=False)
    for r in records:  # near-zero temperature: the greedy continuation among the allowed tokens
        ids = encode(tok, r["prompt"], None, 64)[0]
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        first = int(logits.masked_fill(~mask, float("-inf")).argmax())
        assert encode(tok, r["prompt"], r["target"], 64)[0][len(ids)] == first


def test_a_failed_write_leaves_no_file(tmp_path):
    out = tmp_path / "edits.jsonl"
    with pytest.raises(TypeError):
        write_records(out, [{"prompt": "a", "target": " b"}, {"prompt": {1, 2}}])
    assert os.listdir(tmp_path) == []


def _fails(capsys, argv: list[str], needle: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("mend: error: ") and needle in lines[0], lines


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ["--split", "train", "--out", str(tmp_path / "o.jsonl")]
    one = tmp_path / "one.raw"
    one.write_text(raw_wikitext(1))
    plain = tmp_path / "plain.txt"
    plain.write_text("no headings here\n" * 50)
    _fails(capsys, ["data", "wikitext", "--text", str(tmp_path / "nope.raw"), *out], "not found")
    _fails(capsys, ["data", "wikitext", "--text", str(one), *out], "need at least 2")
    _fails(capsys, ["data", "wikitext", "--text", str(plain), *out], "' = Title = '")
    _fails(capsys, ["data", "wikitext", "--text", str(one), "--temperature", "0", *out],
           "temperature")  # fmt: skip
    _fails(capsys, ["data", "wikitext", "--text", str(one), "--tokens", "0", *out], "tokens")
    _fails(capsys, ["data", "wikitext", "--text", str(one), "--limit", "0", *out], "limit")
    _fails(capsys, ["data", "wikitext", "--text", str(one), "--split", "train", "--out",
                    str(tmp_path)], "not a file")  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["one.raw", "plain.txt"]


def test_cli_builds_records_from_a_local_model(capsys, tmp_path, raw_file, lm):
    model, tok = lm
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "train.jsonl"
    argv = ["data", "wikitext", "--model", str(tmp_path / "model"), "--text", str(raw_file),
            "--split", "train", "--out", str(out), "--prefix-tokens", "12", "--limit", "8"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["records"] == len(records) == 8 and summary["settings"]["n_tokens"] == 10
    built, _ = build_records(model, tok, raw_file, BuildConfig(prefix_tokens=12, limit=8),
                             progress=False)  # fmt: skip
    assert records == built


def test_cli_eval_generation_reports_the_measures(capsys, tmp_path, raw_file, lm, monkeypatch):
    model, tok = lm
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "data" / "wikitext").mkdir(parents=True)
    (tmp_path / "data" / "wikitext" / "wiki.valid.raw").write_text(raw_file.read_text())
    monkeypatch.setenv("MEND_DATA_DIR", str(tmp_path / "data"))  # the held-out text, found
    records, _ = build_records(model, tok, raw_file, BuildConfig(**(CFG.__dict__ | {"limit": 3})),
                               progress=False)  # fmt: skip
    write_records(tmp_path / "edits.jsonl", records)
    argv = ["eval", "--model", str(tmp_path / "model"), "--method", "none", "--data",
            str(tmp_path / "edits.jsonl"), "--generation", "--heldout-windows", "2"]  # fmt: skip
    _fails(capsys, [*argv, "--batch-size", "2", "--out", str(tmp_path / "r.json")], "single")
    _fails(capsys, [*argv, "--sequential", "--out", str(tmp_path / "r.json")], "single")
    assert not (tmp_path / "r.json").exists()
    assert main([*argv, "--out", str(tmp_path / "r.json")]) == 0
    g = json.loads((tmp_path / "r.json").read_text())["generation"]
    assert g["edits"] == 3 and g["windows_per_edit"] == 2
    assert g["ppl_drawdown"] == pytest.approx(0.0, abs=1e-6)
    assert "held-out ppl (each edit)" in capsys.readouterr().out


def test_summary_measures_on_a_hand_built_case():
    before = [{"nll": 3.0, "token_acc": 0.2, "all_correct": False, "greedy_exact": False},
              {"nll": 2.0, "token_acc": 0.5, "all_correct": False, "greedy_exact": False},
              {"nll": 0.5, "token_acc": 1.0, "all_correct": True, "greedy_exact": True},
              {"nll": 1.0, "token_acc": 0.9, "all_correct": False, "greedy_exact": False}]  # fmt: skip
    after = [{"nll": 0.1, "token_acc": 1.0, "all_correct": True, "greedy_exact": True},
             {"nll": 2.5, "token_acc": 0.4, "all_correct": False, "greedy_exact": False},
             {"nll": 0.2, "token_acc": 1.0, "all_correct": True, "greedy_exact": True},
             {"nll": 0.9, "token_acc": 0.9, "all_correct": False, "greedy_exact": True}]  # fmt: skip
    ppl = {"before": [254.0, 254.0, 300.0, 200.0], "after": [260.0, 250.0, 320.0, 210.0],
           "tokens": [127, 127, 127, 127]}  # fmt: skip
    g = summarize(before, after, ppl)
    assert g["edit_success"] == 0.5 and g["pre"]["edit_success"] == 0.25
    assert g["greedy_exact"] == 0.75  # an argmax tie can pass greedy decoding and not the other
    assert g["token_acc"] == pytest.approx(0.825) and g["pre"]["token_acc"] == pytest.approx(0.65)
    assert g["nll_lowered"] == 0.75  # edits 0, 2 and 3 lower the continuation's NLL; 1 raises it
    assert g["nll_before"] == pytest.approx(1.625) and g["nll_after"] == pytest.approx(0.925)
    ppl_before, ppl_after = math.exp(1008 / 508), math.exp(1040 / 508)
    assert g["ppl_before"] == pytest.approx(ppl_before) and g["ppl_after"] == pytest.approx(
        ppl_after
    )
    assert g["ppl_drawdown"] == pytest.approx((ppl_after - ppl_before) / ppl_before)
    assert g["ppl_increase"] == pytest.approx(ppl_after - ppl_before)
    assert "ppl_before" not in summarize(before, after)
    with pytest.raises(MendError):
        summarize(before, after[:2])


def _own_continuation(model, tok) -> tuple[list[int], list[int], str]:
    """(prompt ids, greedy continuation ids, its text) for a corpus prompt whose greedy
    continuation (some of its first tokens) tokenises back in context."""
    for line in corpus()[::7]:
        prompt = " ".join(line.split()[:5])
        x = tok(prompt)["input_ids"]
        y = model.generate(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x)),
                           max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
        y = y[0, len(x) :].tolist()
        for k in range(len(y), 1, -1):
            new = tok.decode(x + y[:k])[len(tok.decode(x)) :]
            if new[:1] == " " and encode(tok, prompt, new, 64)[0] == x + y[:k]:
                return x, y[:k], new
    raise AssertionError("no greedy continuation of the tiny model tokenises back")


def test_continuation_scores_of_the_models_own_greedy_continuation(lm):
    model, tok = lm
    x, y, new = _own_continuation(model, tok)
    prompt = tok.decode(x)
    own = continuation_scores(model, tok, EditRequest(prompt, new))
    assert own["all_correct"] and own["greedy_exact"] and own["token_acc"] == 1.0
    logits = model(input_ids=torch.tensor([x + y])).logits[0, len(x) - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(y)).item()
    assert own["nll"] == pytest.approx(nll, rel=1e-5)
    other = continuation_scores(model, tok, EditRequest(prompt, " red blue green stone"))
    assert not other["all_correct"] and not other["greedy_exact"] and other["token_acc"] < 1.0


def test_evaluate_generation_no_edit_changes_nothing_and_ft_edits(raw_file, lm):
    model, tok = lm
    records, _ = build_records(model, tok, raw_file, BuildConfig(**(CFG.__dict__ | {"limit": 4})),
                               progress=False)  # fmt: skip
    requests = [EditRequest(r["prompt"], r["target"]) for r in records]
    text = raw_file.read_text()
    held = text[heldout_start(text) :]
    none = evaluate_generation(model, tok, NoEdit(model), requests, held, 2, progress=False)
    g = none["generation"]
    assert g["nll_lowered"] == 0.0 and g["ppl_after"] == pytest.approx(g["ppl_before"], rel=1e-6)
    assert g["edit_success"] == g["pre"]["edit_success"] and g["windows_per_edit"] == 2
    assert g["ppl_tokens"] == 4 * 2 * 63 and none["rewrite_acc"] == g["edit_success"]
    ft = FTEditor(model, tok, lr=1e-2, max_steps=40)
    g = evaluate_generation(model, tok, ft, requests, held, 2, progress=False)["generation"]
    assert g["nll_lowered"] == 1.0 and g["edit_success"] > g["pre"]["edit_success"]
    assert g["ppl_after"] != g["ppl_before"]


def test_the_wikitext_recipe_trains_on_built_records(raw_file, lm, tmp_path):
    from mend.training.loop import train
    from mend.training.recipe import load_recipe

    model, tok = lm
    records, _ = build_records(model, tok, raw_file, CFG, progress=False)
    write_records(tmp_path / "train.jsonl", records)
    data = load_requests(tmp_path / "train.jsonl")
    cfg = load_recipe("wikitext").config
    assert cfg.key_text is None and cfg.schedule.minutes == 40
    for key, value in [("schedule.minutes", None), ("schedule.max_steps", 4),
                       ("schedule.val_every", 2), ("schedule.val_edits", 4),
                       ("editor.rank", 8), ("speed.lower_precision", "fp32")]:  # fmt: skip
        cfg = cfg.override(key, value)
    summary = train(model, tok, data[:-4], data[-4:], cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 4
    # validation scored the prefix, its truncated paraphrase and another article's passage
    assert {"rewrite_acc", "rephrase_acc", "locality_acc"} <= set(summary["best_val"])
