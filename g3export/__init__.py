"""g3export: Gemma 3 from a PyTorch definition to ONNX and TensorRT graphs with a static
sliding-window KV cache.

    import g3export
    g3export.build(size="270m", target="onnx", out="builds/270m")   # g3export.api.build

`import g3export` is light: `build` (and the rest of g3export.api, which imports torch when a
build runs) is imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build"]


def __getattr__(name: str) -> Any:
    if name == "build":
        from .api import build

        return build
    raise AttributeError(f"module 'g3export' has no attribute {name!r}")
