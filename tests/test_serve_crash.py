"""A `mend serve` process killed mid-stream of edits comes back with every acknowledged edit,
once, and the weights of those edits made in order, bit for bit."""

from __future__ import annotations

import threading
import time

import torch
from conftest import fact_requests
from serve_helpers import free_port, get, post, start_server, tiny_folders

from mend.edit import MendEditor
from mend.models import load_model
from mend.sequence import EditSequence
from mend.serve import Engine, Journal
from mend.serve.engine import digest
from mend.types import EditRequest


def _stream(port: int, facts: list[EditRequest], acked: list, sent: list, done: threading.Event):
    """Post one edit after another until the server dies; `acked`: (id, fact index)."""
    try:
        for i, f in enumerate(facts):
            sent.append(i)
            body = {"requests": [{"prompt": f.prompt, "target": f.target}]}
            status, made = post(port, "/v1/edits", body)
            assert status == 201
            acked.append((made["id"], i))
    except OSError:
        pass  # killed
    finally:
        done.set()


def test_sigkill_mid_stream_loses_no_acknowledged_edit(tokenizer, tmp_path):
    model_dir, editor_dir = tiny_folders(tmp_path, tokenizer)
    state, log, port = tmp_path / "state", tmp_path / "serve.log", free_port()
    facts = fact_requests(30, seed=7)
    proc = start_server(model_dir, editor_dir, state, port, log)
    acked, sent, done = [], [], threading.Event()
    try:
        streamer = threading.Thread(target=_stream, args=(port, facts, acked, sent, done))
        streamer.start()
        while len(acked) < 8 and not done.is_set():
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no shutdown code runs
        proc.wait(30)
        streamer.join(60)
    finally:
        proc.kill()
    assert done.is_set() and 8 <= len(acked) < len(facts), (len(acked), log.read_text())

    proc = start_server(model_dir, editor_dir, state, port, log)
    try:
        listed = get(port, "/v1/edits")["edits"]
        served = get(port, "/v1/state")
    finally:
        proc.kill()
        proc.wait(30)
    ids = [e["id"] for e in listed]
    assert ids == sorted(set(ids))  # each once, in order
    assert [i for i, _ in acked] == ids[: len(acked)]  # every acknowledged edit
    # at most the edit in flight at the kill: committed, its answer never sent
    assert len(ids) - len(acked) in (0, 1)
    order = [i for _, i in acked] + ([sent[-1]] if len(ids) > len(acked) else [])
    for entry, i in zip(listed, order, strict=True):
        assert (entry["requests"][0]["prompt"], entry["requests"][0]["target"]) == (
            facts[i].prompt,
            facts[i].target,
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server ran
    try:
        model, tok = load_model(str(model_dir))
        reference = EditSequence(MendEditor.from_pretrained(editor_dir, model, tok))
        for i in order:
            reference.edit([EditRequest(facts[i].prompt, facts[i].target)])
        want = {p.name: p.weight.detach() for p in reference.method.params}
        model, tok = load_model(str(model_dir))
        replayed = Engine(MendEditor.from_pretrained(editor_dir, model, tok), Journal(state))
        got = {p.name: p.weight.detach() for p in replayed.editor.params}
    finally:
        torch.set_num_threads(threads)
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    assert served["weights_sha256"] == digest(reference.checksums()["edited"])
    assert served["weights_sha256"] != served["base_sha256"]
    print(
        f"\nkilled after {len(acked)} acknowledged edits ({len(ids) - len(acked)} more "
        f"committed unanswered); replayed {len(ids)}: weights sha256 {served['weights_sha256'][:16]}"
        " equal to the reference's"
    )
