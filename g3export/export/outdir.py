"""The directory side of a build (DESIGN §3.5): what `--out` may be, one writer at a time, and a
crash-safe replace. Nothing the user did not ask g3export to replace is ever touched.

    od = OutputDir(out, force).open()   # checks, lock, recovery; a partial dir to write into
    try:
        write everything into od.partial (manifest.json last)
        od.commit()                      # the new build becomes `out`; the old one is removed
    finally:
        od.close()                       # the partial dir is removed if not committed; unlock

What `--out` may be:
* absent: the build is renamed into place;
* present, without --force: refused ("already exists; pass --force");
* present, with --force: only a g3export build directory is replaced (a real directory whose
  manifest.json is a JSON object with our format_version, target and components). A directory
  of other files, a regular file, a device, a symlink, the current directory or one of its
  ancestors are refused with a message and left as they are.

One writer: `<out>.lock` beside `<out>` is held with flock for the whole build; a second build
into the same `--out` is refused at once with a message (it never silently replaces the first).
The lock file holds a marker line and is removed by its writer at the end (while still locked,
and a locker re-checks that the file it locked is still the one at the path, so a late opener
of a removed lock file cannot believe it holds the lock). A lock file without the marker is
someone else's file: it is locked but never removed. One left by a killed build (marked, held by
nobody) is removed by `recover`.

Crash safety of `--force`: the new build is complete (manifest.json written and fsynced) before
the old one is touched; then `out -> <out>.old-<pid>-<hex>`, `partial -> out`, remove the old
one. SIGINT/SIGTERM are blocked during these steps. A kill -9 between the two renames leaves no
`out`, only the `.old-` sibling, whose writer pid is gone: `recover(out)` (run by every build into
`out`, under the lock, and by `load_build`) renames it back, so the next command finds the old
build; a `.old-` sibling left after a completed swap, or a `.partial-` one of a dead writer, is
removed.

SIGTERM during a build cleans up in the handler itself and then ends the process by that signal:
the partial directory is removed and the lock released, nothing else changed, one line on stderr.
(Raising an exception from the handler, as Python does for Ctrl-C, is not enough: the handler may
run inside a callback from a C++ extension (onnx's nanobind bindings during the export), and an
exception crossing those frames aborts the process with a C++ "terminate" and a traceback; a
killed build's partial directory is then only removed by the next build.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path

from ..errors import BuildError
from .build_files import MANIFEST

# `<out>.partial-<pid>-<hex>` (a build being written) and `<out>.old-<pid>-<hex>` (an old build
# moved aside by --force); export/manifest refuses to open either.
SIBLING = re.compile(r"^(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]+$")
_LOCK_MARK = b"g3export build lock\n"


class OutDirError(BuildError):
    """An output directory that cannot be written or replaced; the message says what to do."""


def is_build_dir(path: Path) -> bool:
    """A real directory (not a symlink) whose manifest.json parses as a g3export manifest."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        m = path / MANIFEST
        if not stat.S_ISREG(os.lstat(m).st_mode) or m.stat().st_size > 1 << 26:
            return False
        d = json.loads(m.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return (isinstance(d, dict) and type(d.get("format_version")) is int
            and isinstance(d.get("target"), str) and isinstance(d.get("components"), dict))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(out: Path, kind: str) -> list[tuple[Path, int]]:
    """(path, writer pid) of `<out>.<kind>-<pid>-<hex>` siblings."""
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    found = []
    for p in entries:
        m = SIBLING.match(p.name)
        if m and m.group("name") == out.name and m.group("kind") == kind:
            found.append((p, int(m.group("pid"))))
    return found


def recover(out: str | Path) -> None:
    """Undo what a killed build left beside `out` (see the module docstring). Only siblings of
    our own naming whose writer process is gone are touched; a live writer's are left alone."""
    out = Path(os.path.abspath(out))
    olds = [(p, pid) for p, pid in _siblings(out, "old") if not _pid_alive(pid)]
    if not os.path.lexists(out):
        complete = sorted((p for p, _ in olds if is_build_dir(p)),
                          key=lambda p: p.stat().st_mtime)
        if complete:  # killed between the two renames of a --force: put the old build back
            os.rename(complete[-1], out)
            olds = [(p, pid) for p, pid in olds if p != complete[-1]]
    if os.path.lexists(out):  # the swap finished: what is left of the old build is garbage
        for p, _ in olds:
            shutil.rmtree(p, ignore_errors=True)
    for p, pid in _siblings(out, "partial"):
        if not _pid_alive(pid) and pid != os.getpid():
            shutil.rmtree(p, ignore_errors=True)
    _remove_stale_lock(out.parent / f"{out.name}.lock")


def _remove_stale_lock(path: Path) -> None:
    """Remove our lock file left by a killed build: only if it has our marker and nobody holds
    it (a live build, this process's own included, holds it: flock conflicts between two open
    descriptions even in one process)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # held by a live build
        if (os.pread(fd, len(_LOCK_MARK) + 1, 0) == _LOCK_MARK
                and os.stat(path).st_ino == os.fstat(fd).st_ino):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_out(out: Path, force: bool) -> None:
    """Refuse an `--out` that must not be written or replaced (see the module docstring)."""
    if not os.path.lexists(out):
        return
    cwd = Path(os.getcwd()).resolve()
    real = out.resolve()
    if real == cwd or real in cwd.parents:
        raise OutDirError(f"--out {out} is the current directory or contains it; give a new "
                          "directory for the build, e.g. --out builds/NAME")
    if not force:
        raise OutDirError(f"{out} already exists; pass --force to replace it (only a g3export "
                          "build is replaced, and only once the new build is complete)")
    if out.is_symlink():
        raise OutDirError(f"--out {out} is a symbolic link; --force replaces only a build "
                          "directory itself: give the directory it points to, or a new path")
    if not is_build_dir(out):
        what = "a directory" if out.is_dir() else "a file" if out.is_file() else "not a directory"
        raise OutDirError(f"{out} is {what} but not a g3export build (no manifest.json of "
                          "ours); --force replaces only build directories, so it was left "
                          "untouched: choose another --out, or move it away yourself")


class _Lock:
    """flock on `<out>.lock` (see the module docstring)."""

    def __init__(self, out: Path):
        self.path = out.parent / f"{out.name}.lock"
        self.fd: int | None = None
        self.ours = False

    def acquire(self) -> None:
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW,
                             0o644)
            except OSError as e:
                raise OutDirError(f"cannot create the lock file {self.path} ({e.strerror}); "
                                  "is the directory writable?") from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OutDirError(f"{self.path} is not a regular file; remove it")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutDirError(f"another g3export build is writing {self.path.parent / self.path.name[:-5]} "
                                      f"(it holds {self.path}); wait for it to finish, or "
                                      "build into another --out") from None
                raise
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed by its last holder after we opened it: try the new one
                os.close(fd)
                continue
            self.fd = fd
            data = os.pread(fd, len(_LOCK_MARK) + 1, 0)
            if data in (b"", _LOCK_MARK):  # ours (or new): marked, removed at the end
                os.pwrite(fd, _LOCK_MARK, 0)
                self.ours = True
            return
        raise OutDirError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self.ours:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class OutputDir:
    """Context manager for writing a build to `out` (see the module docstring)."""

    def __init__(self, out: str | Path, force: bool):
        self.out = Path(os.path.abspath(out))
        self.force = force
        self.partial: Path | None = None
        self._lock = _Lock(self.out)
        self._old_handler = None

    def open(self) -> "OutputDir":
        check_out(self.out, self.force)  # cheap refusal before any directory is created
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._install_sigterm()  # before the partial dir exists: no window without cleanup
            recover(self.out)
            check_out(self.out, self.force)  # again, under the lock and after recovery
            partial = self.out.parent / (f"{self.out.name}.partial-{os.getpid()}-"
                                         f"{secrets.token_hex(4)}")
            self.partial = partial
            partial.mkdir()
        except BaseException:
            self.close()
            raise
        return self

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum, frame):  # see the module docstring
            self.close()
            os.write(2, b"Error: build terminated (SIGTERM); its partial directory was removed\n")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        self._old_handler = signal.signal(signal.SIGTERM, on_term)

    def commit(self) -> None:
        """Put the complete partial dir in place of `out` (replacing a build with --force)."""
        assert self.partial is not None
        _fsync_dir(self.partial)  # its files and manifest are on disk before it is renamed
        blocked = {signal.SIGINT, signal.SIGTERM}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            old = None
            if os.path.lexists(self.out):
                check_out(self.out, self.force)
                old = self.out.parent / f"{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(self.out, old)
            try:
                os.rename(self.partial, self.out)
            except BaseException:
                if old is not None:
                    os.rename(old, self.out)  # put the old build back
                raise
            self.partial = None
            _fsync_dir(self.out.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def close(self) -> None:
        try:
            if self.partial is not None:
                shutil.rmtree(self.partial, ignore_errors=True)
                self.partial = None
        finally:
            if self._old_handler is not None:
                signal.signal(signal.SIGTERM, self._old_handler)
                self._old_handler = None
            self._lock.release()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
