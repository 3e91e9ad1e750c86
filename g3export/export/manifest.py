"""The build directory's format (DESIGN §3.5), owned here: what `manifest.json` holds, as typed
dataclasses; the graph I/O types; hashing; `load_build`, which refuses anything it cannot trust.
Runtimes and the CLI import only this module to open a build: it needs neither torch nor onnx_ir
nor onnxscript (tests/export/test_manifest.py checks it in a fresh interpreter).

    out/
      manifest.json      Manifest.to_dict(): format_version, g3export version, model config,
                         target, dtype, max_context, KV layout, components (ComponentIO), tokenizer,
                         versions of torch/onnx/..., files {name: {size, sha256}}, tensorrt
      text.onnx          the text component (graph; weights in text.onnx.data beside it)
      text.onnx.data
      vision.onnx        the vision component (models with vision), + .data
      vision.onnx.data
      tokenizer.json     when the build has a tokenizer
      text.engine        --target trt / trt-rtx: the TensorRT engine of text.onnx (kept, rewritten
                         for TensorRT); the `tensorrt` section (TensorRTSection) says flavour,
                         version, compute capabilities, attention translation, plugin, profiles

Build directories are artifacts people download, so a manifest is untrusted input. `load_build`
checks it against a schema (`Manifest.from_dict` with the readers of
g3export.export.manifest_schema: every field's type, bool is not an int, known
dtype/target/components), then the whole of it: the KV layout and every component's
I/O must be what the model config gives at that max_context and dtype (a wrong `max_context` or
vocabulary is refused here, not by ONNX Runtime); every file the manifest names (files entries,
tokenizer, component graphs, engines, the external-data files the .onnx graphs point at) must be
a plain name inside the directory (after symlinks), a regular file, and listed in `files` with
its size and sha256, which are checked (g3export.export.build_files). Every refusal is one
`BuildError` line naming the entry and saying to rebuild.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..dtypes import DTYPES
from ..errors import BuildError
from ..modeling.cache import KVLayout, kv_layout
from ..modeling.config import ModelConfig
from . import manifest_schema as schema
from .graph_io import ComponentIO, TensorSpec, text_io, vision_io
from .outdir import SIBLING, recover
from .build_files import (MANIFEST, FileEntry, check_files, hash_files, inside, rebuild_hint,  # noqa: F401
                          regular_file, sha256_file)

__all__ = ["BuildError", "Build", "ComponentIO", "EngineEntry", "FileEntry", "FORMAT_VERSION",
           "MANIFEST", "Manifest", "TARGETS", "TensorRTSection", "TensorSpec", "hash_files",
           "load_build", "sha256_file"]

FORMAT_VERSION = 1
ENGINE_TARGETS = ("trt", "trt-rtx")   # builds that hold TensorRT engines (export/trt FLAVOURS)
TARGETS = ("onnx", *ENGINE_TARGETS)    # the CLI's --target choices read this
COMPONENTS = ("text", "vision")
MAX_MANIFEST_BYTES = 64 << 20          # a manifest is ~100 kB; refuse to read a huge one


def package_version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# The graph I/O contract, as data


# ---------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class EngineEntry:
    """One TensorRT engine: its file, the .onnx it was built from, its optimization profiles
    ([{"name": ..., "shapes": {input: [min, opt, max]}}]: one, "text", since issue 12; builds
    before it have "prefill" and "decode"); `extra` keeps the build's statistics (bytes, seconds,
    peak RSS, layer counts) and any field a newer builder adds."""

    file: str
    onnx: str
    profiles: tuple[dict[str, Any], ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def profile_names(self) -> list[str]:
        return [p["name"] for p in self.profiles]

    def profile_for(self, batch: int, chunk: int, ids: str = "input_ids") -> int:
        """The index of the first profile in which every step of a runtime with `batch` rows and
        chunks of 1..`chunk` tokens runs: `ids` ([batch, seq]) takes batch 1..`batch` and seq
        1..`chunk` (decode [batch, 1], prefill [batch or 1, 1..chunk]). A build before issue 12
        answers its "prefill" profile. BuildError when none does."""
        for i, p in enumerate(self.profiles):
            shapes = p.get("shapes", {}).get(ids)
            if shapes is None:  # the input is static in this profile
                return i
            lo, _, hi = shapes  # [batch, seq] each (the schema checked three int lists)
            if (len(lo) == len(hi) == 2 and lo[0] <= 1 <= batch <= hi[0]
                    and lo[1] <= 1 <= chunk <= hi[1]):
                return i
        raise BuildError(f"no optimization profile of {self.file} takes {ids} of batch 1..{batch} "
                         f"and 1..{chunk} tokens (profiles: {self.profile_names}); rebuild it "
                         "with g3export build")

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "onnx": self.onnx, "profiles": [dict(p) for p in self.profiles],
                **self.extra}


@dataclass(frozen=True)
class TensorRTSection:
    """The manifest's `tensorrt` section (builds with --target trt / trt-rtx): what the engines
    were built with and for (written by g3export.export.trt.build_text_engine)."""

    flavour: str                         # trt | trt-rtx (= the build's target)
    library: str                         # tensorrt | tensorrt_rtx
    version: str | None
    compute_capabilities: list[str] | None
    dtype: str
    attention: str                       # plugin | native
    prefill_chunk: int                   # the longest chunk the engine's profile takes
    engines: dict[str, EngineEntry]      # {component: engine}
    max_batch: int = 1
    chunk_align: int | None = None       # native: no chunk crosses a multiple of this
    opset: int | None = None
    plugin: dict[str, Any] | None = None  # {"name", "namespace", "version"} (attention plugin)
    strongly_typed: bool = True
    fp16_note: str | None = None
    timing_cache: str | None = None
    onnx_only: list[str] = field(default_factory=list)  # components without an engine
    extra: dict[str, Any] = field(default_factory=dict)  # fields a newer builder adds

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("engines", "extra") and (f.name != "plugin" or self.plugin)}
        d["engines"] = {k: e.to_dict() for k, e in self.engines.items()}
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "tensorrt") -> "TensorRTSection":
        t = schema.tensorrt(d, where, [f.name for f in dataclasses.fields(cls)])
        t["engines"] = {k: EngineEntry(**e) for k, e in t["engines"].items()}
        return cls(**t)


@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed. `from_dict` checks types and that the parts agree with each other
    (KV layout and graph I/O against the model config); `load_build` checks the files."""

    target: str
    dtype: str
    max_context: int
    model: ModelConfig
    components: dict[str, ComponentIO]
    files: dict[str, FileEntry]
    tokenizer: str | None = None
    tensorrt: TensorRTSection | None = None
    quantization: dict[str, Any] | None = None  # g3export.export.quantize.QuantScheme.to_dict()
    format_version: int = FORMAT_VERSION
    g3export_version: str | None = None
    created: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    export_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_layout(self) -> KVLayout:
        """The KV layout (batch 1) the graphs were exported for; `from_dict` has checked that
        the recorded one equals this."""
        return kv_layout(self.model.text, self.max_context, 1, self.dtype)

    def referenced_files(self) -> dict[str, str]:
        """{file name: the manifest entry naming it}, for every file a runtime opens."""
        refs = {c.file: f"components.{k}.file" for k, c in self.components.items()}
        if self.tokenizer is not None:
            refs[self.tokenizer] = "tokenizer"
        for k, e in (self.tensorrt.engines if self.tensorrt else {}).items():
            refs[e.file] = f"tensorrt.engines.{k}.file"
            refs[e.onnx] = f"tensorrt.engines.{k}.onnx"
        return refs

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "g3export_version": self.g3export_version,
            "created": self.created, "target": self.target, "dtype": self.dtype,
            "max_context": self.max_context, "model": self.model.to_dict(),
            "kv_layout": self.kv_layout.to_dict(),
            "components": {k: c.to_dict() for k, c in self.components.items()},
            "tokenizer": self.tokenizer, "versions": dict(self.versions),
            "export_seconds": self.export_seconds,
            "files": {k: f.to_dict() for k, f in self.files.items()},
            "tensorrt": None if self.tensorrt is None else self.tensorrt.to_dict(),
            "quantization": None if self.quantization is None else dict(self.quantization),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        """Raises BuildError naming the first entry that is missing, mistyped or inconsistent
        (without the directory and the rebuild hint: load_build adds them)."""
        if not isinstance(d, dict):
            raise BuildError(f"the manifest must be a JSON object, got {type(d).__name__}")
        fv = schema.get(d, "format_version", "int")
        if not 1 <= fv <= FORMAT_VERSION:
            schema.fail("format_version", f"is {fv}; this g3export reads formats 1..{FORMAT_VERSION}")
        max_context = schema.get(d, "max_context", "int")
        if max_context < 1:
            schema.fail("max_context", f"must be >= 1, got {max_context}")
        comps = schema.get(d, "components", "object")
        if not comps:
            schema.fail("components", "is empty: the build has no graph")
        components = {}
        for k, c in comps.items():
            if k not in COMPONENTS:
                schema.fail(f"components.{k}", f"is not a component; known: {', '.join(COMPONENTS)}")
            components[k] = ComponentIO.from_dict(c, f"components.{k}")
            if components[k].name != k:
                schema.fail(f"components.{k}.name", f"is {components[k].name!r}, not {k!r}")
        files = {}
        for name, e in schema.get(d, "files", "object").items():
            e = schema.obj(e, f"files.{name}")
            size, sha = schema.get(e, "size", "int", f"files.{name}"), schema.get(
                e, "sha256", "str", f"files.{name}")
            if size < 0 or not schema.SHA256.match(sha):
                schema.fail(f"files.{name}", "must have a size >= 0 and a sha256 of 64 hex digits")
            files[name] = FileEntry(size, sha)
        trt = schema.get(d, "tensorrt", "object|null", default=None)
        versions = schema.get(d, "versions", "object", default={})
        if not all(isinstance(v, (str, type(None))) for v in versions.values()):
            schema.fail("versions", "must map package names to version strings")
        man = cls(
            target=schema.choice(d, "target", TARGETS), dtype=schema.choice(d, "dtype", tuple(DTYPES)),
            max_context=max_context, model=schema.model_config(schema.get(d, "model", "object")),
            components=components, files=files,
            tokenizer=schema.get(d, "tokenizer", "str|null"),
            tensorrt=None if trt is None else TensorRTSection.from_dict(trt),
            quantization=schema.get(d, "quantization", "object|null", default=None),
            format_version=fv, g3export_version=schema.get(d, "g3export_version", "str|null",
                                                           default=None),
            created=schema.get(d, "created", "str|null", default=None), versions=dict(versions),
            export_seconds=schema.get(d, "export_seconds", "number|null", default=None),
            extra=dict(schema.get(d, "extra", "object", default={})))
        schema.check_agreement(man, schema.get(d, "kv_layout", "object"), lambda: _contracts(man))
        return man

    def write(self, directory: Path) -> None:
        """Write manifest.json into `directory` (fsynced, renamed into place)."""
        path = Path(directory) / MANIFEST
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)


# ---------------------------------------------------------------------------------------------
# Opening a build


@dataclass(frozen=True)
class Build:
    """A loaded (and checked) build directory."""

    root: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.root / name

    config = property(lambda self: self.manifest.model)
    target = property(lambda self: self.manifest.target)
    dtype = property(lambda self: self.manifest.dtype)
    max_context = property(lambda self: self.manifest.max_context)
    components = property(lambda self: dict(self.manifest.components))
    tensorrt = property(lambda self: self.manifest.tensorrt)

    def component(self, name: str) -> ComponentIO:
        comps = self.manifest.components
        if name not in comps:
            raise BuildError(f"{self.root} has no {name!r} component (has: {', '.join(comps)})")
        return comps[name]

    @property
    def tokenizer(self) -> Path | None:
        t = self.manifest.tokenizer
        return self.root / t if t else None

    def kv_layout(self, batch: int = 1) -> KVLayout:
        """The layout the manifest records (checked against the config), for `batch` rows."""
        return self.manifest.kv_layout.for_batch(batch)


def load_build(build_dir: str | Path, expect_target: str | None = None,
               check_hashes: bool = True, progress: bool = False) -> Build:
    """Open and check a build directory (see the module docstring); BuildError otherwise."""
    root = Path(build_dir)
    m = SIBLING.match(root.name)
    if m:
        raise BuildError(f"{root} is the leftover of an interrupted build (a '.{m.group('kind')}-' "
                         f"directory); delete it and run the build again (`g3export build ... "
                         f"--out {root.parent / m.group('name')}`)")
    try:  # a build killed between the two renames of --force: put the old one back
        recover(root)
    except OSError:
        pass
    if not root.is_dir():
        raise BuildError(f"build directory {root} does not exist; create it with "
                         f"`g3export build --size SIZE --target onnx --out {root}`")
    man = read_manifest(root)
    if expect_target is not None and man.target != expect_target:
        raise BuildError(f"{root} is a '{man.target}' build but this runtime needs target "
                         f"'{expect_target}': rebuild with `g3export build ... --target "
                         f"{expect_target} --out DIR`, or run it with the '{man.target}' runtime")
    check_files(root, man.files, man.referenced_files(), check_hashes, progress)
    return Build(root, man)


def read_manifest(root: Path) -> Manifest:
    """manifest.json of `root`, parsed and checked (BuildError naming the entry otherwise)."""
    mpath = root / MANIFEST
    hint = rebuild_hint(root)
    if not mpath.exists() and not mpath.is_symlink():
        raise BuildError(f"{root} has no {MANIFEST}: it is not a complete g3export build; "
                         + hint)
    if not inside(root, mpath) or not regular_file(mpath):
        raise BuildError(f"{mpath} is not a regular file inside {root}; " + hint)
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BuildError(f"{mpath} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a "
                         "manifest g3export wrote; " + hint)
    try:
        d = json.loads(mpath.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BuildError(f"{mpath} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         + hint) from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise BuildError(f"{mpath} is not valid JSON ({e}); " + hint) from None
    fv = d.get("format_version") if isinstance(d, dict) else None
    if isinstance(fv, int) and not isinstance(fv, bool) and fv > FORMAT_VERSION:
        raise BuildError(f"{root} was written in build format {fv} by g3export "
                         f"{short_version(d.get('g3export_version'))}; this g3export "
                         f"({package_version('g3export')}) reads format {FORMAT_VERSION} at "
                         f"most: upgrade g3export, or " + hint)
    try:
        return Manifest.from_dict(d)
    except BuildError as e:
        raise BuildError(f"{mpath}: {e}; " + hint) from None


def short_version(v: Any) -> str:
    return v if isinstance(v, str) and len(v) < 40 else "(unknown version)"


def _contracts(man: "Manifest") -> dict[str, ComponentIO]:
    """The I/O each of the build's components must have for its model, dtype and context (the
    batch dimension and the text graph's options are the graph's own)."""
    out = {}
    text = man.components.get("text")
    if text is not None:
        ids = [s for s in text.inputs if s.name == "input_ids"]
        b = ids[0].shape[0] if ids and ids[0].shape else "batch"
        out["text"] = text_io(man.model, man.max_context, man.dtype,
                              bool(text.options.get("all_logits")), bool(text.options.get("images")),
                              b if isinstance(b, int) else None, text.file)
    if "vision" in man.components and man.model.has_vision:
        out["vision"] = vision_io(man.model, man.dtype, man.components["vision"].file)
    return out
