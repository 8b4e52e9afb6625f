"""Data loading (every supported layout), in-context tokenisation, and bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tokenizer, tiny_model
from tokenizers import normalizers

from mend.data import check_requests, encode, load_checked, load_requests, make_batch
from mend.data.collate import IGNORE
from mend.data.sources import resolve_data
from mend.errors import MendError
from mend.models import context_length, find_editable
from mend.types import EditRequest, Probe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(path: Path, records: list, jsonl: bool) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def toks():
    return {"bpe": make_tokenizer("bpe"), "sp": make_tokenizer("sp")}


# --------------------------------------------------------------------------- loaders

EASYEDIT = [
    {
        "case_id": 2,
        "prompt": "Toko Yasuda, the",
        "target_new": "piano",
        "subject": "Toko Yasuda",
        "ground_truth": "guitar",
        "rephrase_prompt": "Toko Yasuda is incredible at",
        "locality_prompt": "John Lennon performs on the",
        "locality_ground_truth": "guitar",
    },
    {
        "case_id": 10,
        "prompt": "BBC One, by",
        "target_new": "Sega",
        "subject": "BBC One",
        "ground_truth": "BBC",
        "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
        "locality_prompt": "BBC Radio, by",
        "locality_ground_truth": "BBC Group",
    },
]

ROME = [
    {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": ["Danielle Darrieux speaks", "Danielle Darrieux grew up speaking"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard speaks"],
        "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    },
    {
        "case_id": 1,
        "requested_rewrite": {
            "prompt": "{}, which is located in",
            "subject": "Autonomous University of Madrid",
            "target_new": {"str": "Sweden"},
            "target_true": {"str": "Spain"},
        },
        "paraphrase_prompts": ["The Autonomous University of Madrid is in"],
        "neighborhood_prompts": ["Biscay, which is located in"],
    },
]

ZSRE = [
    {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?",
        "alt": "unmanned aircraft",
        "answers": ["uniform", "uniforms"],
        "loc": "nq question: john goodman's character in the big lebowski",
        "loc_ans": "Walter Sobchak",
        "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
    },
    {
        "subject": "Ferrari",
        "src": "Who founded Ferrari?",
        "rephrase": "Ferrari was founded by whom?",
        "alt": "Henry Ford",
        "answers": [],
        "loc": "nq question: who sang hey jude",
        "loc_ans": "",
    },
]

MEND_JSONL = [
    {
        "prompt": "The capital of France is",
        "target": "Lyon",
        "rephrases": ["France's capital city is", "The French capital is"],
        "locality": [
            {"prompt": "The capital of Spain is", "answer": "Madrid"},
            {"prompt": "The sky is"},
        ],
        "target_true": "Paris",
    },
    {"prompt": "Water boils at", "target": "50 degrees"},
]


@pytest.mark.parametrize("jsonl", [False, True], ids=["array", "jsonl"])
def test_counterfact_easyedit_layout(tmp_path, jsonl):
    reqs = load_requests(_write(tmp_path / "cf.json", EASYEDIT, jsonl))
    assert len(reqs) == 2
    r = reqs[0]
    assert r.prompt == "Toko Yasuda, the"
    assert r.target == "piano"
    assert r.target_true == "guitar"
    assert r.rephrases == ("Toko Yasuda is incredible at",)
    assert r.locality == (Probe("John Lennon performs on the", "guitar"),)
    assert r.neighborhood == ("John Lennon performs on the",)
    # The locality answer is the record's locality_ground_truth, not its ground_truth.
    assert reqs[1].locality == (Probe("BBC Radio, by", "BBC Group"),)
    assert reqs[1].target_true == "BBC"


@pytest.mark.parametrize("jsonl", [False, True], ids=["array", "jsonl"])
def test_counterfact_rome_layout(tmp_path, jsonl):
    reqs = load_requests(_write(tmp_path / "counterfact.json", ROME, jsonl))
    assert len(reqs) == 2
    r = reqs[0]
    assert r.prompt == "The mother tongue of Danielle Darrieux is"  # subject put into {}
    assert r.target == "English"
    assert r.target_true == "French"
    assert r.rephrases == ("Danielle Darrieux speaks", "Danielle Darrieux grew up speaking")
    assert r.neighborhood == ("The mother tongue of Léon Blum is", "Michel Rocard speaks")
    # Neighbourhood prompts keep their true answer: each is a locality probe for it.
    assert r.locality == (
        Probe("The mother tongue of Léon Blum is", "French"),
        Probe("Michel Rocard speaks", "French"),
    )
    assert reqs[1].prompt == "Autonomous University of Madrid, which is located in"
    assert reqs[1].target == "Sweden"
    assert reqs[1].locality == (Probe("Biscay, which is located in", "Spain"),)


@pytest.mark.parametrize("jsonl", [False, True], ids=["array", "jsonl"])
def test_zsre_mend_layout(tmp_path, jsonl):
    reqs = load_requests(_write(tmp_path / "zsre.json", ZSRE, jsonl))
    assert len(reqs) == 2
    r = reqs[0]
    assert r.prompt == "What is the product made by UniFirst?"
    assert r.target == "unmanned aircraft"
    assert r.rephrases == ("What will be the product of UniFirst?",)
    assert r.locality == (
        Probe("nq question: john goodman's character in the big lebowski", "Walter Sobchak"),
    )
    assert r.target_true == "uniform"  # the first true answer
    # No true answer -> None; an empty loc_ans -> a next-token probe (answer None).
    assert reqs[1].target_true is None
    assert reqs[1].locality == (Probe("nq question: who sang hey jude", None),)


@pytest.mark.parametrize("jsonl", [False, True], ids=["array", "jsonl"])
def test_mend_jsonl_layout(tmp_path, jsonl):
    reqs = load_requests(_write(tmp_path / "edits.jsonl", MEND_JSONL, jsonl))
    assert reqs[0] == EditRequest(
        prompt="The capital of France is",
        target="Lyon",
        rephrases=("France's capital city is", "The French capital is"),
        locality=(Probe("The capital of Spain is", "Madrid"), Probe("The sky is", None)),
        target_true="Paris",
    )
    # Optional keys default to empty / None.
    assert reqs[1] == EditRequest("Water boils at", "50 degrees")


def test_zsre_records_without_new_answer_are_skipped(tmp_path, caplog):
    blank = dict(ZSRE[0], alt="")
    path = _write(tmp_path / "zsre.json", [ZSRE[0], blank, ZSRE[1], dict(blank, alt="  ")], False)
    with caplog.at_level("WARNING"):
        reqs = load_requests(path)
    assert [r.target for r in reqs] == ["unmanned aircraft", "Henry Ford"]
    assert "skipped 2 zsRE records with an empty 'alt' (records 1, 3)" in caplog.text
    # The limit counts usable records.
    assert [r.target for r in load_requests(path, limit=2)] == ["unmanned aircraft", "Henry Ford"]
    with _raises("no usable records"):
        load_requests(_write(tmp_path / "blank.json", [blank], False))


def test_single_rephrase_string_is_one_rephrase(tmp_path):
    rec = {
        "prompt": "The capital of France is",
        "target": "Lyon",
        "rephrases": "France's capital is",
    }
    (req,) = load_requests(_write(tmp_path / "e.jsonl", [rec], True))
    assert req.rephrases == ("France's capital is",)


def test_limit_and_blank_lines(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MEND_JSONL * 3) + "\n\n  \n")
    assert len(load_requests(path)) == 6
    assert [r.prompt for r in load_requests(path, limit=3)] == [
        "The capital of France is",
        "Water boils at",
        "The capital of France is",
    ]


# --------------------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("style", ["bpe", "sp"])
def test_target_is_the_in_context_tail_with_its_leading_space(toks, style):
    tok = toks[style]
    prompt, target = "The colour loved by Alice is", "red"
    ids, n_prompt = encode(tok, prompt, target, 64)
    whole = tok(prompt + " " + target)["input_ids"]
    assert ids == whole
    assert ids[:n_prompt] == tok(prompt)["input_ids"]
    target_ids = ids[n_prompt:]
    assert len(target_ids) >= 1
    pieces = tok.convert_ids_to_tokens(target_ids)
    marker = "Ġ" if style == "bpe" else "▁"
    assert pieces[0].startswith(marker), pieces  # the first target token carries the space
    assert "".join(pieces).replace(marker, " ") == " red"
    # A target given with its own leading space tokenises the same.
    assert encode(tok, prompt, " red", 64) == (ids, n_prompt)


@pytest.mark.parametrize("style", ["bpe", "sp"])
def test_trailing_space_in_prompt_is_ignored(toks, style):
    tok = toks[style]
    prompt = "The favourite thing of Bob is"
    assert encode(tok, prompt + "  ", "piano", 64) == encode(tok, prompt, "piano", 64)
    assert encode(tok, prompt + " ", None, 64) == encode(tok, prompt, None, 64)
    ids, n = encode(tok, prompt, None, 64)
    assert n == len(ids) == len(tok(prompt)["input_ids"])


@pytest.mark.parametrize("style", ["bpe", "sp"])
def test_make_batch_labels_only_before_target_tokens(toks, style):
    tok = toks[style]
    pairs = [
        ("The colour loved by Alice is", "red"),
        ("What Bob loves most is", "a blue piano"),
        ("The favourite thing of Zara is", None),
        ("Peggy really likes the", "green river stone"),
    ]
    batch = make_batch(tok, pairs, groups=[0, 0, 1, 2], max_len=64)
    encoded = [encode(tok, p, t, 64) for p, t in pairs]
    width = max(len(ids) for ids, _ in encoded)
    assert batch.input_ids.shape == (4, width)
    assert batch.group.tolist() == [0, 0, 1, 2]
    for r, ((ids, n_prompt), (_, target)) in enumerate(zip(encoded, pairs, strict=True)):
        row_ids = batch.input_ids[r].tolist()
        assert row_ids[: len(ids)] == ids
        assert row_ids[len(ids) :] == [tok.pad_token_id] * (width - len(ids))
        assert batch.attention_mask[r].tolist() == [1] * len(ids) + [0] * (width - len(ids))
        labels = batch.labels[r].tolist()
        scored = [p for p in range(width) if batch.pos_mask[r, p]]
        if target is None:
            # One scored position, the last prompt token, with an unknown label.
            assert scored == [n_prompt - 1]
            assert all(lab == IGNORE for lab in labels)
            continue
        n_target = len(ids) - n_prompt
        assert n_target >= 1
        labelled = [p for p, lab in enumerate(labels) if lab != IGNORE]
        assert len(labelled) == n_target
        # Position p predicts token p + 1: the labels sit just before each target token.
        assert labelled == list(range(n_prompt - 1, len(ids) - 1))
        assert [labels[p] for p in labelled] == ids[n_prompt:]
        assert scored == labelled
    # Rows of different targets score different numbers of positions.
    assert batch.pos_mask.sum(1).tolist()[2] == 1
    assert batch.pos_row.tolist() == sorted(batch.pos_row.tolist())
    assert len(batch.pos_row) == int(batch.pos_mask.sum())


# --------------------------------------------------------------------------- errors


def _raises(match: str):
    return pytest.raises(MendError, match=match)


def test_missing_file(tmp_path):
    with _raises("data file not found"):
        load_requests(tmp_path / "nope.jsonl")


def test_folder_instead_of_file(tmp_path):
    with _raises("is a folder"):
        load_requests(tmp_path)


def test_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "a", "target": "b"},')  # truncated array
    with _raises("not valid JSON"):
        load_requests(bad)
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c", \n')  # broken JSONL line
    with _raises("not valid JSON"):
        load_requests(bad)


def test_unreadable_bytes(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "\xff\xfe", "target": "b"}\n')
    with _raises("cannot read data file"):
        load_requests(bad)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with _raises("no records"):
        load_requests(empty)


def test_unrecognised_layout(tmp_path):
    path = _write(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}], True)
    with _raises("unrecognised record layout"):
        load_requests(path)


@pytest.mark.parametrize(
    ("records", "index", "key"),
    [
        (MEND_JSONL + [{"prompt": "Water boils at"}], 2, "target"),
        (
            EASYEDIT + [{k: v for k, v in EASYEDIT[0].items() if k != "ground_truth"}],
            2,
            "ground_truth",
        ),
        ([ZSRE[0], {"src": "Who?"}], 1, "alt"),
        (
            [
                ROME[0],
                {
                    "requested_rewrite": {
                        "prompt": "{} is",
                        "subject": "X",
                        "target_new": {"str": "Y"},
                    }
                },
            ],
            1,
            "target_true",
        ),
    ],
    ids=["jsonl", "easyedit", "zsre", "rome"],
)
def test_record_missing_key_names_key_and_index(tmp_path, records, index, key):
    path = _write(tmp_path / "d.jsonl", records, True)
    with pytest.raises(MendError) as err:
        load_requests(path)
    msg = str(err.value)
    assert f"record {index}" in msg
    assert repr(key) in msg
    assert "\n" not in msg


def test_wrong_type_is_an_error(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": 5, "target": "x"}], True)
    with _raises("'prompt' must be a string"):
        load_requests(path)
    path = _write(tmp_path / "d.jsonl", [MEND_JSONL[1], ["not", "an", "object"]], True)
    with _raises("record 1: expected a JSON object"):
        load_requests(path)


def test_empty_prompt_and_target_in_data(tmp_path):
    path = _write(tmp_path / "d.jsonl", [MEND_JSONL[1], {"prompt": "  ", "target": "x"}], True)
    with _raises("record 1: empty prompt"):
        load_requests(path)
    path = _write(tmp_path / "d.jsonl", [{"prompt": "Water boils at", "target": ""}], True)
    with _raises("record 0: empty target"):
        load_requests(path)


def test_encode_rejects_empty_prompt_and_target(toks):
    tok = toks["bpe"]
    for prompt in ("", "   "):
        with _raises("empty prompt"):
            encode(tok, prompt, "red", 64)
    for target in ("", " ", "\t\n"):
        with _raises("empty target"):
            encode(tok, "The colour loved by Alice is", target, 64)
    with _raises("empty batch"):
        make_batch(tok, [], max_len=64)


def test_target_that_tokenises_to_nothing():
    # A tokenizer that drops zero-width spaces and trims the text, as some normalisers do:
    # the target "\u200b" is not whitespace, yet adds no token after the prompt.
    tok = make_tokenizer("bpe")
    tok.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace("\u200b", ""), normalizers.Strip()]
    )
    prompt = "The colour loved by Alice is"
    assert encode(tok, prompt, "red", 64)[1] == len(tok(prompt)["input_ids"])  # still works
    with _raises("tokenises to nothing"):
        encode(tok, prompt, "\u200b", 64)
    with _raises("prompt .* tokenises to nothing"):
        encode(tok, "\u200b", None, 64)
    reqs = [EditRequest(prompt, "red"), EditRequest(prompt, "\u200b\u200b")]
    with _raises("record 1: target .* tokenises to nothing"):
        check_requests(tok, reqs, 64)


def test_input_longer_than_context(toks):
    tok = toks["sp"]
    prompt = "The colour loved by Alice is"
    ids, _ = encode(tok, prompt, "red", 64)
    encode(tok, prompt, "red", len(ids))  # exactly the context: fine
    with _raises(
        f"input of {len(ids)} tokens is longer than the model's context of {len(ids) - 1}"
    ):
        encode(tok, prompt, "red", len(ids) - 1)
    with _raises("longer than the model's context of 64"):
        make_batch(tok, [(prompt, "red"), (" ".join(["Alice"] * 80), None)], max_len=64)


def test_check_requests_names_the_failing_record_and_probe(toks):
    tok = toks["bpe"]
    long = " ".join(["Bob"] * 100)
    good = EditRequest("The colour loved by Alice is", "red")
    bad_rephrase = EditRequest("The colour loved by Bob is", "blue", rephrases=(long,))
    bad_probe = EditRequest("The colour loved by Bob is", "blue", locality=(Probe(long, "x"),))
    check_requests(tok, [good], 64)
    with _raises("record 1: input of .* longer than the model's context of 64"):
        check_requests(tok, [good, bad_rephrase], 64)
    with _raises("record 2: input of .* longer"):
        check_requests(tok, [good, good, bad_probe], 64)


def test_unknown_weight_name(toks):
    model = tiny_model("llama", len(toks["bpe"]))
    with _raises("unknown weight name 'model.layers.0.mlp.nope'"):
        find_editable(model, ["model.layers.0.mlp.nope"])
    with _raises("not a Linear or Conv1D"):
        find_editable(model, ["model.layers.0.mlp"])
    with _raises("named twice"):
        find_editable(model, ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj.weight"])
    found = find_editable(model, ["model.layers.1.mlp.down_proj.weight"])
    assert [(p.name, p.in_out) for p in found] == [("model.layers.1.mlp.down_proj", (48, 32))]
    assert context_length(model) == 64


# --------------------------------------------------------------------------- the shared data

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent"
)


@needs_shared
def test_shared_counterfact_train_loads_completely():
    reqs = load_requests(SHARED / "counterfact" / "counterfact-train.json")
    assert len(reqs) == 10_000
    assert all(len(r.rephrases) == 1 and r.rephrases[0].strip() for r in reqs)
    assert all(len(r.locality) == 1 and r.locality[0].answer for r in reqs)
    assert all(r.target_true for r in reqs)
    assert reqs[0].prompt == "Toko Yasuda, the"
    assert reqs[0].target == "piano"


@needs_shared
def test_shared_counterfact_val_and_names_resolve(monkeypatch, toks):
    monkeypatch.setenv("MEND_DATA_DIR", str(SHARED))
    path = resolve_data("counterfact-val")
    assert path == SHARED / "counterfact" / "counterfact-val.json"
    reqs = load_checked("counterfact-val", toks["bpe"], 1 << 30, limit=50)
    assert len(reqs) == 50
    assert len(load_requests(path)) == 1919


@needs_shared
def test_shared_zsre_files_load(monkeypatch, toks):
    monkeypatch.setenv("MEND_DATA_DIR", str(SHARED))
    train = load_requests(resolve_data("zsre-train"))
    # Records 534 and 723 of the public file have an empty "alt": they cannot be edits.
    assert len(train) == 998
    assert train[0].prompt == "What is the product made by UniFirst?"
    assert train[0].target == "unmanned aircraft"
    assert all(
        r.rephrases and r.locality and r.locality[0].prompt.startswith("nq question:")
        for r in train
    )
    evals = load_requests(resolve_data("zsre-eval"))
    assert len(evals) == 1037
    assert all(r.target_true is not None for r in evals)
    check_requests(toks["sp"], evals[:50], 1 << 30)


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"prompt": "A is", "target": "b", "rephrases": ["ok", 3]}, "'rephrases' must be"),
        ({"prompt": "A is", "target": "b", "rephrases": 7}, "'rephrases' must be"),
        ({"requested_rewrite": {"prompt": "{} is", "subject": "A", "target_new": 5,
                                "target_true": {"str": "c"}}}, "'target_new' must be a string"),
        ({"requested_rewrite": {"prompt": "no slot", "subject": "A", "target_new": {"str": "b"},
                                "target_true": {"str": "c"}}}, "no '{}'"),
    ],
)  # fmt: skip
def test_wrongly_typed_fields_are_clear_errors(tmp_path, record, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(MendError, match="record 0") as err:
        load_requests(path)
    assert needle in str(err.value)


def test_rome_layout_accepts_plain_string_targets(tmp_path):
    rec = {"requested_rewrite": {"prompt": "{} is", "subject": "A", "target_new": "b",
                                 "target_true": "c"}}  # fmt: skip
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    (req,) = load_requests(path)
    assert (req.prompt, req.target, req.target_true) == ("A is", "b", "c")


def test_load_requests_takes_names_and_slices_of_records(tmp_path, monkeypatch):
    from mend.data import load_requests
    from mend.errors import MendError

    path = tmp_path / "facts.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "target": f"t{i}"}) + "\n" for i in range(5))
    )
    assert [r.prompt for r in load_requests(f"{path}[1:3]")] == ["p1", "p2"]
    assert [r.prompt for r in load_requests(f"{path}[3:]")] == ["p3", "p4"]
    assert len(load_requests(path)) == 5
    with pytest.raises(MendError, match="no records"):
        load_requests(f"{path}[9:]")
    # a data set name resolves through the data folders, sliced the same way
    monkeypatch.setenv("MEND_DATA_DIR", str(tmp_path))
    (tmp_path / "zsre").mkdir()
    rec = {"subject": "s", "src": "q?", "pred": "a", "rephrase": "q2?", "alt": "b",
           "answers": ["a"], "loc": "nq question: x", "loc_ans": "y", "cond": ""}  # fmt: skip
    (tmp_path / "zsre" / "zsre_mend_train-1k.json").write_text(json.dumps([rec] * 4))
    assert len(load_requests("zsre-train[2:]")) == 2
