"""ONNX Runtime session over a build directory (DESIGN §3.7): one InferenceSession per component,
the static KV cache allocated once and bound as both input and output of the text graph.

    sess = OrtSession.from_build("builds/270m-onnx", provider="cpu")
    logits = sess.forward(ids, start_pos=0)      # float32 [B, V]; cache updated in place
    logits = sess.forward(ids, start_pos=np.array([5, 0, 17]))  # each row at its own position
    logits = sess.forward_row(2, ids[2:3], 17)  # one slot only -> [1, V]
    sess.reset()
    feats = sess.image_features(pixel_values)   # [N, 3, S, S] -> float32 [N, mm_tokens, hidden]

Vision: a build with a `vision` component gets a second InferenceSession (`OrtVision`, same
provider and thread options), created on the first image_features() call, so text-only use pays
nothing for it; a build without one raises VisionUnavailable with what to do.

Memory per step: nothing is allocated for the caches. Every past_key_i / past_value_i OrtValue is
created once (zeros: masked ring slots must hold finite numbers, 0 * NaN would poison the
probability-weighted sum) and bound with IOBinding as the input AND as present_key_i /
present_value_i; the graph's ScatterND writes the chunk into it (see
g3export.export.onnx_attention for why the write is ordered after the reads). Last-position
logits are bound to one preallocated [B, 1, V] float32 buffer; with an all-logits graph the
logits output is left to ORT (its shape changes with the chunk).

One slot (forward_row): a second IOBinding per row, made on the row's first use and kept, binds
row r's contiguous slice of every cache buffer ([r, :, :, :] of a row-major [B, KV, S, D] tensor)
by address as a [1, KV, S, D] input and output: the graph, exported with a symbolic batch, runs
with batch 1 on that slice, nothing is copied and the other rows are untouched.

Threads: intra_op = physical cores (psutil if present, else the affinity mask), inter_op 1,
sequential execution, ORT_ENABLE_ALL. Pool threads spin by default (ORT's default, good on an idle
machine); on cores shared with other busy processes spinning makes decode ~1.5x slower (270M:
108 vs 70 ms/step measured here under load), so `spinning=False` / G3_ORT_SPIN=0 turns it off.

Optimized-model cache (`optimized_model_cache=PATH`): the first session writes ORT's optimized
graph (+ PATH.data for its weights), later ones load it. Measured on the 270M fp32 build (loaded
machine, noisy): normal start 2.8-4.9 s, writing the cache 4.2-8.3 s, starting from it 1.9-2.9 s.
A gain of ~1-2 s per start, but the file is hardware-specific (ORT warns about NCHWc layouts) and
doubles the disk use, so it is off by default. A cache is for the batch it was written at (a
batch-1 session's graph has the lm_head's batched branch folded away, g3export.export.onnx_lm_head).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..dtypes import DTYPES, ONNX_NUMPY, ORT_TYPE_BYTES
from ..errors import BuildError, UserError
from ..modeling.cache import DEFAULT_PREFILL_CHUNK, KVLayout, kv_layout
from ..modeling.config import ModelConfig
from .session import Session

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ProviderError(UserError, RuntimeError):
    """The requested execution provider is not available in this onnxruntime."""


def _ort_error(e: Exception) -> bool:
    """An exception raised by ONNX Runtime itself (its pybind errors: Fail, InvalidArgument,
    InvalidGraph, NoSuchFile, ... derive from Exception only, so they are told by module)."""
    return type(e).__module__.startswith("onnxruntime") and not isinstance(e, UserError)


def inference_session(path: str | Path, so, providers):
    """ort.InferenceSession over a graph of a build, ORT's errors as a BuildError naming it."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:
        if not _ort_error(e):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise BuildError(f"ONNX Runtime cannot load {path} ({type(e).__name__}: {first}); the "
                         "build is damaged or was written by another version: rebuild it with "
                         "`g3export build ... --force`") from e


def run_graph(path, fn, *args):
    """fn(*args) (a session run), ORT's errors as a BuildError: inputs that match the manifest
    but not the graph mean the two disagree."""
    try:
        return fn(*args)
    except Exception as e:
        if not _ort_error(e):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise BuildError(f"ONNX Runtime failed running {path} ({type(e).__name__}: {first}); its "
                         "manifest and graph disagree or the build is damaged: rebuild it") from e


class VisionUnavailable(BuildError):
    """image_features() on a build without a vision component."""


class OrtVision:
    """The vision graph: pixel_values float32 [N, 3, S, S] -> float32 [N, mm_tokens, hidden].

    One InferenceSession over vision.onnx (contract: g3export.export.onnx_vision). Images are run
    in batches of at most `max_batch` (bounds the activation memory: SigLIP at 896 px holds
    [N, 16, 4096, 4096] attention scores per layer)."""

    def __init__(self, path: str | Path, io, provider: str = "cpu", threads: int | None = None,
                 spinning: bool | None = None, max_batch: int = 4):
        self.io = io
        self.max_batch = max_batch
        self.provider, self.device = resolve_provider(provider)
        providers = [self.provider] if self.provider == "CPUExecutionProvider" else [
            self.provider, "CPUExecutionProvider"]
        self.path = path
        self.sess = inference_session(path, session_options(threads, None, None, spinning),
                                      providers)
        self.shape = tuple(io.input("pixel_values").shape[1:])

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        px = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if px.ndim != 4 or tuple(px.shape[1:]) != self.shape or px.shape[0] < 1:
            raise ValueError(f"pixel_values must be [images >= 1, {', '.join(map(str, self.shape))}]"
                             f", got {list(px.shape)}")
        outs = [run_graph(self.path, self.sess.run, ["image_features"],
                          {"pixel_values": px[i:i + self.max_batch]})[0]
                for i in range(0, px.shape[0], self.max_batch)]
        return np.concatenate(outs).astype(np.float32, copy=False)


def physical_cores() -> int:
    try:
        import psutil  # type: ignore

        n = psutil.cpu_count(logical=False)
        if n:
            return max(1, min(n, len(os.sched_getaffinity(0))))
    except Exception:
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, optimized_path: str | None = None,
                    profile: str | None = None, spinning: bool | None = None,
                    batch: int | None = None):
    """threads: intra-op threads (default: physical cores). spinning: let idle pool threads spin
    (ORT's default, best on an otherwise idle machine); False when the cores are shared with other
    busy processes (G3_ORT_SPIN=0 sets it too). batch=1 fixes the text graph's symbolic `batch`
    dimension to 1, so ORT's constant folding resolves the lm_head's If on the row count and
    never pre-packs its batched branch (g3export.export.onnx_lm_head); a session of more slots
    keeps both branches (forward_row runs one row, a decode step all of them)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or physical_cores()
    if spinning is None and os.environ.get("G3_ORT_SPIN") is not None:
        spinning = os.environ["G3_ORT_SPIN"] not in ("0", "false", "no")
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: its constant folding warns once per folded constant
    if batch == 1:
        so.add_free_dimension_override_by_name("batch", 1)
    if optimized_path:
        so.optimized_model_filepath = optimized_path
        # weights go to a side file (protobuf caps one file at 2 GB)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    os.path.basename(optimized_path) + ".data")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return so


def resolve_provider(provider: str) -> tuple[str, str]:
    """'cpu' | 'cuda' -> (ORT provider name, OrtValue device type); clear error if unavailable."""
    import onnxruntime as ort

    key = provider.lower()
    if key not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; use one of: {', '.join(PROVIDERS)}")
    name = PROVIDERS[key]
    available = ort.get_available_providers()
    if name not in available:
        hint = (" Install onnxruntime-gpu (pip install 'g3export[gpu]') on a machine with a CUDA "
                "GPU, or run with --provider cpu." if key == "cuda" else "")
        raise ProviderError(f"{name} is not available in this onnxruntime {ort.__version__} "
                            f"(available: {', '.join(available)}).{hint}")
    return name, ("cuda" if key == "cuda" else "cpu")


class OrtSession(Session):
    """Runs the text graph with the KV cache bound in place. See the module docstring."""

    def __init__(self, config: ModelConfig, text_path: str | Path, io, max_context: int,
                 dtype: str = "fp32", provider: str = "cpu", batch: int = 1,
                 threads: int | None = None, max_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 optimized_model_cache: str | Path | None = None, profile: str | None = None,
                 spinning: bool | None = None, vision: tuple[str | Path, object] | None = None,
                 layout: KVLayout | None = None):
        """vision: (path of vision.onnx, its ComponentIO) when the build has one. layout: the
        KV layout a build's manifest records (from_build passes it; default: the config's)."""
        import onnxruntime as ort

        self.config = config
        self._vision_spec = vision
        self._vision: OrtVision | None = None
        self._threads, self._spinning, self._provider_key = threads, spinning, provider
        self.max_context = max_context
        self.batch = batch
        self.dtype = dtype
        self.io = io
        self.max_chunk = max_chunk
        self.provider, self.device = resolve_provider(provider)
        if dtype == "bf16" and self.device == "cpu":
            raise ProviderError("this is a bf16 build: ONNX Runtime's CPU provider has no bf16 "
                                "kernels (Mul, MatMul, ...). Run it with --provider cuda, or "
                                "build with --dtype fp32 for CPU (fp16 also runs on CPU, slowly)")
        self.layout = layout or kv_layout(config.text, max_context, batch, dtype)
        model_path = str(text_path)
        so_path = None
        if optimized_model_cache is not None:
            cache = Path(optimized_model_cache)
            if cache.exists():
                model_path = str(cache)
            else:
                so_path = str(cache)
        so = session_options(threads, so_path, profile, spinning, batch)
        providers = [self.provider] if self.provider == "CPUExecutionProvider" else [
            self.provider, "CPUExecutionProvider"]
        self.sess = inference_session(model_path, so, providers)

        # numpy dtype with the cache's element size, and the ONNX element type (bf16 has no numpy
        # dtype: its buffers are uint16 arrays reinterpreted as bfloat16, no copy)
        np_dt, onnx_type = DTYPES[dtype].numpy, DTYPES[dtype].onnx_type
        self._buffers: list[np.ndarray] = []  # CPU: the numpy arrays that ARE the caches
        self._cache_values: list[tuple[str, str, ort.OrtValue]] = []
        for lc in self.layout.layers:
            for past in (lc.k_name, lc.v_name):
                present = io.present(past)
                # zeros, not garbage: masked ring slots are multiplied by probability 0, and
                # 0 * NaN would poison the sum
                host = np.zeros(lc.shape, dtype=np_dt)
                if self.device == "cpu":
                    host.fill(0)  # touch every page now: no page faults while decoding, and
                    # the process really holds kv_bytes from the start
                    self._buffers.append(host)
                    ov = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(host, onnx_type)
                else:
                    ov = ort.OrtValue.ortvalue_from_shape_and_type(list(lc.shape), onnx_type,
                                                                    self.device, 0)
                    ov.update_inplace(ort.OrtValue.ortvalue_from_numpy_with_onnx_type(host, onnx_type))
                self._cache_values.append((past, present, ov))
        self._kv_bytes = self._measure_kv_bytes()

        self.all_logits = bool(io.options.get("all_logits", False))
        v = config.text.vocab_size
        self._logits = None
        if not self.all_logits:
            self._logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, v], np.float32,
                                                                     self.device, 0)
        self._start = np.zeros(batch, dtype=np.int64)
        self._row_start = np.zeros(1, dtype=np.int64)
        self._row_logits = None
        if not self.all_logits:
            self._row_logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, v], np.float32,
                                                                         self.device, 0)
        self._row_bindings: dict[int, object] = {}
        self._no_image_row = np.zeros((1, config.text.hidden_size), np.float32)
        self.binding = self.sess.io_binding()
        self._bind_static()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_build(cls, build_dir: str | Path, provider: str = "cpu", batch: int = 1,
                   **kwargs) -> "OrtSession":
        from ..export.manifest import Build, load_build

        b = build_dir if isinstance(build_dir, Build) else load_build(build_dir, expect_target="onnx")
        io = b.component("text")
        fixed = io.input("input_ids").shape[0]
        if isinstance(fixed, int) and fixed != batch:
            raise ValueError(f"this build was exported for batch {fixed}, not {batch}")
        vision = None
        if "vision" in b.components:
            vio = b.component("vision")
            vision = (b.path(vio.file), vio)
        return cls(b.config, b.path(io.file), io, b.max_context, b.dtype, provider, batch,
                   vision=vision, layout=b.kv_layout(batch), **kwargs)

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, S, S] float32 -> [N, mm_tokens_per_image, hidden] float32 (the vision graph)."""
        if self._vision_spec is None:
            what = ("has no vision encoder" if not self.config.has_vision else
                    "was built without its vision component; rebuild it with "
                    "`g3export build ... --components text,vision`")
            raise VisionUnavailable(f"this build ({self.config.name}) {what}: it cannot take images")
        if self._vision is None:
            path, io = self._vision_spec
            self._vision = OrtVision(path, io, self._provider_key, self._threads, self._spinning)
        return self._vision(pixel_values)

    def _bind_static(self) -> None:
        b = self.binding
        for past, present, ov in self._cache_values:
            b.bind_ortvalue_input(past, ov)
            b.bind_ortvalue_output(present, ov)  # same buffer: the graph writes in place
        self._bind_outputs(b, self._logits)

    def _measure_kv_bytes(self) -> int:
        total = 0
        for _, _, ov in self._cache_values:
            n = int(np.prod(ov.shape()))
            total += n * ORT_TYPE_BYTES[ov.data_type()]
        if self._buffers:  # CPU: cross-check against the arrays the OrtValues wrap
            assert total == sum(a.nbytes for a in self._buffers)
        return total

    # -- Session interface --------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        return self._kv_bytes

    @property
    def cache_arrays(self) -> list[np.ndarray]:
        """CPU only: the numpy arrays that ARE the cache buffers (k0, v0, k1, ...)."""
        return list(self._buffers)

    def cache_ortvalues(self):
        return [ov for _, _, ov in self._cache_values]

    def reset(self) -> None:
        # Nothing needs clearing for correctness (start_pos = 0 masks every old slot), but stale
        # values are zeroed on CPU so a reset session is bit-identical to a fresh one.
        for a in self._buffers:
            a.fill(0)

    def forward(self, input_ids: np.ndarray, start_pos: "int | np.ndarray",
                image_features: np.ndarray | None = None) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"input_ids must be [batch={self.batch}, T], got {ids.shape}")
        starts = self.row_starts(start_pos, ids.shape[1])
        return self._chunked(self.binding, ids, starts, self._start, image_features, self._logits)

    def forward_row(self, row: int, input_ids: np.ndarray, start_pos: int,
                    image_features: np.ndarray | None = None) -> np.ndarray:
        ids = self.check_row(row, input_ids)
        if start_pos < 0 or start_pos + ids.shape[1] > self.max_context:
            raise ValueError(f"positions {start_pos}..{start_pos + ids.shape[1] - 1} exceed "
                             f"max_context {self.max_context}")
        binding = self._row_binding(row)
        return self._chunked(binding, ids, np.array([start_pos], dtype=np.int64), self._row_start,
                             image_features, self._row_logits)

    def _row_binding(self, row: int):
        """The IOBinding of slot `row` (see the module docstring), made once per row."""
        if row not in self._row_bindings:
            if self.dtype == "bf16":
                raise ValueError("forward_row is not available for bf16 builds (numpy has no "
                                 "bfloat16 type to bind a cache slice by address)")
            b = self.sess.io_binding()
            el = {"fp32": np.float32, "fp16": np.float16}[self.dtype]
            for past, present, ov in self._cache_values:
                shape = ov.shape()
                row_bytes = int(np.prod(shape[1:])) * ORT_TYPE_BYTES[ov.data_type()]
                ptr = ov.data_ptr() + row * row_bytes
                for name, bind in ((past, b.bind_input), (present, b.bind_output)):
                    bind(name, self.device, 0, el, [1, *shape[1:]], ptr)
            self._row_bindings[row] = b
            self._bind_outputs(b, self._row_logits)
        return self._row_bindings[row]

    def _chunked(self, binding, ids, starts, start_buf, image_features, logits_value):
        t = ids.shape[1]
        step = self.max_chunk or t
        if image_features is not None:
            step = t  # an image must not straddle chunks; the caller chunks around images
        out = None
        for s in range(0, t, step):
            start_buf[:] = starts + s
            out = self._run(binding, ids[:, s:s + step], start_buf, image_features, logits_value)
        return out

    def _bind_outputs(self, b, logits_value) -> None:
        if logits_value is not None:
            b.bind_ortvalue_output("logits", logits_value)
        else:
            b.bind_output("logits", self.device)

    def _run(self, b, ids: np.ndarray, starts: np.ndarray, image_features,
             logits_value) -> np.ndarray:
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("start_pos", starts)
        if self.io.options.get("images"):
            feats = image_features
            if feats is None:  # one dummy row: the graph gathers row 0 for non-image tokens
                feats = self._no_image_row
            spec = self.io.input("image_features")  # bf16: float32 as before (no numpy bf16)
            np_dt = ONNX_NUMPY[spec.dtype] if spec.dtype != "bfloat16" else np.float32
            b.bind_cpu_input("image_features", np.ascontiguousarray(feats, dtype=np_dt))
        run_graph(self.io.file, self.sess.run_with_iobinding, b)
        if logits_value is not None:
            # a copy: the bound buffer is overwritten by the next step ([B, V] floats, small)
            return np.array(logits_value.numpy()[:, -1, :])
        logits = b.get_outputs()[0].numpy()
        b.clear_binding_outputs()
        if b is self.binding:
            self._bind_static()
        else:  # a row binding lost its cache outputs too: made again on the row's next use
            self._row_bindings = {k: v for k, v in self._row_bindings.items() if v is not b}
        return logits[:, -1, :].astype(np.float32, copy=False)
