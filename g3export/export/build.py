"""The build directory (DESIGN §3.5): written to a temporary sibling and renamed into place only
when complete; a manifest that any runtime (a C++ one later) can follow; hashes checked on load.

    out/
      manifest.json      format_version, g3export version, model config, target, dtype,
                         max_context, KV layout, components and their I/O (ComponentIO), tokenizer
                         file name, versions of torch/onnx/onnxruntime/..., sha256+size per file
      text.onnx          the text component (graph; weights in the .data file beside it)
      text.onnx.data
      vision.onnx        the vision component (models with vision; onnx_vision), + .data
      vision.onnx.data
      tokenizer.json     when one was given
      text.engine        --target trt / trt-rtx only: the serialized TensorRT engine of text.onnx
                         (which is kept, rewritten for TensorRT); the manifest's `tensorrt`
                         section says flavour, version, compute capabilities, attention
                         translation, plugin, profiles (g3export.export.trt.build_text_engine)

`build(..., components=("vision",))` writes only some components (default: every one the config
has); `Build.components` lists what a directory holds.

Atomicity. `build()` writes everything into `<out>.partial-<pid>-<random>` (same parent, so the
final rename is atomic on one filesystem); manifest.json is written last; only then is the
directory renamed to `<out>`. With force, an existing `<out>` is moved aside only after the new
build is complete, and removed after the rename. An interrupted build (exception, Ctrl-C) removes
its partial dir; a killed one leaves a `.partial-` dir without a manifest, which `load_build`
refuses and the next `build()` into the same `<out>` removes (when its pid is gone).

`load_build(dir)` refuses, with a `BuildError` whose message says what to do: a missing directory
or manifest, a `.partial-` directory, a newer format_version, a different target, a missing file,
or a size/sha256 mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..modeling.cache import kv_layout
from ..modeling.config import ModelConfig
from ..errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TARGETS = ("onnx", "trt", "trt-rtx")
_PARTIAL = re.compile(r"^(?P<name>.+)\.partial-(?P<pid>\d+)-[0-9a-f]+$")


class BuildError(UserError, RuntimeError):
    """A build directory that cannot be used (or written); the message says what to do."""


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _rebuild_hint(path: Path) -> str:
    return f"rebuild it with `g3export build ... --out {path} --force`"


def sha256_file(path: Path, bar=None, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            if bar is not None:
                bar.update(len(b))
    return h.hexdigest()


def _hash_files(root: Path, names: list[str], progress: bool, desc: str,
                known: dict[str, dict] | None = None) -> dict[str, dict]:
    """{name: {"size", "sha256"}}. `known`: digests taken as the files were written (streamed
    weights), used when the file's size and mtime are still those recorded (a TensorRT build
    rewrites text.onnx.data: then it is hashed again)."""
    from tqdm import tqdm

    out = {}
    todo = []
    for n in names:
        st = (root / n).stat()
        k = (known or {}).get(n)
        if k is not None and (k["size"], k["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            out[n] = {"size": k["size"], "sha256": k["sha256"]}
        else:
            todo.append(n)
    total = sum((root / n).stat().st_size for n in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
              leave=False) as bar:
        for n in todo:
            p = root / n
            out[n] = {"size": p.stat().st_size, "sha256": sha256_file(p, bar)}
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Build:
    """A loaded (and checked) build directory."""

    root: Path
    manifest: dict[str, Any]
    config: ModelConfig
    target: str
    dtype: str
    max_context: int

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def components(self):
        from .onnx_export import ComponentIO

        return {k: ComponentIO.from_dict(v) for k, v in self.manifest["components"].items()}

    def component(self, name: str):
        comps = self.components
        if name not in comps:
            raise BuildError(f"{self.root} has no {name!r} component (has: {', '.join(comps)})")
        return comps[name]

    @property
    def tokenizer(self) -> Path | None:
        t = self.manifest.get("tokenizer")
        return self.root / t if t else None

    @property
    def kv_layout(self) -> dict[str, Any]:
        return self.manifest["kv_layout"]


def load_build(build_dir: str | Path, expect_target: str | None = None,
               check_hashes: bool = True, progress: bool = False) -> Build:
    root = Path(build_dir)
    m = _PARTIAL.match(root.name)
    if m:
        raise BuildError(f"{root} is the leftover of an interrupted build (a '.partial-' directory); "
                         f"delete it and run the build again (`g3export build ... --out "
                         f"{root.parent / m.group('name')}`)")
    if not root.is_dir():
        raise BuildError(f"build directory {root} does not exist; create it with "
                         f"`g3export build --size SIZE --target onnx --out {root}`")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BuildError(f"{root} has no {MANIFEST}: it is not a complete g3export build; "
                         + _rebuild_hint(root))
    try:
        man = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BuildError(f"{mpath} is not valid JSON ({e}); " + _rebuild_hint(root)) from None
    fv = man.get("format_version")
    if not isinstance(fv, int):
        raise BuildError(f"{mpath} has no integer format_version; " + _rebuild_hint(root))
    if fv > FORMAT_VERSION:
        raise BuildError(f"{root} was written in build format {fv} by g3export "
                         f"{man.get('g3export_version')}; this g3export "
                         f"({_version('g3export')}) reads format {FORMAT_VERSION} at most: upgrade "
                         f"g3export, or " + _rebuild_hint(root))
    target = man.get("target")
    if expect_target is not None and target != expect_target:
        raise BuildError(f"{root} is a '{target}' build but this runtime needs target "
                         f"'{expect_target}': rebuild with `g3export build ... --target "
                         f"{expect_target} --out DIR`, or run it with the '{target}' runtime")
    files = man.get("files") or {}
    for name, meta in files.items():
        p = root / name
        if not p.is_file():
            raise BuildError(f"{root} is missing {name} (listed in its manifest); "
                             + _rebuild_hint(root))
        if p.stat().st_size != meta["size"]:
            raise BuildError(f"{root / name} has {p.stat().st_size} bytes, the manifest says "
                             f"{meta['size']}: the file was altered or truncated; "
                             + _rebuild_hint(root))
    if check_hashes:
        got = _hash_files(root, list(files), progress, "checking hashes")
        for name, meta in files.items():
            if got[name]["sha256"] != meta["sha256"]:
                raise BuildError(f"{root / name} does not match its sha256 in the manifest: the "
                                 f"file was altered or corrupted; " + _rebuild_hint(root))
    try:
        config = ModelConfig.from_dict(man["model"])
    except Exception as e:
        raise BuildError(f"{mpath} has an unreadable model config ({e}); "
                         + _rebuild_hint(root)) from None
    return Build(root, man, config, target, man["dtype"], int(man["max_context"]))


def _clean_stale_partials(out: Path) -> None:
    """Remove `<out>.partial-<pid>-*` siblings whose writer process is gone."""
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = _PARTIAL.match(p.name)
        if not m or m.group("name") != out.name or not p.is_dir():
            continue
        pid = int(m.group("pid"))
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive or pid == os.getpid():
            shutil.rmtree(p, ignore_errors=True)


def build(model, tokenizer_json: str | Path | None, out_dir: str | Path, target: str = "onnx",
          dtype: str = "fp32", max_context: int = 2048, force: bool = False,
          progress: bool = True, extra_manifest: dict[str, Any] | None = None,
          all_logits: bool = False, images: bool | None = None, dynamic_batch: bool = True,
          export_options: dict[str, Any] | None = None,
          components: tuple[str, ...] | None = None,
          trt_options: dict[str, Any] | None = None, weights=None, quant=None) -> Path:
    """Export `model` (a Gemma3Model; cast to dtype in place) into the build directory `out_dir`.

    weights: a g3export.modeling.sources.WeightSource, when `model` is on the meta device
    (`g3export.modeling.weights.open_weights` gives both): the weights stream from it into the
    build and memory does not grow with the model (DESIGN §3.6). None: the model's own tensors.

    components: which graphs to write, from ("text", "vision"); default: text, plus vision when
    the config has a vision encoder. images: whether the text graph takes image features
    (default: when the config has vision). trt_options: for --target trt/trt-rtx, the keyword
    arguments of g3export.export.trt.plan_engines (attention, prefill_chunk, max_batch,
    compute_capabilities, timing_cache); see _build_engines. quant: a
    g3export.export.quantize.QuantScheme (checked here, before any work; recorded in the
    manifest's `quantization` section).
    """
    out = Path(out_dir)
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; use one of: {', '.join(TARGETS)}")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise BuildError(f"unknown dtype {dtype!r}; use fp32 (CPU), fp16 or bf16 (GPU)")
    cfg: ModelConfig = model.config
    components = _check_components(cfg, components)
    if images is None:
        images = cfg.has_vision
    try:
        layout = kv_layout(cfg.text, max_context, 1, dtype)
    except ValueError as e:
        raise BuildError(str(e)) from None
    if quant is not None:
        from .quantize import check_scheme, quant_dims

        check_scheme(quant, target, quant_dims(cfg.text))
    engine_plan = None
    if target != "onnx":  # checked before any work; the ONNX is exported in its translation
        from .trt import plan_engines

        engine_plan = plan_engines(cfg, target, dtype, max_context, images=images,
                                   **(trt_options or {}))
        export_options = {**engine_plan.export_options(), **(export_options or {})}
    if out.exists() and not force:
        raise BuildError(f"{out} already exists; pass --force to replace it (it is replaced only "
                         "once the new build is complete)")
    if tokenizer_json is not None and not Path(tokenizer_json).is_file():
        raise BuildError(f"tokenizer file {tokenizer_json} not found")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(out)
    tmp = out.parent / f"{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        from .onnx_export import export_text
        from .onnx_vision import export_vision

        def step(what: str) -> None:  # the export itself has no progress bar: say what runs
            if progress:
                print(f"{what} ...", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        ios = []
        streamed: dict[str, dict] = {}  # data files hashed as they were written
        if "text" in components:
            step("exporting the text component (torch.export -> ONNX)")
            ios.append(export_text(model, tmp, max_context, dtype, all_logits=all_logits,
                                   images=images, dynamic_batch=dynamic_batch, progress=progress,
                                   weights=weights, hashes=streamed, quant=quant,
                                   **(export_options or {})))
        if "vision" in components:
            step("exporting the vision component (torch.export -> ONNX)")
            ios.append(export_vision(model, tmp, dtype, progress=progress, weights=weights,
                                     hashes=streamed))
        export_s = time.perf_counter() - t0
        tok_name = None
        if tokenizer_json is not None:
            tok_name = "tokenizer.json"
            shutil.copyfile(tokenizer_json, tmp / tok_name)
        trt_section = _build_engines(tmp, engine_plan, ios, progress)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        files = _hash_files(tmp, names, progress, "hashing", known=streamed)
        manifest = {
            "format_version": FORMAT_VERSION,
            "g3export_version": _version("g3export"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": target,
            "dtype": dtype,
            "max_context": max_context,
            "model": cfg.to_dict(),
            "kv_layout": layout.to_dict(),
            "components": {io.name: io.to_dict() for io in ios},
            "tokenizer": tok_name,
            "versions": {k: _version(k) for k in ("torch", "onnx", "onnxscript", "onnx-ir",
                                                   "onnxruntime", "onnxruntime-gpu")},
            "export_seconds": round(export_s, 2),
            "files": files,
            "tensorrt": trt_section,
            "quantization": quant.to_dict() if quant is not None else None,
            "extra": extra_manifest or {},
        }
        _write_json(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        if out.exists():  # force: swap only now that the new build is complete
            old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


COMPONENTS = ("text", "vision")


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


def _build_engines(partial_dir: Path, plan, ios: list, progress: bool) -> dict[str, Any] | None:
    """The TensorRT step of a `trt`/`trt-rtx` build (None for `onnx`): runs after the ONNX
    components are written into the partial directory and before files are hashed, so the
    engines are covered by the manifest's sha256 list. Each component's .onnx is rewritten for
    TensorRT and kept beside its engine (see g3export.export.trt.build_text_engine); the returned
    dict is the manifest's `tensorrt` section (flavour, version, compute capabilities, attention
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
    return section


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


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
