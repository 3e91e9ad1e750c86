"""A real tritonserver serving a tiny ONNX build through `g3export triton-repo`'s repository:
streamed greedy tokens equal generate() batch 1, cancellation frees a slot, bad requests get an
error while the others finish, SIGINT stops everything within seconds."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from .conftest import MAX_CONTEXT, ROOT, assert_gone, load_client, start_server, tree

client = load_client()


def stream_ids(url, body):
    ids, text = [], []
    for ev in client.generate_stream(url, body):
        ids += client.ids_of(ev)
        text.append(ev.get("text_output", ""))
    return ids, "".join(text)


def run_all(url, bodies, timeout=600):
    """Every body at once, one thread each; -> [(ids, text) or ServerError]."""
    out = [None] * len(bodies)

    def one(i):
        try:
            out[i] = stream_ids(url, bodies[i])
        except client.ServerError as e:
            out[i] = e
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out


@pytest.fixture(scope="module")
def reference(tiny_text_build):
    from g3export.runtimes.ort_session import OrtSession
    from g3export.runtimes.tokenizer import Tokenizer

    return (OrtSession.from_build(tiny_text_build),
            Tokenizer.from_json_file(tiny_text_build / "tokenizer.json"))


def test_concurrent_streams_equal_generate(tiny_server, reference):
    from g3export.runtimes.generate import generate
    from g3export.runtimes.prompt import build_prompt_ids

    session, tok = reference
    rng = np.random.default_rng(1)
    # 8 prompts of 3..38 tokens (the window is 8): more requests than the server's 2 slots
    prompts = [[2, *rng.integers(3, 512, size=2 + 5 * i).tolist()] for i in range(8)]
    bodies = [{"input_ids": p, "max_tokens": 12} for p in prompts]
    text = "tell me a story about cats and dogs"
    bodies.append({"text_input": text, "max_tokens": 10})
    got = run_all(tiny_server.url, bodies)
    for p, g in zip(prompts, got[:8]):
        assert g[0] == generate(session, p, 12).token_ids
    ids = build_prompt_ids(tok, session.config, text)
    want = generate(session, ids, 10).token_ids
    assert got[8][0] == want and got[8][1] == tok.decode(want)


def test_bad_requests_get_errors_while_others_finish(tiny_server, reference):
    from g3export.runtimes.generate import generate

    good = [2, 10, 11, 12]
    bodies = [{"input_ids": good, "max_tokens": 8},
              {"input_ids": [2] * MAX_CONTEXT, "max_tokens": 4},            # too long
              {"input_ids": good, "temperature": -1.0},                      # bad sampling
              {"input_ids": good, "top_p": 1.5},
              {"max_tokens": 4},                                             # no input
              {"input_ids": good, "text_input": "hello"},                    # both
              {"input_ids": [2, 99999]},                                     # id out of range
              {"input_ids": good, "max_tokens": 8}]
    got = run_all(tiny_server.url, bodies)
    want = generate(reference[0], good, 8).token_ids
    assert got[0][0] == want and got[7][0] == want
    msgs = [str(g) for g in got[1:7]]
    assert all(isinstance(g, client.ServerError) for g in got[1:7]), got
    assert "context" in msgs[0] and "temperature" in msgs[1] and "top_p" in msgs[2]
    assert "exactly one" in msgs[3] and "exactly one" in msgs[4] and "range" in msgs[5]
    assert all("\n" not in m for m in msgs)


def test_cancelled_stream_frees_its_slot(tiny_server):
    # both slots taken by long streams; the clients close after the first token
    for _ in range(2):
        gen = client.generate_stream(tiny_server.url, {"input_ids": [2, 5, 6], "max_tokens": 55})
        next(gen)
        gen.close()
    t = time.monotonic()
    # two more, which need both slots: served only if the cancelled ones were freed
    got = run_all(tiny_server.url, [{"input_ids": [2, 7], "max_tokens": 3}] * 2)
    assert all(len(g[0]) >= 1 for g in got), got
    assert time.monotonic() - t < 60


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_serve_cli_stops_on_sigint(tiny_text_build, triton_install, inherited):
    """`inherited=ignored`: started the way `cmd &` in a non-interactive shell starts it (CI
    scripts), with SIGINT ignored, which Python keeps unless told otherwise."""
    from g3export.serving.server import free_port

    port = free_port()
    disposition = signal.SIG_IGN if inherited == "ignored" else signal.SIG_DFL
    p = subprocess.Popen([sys.executable, "-m", "g3export.cli", "serve", str(tiny_text_build),
                          "--port", str(port), "--max-batch", "1"],
                         stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    procs = []
    try:
        line = ""
        deadline = time.monotonic() + 180
        while "serving" not in line and time.monotonic() < deadline:
            line = p.stderr.readline()
            assert line or p.poll() is None, "g3export serve exited"
        assert f"http://127.0.0.1:{port}" in line
        # keep reading its stderr, so the child never blocks on a full pipe
        drain = threading.Thread(target=p.stderr.read, daemon=True)
        drain.start()
        ids, _ = stream_ids(f"http://127.0.0.1:{port}", {"input_ids": [2, 5], "max_tokens": 3})
        assert len(ids) >= 1
        procs = tree(p.pid)
        repo = [a for a in procs[1].cmdline() if a.startswith("--model-repository=")][0]
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0 or p.returncode in (1, -signal.SIGINT)
        assert time.monotonic() - t < 15
        assert_gone(procs)
        from pathlib import Path
        assert not Path(repo.split("=", 1)[1]).exists()  # the temporary repository is gone
    finally:
        if p.poll() is None:
            p.kill()
        for q in procs:  # on a failure too: tritonserver runs in a session of its own
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass


def test_generate_endpoint_with_stream_false(tiny_server, reference):
    import json
    import urllib.request

    from g3export.runtimes.generate import generate

    body = {"input_ids": [2, 5, 6], "max_tokens": 6, "stream": False}
    req = urllib.request.Request(tiny_server.url + "/v2/models/gemma3/generate",
                                 data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    want = generate(reference[0], [2, 5, 6], 6).token_ids
    assert client.ids_of(out) == want and out["text_output"] == reference[1].decode(want)
