"""Shared pieces of the hostile-input suite (issue 15): run the CLI as a user would, assert the
properties every bad input must have, and one tiny random-weight build per test session.

Every case asserts the same contract: a non-zero exit, exactly one line `Error: ...` (or click's
usage error, exit 2) on stderr, no "Traceback", within a time limit, and nothing written or
removed outside the paths the case gave (a snapshot of the tree before and after).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from g3export.cli import main; main()"]


def cli(*args, cwd=None, timeout=120, env=None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (argv bytes, signals, FIFOs and the real exit path)."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, timeout=timeout, env=e)


def invoke(*args):
    """The CLI in-process (click's runner): for cases that need no fresh process."""
    from g3export.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not progress output of a run that got far enough to print."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and not ln.startswith(("loading ", "checking", "exporting", "hashing"))]


def assert_refused(result, *words, code=None):
    """A non-zero exit with one error line naming `words`, and no traceback."""
    if isinstance(result, subprocess.CompletedProcess):
        rc, err = result.returncode, result.stderr.decode("utf-8", "replace")
    else:
        rc, err = result.exit_code, result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            repr(result.exception)
    assert "Traceback" not in err, err
    assert rc != 0, err
    if code is not None:
        assert rc == code, (rc, err)
    lines = error_lines(err)
    if rc == 2:  # click's usage error: "Usage: ...", "Try ...", blank, "Error: ..."
        lines = [ln for ln in lines if ln.startswith("Error:")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under roots with its type, size and mtime: compare before/after a case."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                p = Path(dirpath) / n
                st = p.lstat()
                out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> Path:
    """One tiny random-weight ONNX build (context 64), shared: cases only read it."""
    from g3export.export.build import build
    from g3export.modeling.weights import build_model

    out = tmp_path_factory.mktemp("fuzz_build") / "tiny"
    build(build_model("tiny", weights="random"), None, out, max_context=64, progress=False)
    return out
