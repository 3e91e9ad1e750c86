"""Writing a build directory (DESIGN §3.5): the orchestration of one build: check the options,
export each component into a temporary sibling directory, build the TensorRT engines (trt /
trt-rtx), hash every file, write the manifest (g3export.export.manifest owns the format and its
reading) and rename the directory into place only when complete.

`build(..., components=("vision",))` writes only some components (default: every one the config
has); `Build.components` lists what a directory holds.

Atomicity. `build()` writes everything into `<out>.partial-<pid>-<random>` (same parent, so the
final rename is atomic on one filesystem); manifest.json is written last; only then is the
directory renamed to `<out>`. g3export.export.outdir owns the directory handling: `--force`
replaces only a g3export build, one build at a time (`<out>.lock`), crash-safe (an old build
moved aside by a killed `--force` is put back by the next build or `load_build`). An interrupted
build (exception, Ctrl-C, SIGTERM) removes its partial dir; a killed one leaves a `.partial-` dir
without a manifest, which `load_build` refuses and the next `build()` into the same `<out>`
removes (when its pid is gone).

`load_build(dir)` (g3export.export.manifest) refuses a `.partial-` directory and anything else it
cannot trust, with a `BuildError` whose message says what to do.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..dtypes import DTYPES
from ..modeling.config import ModelConfig
from .manifest import (COMPONENTS, TARGETS, BuildError, Manifest, TensorRTSection,
                       hash_files, package_version)

__all__ = ["build"]


def build(model, tokenizer, out_dir: str | Path, target: str = "onnx",
          dtype: str = "fp32", max_context: int = 2048, force: bool = False,
          progress: bool = True, extra_manifest: dict[str, Any] | None = None,
          all_logits: bool = False, images: bool | None = None, dynamic_batch: bool = True,
          export_options: dict[str, Any] | None = None,
          components: tuple[str, ...] | None = None,
          trt_options: dict[str, Any] | None = None, weights=None, quant=None) -> Path:
    """Export `model` (a Gemma3Model; cast to dtype in place) into the build directory `out_dir`.

    tokenizer: None, a g3export Tokenizer (anything with `to_json()`: written as tokenizer.json
    into the partial directory), or the path of a tokenizer.json file (copied).
    weights: a g3export.modeling.sources.WeightSource, when `model` is on the meta device
    (`g3export.modeling.weights.open_weights` gives both): the weights stream from it into the
    build and memory does not grow with the model (DESIGN §3.6). None: the model's own tensors.

    components: which graphs to write, from ("text", "vision"); default: text, plus vision when
    the config has a vision encoder. images: whether the text graph takes image features
    (default: when the config has vision). trt_options: for --target trt/trt-rtx, the keyword
    arguments of g3export.export.trt.plan_engines (attention, prefill_chunk, max_batch,
    compute_capabilities, timing_cache); see _build_engines. quant: a
    g3export.export.quantize.QuantScheme (checked here, before any work; recorded in the
    manifest's `quantization` section). fp8 first calibrates its activation scales on
    quant.calibration's text (g3export.export.calibrate; the tokenizer, if any, tokenizes it).
    """
    out = Path(out_dir)
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; use one of: {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise BuildError(f"unknown dtype {dtype!r}; use fp32 (CPU), fp16 or bf16 (GPU)")
    cfg: ModelConfig = model.config
    components = _check_components(cfg, components)
    if images is None:
        images = cfg.has_vision
    if not 0 < max_context <= cfg.text.max_position_embeddings:
        raise BuildError(f"max_context {max_context} must be in 1..{cfg.text.max_position_embeddings} "
                         "(the model's max_position_embeddings)")
    if quant is not None:
        from .quantize import check_scheme, quant_dims

        check_scheme(quant, target, quant_dims(cfg.text))
        quant = quant.resolve(target)  # symmetric or not, decided per scheme and target
        if quant.scheme == "fp8":
            from .quantize import fp8_min_compute_capability

            fp8_min_compute_capability((trt_options or {}).get("compute_capabilities"))
    engine_plan = None
    if target != "onnx":  # checked before any work; the ONNX is exported in its translation
        from .trt import plan_engines

        engine_plan = plan_engines(cfg, target, dtype, max_context, images=images,
                                   **(trt_options or {}))
        export_options = {**engine_plan.export_options(), **(export_options or {})}
    if isinstance(tokenizer, (str, Path)) and not Path(tokenizer).is_file():
        raise BuildError(f"tokenizer file {tokenizer} not found")
    # --out/--force checks, the lock, recovery of a killed build, the partial dir, SIGTERM
    from .outdir import OutputDir

    od = OutputDir(out, force).open()
    tmp = od.partial
    try:
        from .onnx_export import export_text
        from .onnx_vision import export_vision

        def step(what: str) -> None:  # the export itself has no progress bar: say what runs
            if progress:
                print(f"{what} ...", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        ios = []
        streamed: dict[str, dict] = {}  # data files hashed as they were written
        amax = None
        if "text" in components and quant is not None and quant.scheme == "fp8":
            from .calibrate import calibrate
            from .quantize import read_calibration

            text = quant.calibration or read_calibration(None)  # None: the default text
            step(f"calibrating fp8 activation scales on {text['name']}")
            amax, record = calibrate(model, weights, text, tokenizer, max_context)
            quant = dataclasses.replace(quant, calibration=record)
        if "text" in components:
            step("exporting the text component (torch.export -> ONNX)")
            ios.append(export_text(model, tmp, max_context, dtype, all_logits=all_logits,
                                   images=images, dynamic_batch=dynamic_batch, progress=progress,
                                   weights=weights, hashes=streamed, quant=quant,
                                   activation_amax=amax,
                                   **(export_options or {})))
        if "vision" in components:
            step("exporting the vision component (torch.export -> ONNX)")
            ios.append(export_vision(model, tmp, dtype, progress=progress, weights=weights,
                                     hashes=streamed))
        export_s = time.perf_counter() - t0
        tok_name = None
        if tokenizer is not None:
            tok_name = "tokenizer.json"
            if isinstance(tokenizer, (str, Path)):
                shutil.copyfile(tokenizer, tmp / tok_name)
            else:
                (tmp / tok_name).write_text(tokenizer.to_json(), encoding="utf-8")
        trt_section = _build_engines(tmp, engine_plan, ios, progress)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = Manifest(
            target=target, dtype=dtype, max_context=max_context, model=cfg,
            components={io.name: io for io in ios},
            files=hash_files(tmp, names, progress, "hashing", known=streamed), tokenizer=tok_name,
            tensorrt=trt_section, g3export_version=package_version("g3export"),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            versions={k: package_version(k) for k in ("torch", "onnx", "onnxscript", "onnx-ir",
                                                      "onnxruntime", "onnxruntime-gpu")},
            export_seconds=round(export_s, 2), extra=extra_manifest or {},
            quantization=quant.to_dict() if quant is not None else None)
        manifest.write(tmp)
        od.commit()  # crash-safe swap (g3export.export.outdir)
    finally:
        od.close()  # removes the partial dir if the build did not complete; unlocks
    return out


def _check_components(cfg: ModelConfig, components) -> tuple[str, ...]:
    if components is None:
        return ("text", "vision") if cfg.has_vision else ("text",)
    components = tuple(dict.fromkeys(components))
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise BuildError(f"unknown components {bad or '(none)'}; choose from: "
                         f"{', '.join(COMPONENTS)}")
    if "vision" in components and not cfg.has_vision:
        raise BuildError(f"model {cfg.name!r} has no vision encoder: build --components text")
    return components


def _build_engines(partial_dir: Path, plan, ios: list, progress: bool) -> TensorRTSection | None:
    """The TensorRT step of a `trt`/`trt-rtx` build (None for `onnx`): runs after the ONNX
    components are written into the partial directory and before files are hashed, so the
    engines are covered by the manifest's sha256 list. Each component's .onnx was written for
    TensorRT by the export (EnginePlan.export_options) and is kept, unchanged, beside its engine
    (see g3export.export.trt.build_text_engine); the returned
    section is the manifest's `tensorrt` section (flavour, version, compute capabilities, attention
    translation and plugin, profiles, engine bytes and build time). Only the text component gets
    an engine so far; a vision component stays ONNX (listed under `onnx_only`)."""
    if plan is None:
        return None
    from .trt import build_text_engine

    section: dict[str, Any] | None = None
    for io in ios:
        if io.name == "text":
            section = build_text_engine(partial_dir, plan, io, progress=progress)
    if section is None:
        raise BuildError("a TensorRT build needs the text component")
    section["onnx_only"] = [io.name for io in ios if io.name not in section["engines"]]
    return TensorRTSection.from_dict(section)

