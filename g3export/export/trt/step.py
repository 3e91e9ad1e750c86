"""The build directory's engine step (`g3export build --target trt|trt-rtx`, called by
g3export.export.build._build_engines after the export).

`build_text_engine` builds `text.engine` from the `text.onnx` the exporter wrote for this plan
(`EnginePlan.export_options()`: the TensorRT graph is final when it is written, see graph.py). It
does not read or rewrite the ONNX file: the engine builder, in a child process (child.py), parses
it by path, so the build never holds the weights beyond what the TensorRT builder itself needs,
and the child's peak RSS is the builder's own. text.onnx (+ .data) is KEPT beside text.engine: it
is what the engine was built from, so an engine for another GPU / compute capability / TensorRT
version can be rebuilt from the build directory alone (`build_engine`), and `verify` reads the
reference weights from it.

Returns the manifest's `tensorrt` section, a plain dict with exactly these keys (no file hashes:
the manifest's `files` covers them):

    flavour               "trt" | "trt-rtx"
    library               "tensorrt" | "tensorrt_rtx"
    version               the library's version string
    compute_capabilities  list of "8.6"-style strings, or None (library default / build GPU)
    strongly_typed        True
    dtype                 "fp32" | "fp16" | "bf16"
    fp16_note             FP16_NOTE for fp16, else None
    attention             "plugin" | "native"   (Translation.manifest())
    opset                 int                   (Translation.manifest())
    plugin                {"name", "namespace", "version"}, plugin translation only
    prefill_chunk         int: the longest chunk the engine's profile takes
    chunk_align           int (native: the smallest ring) or None
    max_batch             int
    timing_cache          str path or None
    engines               {"text": {file, onnx, profiles, bytes, build_seconds, peak_rss_mb,
                                    layers, layer_types}}
                          profiles: ONE profile, [{"name": "text", "shapes": {input: [min, opt,
                          max]}}] (engine.text_profile: seq 1..prefill_chunk, batch 1..max_batch,
                          opt = the decode step); builds before issue 12 have two, "prefill"
                          and "decode", and still run (EngineEntry.profile_for)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .engine import DEFAULT_PLUGINS, build_engine, text_profile
from .library import library_name
from .options import FP16_NOTE, EnginePlan


def build_text_engine(partial_dir: str | Path, plan: EnginePlan, io: Any,
                      progress: bool = False) -> dict[str, Any]:
    """Build `text.engine` beside the exported `text.onnx` in `partial_dir` (module docstring)."""
    root = Path(partial_dir)
    profile = text_profile(io, plan.prefill_chunk, max_batch=plan.max_batch)
    engine_file = Path(io.file).with_suffix(".engine").name
    plugins = DEFAULT_PLUGINS if plan.attention == "plugin" else ()
    info = build_engine(root / io.file, root / engine_file, plan.target, profiles=[profile],
                        dtype=plan.dtype, compute_capabilities=plan.compute_capabilities,
                        timing_cache=plan.timing_cache, plugins=plugins, isolate=True)
    return {
        "flavour": plan.target,
        "library": library_name(plan.target),
        "version": info.version,
        "compute_capabilities": info.compute_capabilities,
        "strongly_typed": True,
        "dtype": plan.dtype,
        "fp16_note": FP16_NOTE if plan.dtype == "fp16" else None,
        **plan.translation.manifest(),
        "prefill_chunk": plan.prefill_chunk,
        "chunk_align": smallest_ring_from_io(io) if plan.attention == "native" else None,
        "max_batch": plan.max_batch,
        "timing_cache": plan.timing_cache,
        "engines": {io.name: {
            "file": engine_file, "onnx": io.file, "profiles": info.profiles,
            "bytes": info.bytes, "build_seconds": info.seconds, "peak_rss_mb": info.peak_rss_mb,
            "layers": info.layers, "layer_types": info.layer_types}},
    }


def smallest_ring_from_io(io: Any) -> int:
    """The smallest cache length among the component's past_* inputs (dim 2)."""
    return min(int(t.shape[2]) for t in io.inputs if t.name.startswith("past_"))
