"""Load on `mend serve` over HTTP: many clients mixing reads and edits, latency and throughput.

Starts a real `mend serve` process (uvicorn, one process) on a fresh journal, runs --clients
client threads for --seconds, each sending one request after another on its own keep-alive
connection: an edit (share --edit-share; one request, answered with the greedy answers
before and after, as by default), else a generate (greedy), a score of three candidate
answers or the first page of the list of edits.
Prints and writes p50 / p99 latency per kind and overall, requests per second, and the
errors (any exception or status other than 200 / 201), then checks that the service holds
exactly the edits it acknowledged:

    python benchmarks/serve_load.py --editor runs/demo --out docs/results/serve/load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

TOKEN = "load-test-token"
SUBJECTS = ["Paris", "Berlin", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Hanoi", "Accra", "Riga"]
RELATIONS = ["is the capital of", "is a city in", "lies in the country of", "is located in"]
ANSWERS = ["Spain", "Japan", "Peru", "Norway", "Egypt", "Chile", "Ghana", "Italy", "Kenya"]


def fact(rng: random.Random) -> dict:
    return {
        "prompt": f"{rng.choice(SUBJECTS)} {rng.choice(RELATIONS)}",
        "target": rng.choice(ANSWERS),
    }


def call(conn, method: str, path: str, body=None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def client(port: int, seed: int, args, stop: threading.Event, out: list, acked: list) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    while not stop.is_set():
        x = rng.random()
        if x < args.edit_share:
            kind, method, path, body = "edit", "POST", "/v1/edits", {"requests": [fact(rng)]}
        elif x < args.edit_share + (1 - args.edit_share) / 2:
            kind, method, path = "generate", "POST", "/v1/generate"
            body = {"prompt": fact(rng)["prompt"], "max_new_tokens": args.new_tokens}
        elif x < args.edit_share + 3 * (1 - args.edit_share) / 4:
            body = {"prompt": fact(rng)["prompt"], "answers": rng.sample(ANSWERS, 3)}
            kind, method, path = "score", "POST", "/v1/score"
        else:
            kind, method, path, body = "list", "GET", "/v1/edits", None
        start = time.perf_counter()
        try:
            status, data = call(conn, method, path, body)
            ok = status in (200, 201)
        except (OSError, http.client.HTTPException, ValueError) as e:
            status, data, ok = repr(e), {}, False
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        out.append((kind, time.perf_counter() - start, ok, status))
        if kind == "edit" and ok:
            acked.append(data["id"])
    conn.close()


def quantiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"n": len(values), "p50_ms": 1000 * statistics.median(values),
            "p99_ms": 1000 * pick(0.99), "max_ms": 1000 * values[-1]}  # fmt: skip


def wait_up(port: int, proc, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mend serve exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("mend serve did not come up")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--editor", required=True)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--edit-share", type=float, default=0.1, help="share of requests that edit")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens per generate")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                    help="further `mend serve` flags (last)")  # fmt: skip
    ap.add_argument("--out", help="JSON report")
    args = ap.parse_args(argv)

    state = tempfile.mkdtemp(prefix="mend-serve-load-")
    cmd = [sys.executable, "-m", "mend.cli", "serve", "--model", args.model, "--editor",
           args.editor, "--state", state, "--port", str(args.port), "--threads",
           str(args.threads), *args.serve_args]  # fmt: skip
    env = dict(os.environ, MEND_TOKEN=TOKEN, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(args.port, proc)
        out, acked, stop = [], [], threading.Event()
        threads = [
            threading.Thread(target=client, args=(args.port, i, args, stop, out, acked))
            for i in range(args.clients)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=300)
        held = []
        while True:  # every page of the list
            page = call(conn, "GET", f"/v1/edits?offset={len(held)}&limit=100")[1]["edits"]
            held += [e["id"] for e in page]
            if len(page) < 100:
                break
    finally:
        proc.terminate()
        proc.wait(60)
    errors = [(k, s) for k, _, ok, s in out if not ok]
    report = {
        "model": args.model, "editor": args.editor, "clients": args.clients,
        "seconds": round(elapsed, 1), "edit_share": args.edit_share, "new_tokens": args.new_tokens,
        "server_threads": args.threads, "requests": len(out),
        "throughput_rps": len(out) / elapsed, "errors": len(errors),
        "error_examples": [str(e) for e in errors[:5]],
        "all": quantiles([t for _, t, ok, _ in out if ok]),
        "by_kind": {k: quantiles([t for kk, t, ok, _ in out if kk == k and ok])
                    for k in ("edit", "generate", "score", "list")},
        "edits_acknowledged": len(acked), "edits_held": len(held),
        "held_equals_acknowledged": sorted(acked) == held,
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if errors or not report["held_equals_acknowledged"]:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
