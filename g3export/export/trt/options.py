"""TensorRT engine options, checked in ONE place (`check_options`), and the build's engine plan.

* `RTX_COMPUTE_CAPABILITIES` is the one list of GPU architectures TensorRT-RTX 1.7 targets
  (`--compute-capability` choices in the CLI read it; 9.0 is absent: no H100/H200).
* `check_options(flavour, compute_capabilities, timing_cache)` raises `EngineOptionError` (a
  BuildError: the CLI prints it without a traceback) for an option the flavour does not take:
  compute capabilities are TensorRT-RTX's (TensorRT builds for the GPU it runs on), a timing cache
  is TensorRT's (TensorRT-RTX builds ahead of time without a GPU and a timing cache would need
  one). `plan_engines` (the CLI's and the library's entry) and `build_engine` (a direct call) both
  go through it.
* `plan_engines` checks everything else against the model before any work: attention plugin |
  native; prefill chunk (default 512, never past the context, for native at most the smallest
  ring, at least one image when the build takes images); max batch >= 1. It returns an
  `EnginePlan`, which the export step reads (`export_options`) and the engine step builds from.
* fp16: nothing is clamped; the CLI warns (FP16_NOTE) and the manifest records the note.

Imports nothing heavy (no torch, onnx or TensorRT) so the CLI can read the tables cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ...errors import BuildError
from ...modeling.cache import DEFAULT_PREFILL_CHUNK
from .library import check_flavour

# compute capability strings accepted for TensorRT-RTX -> ComputeCapability member names
RTX_COMPUTE_CAPABILITIES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89",
                            "12.0": "SM120", "12.1": "SM121"}

ATTENTIONS = ("plugin", "native")  # the TensorRT translations of g3.attention (plugin = default)


FP16_NOTE = ("fp16: Gemma 3 was trained in bf16 and its activations (residual stream, MLP) exceed "
             "fp16's maximum 65504 in real checkpoints, which gives inf/NaN logits. The engine is "
             "built as asked, nothing is clamped; verify its output, and prefer --dtype bf16 "
             "(every GPU TensorRT-RTX targets, and every data-centre GPU since A100, has bf16).")


class EngineOptionError(BuildError, ValueError):
    """An engine option the flavour or the model does not take; the message says what to use."""


def check_options(flavour: str, compute_capabilities: Sequence[str] | None = None,
                  timing_cache: str | Path | None = None) -> list[str] | None:
    """Validate the flavour-specific options; returns the compute capabilities as a list or None."""
    check_flavour(flavour)
    ccs = list(compute_capabilities or []) or None
    if flavour == "trt" and ccs:
        raise EngineOptionError("--compute-capability is a TensorRT-RTX option (--target "
                                "trt-rtx); TensorRT builds for the GPU it runs on")
    for cc in ccs or []:
        if cc not in RTX_COMPUTE_CAPABILITIES:
            raise EngineOptionError(f"--compute-capability {cc}: TensorRT-RTX targets "
                                    f"{', '.join(RTX_COMPUTE_CAPABILITIES)} (not 9.0: no "
                                    "H100/H200)")
    if flavour == "trt-rtx" and timing_cache is not None:
        raise EngineOptionError("--timing-cache is for --target trt: TensorRT-RTX builds ahead of "
                                "time without a GPU, and a timing cache would need one")
    return ccs


@dataclass
class EnginePlan:
    """Everything the engine step needs, checked before any work (`plan_engines`)."""

    target: str
    attention: str                       # 'plugin' | 'native'
    dtype: str
    prefill_chunk: int
    max_batch: int = 1
    compute_capabilities: list[str] | None = None
    timing_cache: str | None = None
    images: bool = False

    @property
    def translation(self) -> Any:
        from ..translations import get

        return get(self.attention)

    def export_options(self) -> dict[str, Any]:
        """What `export_text` takes to write the graph this plan's engine is built from, as the
        engine builder parses it (g3export.export.trt.graph): the attention translation, and
        the TensorRT graph passes run before the file is written."""
        from .graph import tensorrt_passes

        t = self.translation
        return {"translation_table": t.table, "opset": t.opset, "tie_lm_head": False,
                "graph_passes": tensorrt_passes(t)}


def smallest_ring(cfg: Any, max_context: int) -> int:
    """Slots of the smallest KV buffer (the sliding window, or max_context if smaller)."""
    from ...modeling.cache import kv_layout

    return min(lc.shape[2] for lc in kv_layout(cfg.text, max_context, 1, "fp32").layers)


def plan_engines(cfg: Any, target: str, dtype: str, max_context: int, attention: str | None = None,
                 prefill_chunk: int | None = None, max_batch: int = 1,
                 compute_capabilities: Sequence[str] | None = None,
                 timing_cache: str | Path | None = None, images: bool = False) -> EnginePlan:
    """Check the engine options against the model (BuildError with what to do)."""
    ccs = check_options(target, compute_capabilities, timing_cache)
    attention = attention or "plugin"
    if attention not in ATTENTIONS:
        raise EngineOptionError(f"--attention {attention!r} is not a TensorRT translation; use "
                                "plugin (default) or native")
    ring = smallest_ring(cfg, max_context)
    if prefill_chunk is None:
        prefill_chunk = min(DEFAULT_PREFILL_CHUNK, max_context)
        if attention == "native":
            prefill_chunk = min(prefill_chunk, ring)
    if prefill_chunk < 1 or prefill_chunk > max_context:
        raise EngineOptionError(f"--prefill-chunk {prefill_chunk} must be between 1 and the "
                                f"context length {max_context}")
    if attention == "native" and prefill_chunk > ring:
        raise EngineOptionError(
            f"--prefill-chunk {prefill_chunk} is longer than the sliding window ({ring} slots): "
            f"the native translation writes the KV cache with TensorScatter(mode=linear), which "
            f"must not wrap a sliding layer's ring, and TensorRT refuses a KV-cache update longer "
            f"than its cache. Use --prefill-chunk {ring} (or less), or --attention plugin")
    if images and prefill_chunk < cfg.mm_tokens_per_image:
        raise EngineOptionError(f"--prefill-chunk {prefill_chunk} is shorter than one image "
                                f"({cfg.mm_tokens_per_image} tokens), which is never split across "
                                "chunks")
    if max_batch < 1:
        raise EngineOptionError("--max-batch must be >= 1")
    return EnginePlan(target, attention, dtype, prefill_chunk, max_batch, ccs,
                      None if timing_cache is None else str(timing_cache), images)
