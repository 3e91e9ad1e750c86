"""Open a build directory with the runtime its manifest names (DESIGN §3.5).

    session, tokenizer = open_build("builds/270m", provider="cpu")

The manifest's target picks the runtime: `onnx` → ONNX Runtime (CPU or CUDA); `trt`/`trt-rtx` →
the TensorRT engine runtime, which needs a GPU. load_build has already refused a directory that is
incomplete, from a newer format, or whose files do not match their hashes.
"""

from __future__ import annotations

from pathlib import Path

from ..export.manifest import ENGINE_TARGETS, BuildError, load_build


def open_build(build_dir: str | Path, provider: str = "cpu", batch: int = 1):
    """(session with `batch` sequence slots, tokenizer or None) for a build directory: the
    manifest's target picks ONNX Runtime or the TensorRT engine runtime."""
    from .tokenizer import Tokenizer

    build = load_build(build_dir)
    target = build.target
    if target == "onnx":
        from .ort_session import OrtSession

        session = OrtSession.from_build(build, provider=provider, batch=batch)
    elif target in ENGINE_TARGETS:
        if provider != "cuda" and provider != "cpu":
            raise BuildError(f"unknown provider {provider!r}")
        from .trt_session import TrtSession

        session = TrtSession.from_build(build, batch=batch)
    else:
        raise BuildError(f"{build_dir}: unknown target {target!r} in manifest.json; "
                         "rebuild it with this version of g3export")
    tokenizer = Tokenizer.from_json_file(build.tokenizer) if build.tokenizer else None
    return session, tokenizer
