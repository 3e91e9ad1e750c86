"""Building a TensorRT / TensorRT-RTX engine from an ONNX file (issue 7, DESIGN §3.2, §5).

* `build_engine(onnx_path, engine_path, flavour, ...)` parses the ONNX file BY PATH with the
  flavour's parser (`parse_from_file`: the parser reads the external data itself; plugin creators
  registered first), requires every node to parse, builds a strongly typed network (precision is
  the graph's: a bf16 graph gives a bf16 engine), writes the serialized engine to `engine_path`
  and returns an `EngineInfo` (flavour, version, seconds, bytes, layer counts by type, profiles,
  compute capabilities, the building process's peak RSS). Nothing is written when parsing or
  building fails (`EngineBuildError`). Options are checked by `options.check_options`.
* `isolate=True` runs the build in a child process (g3export.export.trt.child): its peak RSS
  (VmHWM, see `_peak_rss_mb`) is then the builder's own (the parent's model and graph are not in
  it), and the libtensorrt_rtx.so
  fix may need LD_LIBRARY_PATH set at process start (library.py). None = a child only when the
  fix needs it.
* Optimization profile: the text engine has ONE profile, `text` (`text_profile()`, from the
  component's I/O): seq 1..prefill_chunk, batch 1..max_batch, opt seq 1. Prefill chunks and
  decode steps both run in it. One profile because TensorRT-RTX keeps the per-layer weights once
  PER PROFILE (measured on a config of mostly per-layer weights: 2.06x the weights with a
  `prefill` and a `decode` profile, 1.05x with this one; BENCHMARKS.md §4.1); one engine because
  two engines would each carry all the weights too. The runtime (g3export.runtimes.trt_session) runs a prefill and a decode execution
  context, both on this profile.
  The opt shape is decode's (seq 1, batch 1): decode is the step that runs once per generated
  token and that the runtime captures in a CUDA graph, so the kernels TensorRT picks at build time
  (classic TensorRT tunes its tactics at opt) are the ones for the shape that runs most. Prefill
  is one call per chunk of the prompt, compute-bound, and TensorRT-RTX compiles kernels
  specialised to each new shape at run time anyway (`DynamicShapesKernelSpecializationStrategy`,
  lazy by default: a generic kernel until the specialised one is ready).
* fp32 networks: TensorRT-RTX builds fp32 `Attention` only when the layer is decomposable, so
  every attention layer of an fp32 network is marked decomposable (bf16/fp16 stay fused).
* The preview feature ALIASED_PLUGIN_IO_10_03 is enabled: the attention plugin declares its cache
  outputs as aliases of its cache inputs (in-place update); without it the build is refused.
* Timing cache: `--target trt` only (loaded and saved at `timing_cache`).
* Compute capabilities (TensorRT-RTX): a list such as ["8.6", "12.0"]; None = the library's
  default. The CPU-only ahead-of-time build needs no GPU.
* Weight-stripped (refittable) engines are NOT built: TensorRT-RTX 1.7.1's CPU-only build fails
  with `BuilderFlag.STRIP_PLAN`, `REFIT` or `REFIT_IDENTICAL` (README, TensorRT section).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # type-checked against tensorrt-stubs (TensorRT-RTX has the same API)
    import tensorrt

from ...errors import BuildError
from .library import ensure_rtx_soname, require_tensorrt, rtx_env
from .options import RTX_COMPUTE_CAPABILITIES, check_options

DEFAULT_PLUGINS = ("g3export.export.kernels.trt_plugin:register_plugins",)


class EngineBuildError(BuildError):
    """Parsing or building failed; the message carries the parser's/builder's errors."""


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


TEXT_PROFILE = "text"  # the name of the text engine's one optimization profile


def text_profile(io: Any, chunk: int, max_batch: int = 1,
                 image_tokens: int | None = None) -> Profile:
    """The text engine's one optimization profile (module docstring) for a text ComponentIO
    (g3export.export.graph_io.text_io). Symbolic dims are resolved as (min, opt, max):
    seq -> (1, 1, chunk), batch -> (1, 1, max_batch), image_tokens -> (1, 1, image_tokens or
    chunk); opt is the decode step's shape (seq 1, batch 1, one image_features row)."""
    rules = {"seq": (1, 1, chunk), "batch": (1, 1, max_batch),
             "image_tokens": (1, 1, image_tokens or chunk)}

    def resolve(spec_shape: Sequence[int | str]) -> tuple[Shape, Shape, Shape]:
        out: list[list[int]] = [[], [], []]
        for d in spec_shape:
            if isinstance(d, int):
                vals = (d, d, d)
            elif d in rules:
                vals = rules[d]
            else:
                raise ValueError(f"no profile rule for symbolic dim {d!r}")
            for i in range(3):
                out[i].append(int(vals[i]))
        return tuple(out[0]), tuple(out[1]), tuple(out[2])

    return Profile(TEXT_PROFILE, {t.name: resolve(t.shape) for t in io.inputs
                                  if any(isinstance(d, str) for d in t.shape)})


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
    ccs = check_options(flavour, compute_capabilities, timing_cache) or []
    trt = require_tensorrt(flavour)
    if isolate is None:
        isolate = flavour == "trt-rtx" and not ensure_rtx_soname().in_process
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if isolate:
        from .child import ChildFailed, build_in_child

        plugins_ = [p for p in plugins if isinstance(p, str)]
        if len(plugins_) != len(plugins):
            raise ValueError("an isolated build takes plugins as 'module:function' strings")
        request = {"onnx": str(onnx_path), "engine": str(engine_path), "flavour": flavour,
                   "plugins": plugins_, "profiles": [p.to_dict() for p in profiles],
                   "dtype": dtype, "compute_capabilities": ccs or None,
                   "timing_cache": None if timing_cache is None else str(timing_cache),
                   "optimization_level": optimization_level, "workspace_mb": workspace_mb,
                   "verbose": verbose}
        env = rtx_env() if flavour == "trt-rtx" else dict(os.environ)
        try:
            result = build_in_child(__name__ + ":child_main", request, env,
                                    f"the {flavour} engine build of {onnx_path.name}")
        except ChildFailed as e:
            raise EngineBuildError(str(e)) from e
        if "error" in result:
            raise EngineBuildError(result["error"])
        return EngineInfo(**result)

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
    if flavour == "trt-rtx" and ccs:
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
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
    nbytes = serialized.nbytes
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".partial")
    with open(tmp, "wb") as f:  # from the builder's buffer: no second copy of the engine
        f.write(memoryview(serialized))
    del serialized
    os.replace(tmp, engine_path)
    if cache is not None and timing_cache is not None:
        Path(timing_cache).write_bytes(memoryview(cache.serialize()).tobytes())
    seconds = time.perf_counter() - t0
    fix = ensure_rtx_soname().method if flavour == "trt-rtx" else None
    return EngineInfo(
        flavour=flavour, version=str(trt.__version__), engine=str(engine_path),
        onnx=str(onnx_path), seconds=round(seconds, 3), bytes=nbytes,
        layers=network.num_layers, layer_types=layer_types,
        profiles=[p.to_dict() for p in profiles], compute_capabilities=ccs or None,
        plugins=plugin_names, peak_rss_mb=_peak_rss_mb(), soname_fix=fix,
        decomposable_attention=decomposable, extra={"dtype": dtype})


def _peak_rss_mb() -> float:
    """This process's peak RSS in MiB since it started its program: VmHWM (the high-water mark of
    its current address space). Not ru_maxrss: Linux carries ru_maxrss across fork + execve, so a
    child started by a process holding a model would report at least the parent's RSS at the
    fork (measured: 1889 MiB for a ~1.1 GiB builder). ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _profile_from_dict(d: Mapping[str, Any]) -> Profile:
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {
        k: (tuple(v[0]), tuple(v[1]), tuple(v[2])) for k, v in d["shapes"].items()}
    return Profile(d["name"], shapes)


def child_main(req: Mapping[str, Any]) -> dict[str, Any]:
    """The child process's side of `isolate=True` (g3export.export.trt.child): the request's
    build, in this process; the EngineInfo as a dict, or {"error": message}."""
    try:
        info = build_engine(req["onnx"], req["engine"], req["flavour"],
                            profiles=[_profile_from_dict(p) for p in req["profiles"]],
                            dtype=req.get("dtype"),
                            compute_capabilities=req.get("compute_capabilities"),
                            timing_cache=req.get("timing_cache"), plugins=req["plugins"],
                            optimization_level=req.get("optimization_level"),
                            workspace_mb=req.get("workspace_mb"), isolate=False,
                            verbose=req.get("verbose", False))
        return info.to_dict()
    except (BuildError, ValueError) as e:
        return {"error": str(e)}

