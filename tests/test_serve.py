"""`mend serve`'s API in process: edits, removals, the journal's replay, refusals, auth."""

from __future__ import annotations

import logging
import sqlite3
import threading

import pytest
import torch
from conftest import fact_requests, make_tokenizer
from fastapi.testclient import TestClient
from serve_helpers import TOKEN, ZWSP, drop_zwsp, tiny_editor

from mend.cli import main
from mend.errors import MendError
from mend.serve import Engine, Journal, RWLock, create_app, load_token
from mend.serve.schema import (
    MAX_ANSWERS,
    MAX_BODY_BYTES,
    MAX_NEW_TOKENS,
    MAX_PAGE,
    MAX_PROMPT_CHARS,
    MAX_REQUESTS,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def tok():
    return drop_zwsp(make_tokenizer("bpe"))


def _fact(i: int) -> dict:
    r = fact_requests(12, seed=5)[i]
    return {"prompt": r.prompt, "target": r.target, "rephrases": list(r.rephrases)}


def _serve(tok, folder, **kw):
    engine = Engine(tiny_editor(tok, **kw), Journal(folder))
    return engine, TestClient(create_app(engine, TOKEN))


def _weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {p.name: p.weight.detach().clone() for p in engine.editor.params}


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_edit_list_remove_and_state(tok, tmp_path):
    engine, client = _serve(tok, tmp_path / "state")
    base = client.get("/v1/state").json()
    assert base["edits"] == 0 and base["weights_sha256"] == base["base_sha256"]
    fact = _fact(0)
    asked = [fact["prompt"], *fact["rephrases"]]
    before = [client.post("/v1/generate", json={"prompt": p}).json()["answer"] for p in asked]
    r = client.post("/v1/edits", json={"requests": [fact]}, headers=AUTH)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["id"] == 1 and made["requests"][0]["target"] == fact["target"]
    # the greedy answers before and after, for the prompt and every paraphrase
    assert [a["prompt"] for a in made["answers"]] == asked
    assert [a["before"] for a in made["answers"]] == before
    after = [client.post("/v1/generate", json={"prompt": p}).json()["answer"] for p in asked]
    assert [a["after"] for a in made["answers"]] == after
    # which targets were reached: exactly those the model now scores as its argmax answer
    scored = [
        client.post("/v1/score", json={"prompt": p, "answers": [fact["target"]]}).json()
        for p in asked
    ]
    assert [a["reached"] for a in made["answers"]] == [s["scores"][0]["argmax"] for s in scored]
    assert made["holds"] == [made["answers"][0]["reached"]]
    edited = client.get("/v1/state").json()
    assert edited["edits"] == 1 and edited["weights_sha256"] != base["weights_sha256"]
    assert client.get("/v1/edits").json()["edits"][0]["id"] == 1
    assert client.get("/v1/edits/1").json()["requests"][0]["prompt"] == fact["prompt"]
    r = client.delete("/v1/edits/1", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"removed": 1, "edits": 0}
    after = client.get("/v1/state").json()
    assert after["weights_sha256"] == base["weights_sha256"]  # bit for bit
    assert engine.journal.count() == {"edit": 1, "remove": 1}
    metrics = client.get("/metrics").text
    assert "mend_edits_total 1.0" in metrics and "mend_rollbacks_total 1.0" in metrics
    assert "mend_edits_applied 0.0" in metrics
    assert 'mend_request_seconds_count{route="POST /v1/edits"} 1.0' in metrics


def test_a_restart_replays_the_journal_bit_for_bit(tok, tmp_path):
    engine, client = _serve(tok, tmp_path / "state")
    for i in range(4):
        assert client.post("/v1/edits", json={"requests": [_fact(i)]}, headers=AUTH).is_success
    assert client.delete("/v1/edits/2", headers=AUTH).is_success
    before, state = _weights(engine), client.get("/v1/state").json()
    engine.journal.close()

    again, client = _serve(tok, tmp_path / "state")  # a fresh base model, the same journal
    assert _equal(_weights(again), before)
    assert client.get("/v1/state").json() == state
    assert [e["id"] for e in client.get("/v1/edits").json()["edits"]] == [1, 3, 4]
    r = client.post("/v1/edits", json={"requests": [_fact(5)]}, headers=AUTH)
    assert r.json()["id"] == 5  # ids are never reused
    assert again.journal.count() == {"edit": 5, "remove": 1}


def test_a_journal_of_other_weights_is_refused(tok, tmp_path):
    engine, client = _serve(tok, tmp_path / "state")
    client.post("/v1/edits", json={"requests": [_fact(0)]}, headers=AUTH)
    editor = tiny_editor(tok)
    with torch.no_grad():
        editor.params[0].weight.add_(1e-3)
    with pytest.raises(MendError, match="holds edits of other weights"):
        Engine(editor, Journal(tmp_path / "state"))


def test_an_edit_the_journal_cannot_hold_is_undone(tok, tmp_path, monkeypatch):
    engine, _ = _serve(tok, tmp_path / "state")
    base = _weights(engine)

    def full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(engine.journal, "add_edit", full)
    with pytest.raises(sqlite3.OperationalError):
        engine.edit([fact_requests(1)[0]])
    assert len(engine.seq) == 0 and _equal(_weights(engine), base)
    client = TestClient(create_app(engine, TOKEN), raise_server_exceptions=False)
    r = client.post("/v1/edits", json={"requests": [_fact(0)]}, headers=AUTH)
    assert r.status_code == 500 and "OperationalError" in r.json()["error"]
    assert client.get("/v1/edits").json()["edits"] == [] and _equal(_weights(engine), base)


def _big(n: int) -> str:
    return "The favourite thing of Alice is " * n


# (what is wrong, method, path, JSON body or raw bytes, headers, status, words of the message)
BAD = [
    ("no token", "post", "/v1/edits", {"requests": [_fact(0)]}, {}, 401, "need a token"),
    ("wrong token", "post", "/v1/edits", {"requests": [_fact(0)]},
     {"Authorization": "Bearer nope"}, 401, "wrong token"),
    ("basic auth", "post", "/v1/edits", {"requests": [_fact(0)]},
     {"Authorization": f"Basic {TOKEN}"}, 401, "need a token"),
    ("removal without token", "delete", "/v1/edits/1", None, {}, 401, "need a token"),
    ("empty target", "post", "/v1/edits", {"requests": [{"prompt": "Alice is", "target": ""}]},
     AUTH, 422, "requests.0.target"),
    ("blank target", "post", "/v1/edits", {"requests": [{"prompt": "Alice is", "target": "  "}]},
     AUTH, 422, "empty target"),
    ("target that tokenises to nothing", "post", "/v1/edits",
     {"requests": [{"prompt": "Alice is", "target": ZWSP}]}, AUTH, 422, "tokenises to nothing"),
    ("blank prompt", "post", "/v1/edits", {"requests": [{"prompt": " ", "target": "red"}]},
     AUTH, 422, "empty prompt"),
    ("prompt over the context", "post", "/v1/edits",
     {"requests": [{"prompt": _big(8), "target": "red"}]}, AUTH, 422, "longer than the model's context"),
    ("prompt over the characters", "post", "/v1/edits",
     {"requests": [{"prompt": "a" * (MAX_PROMPT_CHARS + 1), "target": "red"}]}, AUTH, 422,
     "at most 2000 characters"),
    ("blank paraphrase", "post", "/v1/edits",
     {"requests": [{"prompt": "Alice is", "target": "red", "rephrases": [" "]}]}, AUTH, 422,
     "empty prompt"),
    ("second request bad", "post", "/v1/edits",
     {"requests": [_fact(0), {"prompt": "Bob is", "target": ZWSP}]}, AUTH, 422, "request 1"),
    ("unknown field", "post", "/v1/edits", {"requests": [_fact(0)], "alpha": 3}, AUTH, 422,
     "alpha: Extra inputs are not permitted"),
    ("unknown field in a request", "post", "/v1/edits",
     {"requests": [dict(_fact(0), subject="Alice")]}, AUTH, 422, "requests.0.subject"),
    ("no requests", "post", "/v1/edits", {"requests": []}, AUTH, 422, "requests"),
    ("too many requests", "post", "/v1/edits", {"requests": [_fact(0)] * (MAX_REQUESTS + 1)},
     AUTH, 422, f"at most {MAX_REQUESTS} items"),
    ("a number as target", "post", "/v1/edits", {"requests": [{"prompt": "Alice is", "target": 5}]},
     AUTH, 422, "valid string"),
    ("a string as flag", "post", "/v1/edits", {"requests": [_fact(0)], "compare": "yes"}, AUTH,
     422, "compare"),
    ("malformed JSON", "post", "/v1/edits", b'{"requests": [', AUTH, 422, "JSON"),
    ("body over the limit", "post", "/v1/edits", b"x" * (MAX_BODY_BYTES + 1), AUTH, 413,
     f"over {MAX_BODY_BYTES} bytes"),
    ("unknown edit", "get", "/v1/edits/7", None, {}, 404, "no edit 7"),
    ("removing an unknown edit", "delete", "/v1/edits/7", None, AUTH, 404, "no edit 7"),
    ("an edit id that is no number", "delete", "/v1/edits/first", None, AUTH, 422, "edit_id"),
    ("zero new tokens", "post", "/v1/generate", {"prompt": "Alice is", "max_new_tokens": 0},
     {}, 422, "max_new_tokens"),
    ("too many new tokens", "post", "/v1/generate",
     {"prompt": "Alice is", "max_new_tokens": MAX_NEW_TOKENS + 1}, {}, 422, "max_new_tokens"),
    ("prompt and new tokens over the context", "post", "/v1/generate",
     {"prompt": _big(1), "max_new_tokens": 60}, {}, 422, "longer than the model's context"),
    ("temperature without a seed", "post", "/v1/generate",
     {"prompt": "Alice is", "temperature": 0.7}, {}, 422, "give a seed too"),
    ("negative seed", "post", "/v1/generate", {"prompt": "Alice is", "seed": -1}, {}, 422,
     "seed"),
    ("top_p of zero", "post", "/v1/generate", {"prompt": "Alice is", "seed": 1, "top_p": 0},
     {}, 422, "top_p"),
    ("score of a blank answer", "post", "/v1/score", {"prompt": "Alice is", "answers": [" "]},
     {}, 422, "answer 0: empty target"),
    ("score of an answer that tokenises to nothing", "post", "/v1/score",
     {"prompt": "Alice is", "answers": ["red", ZWSP]}, {}, 422, "answer 1: target"),
    ("score of no answers", "post", "/v1/score", {"prompt": "Alice is", "answers": []}, {}, 422,
     "answers"),
    ("score of too many answers", "post", "/v1/score",
     {"prompt": "Alice is", "answers": ["red"] * (MAX_ANSWERS + 1)}, {}, 422,
     f"at most {MAX_ANSWERS} items"),
    ("score without a prompt", "post", "/v1/score", {"answers": ["red"]}, {}, 422,
     "prompt: Field required"),
    ("a page over the limit", "get", f"/v1/edits?limit={MAX_PAGE + 1}", None, {}, 422, "limit"),
    ("a negative offset", "get", "/v1/edits?offset=-1", None, {}, 422, "offset"),
    ("unknown path", "get", "/v1/nothing", None, {}, 404, "Not Found"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "words"),
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])  # fmt: skip
def test_bad_input_is_refused_in_words_and_changes_nothing(
    tok, tmp_path, method, path, body, headers, status, words
):
    engine, client = _serve(tok, tmp_path / "state")
    assert client.post("/v1/edits", json={"requests": [_fact(1)]}, headers=AUTH).is_success
    before, journaled = client.get("/v1/state").json(), engine.journal.count()
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body else {}
    r = client.request(method, path, headers={"Content-Type": "application/json", **headers}, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()
    assert client.get("/v1/state").json() == before
    assert engine.journal.count() == journaled


def test_a_streamed_body_over_the_limit_is_refused(tok, tmp_path):
    engine, client = _serve(tok, tmp_path / "state")
    chunks = (b"x" * 4096 for _ in range(MAX_BODY_BYTES // 4096 + 2))  # no Content-Length
    r = client.post("/v1/edits", content=chunks, headers=AUTH)
    assert r.status_code == 413 and "bytes" in r.json()["error"]
    assert engine.journal.count() == {"edit": 0, "remove": 0}


def test_a_least_squares_editor_removes_only_its_last_edit(tok, tmp_path):
    engine, client = _serve(tok, tmp_path / "state", aggregate="ls", boost=())
    for i in range(2):
        client.post("/v1/edits", json={"requests": [_fact(i)]}, headers=AUTH)
    r = client.delete("/v1/edits/1", headers=AUTH)
    assert r.status_code == 409 and "not the last" in r.json()["error"]
    assert engine.journal.count() == {"edit": 2, "remove": 0}
    assert client.delete("/v1/edits/2", headers=AUTH).is_success
    assert client.delete("/v1/edits/1", headers=AUTH).is_success
    assert client.get("/v1/state").json()["edits"] == 0


def test_without_a_token_writes_are_refused_unless_no_auth(tok, tmp_path, caplog, monkeypatch):
    engine = Engine(tiny_editor(tok), Journal(tmp_path / "state"))
    with caplog.at_level(logging.WARNING, "mend"):
        client = TestClient(create_app(engine, None))
    assert "edits and roll-backs are refused" in caplog.text
    assert client.get("/healthz").json() == {"ok": True, "edits": 0, "writes": "off"}
    for method, path, body in [("post", "/v1/edits", {"requests": [_fact(0)]}),
                               ("delete", "/v1/edits/1", None)]:  # fmt: skip
        for headers in ({}, AUTH):  # no token can open what has no token
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 403 and "takes no edits" in r.json()["error"]
    assert client.post("/v1/generate", json={"prompt": "Alice is"}).status_code == 200  # reads
    assert engine.journal.count() == {"edit": 0, "remove": 0} and len(engine.seq) == 0

    caplog.clear()
    with caplog.at_level(logging.WARNING, "mend"):
        client = TestClient(create_app(engine, None, no_auth=True))
    assert "no auth" in caplog.text
    assert client.get("/healthz").json()["writes"] == "open"
    assert client.post("/v1/edits", json={"requests": [_fact(0)]}).status_code == 201


def test_the_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEND_TOKEN", "from-env")
    (tmp_path / "token").write_text("from-file\n")
    assert load_token(str(tmp_path / "token")) == "from-file"
    assert load_token(None) == "from-env"
    monkeypatch.delenv("MEND_TOKEN")
    assert load_token(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(MendError, match="is empty"):
        load_token(str(tmp_path / "empty"))
    argv = ["serve", "--editor", str(tmp_path), "--state", str(tmp_path / "other"),
            "--token-file", str(tmp_path / "missing")]  # fmt: skip
    assert main(argv) == 2  # before a model is loaded or a journal made
    assert not (tmp_path / "other").exists()


def test_the_page_and_its_files_are_served(tok, tmp_path):
    _, client = _serve(tok, tmp_path / "state")
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from other hosts


def test_readers_never_see_half_an_edit(tok, tmp_path):
    """States read while edits and removals run are always whole: before or after a change."""
    engine = Engine(tiny_editor(tok), Journal(tmp_path / "state"))
    whole = {engine.state()["weights_sha256"]}
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            seen.append(engine.state()["weights_sha256"])

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for i, r in enumerate(fact_requests(6, seed=2)):
            engine.edit([r])
            whole.add(engine.state()["weights_sha256"])  # (the only writer: this state is whole)
            if i % 2:
                engine.remove(engine.seq.records[0].id)
                whole.add(engine.state()["weights_sha256"])
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert len(seen) > 10 and set(seen) <= whole


def test_the_lock_lets_readers_share_and_a_writer_in_alone_first():
    lock, log = RWLock(), []
    reading, release = threading.Event(), threading.Event()

    def reader(name, hold=False):
        with lock.read():
            log.append(f"{name} in")
            if hold:
                reading.set()
                release.wait(5)
            log.append(f"{name} out")

    def writer():
        with lock.write():
            log.append("writer")

    first = threading.Thread(target=reader, args=("r1", True))
    first.start()
    reading.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    while not lock._waiting:  # the writer waits for r1
        pass
    late = threading.Thread(target=reader, args=("r2",))
    late.start()
    late.join(0.2)
    assert late.is_alive() and log == ["r1 in"]  # a later reader waits behind the writer
    release.set()
    for t in (first, w, late):
        t.join(5)
    assert log == ["r1 in", "r1 out", "writer", "r2 in", "r2 out"]


def test_removing_an_edit_gives_the_weights_of_the_other_edits_made_in_order(tok, tmp_path):
    """Bit for bit: edits 1..4 with edit 2 removed, and a fresh service given 1, 3, 4."""
    engine, client = _serve(tok, tmp_path / "a")
    for i in range(4):
        assert client.post("/v1/edits", json={"requests": [_fact(i)]}, headers=AUTH).is_success
    assert client.delete("/v1/edits/2", headers=AUTH).is_success
    never, other = _serve(tok, tmp_path / "b")
    for i in (0, 2, 3):
        assert other.post("/v1/edits", json={"requests": [_fact(i)]}, headers=AUTH).is_success
    assert _equal(_weights(engine), _weights(never))
    assert client.get("/v1/state").json()["weights"] == other.get("/v1/state").json()["weights"]


def test_a_batched_edit_is_one_edit_of_many_requests(tok, tmp_path):
    engine, client = _serve(tok, tmp_path / "state")
    facts = [_fact(i) for i in range(3)]
    made = client.post("/v1/edits", json={"requests": facts}, headers=AUTH).json()
    assert made["id"] == 1 and len(made["holds"]) == 3
    asked = [p for f in facts for p in (f["prompt"], *f["rephrases"])]
    assert [a["prompt"] for a in made["answers"]] == asked
    assert client.get("/v1/edits").json()["total"] == 1
    assert client.delete("/v1/edits/1", headers=AUTH).is_success
    assert client.get("/v1/state").json()["weights_sha256"] == engine.state()["base_sha256"]


def test_the_list_of_edits_is_paged(tok, tmp_path):
    _, client = _serve(tok, tmp_path / "state")
    for i in range(5):
        client.post("/v1/edits", json={"requests": [_fact(i)], "compare": False}, headers=AUTH)
    client.delete("/v1/edits/3", headers=AUTH)
    page = client.get("/v1/edits?offset=1&limit=2").json()
    assert [e["id"] for e in page["edits"]] == [2, 4]
    assert (page["total"], page["offset"], page["limit"]) == (4, 1, 2)
    assert client.get("/v1/edits?offset=4").json()["edits"] == []
    assert [e["id"] for e in client.get("/v1/edits").json()["edits"]] == [1, 2, 4, 5]


def test_generate_is_greedy_or_sampled_the_same_for_the_same_seed(tok, tmp_path):
    engine, client = _serve(tok, tmp_path / "state")

    def gen(**kw) -> str:
        r = client.post("/v1/generate", json={"prompt": "Alice is", "max_new_tokens": 12, **kw})
        assert r.status_code == 200, r.text
        return r.json()["answer"]

    greedy = gen()
    assert gen() == greedy and gen(max_new_tokens=12) == greedy
    sampled = {seed: gen(seed=seed) for seed in range(6)}
    assert all(gen(seed=seed) == text for seed, text in sampled.items())  # same seed, same text
    assert len(set(sampled.values())) > 1  # (a random tiny model: draws differ by seed)
    assert gen(seed=3, temperature=0.5, top_p=0.9) == gen(seed=3, temperature=0.5, top_p=0.9)
    # a nucleus of one token is the argmax every time: greedy decoding
    assert gen(seed=4, top_p=1e-6) == greedy
    assert len(tok(gen(seed=1, max_new_tokens=3))["input_ids"]) <= 3 + 1


def test_score_gives_each_answers_log_probability(tok, tmp_path):
    engine, client = _serve(tok, tmp_path / "state")
    prompt, answers = "The favourite colour of Alice is", ["red", "dark blue", "green tea pot"]
    r = client.post("/v1/score", json={"prompt": prompt, "answers": answers})
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert [s["answer"] for s in scores] == answers
    model = engine.editor.model
    for s in scores:  # the model run on the whole text, token by token
        n = len(tok(prompt)["input_ids"])
        ids = tok(f"{prompt} {s['answer']}", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        want = sum(float(logp[i - 1, ids[0, i]]) for i in range(n, ids.shape[1]))
        assert s["tokens"] == ids.shape[1] - n and s["logprob"] < 0
        assert s["logprob"] == pytest.approx(want, abs=1e-4)
        argmax = all(int(logp[i - 1].argmax()) == ids[0, i] for i in range(n, ids.shape[1]))
        assert s["argmax"] == argmax
    # an edit to "red" that reaches it raises its log-probability
    made = client.post(
        "/v1/edits", json={"requests": [{"prompt": prompt, "target": "red"}]}, headers=AUTH
    ).json()
    again = client.post("/v1/score", json={"prompt": prompt, "answers": ["red"]}).json()
    assert again["scores"][0]["argmax"] == made["holds"][0]
    assert again["scores"][0]["logprob"] > scores[0]["logprob"]


def test_health_docs_openapi_and_metrics(tok, tmp_path):
    _, client = _serve(tok, tmp_path / "state")
    assert client.get("/healthz").json() == {"ok": True, "edits": 0, "writes": "token"}
    assert client.get("/v1/health").status_code == 404  # one health path
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text
    for url in ("/docs/files/swagger-ui-bundle.js", "/docs/files/swagger-ui.css"):
        assert url in docs.text and client.get(url).status_code == 200
    assert "http" not in docs.text and '"validatorUrl": null' in docs.text  # no other host
    spec = client.get("/openapi.json").json()
    routes = {(m.upper(), path) for path, ops in spec["paths"].items() for m in ops}
    assert routes >= {
        ("POST", "/v1/edits"), ("GET", "/v1/edits"), ("GET", "/v1/edits/{edit_id}"),
        ("DELETE", "/v1/edits/{edit_id}"), ("POST", "/v1/generate"), ("POST", "/v1/score"),
        ("GET", "/healthz"), ("GET", "/metrics"),
    }  # fmt: skip
    client.post("/v1/edits", json={"requests": [_fact(0)]}, headers=AUTH)
    client.post("/v1/edits", json={"requests": [_fact(1)]})  # refused: no token
    client.delete("/v1/edits/1", headers=AUTH)
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE mend_request_seconds histogram" in text
    assert 'mend_request_seconds_bucket{le="+Inf",route="POST /v1/edits"} 2.0' in text
    assert "# TYPE mend_edit_seconds histogram" in text and "mend_edit_seconds_count 1.0" in text
    assert "mend_edits_total 1.0" in text and "mend_rollbacks_total 1.0" in text
    assert 'mend_refused_requests_total{status="401"} 1.0' in text
