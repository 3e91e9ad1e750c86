"""The real 270M (ONNX, CPU) through a real tritonserver: 8 concurrent greedy streams, some past
the 512-token window, each equal to generate() batch 1. Slow: builds the 270M once (minutes;
G3EXPORT_270M_ONNX=DIR reuses an existing build, `g3export build --size 270m --target onnx`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import assert_gone, start_server, tree
from .test_triton_server import run_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def build_270m(tmp_path_factory) -> Path:
    given = os.environ.get("G3EXPORT_270M_ONNX")
    if given:
        return Path(given)
    from click.testing import CliRunner
    from g3export.cli import main

    out = tmp_path_factory.mktemp("real270m") / "build"
    r = CliRunner().invoke(main, ["build", "--size", "270m", "--target", "onnx",
                                  "--max-context", "1024", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_270m_concurrent_streams_equal_generate(build_270m, tmp_path, triton_install):
    from g3export.runtimes.generate import generate
    from g3export.runtimes.ort_session import OrtSession
    from g3export.runtimes.prompt import build_prompt_ids
    from g3export.runtimes.tokenizer import Tokenizer

    session = OrtSession.from_build(build_270m)
    tok = Tokenizer.from_json_file(build_270m / "tokenizer.json")
    words = "the quick brown fox jumps over the lazy dog and keeps running ".split()
    texts = [" ".join(words * (1 + 9 * i))[: 40 + 500 * i] + " What animal is this about?"
             for i in range(8)]  # 10..~750 tokens: the longer ones past the 512 window
    prompts = [build_prompt_ids(tok, session.config, t) for t in texts]
    assert max(map(len, prompts)) > 512
    want = [generate(session, p, 8).token_ids for p in prompts]
    del session  # the server's process loads its own copy
    __import__("gc").collect()
    server = start_server(build_270m, tmp_path / "repo", triton_install, 4)
    procs = tree(server.proc.pid)
    try:
        got = run_all(server.url, [{"input_ids": p, "max_tokens": 8} for p in prompts])
    finally:
        server.stop()
    assert_gone(procs)
    assert [g[0] for g in got] == want
