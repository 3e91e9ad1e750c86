"""Opening files a user names (a config.json, an image, a tokenizer): only regular files, read
without blocking, errors as the caller's UserError subclass naming the file.

Why: `open()` on a FIFO blocks until a writer appears (a config.json that is a FIFO hung the CLI
until killed), a character device such as /dev/zero never ends, and an OSError or a
UnicodeDecodeError escaping to the CLI is a traceback. `require_regular_file` is the cheap check
(stat) for paths handed to a library that opens them itself (Pillow, tokenizers, ONNX Runtime);
`read_regular_file` also opens with O_NONBLOCK and re-checks the opened descriptor, so a file
swapped for a FIFO between the stat and the open cannot block either.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import UserError


def require_regular_file(path: str | Path, error: type[UserError], what: str = "file") -> Path:
    """The path, if it names an existing regular file (after symlinks); else `error`."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{what} {p} does not exist; check the path") from None
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {p} is a directory, not a file; give the path of a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {p} is not a regular file (a FIFO, socket or device); give a file")
    return p


def read_regular_file(path: str | Path, error: type[UserError], what: str = "file",
                      max_bytes: int = 1 << 30) -> bytes:
    """The bytes of a regular file of at most max_bytes; anything else is `error`."""
    p = require_regular_file(path, error, what)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise error(f"{what} {p} is not a regular file")
            if st.st_size > max_bytes:
                raise error(f"{what} {p} has {st.st_size} bytes, more than the {max_bytes} such a "
                            "file can have; is it the right file?")
            return f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None


def read_json_object(path: str | Path, error: type[UserError], what: str = "file",
                     max_bytes: int = 1 << 24) -> dict[str, Any]:
    """A JSON object from a regular UTF-8 file; anything else (a list, null, bad JSON, bad UTF-8,
    deep nesting) is `error` naming the file."""
    raw = read_regular_file(path, error, what, max_bytes)
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); it looks "
                    "corrupt") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise error(f"{what} {path} is not valid JSON ({str(e)[:100]}); it looks corrupt") from None
    if not isinstance(d, dict):
        raise error(f"{what} {path} holds a JSON {type(d).__name__}, not an object; it looks "
                    "corrupt")
    return d
