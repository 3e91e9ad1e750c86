"""Nothing lost (issue 15): `--force` replaces only a g3export build, the replace survives a kill
at any point, two builds never both write one `--out`, SIGTERM cleans up like Ctrl-C. On main:
--force replaced a directory of the user's files, a regular file or a device node; `--out .
--force` was a traceback; a kill between the two renames left no build at --out; concurrent
builds both printed "built"; SIGTERM left the `.partial-` directory."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g3export.export.manifest import BuildError, load_build
from g3export.export.outdir import OutputDir, is_build_dir, recover

from .conftest import ROOT, assert_refused, cli, invoke, snapshot

TINY = ["build", "--size", "tiny", "--weights", "random", "--max-context", "32"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def user_dir(tmp_path):
    d = tmp_path / "mydata"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "sub").mkdir()
    (d / "sub" / "notes.txt").write_text("notes")
    return d


def test_force_refuses_a_directory_of_user_files(user_dir, tmp_path):
    before = snapshot(tmp_path)
    assert_refused(invoke(*TINY, "--out", user_dir, "--force"), "not a g3export build",
                   str(user_dir))
    assert snapshot(tmp_path) == before


def test_force_refuses_a_fake_manifest(user_dir, tmp_path):
    (user_dir / "manifest.json").write_text('{"name": "my web app manifest"}')
    before = snapshot(tmp_path)
    assert_refused(invoke(*TINY, "--out", user_dir, "--force"), "not a g3export build")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "symlink", "device"])
def test_force_refuses_files_links_and_devices(tmp_path, tiny_build, kind):
    if kind == "file":
        out = tmp_path / "out.bin"
        out.write_bytes(b"precious")
    elif kind == "symlink":
        out = tmp_path / "link"
        out.symlink_to(tiny_build)
    else:
        out = Path("/dev/null")
    before = snapshot(tmp_path, tiny_build)
    assert_refused(invoke(*TINY, "--out", out, "--force"), str(out))
    assert snapshot(tmp_path, tiny_build) == before
    assert out.exists()


@pytest.mark.parametrize("out", [".", "..", "ANCESTOR"])
def test_force_refuses_the_cwd_and_its_ancestors(tmp_path, out):
    """A fresh process in a cwd holding a build-looking manifest: even so, the directory the user
    stands in (or one above it) is never replaced."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "file.txt").write_text("keep")
    target = str(tmp_path / "a") if out == "ANCESTOR" else out
    before = snapshot(tmp_path)
    r = cli(*TINY, "--out", target, "--force", cwd=work, timeout=120)
    assert_refused(r, "current directory")
    assert snapshot(tmp_path) == before


def test_force_replaces_a_build_and_recovers_from_a_kill(tmp_path, tiny_build):
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    assert is_build_dir(out)
    # kill -9 between `out -> .old-PID-*` and `partial -> out`: no out, a complete .old- sibling
    # of a dead writer, and a .partial- one. main: load_build said "does not exist".
    pid = _dead_pid()
    os.rename(out, tmp_path / f"b.old-{pid}-0123abcd")
    shutil.copytree(tiny_build, tmp_path / f"b.partial-{pid}-0123abcd")
    b = load_build(out)  # puts the old build back by itself
    assert b.max_context == 64 and is_build_dir(out)
    recover(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    # a kill after the swap: out is the new build, a stale .old- is garbage
    shutil.copytree(tiny_build, tmp_path / f"b.old-{_dead_pid()}-00ff00ff")
    recover(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    # a live writer's siblings are never touched
    live = tmp_path / f"b.old-{os.getppid()}-0000beef"
    live.mkdir()
    recover(out)
    assert live.exists()


def test_force_replaces_a_build(tmp_path, tiny_build):
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    r = invoke(*TINY, "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert load_build(out).max_context == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no lock, partial or old left


def test_second_build_into_one_out_is_refused(tmp_path):
    """A second writer while the first holds the lock is refused with a message, nothing
    written. main: both printed "built" and the later silently replaced the earlier."""
    out = tmp_path / "b"
    od = OutputDir(out, force=False).open()
    try:
        before = snapshot(tmp_path)
        r = cli(*TINY, "--out", out, timeout=120)
        assert_refused(r, "another g3export build", "wait")
        assert snapshot(tmp_path) == before
    finally:
        od.close()
    assert not (tmp_path / "b.lock").exists() and list(tmp_path.iterdir()) == []


def test_lock_file_of_someone_else_is_kept(tmp_path):
    (tmp_path / "b.lock").write_text("the user's own file")
    od = OutputDir(tmp_path / "b", force=False).open()
    od.close()
    assert (tmp_path / "b.lock").read_text() == "the user's own file"


def test_sigterm_removes_the_partial_dir(tmp_path):
    """SIGTERM during the export: the partial directory goes, like Ctrl-C (main: left behind)."""
    out = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", "from g3export.cli import main; main()", *TINY,
                          "--out", str(out)], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any(".partial-" in q.name for q in tmp_path.iterdir()):
        if p.poll() is not None:
            pytest.fail(p.stderr.read().decode())
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and b"Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # no partial, no lock, no out


_KILL_BETWEEN_RENAMES = """
import os, shutil, signal, sys
from g3export.export import outdir
od = outdir.OutputDir(sys.argv[1], force=True).open()
shutil.copytree(sys.argv[2], od.partial, dirs_exist_ok=True)
real = os.rename
def rename(a, b):
    real(a, b)
    if ".old-" in str(b):
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
od.commit()
"""


def test_kill_9_between_the_renames_of_force(tmp_path, tiny_build):
    """A real kill -9 after `out -> .old-*`: no build at out, the old one under a name the user
    does not know, a partial dir and the lock file. main left it so; now the next command
    (load_build here; a build does the same) puts the old build back and cleans up."""
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    r = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(out), str(tiny_build)],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and any(".old-" in p.name for p in tmp_path.iterdir())
    assert load_build(out).max_context == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
