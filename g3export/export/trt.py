"""TensorRT engine builder, two flavours behind one module (issue 7, DESIGN §3.2, §5):

    target     library                 package                                   GPUs
    ---------  ----------------------  ----------------------------------------  ----------------------
    trt        TensorRT >= 10.6        `pip install 'g3export[tensorrt]'`         data-centre (H100...)
    trt-rtx    TensorRT for RTX 1.7    `pip install 'g3export[trt-rtx]'`          RTX, cc 8.0/8.6/8.9/
                                       (= tensorrt-rtx-cu13==1.7.1.116)           12.0/12.1 (not 9.0)

Contracts:

* `require_tensorrt(target)` returns the flavour's Python module or raises `TensorRTMissing` (a
  `RuntimeError` whose message says what to install and that `--target onnx` works). Call it
  before any work so that a missing library never leaves a partial build directory. A module that
  imports but has no `Builder` is treated as missing: `tensorrt-stubs` installs a `tensorrt/`
  directory holding only `.pyi` files, which Python imports as an empty namespace package.
* TensorRT-RTX's ONNX parser `dlopen`s `libtensorrt_rtx.so` (unversioned) to create plugins and
  the wheel ships only `libtensorrt_rtx.so.1`; without the plain name the process aborts inside
  `parse` ("terminate called without an active exception"). Measured here: the parser library's
  RPATH is `$ORIGIN`, so a symlink `libtensorrt_rtx.so -> libtensorrt_rtx.so.1` beside it is found
  (even when created after `import tensorrt_rtx`); `LD_LIBRARY_PATH` set at process start works;
  setting it later in `os.environ`, or preloading the library with `ctypes` (as `.so.1` or through
  a symlink of the plain name elsewhere, RTLD_GLOBAL) does NOT (glibc matches a loaded object by
  its soname, `libtensorrt_rtx.so.1`). So `ensure_rtx_soname()` creates the symlink beside the
  wheel's library (atomically: temp name + rename); where that directory is not writable it makes
  the symlink in a private cache directory, and `build_engine` then runs the build in a child
  process whose `LD_LIBRARY_PATH` starts with that directory (`rtx_env()` gives the environment
  for any other process that must parse plugin graphs).
* `prepare_for_tensorrt(model)` must run on an exported graph before it is saved for a TensorRT
  target: the exporter (optimize=False) leaves e.g. ReduceMean's axes as Reshape(Constant), which
  TensorRT's parser refuses ("Axis input must resolve to a build-time constant"); it folds
  constants (onnxscript's folder, small tensors only: 0.07 s on the tiny preset).
* `build_engine(onnx_path, engine_path, flavour, ...)` parses the ONNX file with the flavour's
  parser (plugin creators registered first), requires every node to parse, builds a strongly
  typed network (precision is the graph's: a bf16 graph gives a bf16 engine), writes the
  serialized engine to `engine_path` and returns an `EngineInfo` (flavour, version, seconds,
  bytes, layer counts by type, profiles, compute capabilities, peak RSS). Nothing is written when
  parsing or building fails (`EngineBuildError`).
* Optimization profiles: ONE engine with two profiles, `prefill` (seq 1..chunk, opt chunk) and
  `decode` (seq = 1). One engine because two would each carry all the weights (the tied 262144-row
  embedding alone is 1 GiB at 12B bf16); the runtime creates one execution context per profile,
  both bound to the same KV-cache buffers. `text_profiles()` builds them from the component's I/O.
* fp32 networks: TensorRT-RTX builds fp32 `Attention` only when the layer is decomposable, so
  every attention layer of an fp32 network is marked decomposable (bf16/fp16 stay fused).
* The preview feature ALIASED_PLUGIN_IO_10_03 is enabled: the attention plugin declares its cache
  outputs as aliases of its cache inputs (in-place update); without it the build is refused.
* Timing cache: `--target trt` only (loaded and saved at `timing_cache`); TensorRT-RTX has no
  use for one without a GPU, and asking for it there is an error.
* Compute capabilities (TensorRT-RTX): a list such as ["8.6", "12.0"]; None = the library's
  default. The CPU-only ahead-of-time build needs no GPU.
* The build directory's engine step (`g3export build --target trt|trt-rtx`, via
  g3export.export.build._build_engines): `plan_engines` checks the options against the model
  before any work (attention plugin|native; prefill chunk, default 512, and for native at most the
  smallest ring; compute capabilities only for trt-rtx; timing cache only for trt);
  `build_text_engine` rewrites the exported text.onnx for TensorRT, KEEPS it beside text.engine
  (rebuilding an engine for another GPU/version needs no re-export, and verify reads weights from
  it), and returns the manifest's `tensorrt` section. fp16: nothing is clamped; the CLI warns
  (FP16_NOTE) and the manifest records the note.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # type-checked against tensorrt-stubs (TensorRT-RTX has the same API)
    import tensorrt

from ..errors import BuildError
from ..modeling.cache import DEFAULT_PREFILL_CHUNK
from .manifest import ENGINE_TARGETS

FLAVOURS = ENGINE_TARGETS

_MODULES = {"trt": "tensorrt", "trt-rtx": "tensorrt_rtx"}
_INSTALL = {
    "trt": ("TensorRT is not installed. Install TensorRT >= 10.6 for your CUDA version from "
            "NVIDIA (pip install 'g3export[tensorrt]', which needs NVIDIA's package index "
            "https://pypi.nvidia.com, or the tar/deb packages from "
            "https://developer.nvidia.com/tensorrt)"),
    "trt-rtx": ("TensorRT for RTX is not installed. Install it with: "
                "pip install 'g3export[trt-rtx]'  (tensorrt-rtx-cu13==1.7.1.116)"),
}

# compute capability strings accepted for TensorRT-RTX -> ComputeCapability member names
RTX_COMPUTE_CAPABILITIES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89",
                            "12.0": "SM120", "12.1": "SM121"}

DEFAULT_PLUGINS = ("g3export.export.trt_plugin:register_plugins",)


class TensorRTMissing(BuildError):
    """The flavour's library cannot be imported. The message says what to install."""


class EngineBuildError(BuildError):
    """Parsing or building failed; the message carries the parser's/builder's errors."""


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown TensorRT flavour {flavour!r}; valid: {', '.join(FLAVOURS)}")


def require_tensorrt(target: str) -> Any:
    """Import and return `tensorrt` (target 'trt') or `tensorrt_rtx` (target 'trt-rtx').

    Raises TensorRTMissing, before any other work, when it is not installed (or is only
    `tensorrt-stubs`). For TensorRT-RTX the unversioned-soname problem is fixed first."""
    _check_flavour(target)
    name = _MODULES[target]
    hint = (f"{_INSTALL[target]}. Without it, `g3export build --target onnx` works and needs no "
            "TensorRT.")
    if importlib.util.find_spec(name) is None:
        raise TensorRTMissing(hint)
    if target == "trt-rtx":
        ensure_rtx_soname()
    try:
        mod = importlib.import_module(name)
    except (ImportError, OSError) as e:
        raise TensorRTMissing(f"{hint} (importing {name} failed: {e})") from e
    if not hasattr(mod, "Builder"):
        where = list(getattr(mod, "__path__", [])) or getattr(mod, "__file__", None)
        raise TensorRTMissing(f"{hint} (`import {name}` found only {where}, e.g. type stubs from "
                              "tensorrt-stubs, not the library)")
    return mod


def tensorrt_available(target: str) -> bool:
    try:
        require_tensorrt(target)
    except TensorRTMissing:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# libtensorrt_rtx.so


@dataclass(frozen=True)
class SonameFix:
    """How `libtensorrt_rtx.so` is made findable. method: 'present' (already there), 'symlink'
    (created beside the wheel's library), 'env' (private dir: needs LD_LIBRARY_PATH at process
    start, see `in_process`), 'none' (no tensorrt_rtx_libs package: a system install)."""

    method: str
    lib_dir: str | None
    private_dir: str | None = None

    @property
    def in_process(self) -> bool:
        """Whether this process can parse plugin graphs (the plain name is findable now)."""
        if self.method != "env":
            return True
        return self.private_dir in _startup_ld_library_path()


_SONAME = "libtensorrt_rtx.so"
_REAL = "libtensorrt_rtx.so.1"
_fix_cache: SonameFix | None = None


def _startup_ld_library_path() -> list[str]:
    """LD_LIBRARY_PATH as the dynamic loader saw it at process start (later changes to os.environ
    are ignored by the loader)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    for item in raw.split(b"\0"):
        if item.startswith(b"LD_LIBRARY_PATH="):
            return item[len(b"LD_LIBRARY_PATH="):].decode(errors="replace").split(os.pathsep)
    return []


def _rtx_lib_dir() -> Path | None:
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / _REAL).exists():
            return Path(loc)
    return None


def _private_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "g3export" / "tensorrt_rtx_soname"


def _atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: concurrent processes never see a half-made link


def ensure_rtx_soname(lib_dir: Path | None = None, private_dir: Path | None = None,
                      allow_in_place: bool = True) -> SonameFix:
    """Make `libtensorrt_rtx.so` findable by TensorRT-RTX's ONNX parser (module docstring).

    Arguments are for tests; by default the installed wheel's directory and the user's cache.
    Idempotent and cheap after the first call."""
    global _fix_cache
    default = lib_dir is None and private_dir is None and allow_in_place
    if default and _fix_cache is not None:
        return _fix_cache
    lib_dir = lib_dir if lib_dir is not None else _rtx_lib_dir()
    if lib_dir is None:
        fix = SonameFix("none", None)
    else:
        link = lib_dir / _SONAME
        if link.exists():  # follows the link: a dangling one is replaced below
            fix = SonameFix("present", str(lib_dir))
        else:
            fix_: SonameFix | None = None
            if allow_in_place and os.access(lib_dir, os.W_OK):
                try:
                    _atomic_symlink(_REAL, link)  # relative: survives moving the environment
                    fix_ = SonameFix("symlink", str(lib_dir))
                except OSError:
                    fix_ = None
            if fix_ is None:
                pdir = private_dir if private_dir is not None else _private_cache_dir()
                pdir.mkdir(parents=True, exist_ok=True)
                _atomic_symlink(str((lib_dir / _REAL).resolve()), pdir / _SONAME)
                fix_ = SonameFix("env", str(lib_dir), str(pdir))
            fix = fix_
    if default:
        _fix_cache = fix
    return fix


def rtx_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that will parse TensorRT-RTX plugin graphs."""
    env = dict(os.environ if base is None else base)
    fix = ensure_rtx_soname()
    if fix.method == "env" and fix.private_dir:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if fix.private_dir not in parts:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([fix.private_dir, *parts])
    return env


def prepare_for_tensorrt(model: Any) -> Any:
    """Fold constant subgraphs of an onnx_ir Model in place (see the module docstring); returns
    the folder's result. Large initializers are never folded (the folder's size limits)."""
    from onnxscript.optimizer import fold_constants

    return fold_constants(model)


# ---------------------------------------------------------------------------------------------
# Profiles


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shapes. Inputs not named keep
    their static shape."""

    name: str
    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name,
                "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def text_profiles(io: Any, chunk: int, batch: tuple[int, int, int] = (1, 1, 1),
                  image_tokens: int | None = None) -> list[Profile]:
    """`prefill` (seq 1..chunk, opt chunk) and `decode` (seq 1) for a text ComponentIO
    (g3export.export.onnx_export.text_io): symbolic dims are resolved as
    batch -> batch (min, opt, max), seq -> the profile's range, image_tokens -> 1..image_tokens."""
    def resolve(spec_shape: Sequence[int | str], seq: tuple[int, int, int]) -> tuple[Shape, Shape, Shape]:
        out: list[list[int]] = [[], [], []]
        for d in spec_shape:
            if isinstance(d, int):
                vals = (d, d, d)
            elif d == "batch":
                vals = batch
            elif d == "seq":
                vals = seq
            elif d == "image_tokens":
                n = image_tokens or chunk
                vals = (1, n, n)
            else:
                raise ValueError(f"no profile rule for symbolic dim {d!r}")
            for i in range(3):
                out[i].append(int(vals[i]))
        return tuple(out[0]), tuple(out[1]), tuple(out[2])

    profiles = []
    for name, seq in (("prefill", (1, chunk, chunk)), ("decode", (1, 1, 1))):
        shapes = {t.name: resolve(t.shape, seq) for t in io.inputs
                  if any(isinstance(d, str) for d in t.shape)}
        profiles.append(Profile(name, shapes))
    return profiles


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class EngineInfo:
    flavour: str
    version: str
    engine: str
    onnx: str
    seconds: float
    bytes: int
    layers: int
    layer_types: dict[str, int]
    profiles: list[dict[str, Any]]
    compute_capabilities: list[str] | None
    plugins: list[str]
    strongly_typed: bool = True
    peak_rss_mb: float | None = None
    soname_fix: str | None = None
    decomposable_attention: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _call_registration(trt: Any, plugins: Iterable[str | Callable[[Any], Any]]) -> list[str]:
    names = []
    for p in plugins:
        if isinstance(p, str):
            mod, _, fn = p.partition(":")
            func = getattr(importlib.import_module(mod), fn or "register_plugins")
            names.append(p)
        else:
            func = p
            names.append(getattr(p, "__qualname__", repr(p)))
        func(trt)
    return names


def _parse(trt: Any, network: tensorrt.INetworkDefinition, logger: tensorrt.ILogger,
           onnx_path: Path) -> None:
    parser: tensorrt.OnnxParser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        raise EngineBuildError(f"the {onnx_path.name} graph did not parse:\n  " +
                               "\n  ".join(errors or ["(no error reported)"]))


def _layer_types(trt: Any, network: tensorrt.INetworkDefinition) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        t = str(network.get_layer(i).type).split(".")[-1]
        counts[t] = counts.get(t, 0) + 1
    return counts


def _mark_decomposable(trt: Any, network: tensorrt.INetworkDefinition) -> int:
    """Mark every attention of the network decomposable (needed for fp32). Returns how many."""
    seen = 0
    input_type = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    if input_type is None:
        return 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != input_type:
            continue
        layer.__class__ = trt.IAttentionInputLayer
        attn = getattr(layer, "attention", None)
        if attn is not None and not attn.decomposable:
            attn.decomposable = True
            seen += 1
    return seen


def _has_float32_io(trt: Any, network: tensorrt.INetworkDefinition) -> bool:
    for i in range(network.num_inputs):
        if network.get_input(i).dtype == trt.DataType.FLOAT and len(network.get_input(i).shape) == 4:
            return True
    return False


def build_engine(onnx_path: str | Path, engine_path: str | Path, flavour: str, *,
                 profiles: Sequence[Profile] = (), dtype: str | None = None,
                 compute_capabilities: Sequence[str] | None = None,
                 timing_cache: str | Path | None = None,
                 plugins: Sequence[str | Callable[[Any], Any]] = DEFAULT_PLUGINS,
                 optimization_level: int | None = None, workspace_mb: int | None = None,
                 isolate: bool | None = None, verbose: bool = False) -> EngineInfo:
    """Parse `onnx_path` with the flavour's ONNX parser and write a serialized engine to
    `engine_path` (module docstring). `dtype` ('fp32'|'fp16'|'bf16') is recorded and, for fp32,
    attention layers are made decomposable; the precision itself is the graph's (strongly typed).
    `plugins`: registration functions (`module:function`, or callables when not isolated) that
    register plugin creators with the flavour's registry before parsing. `isolate`: run the build
    in a child process (True), in this process (False), or decide (None: a child only when the
    libtensorrt_rtx.so fix needs LD_LIBRARY_PATH)."""
    _check_flavour(flavour)
    trt = require_tensorrt(flavour)
    if flavour == "trt-rtx" and timing_cache is not None:
        raise ValueError("TensorRT-RTX builds take no timing cache (it would require a GPU)")
    if flavour == "trt" and compute_capabilities:
        raise ValueError("compute capabilities are a TensorRT-RTX option; TensorRT builds for "
                         "the GPU it runs on")
    if isolate is None:
        isolate = flavour == "trt-rtx" and not ensure_rtx_soname().in_process
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if isolate:
        return _build_in_child(onnx_path, engine_path, flavour, profiles=profiles, dtype=dtype,
                               compute_capabilities=compute_capabilities,
                               timing_cache=timing_cache, plugins=plugins,
                               optimization_level=optimization_level, workspace_mb=workspace_mb,
                               verbose=verbose)

    t0 = time.perf_counter()
    logger: tensorrt.Logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    plugin_names = _call_registration(trt, plugins)
    builder: tensorrt.Builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network: tensorrt.INetworkDefinition = builder.create_network(flags)
    _parse(trt, network, logger, onnx_path)
    decomposable = 0
    if dtype == "fp32" or (dtype is None and _has_float32_io(trt, network)):
        decomposable = _mark_decomposable(trt, network)
    config: tensorrt.IBuilderConfig = builder.create_builder_config()
    aliased = getattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03", None)
    if aliased is not None:  # the attention plugin's cache outputs alias its cache inputs
        config.set_preview_feature(aliased, True)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for prof in profiles:
        p: tensorrt.IOptimizationProfile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in prof.shapes.items():
            tensor = next((network.get_input(i) for i in range(network.num_inputs)
                           if network.get_input(i).name == name), None)
            if tensor is None:
                raise EngineBuildError(f"profile {prof.name!r} names {name!r}, which is not an "
                                       "input of the network")
            if tensor.is_shape_tensor:
                p.set_shape_input(name, mn, opt, mx)
            else:
                p.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(p)
    ccs = list(compute_capabilities or [])
    if flavour == "trt-rtx" and ccs:
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            if cc not in RTX_COMPUTE_CAPABILITIES:
                raise ValueError(f"TensorRT-RTX compute capability {cc!r}; valid: "
                                 f"{', '.join(RTX_COMPUTE_CAPABILITIES)}")
            config.set_compute_capability(getattr(trt.ComputeCapability,
                                                  RTX_COMPUTE_CAPABILITIES[cc]), i)
    cache = None
    if flavour == "trt" and timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    layer_types = _layer_types(trt, network)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{flavour} builder failed on {onnx_path.name} (see the log above)")
    data = memoryview(serialized).tobytes()
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, engine_path)
    if cache is not None and timing_cache is not None:
        Path(timing_cache).write_bytes(memoryview(cache.serialize()).tobytes())
    seconds = time.perf_counter() - t0
    fix = ensure_rtx_soname().method if flavour == "trt-rtx" else None
    return EngineInfo(
        flavour=flavour, version=str(trt.__version__), engine=str(engine_path),
        onnx=str(onnx_path), seconds=round(seconds, 3), bytes=len(data),
        layers=network.num_layers, layer_types=layer_types,
        profiles=[p.to_dict() for p in profiles], compute_capabilities=ccs or None,
        plugins=plugin_names, peak_rss_mb=_peak_rss_mb(), soname_fix=fix,
        decomposable_attention=decomposable, extra={"dtype": dtype})


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _build_in_child(onnx_path: Path, engine_path: Path, flavour: str, **kw: Any) -> EngineInfo:
    plugins = kw.pop("plugins")
    if any(not isinstance(p, str) for p in plugins):
        raise ValueError("an isolated build takes plugins as 'module:function' strings")
    request = {"onnx": str(onnx_path), "engine": str(engine_path), "flavour": flavour,
               "plugins": list(plugins),
               "profiles": [p.to_dict() for p in kw.pop("profiles")],
               "timing_cache": None if kw["timing_cache"] is None else str(kw["timing_cache"]),
               **{k: v for k, v in kw.items() if k != "timing_cache"}}
    with tempfile.TemporaryDirectory(prefix="g3export-trt-") as td:
        req, res = Path(td) / "request.json", Path(td) / "result.json"
        req.write_text(json.dumps(request))
        env = rtx_env() if flavour == "trt-rtx" else dict(os.environ)
        proc = subprocess.run([sys.executable, "-m", "g3export.export.trt", str(req), str(res)],
                              env=env)
        if proc.returncode != 0 or not res.exists():
            raise EngineBuildError(f"the {flavour} engine build of {onnx_path.name} failed in its "
                                   f"child process (exit status {proc.returncode})")
        result = json.loads(res.read_text())
    if "error" in result:
        raise EngineBuildError(result["error"])
    return EngineInfo(**result)


def _profile_from_dict(d: Mapping[str, Any]) -> Profile:
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {
        k: (tuple(v[0]), tuple(v[1]), tuple(v[2])) for k, v in d["shapes"].items()}
    return Profile(d["name"], shapes)


def _child_main(argv: Sequence[str]) -> int:
    req_path, res_path = Path(argv[0]), Path(argv[1])
    req = json.loads(req_path.read_text())
    try:
        info = build_engine(req["onnx"], req["engine"], req["flavour"],
                            profiles=[_profile_from_dict(p) for p in req["profiles"]],
                            dtype=req.get("dtype"),
                            compute_capabilities=req.get("compute_capabilities"),
                            timing_cache=req.get("timing_cache"), plugins=req["plugins"],
                            optimization_level=req.get("optimization_level"),
                            workspace_mb=req.get("workspace_mb"), isolate=False,
                            verbose=req.get("verbose", False))
        res_path.write_text(json.dumps(info.to_dict()))
    except (EngineBuildError, TensorRTMissing, ValueError) as e:
        res_path.write_text(json.dumps({"error": str(e)}))
    return 0



# ---------------------------------------------------------------------------------------------
# The build directory's engine step (g3export.export.build calls these)

FP16_NOTE = ("fp16: Gemma 3 was trained in bf16 and its activations (residual stream, MLP) exceed "
             "fp16's maximum 65504 in real checkpoints, which gives inf/NaN logits. The engine is "
             "built as asked, nothing is clamped; verify its output, and prefer --dtype bf16 "
             "(every GPU TensorRT-RTX targets, and every data-centre GPU since A100, has bf16).")

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
        from .translations import get

        return get(self.attention)

    def export_options(self) -> dict[str, Any]:
        """What `export_text` takes to emit this plan's attention translation."""
        t = self.translation
        return {"translation_table": t.table, "opset": t.opset}


def smallest_ring(cfg: Any, max_context: int) -> int:
    """Slots of the smallest KV buffer (the sliding window, or max_context if smaller)."""
    from ..modeling.cache import kv_layout

    return min(lc.shape[2] for lc in kv_layout(cfg.text, max_context, 1, "fp32").layers)


def plan_engines(cfg: Any, target: str, dtype: str, max_context: int, attention: str | None = None,
                 prefill_chunk: int | None = None, max_batch: int = 1,
                 compute_capabilities: Sequence[str] | None = None,
                 timing_cache: str | Path | None = None, images: bool = False) -> EnginePlan:
    """Check the engine options against the model (BuildError/ValueError with what to do)."""
    _check_flavour(target)
    attention = attention or "plugin"
    if attention not in ("plugin", "native"):
        raise BuildError(f"--attention {attention!r} is not a TensorRT translation; use plugin "
                         "(default) or native")
    ring = smallest_ring(cfg, max_context)
    if prefill_chunk is None:
        prefill_chunk = min(DEFAULT_PREFILL_CHUNK, max_context)
        if attention == "native":
            prefill_chunk = min(prefill_chunk, ring)
    if prefill_chunk < 1 or prefill_chunk > max_context:
        raise BuildError(f"--prefill-chunk {prefill_chunk} must be between 1 and the context "
                         f"length {max_context}")
    if attention == "native" and prefill_chunk > ring:
        raise BuildError(
            f"--prefill-chunk {prefill_chunk} is longer than the sliding window ({ring} slots): "
            f"the native translation writes the KV cache with TensorScatter(mode=linear), which "
            f"must not wrap a sliding layer's ring, and TensorRT refuses a KV-cache update longer "
            f"than its cache. Use --prefill-chunk {ring} (or less), or --attention plugin")
    if images and prefill_chunk < cfg.mm_tokens_per_image:
        raise BuildError(f"--prefill-chunk {prefill_chunk} is shorter than one image "
                         f"({cfg.mm_tokens_per_image} tokens), which is never split across chunks")
    if max_batch < 1:
        raise BuildError("--max-batch must be >= 1")
    ccs = list(compute_capabilities or []) or None
    if target == "trt" and ccs:
        raise BuildError("--compute-capability is a TensorRT-RTX option (--target trt-rtx); "
                         "TensorRT builds for the GPU it runs on")
    for cc in ccs or []:
        if cc not in RTX_COMPUTE_CAPABILITIES:
            raise BuildError(f"--compute-capability {cc}: TensorRT-RTX targets "
                             f"{', '.join(RTX_COMPUTE_CAPABILITIES)} (not 9.0: no H100/H200)")
    if target == "trt-rtx" and timing_cache is not None:
        raise BuildError("--timing-cache is for --target trt: TensorRT-RTX builds ahead of time "
                         "without a GPU, and a timing cache would need one")
    return EnginePlan(target, attention, dtype, prefill_chunk, max_batch, ccs,
                      None if timing_cache is None else str(timing_cache), images)


def build_text_engine(partial_dir: str | Path, plan: EnginePlan, io: Any,
                      progress: bool = False) -> dict[str, Any]:
    """Turn the exported `text.onnx` in `partial_dir` into `text.engine` beside it.

    The ONNX graph is finalized for the translation and constant-folded (prepare_for_tensorrt),
    then rewritten in place and KEPT (with its .data): it is what the engine was built from, so an
    engine for another GPU / compute capability / TensorRT version can be rebuilt from the build
    directory alone (`build_engine`), and `verify` reads the reference weights from it. Returns
    the manifest's `tensorrt` section (without file hashes: the manifest's `files` covers them)."""
    import onnx_ir as ir

    from .onnx_export import save_with_external_data

    root = Path(partial_dir)
    tr = plan.translation
    src = root / io.file
    t0 = time.perf_counter()
    m = ir.load(str(src))
    tr.finalize(m)
    prepare_for_tensorrt(m)
    stage = root / ".trt-onnx"
    save_with_external_data(m, stage / io.file, progress=progress)
    del m
    os.replace(stage / (io.file + ".data"), root / (io.file + ".data"))
    os.replace(stage / io.file, root / io.file)
    stage.rmdir()
    prepare_s = time.perf_counter() - t0
    profiles = text_profiles(io, plan.prefill_chunk, batch=(1, 1, plan.max_batch))
    engine_file = Path(io.file).with_suffix(".engine").name
    plugins = DEFAULT_PLUGINS if plan.attention == "plugin" else ()
    info = build_engine(root / io.file, root / engine_file, plan.target, profiles=profiles,
                        dtype=plan.dtype, compute_capabilities=plan.compute_capabilities,
                        timing_cache=plan.timing_cache, plugins=plugins)
    return {
        "flavour": plan.target,
        "library": _MODULES[plan.target],
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
            "bytes": info.bytes, "build_seconds": info.seconds,
            "prepare_seconds": round(prepare_s, 3), "peak_rss_mb": info.peak_rss_mb,
            "layers": info.layers, "layer_types": info.layer_types}},
    }


def smallest_ring_from_io(io: Any) -> int:
    """The smallest cache length among the component's past_* inputs (dim 2)."""
    return min(int(t.shape[2]) for t in io.inputs if t.name.startswith("past_"))


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
