"""The library calls behind the CLI, with the CLI's defaults (`g3export.build` is this module's
`build`; `import g3export` stays light: it is imported on first use).

    import g3export
    out = g3export.build(size="270m", target="onnx")            # builds/270m-onnx-fp32
    out = g3export.build(checkpoint="ckpt/", target="trt-rtx", max_context=4096, out="b/x")

Defaults (the same as `g3export build`): dtype fp32 for `onnx`, bf16 for `trt`/`trt-rtx`; max
context min(the model's maximum, 8192); out `builds/<name>-<target>-<dtype>`; every component
the model has; weights from the checkpoint (or the embedded 270M for `size="270m"`), or seeded
random ones with weights="random". The tokenizer (from the checkpoint, the GGUF metadata or the
embedded 270M) is handed to the build as an object, which writes tokenizer.json itself.

Bad option combinations raise `OptionError` (the CLI shows it as a usage error, exit 2); bad
files and models raise the module's own UserError (BuildError, CheckpointError, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .errors import UserError
from .export.manifest import TARGETS

DEFAULT_MAX_CONTEXT = 8192  # the default cache length, when the model allows that much


class OptionError(UserError, ValueError):
    """A combination of build options that does not go together; the message names them."""


def default_dtype(target: str) -> str:
    """fp32 for ONNX Runtime on CPU; bf16 for the TensorRT engines (GPU)."""
    return "fp32" if target == "onnx" else "bf16"


def build(size: str | None = None, checkpoint: str | Path | None = None, *,
          target: str = "onnx", dtype: str | None = None, max_context: int | None = None,
          weights: str = "checkpoint", out: str | Path | None = None, force: bool = False,
          all_logits: bool = False, components: Sequence[str] | None = None,
          attention: str | None = None, compute_capabilities: Sequence[str] = (),
          prefill_chunk: int | None = None, max_batch: int = 1,
          timing_cache: str | Path | None = None, quant: str | None = None,
          quant_block: int = 32, quant_embedding: bool = True,
          calibration: str | Path | None = None, quant_symmetric: bool | None = None,
          progress: bool = True) -> Path:
    """Build a Gemma 3 model (a preset `size`, a HF directory or .gguf `checkpoint`, or both,
    which must match) into a build directory; returns its path. See the module docstring for the
    defaults; the TensorRT options (attention, compute_capabilities, prefill_chunk, max_batch,
    timing_cache) are those of g3export.export.trt.plan_engines; quant (int4 | int8 | fp8),
    quant_block, quant_embedding, calibration and quant_symmetric (None: the scheme's default,
    QuantScheme.resolve) those of g3export.export.quantize.QuantScheme (the default `out` then
    ends in `-int4`/`-int8`)."""
    if size is None and checkpoint is None:
        raise OptionError("give --size or --checkpoint (both: they must match)")
    if target not in TARGETS:
        raise OptionError(f"unknown target {target!r}; use one of: {', '.join(TARGETS)}")
    scheme = None
    if quant is not None:  # checked before any work (and again by build against the config)
        from .export.quantize import (QuantScheme, check_scheme, fp8_min_compute_capability,
                                      read_calibration)

        if calibration is not None and quant != "fp8":
            raise OptionError("--calibration is an option of --quant fp8 (int4/int8 are "
                              "weight-only: nothing to calibrate)")
        fp8 = quant == "fp8"  # the embedding / lm_head stay unquantized (quantize.FP8_KEPT)
        scheme = QuantScheme(quant, None if fp8 else int(quant_block), quant_embedding and not fp8,
                             read_calibration(calibration) if fp8 else None, quant_symmetric)
        check_scheme(scheme, target, {})
        scheme.resolve(target)  # an asymmetric TensorRT request fails here, before any work
        if fp8:
            fp8_min_compute_capability(compute_capabilities)
    elif calibration or not quant_embedding or quant_symmetric is not None:
        raise OptionError("--calibration/--no-quant-embedding/--quant-(a)symmetric are options "
                          "of --quant")
    if target != "onnx":
        from .export.trt import require_tensorrt  # says what to install, before any work
        require_tensorrt(target)
    dtype = dtype or default_dtype(target)
    trt_options = None
    if target == "onnx":
        if attention or compute_capabilities or prefill_chunk or timing_cache or max_batch != 1:
            raise OptionError("--attention/--compute-capability/--prefill-chunk/--max-batch/"
                              "--timing-cache are options of --target trt and trt-rtx")
    else:
        trt_options = {"attention": attention or "plugin", "prefill_chunk": prefill_chunk,
                       "max_batch": max_batch,
                       "compute_capabilities": list(compute_capabilities) or None,
                       "timing_cache": timing_cache}
        if dtype == "fp16" and progress:
            from .export.trt import FP16_NOTE
            print(f"warning: {FP16_NOTE}", file=sys.stderr)
    from .dtypes import NAMES
    from .export.build import build as do_build
    from .export.outdir import check_out
    from .modeling.config import preset
    from .modeling.weights import open_weights

    if dtype not in NAMES:
        raise OptionError(f"unknown dtype {dtype!r}; use one of: {', '.join(NAMES)}")
    # Check cheap things before opening the weights.
    if size and max_context and max_context > preset(size).text.max_position_embeddings:
        raise OptionError(f"--max-context {max_context} is beyond {size}'s "
                          f"{preset(size).text.max_position_embeddings}")
    comps = tuple(components) if components else None
    # The model stays on the meta device: its weights stream from the source into the build's
    # files (DESIGN §3.6), so memory does not grow with the model. Opening reads headers only.
    model, source = open_weights(size, checkpoint=checkpoint, weights=weights,
                                 all_logits=all_logits)
    cfg = model.config
    if max_context and max_context > cfg.text.max_position_embeddings:
        raise OptionError(f"--max-context {max_context} is beyond the model's "
                          f"{cfg.text.max_position_embeddings}")
    ctx = max_context or min(cfg.text.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    out = Path(out or f"builds/{cfg.name}-{target}-{dtype}{'-' + quant if quant else ''}")
    check_out(out, force)  # refuse a wrong --out before any work (checked again under the lock)
    tokenizer = tokenizer_for(size, checkpoint, weights)
    return do_build(model, tokenizer, out, target=target, dtype=dtype, max_context=ctx,
                    force=force, trt_options=trt_options, components=comps, progress=progress,
                    weights=source, all_logits=all_logits, quant=scheme)


def load_model(size, checkpoint, weights, dtype="fp32", all_logits=False, progress=True):
    """A Gemma3Model from a preset / checkpoint / the embedded 270M, or with random weights."""
    from .dtypes import dtype as dtype_of
    from .modeling.weights import build_model

    source = "random" if weights == "random" else (checkpoint or f"the embedded {size}")
    if progress:
        print(f"loading {source} weights ({dtype}) ...", file=sys.stderr)
    return build_model(size, checkpoint=checkpoint, weights=weights,
                       dtype=dtype_of(dtype).torch, all_logits=all_logits)


def tokenizer_for(size, checkpoint, weights):
    """The tokenizer of a checkpoint, of the embedded 270M, or None (ids only)."""
    from .runtimes.tokenizer import Tokenizer, TokenizerError

    if checkpoint:
        try:
            return Tokenizer.from_checkpoint(checkpoint)
        except TokenizerError:
            return None  # a checkpoint without a tokenizer: --prompt-ids still works
    if size and size.lower() == "270m" and weights != "random":
        from .modeling.embedded import embedded_gguf_path
        return Tokenizer.from_checkpoint(embedded_gguf_path())
    return None
