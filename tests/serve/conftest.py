"""Fixtures for the Triton server tests: a tiny ONNX build with a tokenizer, a real tritonserver on
127.0.0.1 (a free port) started and stopped here, and a check that no process outlives it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import psutil
import pytest

from tests.test_samples import write_word_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MAX_CONTEXT = 64


def load_client():
    spec = importlib.util.spec_from_file_location("g3_client", ROOT / "samples" / "client.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def triton_install():
    from g3export.serving.server import ServerError, find_tritonserver

    try:
        return find_tritonserver()
    except ServerError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_text_build(hf_tiny_causal, tmp_path_factory) -> Path:
    from click.testing import CliRunner
    from g3export.cli import main

    _, src = hf_tiny_causal
    ck = tmp_path_factory.mktemp("serve_ck") / "tiny"
    shutil.copytree(src, ck)
    write_word_tokenizer(ck / "tokenizer.json")
    out = tmp_path_factory.mktemp("serve_builds") / "tiny-onnx"
    r = CliRunner().invoke(main, ["build", "--checkpoint", str(ck), "--target", "onnx",
                                  "--max-context", str(MAX_CONTEXT), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def assert_gone(procs: list[psutil.Process]) -> None:
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


def start_server(build: Path, repo: Path, triton_install, max_batch: int):
    from g3export.serving.repo import write_repository
    from g3export.serving.server import TritonServer

    write_repository(build, repo, max_batch=max_batch, default_max_tokens=16)
    return TritonServer(repo, install=triton_install).start(timeout=180)


@pytest.fixture(scope="module")
def tiny_server(tiny_text_build, tmp_path_factory, triton_install):
    """A server with 2 slots over the tiny build; stopped (and checked) after the module."""
    server = start_server(tiny_text_build, tmp_path_factory.mktemp("repo"), triton_install, 2)
    procs = tree(server.proc.pid)
    assert any("triton_python_backend_stub" in " ".join(p.cmdline()) for p in procs)
    yield server
    server.stop()
    assert_gone(procs)
