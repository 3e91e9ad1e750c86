"""TensorRT engine runtime over a `--target trt` / `--target trt-rtx` build directory (issue 7,
DESIGN §3.3, §3.7). Same Session interface as the ONNX Runtime one, so the same generation loop,
sampling, tokenizer and chat template drive it.

    sess = TrtSession.from_build(load_build("builds/12b-trt"))
    logits = sess.forward(ids, start_pos=0)      # float32 [B, V] on the host; cache updated in place
    logits = sess.forward(ids, start_pos=np.array([5, 0]))  # each row at its own position
    logits = sess.forward_row(1, ids[1:2], 0)   # one slot only -> [1, V]

Contract:
* Needs an NVIDIA GPU (torch with CUDA) and the build's flavour of TensorRT (`tensorrt` for trt,
  `tensorrt_rtx` for trt-rtx, the version in the manifest's `tensorrt` section). Without a GPU,
  `from_build` raises `GpuRequired` (a BuildError: the CLI prints it without a traceback); without
  the library, `TensorRTMissing`. Importing this module needs neither.
* Plugin builds (`tensorrt.attention == "plugin"`): the G3Attention plugin creator is registered
  (g3export.export.kernels.trt_plugin.register_plugins) before the engine is deserialized.
* One engine with ONE optimization profile (seq 1..prefill_chunk, batch 1..max_batch; opt = the
  decode step, g3export.export.trt.engine.text_profile): a profile per shape regime would make
  TensorRT-RTX keep every per-layer weight once per profile. Two execution contexts, `prefill`
  and `decode`, both on that profile (`make_contexts`; contexts may share a profile since
  TensorRT 10, which made PROFILE_SHARING_0806 always on, and TensorRT-RTX). Two rather than one
  so that the decode context's input shapes and tensor addresses never change after it is set
  up: its CUDA graph is captured once and stays valid (a graph replays the shapes and addresses
  it was captured with), while the prefill context is re-shaped for every chunk and re-pointed by
  `forward_row`. They run one after the other on one stream. Each allocates the engine's
  activation memory (STATIC), as the two contexts of the two-profile engines did. A build made
  before this (profiles `prefill` and `decode`) runs too: both contexts take the profile that
  covers 1..prefill_chunk tokens (`EngineEntry.profile_for`: its `prefill`).
* The static KV cache (g3export.modeling.cache.kv_layout) is allocated ONCE on the GPU as torch
  CUDA tensors (zeros) and the same device address is bound to past_*_i and present_*_i of both
  contexts (`set_tensor_address`): the engine updates it in place. input_ids, start_pos,
  image_features and logits also live in fixed device buffers allocated once, so the decode step
  (fixed shapes, fixed addresses) is captured in a CUDA graph after its first (warm-up) run and
  replayed from then on (`cuda_graph=False` turns that off; a capture that fails falls back to
  plain enqueues and says so in `self.cuda_graph_error`).
* Chunk limits (honoured by g3export.runtimes.generate): `prefill_chunk` = the profile's
  longest chunk; `chunk_align` (native builds only) = the smallest ring: a chunk never crosses a
  multiple of it, because TensorScatter(mode=linear) must not wrap a sliding layer's ring.
  `forward` checks both and raises ValueError rather than run a wrong chunk.
* Logits are float32 [B, 1, V] on the device and copied to the host after each step.
* start_pos is int64 [B] on the device (one start per row). `forward_row(r, ...)` runs the prefill
  context with batch 1 on row r's slice of every cache buffer: the context's cache addresses are
  set to data_ptr + r * row bytes (no copy) and set back to the whole buffers by the next
  `forward` (2 * layers set_tensor_address calls, host only). The decode context and its CUDA
  graph are never rebound.
* Images: only the text component has an engine so far; a build's vision component stays ONNX
  (manifest `tensorrt.onnx_only`) and `image_features` runs it with ONNX Runtime (CUDA provider
  when onnxruntime-gpu is installed, else CPU), created on first use.

Not run here (no GPU on the machines this was written on): everything below `from_build`'s GPU
check. It follows the TensorRT 10 / TensorRT-RTX 1.x Python API (named tensors, execute_async_v3).
The choice of profile and the context set-up (`make_contexts`) are checked on CPU against a fake
engine (tests/runtimes/test_trt_contexts.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import DTYPES
from ..export.manifest import ENGINE_TARGETS, Build, BuildError, load_build
from .session import Session

NO_GPU = ("this build is a TensorRT engine ({target}) and needs an NVIDIA GPU with {lib}; none is "
          "visible here (torch.cuda.is_available() is False). Build with --target onnx to run on "
          "CPU (g3export build ... --target onnx), or run this build on a GPU machine")


class GpuRequired(BuildError):
    """A TensorRT build was opened on a machine without a usable NVIDIA GPU."""


def _require_gpu(target: str) -> Any:
    lib = "TensorRT-RTX (pip install 'g3export[trt-rtx]')" if target == "trt-rtx" else "TensorRT"
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        raise GpuRequired(NO_GPU.format(target=target, lib=lib)) from e
    if not torch.cuda.is_available():
        raise GpuRequired(NO_GPU.format(target=target, lib=lib))
    return torch


def make_contexts(engine: Any, profile: int, stream_handle: int, trt: Any) -> dict[str, Any]:
    """The `prefill` and `decode` execution contexts of a deserialized engine, both on
    optimization profile `profile` (the module docstring says why two on one profile). The
    profile switch is enqueued on `stream_handle`, the stream every later enqueue uses.

    TensorRT-RTX (a library with `DynamicShapesKernelSpecializationStrategy`): the decode context
    compiles its shape-specialised kernels EAGERLY (blocking, on its first run) instead of lazily
    in the background, so that the decode CUDA graph, captured on its second run, records the
    specialised kernels and not the generic fallback ones that run until a lazy compile is done.
    The prefill context keeps the library's default (lazy): it is never captured."""
    eager = getattr(getattr(trt, "DynamicShapesKernelSpecializationStrategy", None), "EAGER", None)
    contexts = {}
    for name in ("prefill", "decode"):
        if name == "decode" and eager is not None:
            config = engine.create_runtime_config()
            config.dynamic_shapes_kernel_specialization_strategy = eager
            ctx = engine.create_execution_context(runtime_config=config)
        else:
            ctx = engine.create_execution_context()
        if ctx is None:  # TensorRT logs why: usually the GPU memory for its activations
            raise BuildError(f"TensorRT could not create the {name} execution context (see the "
                             "TensorRT log above; out of GPU memory?)")
        if not ctx.set_optimization_profile_async(profile, stream_handle):
            raise BuildError(f"TensorRT refused optimization profile {profile} for the {name} "
                             f"execution context (the engine has {engine.num_optimization_profiles})")
        contexts[name] = ctx
    return contexts


class TrtSession(Session):
    """See the module docstring."""

    def __init__(self, build: Build, batch: int = 1, cuda_graph: bool = True, device: int = 0):
        torch = _require_gpu(build.target)
        from ..export.trt import require_tensorrt

        trt = require_tensorrt(build.target)
        section = build.tensorrt
        if section is None or "text" not in section.engines:
            raise BuildError(f"{build.root}: the manifest has no TensorRT text engine; rebuild it "
                             f"with `g3export build ... --target {build.target}`")
        if section.attention == "plugin":
            from ..export.kernels.trt_plugin import register_plugins

            register_plugins(trt)  # before deserializing: the engine names the plugin creator
        self.torch, self.trt = torch, trt
        self._build = build
        self._vision: Any = None
        self.config = build.config
        self.max_context = build.max_context
        self.batch = batch
        self.dtype = build.dtype
        self.io = build.component("text")
        self.images = bool(self.io.options.get("images"))
        self.prefill_chunk = section.prefill_chunk
        self.chunk_align = section.chunk_align
        if batch > section.max_batch:
            raise BuildError(f"this engine was built for batch <= {section.max_batch}; "
                             "rebuild with --max-batch")
        engine = section.engines["text"]
        self.profile = engine.profile_for(batch, self.prefill_chunk)  # every step runs in it
        self.dev = torch.device("cuda", device)
        torch.cuda.set_device(self.dev)
        self.stream = torch.cuda.Stream(self.dev)

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine_file = build.path(engine.file)
        self.engine = self.runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise BuildError(
                f"{engine_file} could not be deserialized by {build.target} "
                f"{getattr(trt, '__version__', '?')}: it was built with {section.library} "
                f"{section.version} for compute capabilities "
                f"{section.compute_capabilities or 'the build GPU'}; engines are portable "
                f"across none of these. Rebuild it on/for this GPU (g3export build ... --target "
                f"{build.target})")
        self.contexts = make_contexts(self.engine, self.profile, self.stream.cuda_stream, trt)

        tdt = DTYPES[self.dtype].torch
        self.layout = build.kv_layout(batch)  # what the manifest records (checked on load)
        self.caches: list[Any] = []
        self._kv_names: list[tuple[str, str]] = []
        for lc in self.layout.layers:
            for past in (lc.k_name, lc.v_name):
                self.caches.append(torch.zeros(lc.shape, dtype=tdt, device=self.dev))
                self._kv_names.append((past, self.io.present(past)))
        t = self.config.text
        self._ids = torch.zeros(batch * self.prefill_chunk, dtype=torch.int64, device=self.dev)
        self._start = torch.zeros(batch, dtype=torch.int64, device=self.dev)
        self._row_bound: int | None = None  # the row the prefill context is bound to, if any
        self._logits = torch.zeros(batch, 1, t.vocab_size, dtype=torch.float32, device=self.dev)
        self._feats = (torch.zeros(self.prefill_chunk, t.hidden_size, dtype=tdt, device=self.dev)
                       if self.images else None)
        self._host_inputs = [n for n in ("input_ids", "start_pos")
                             if self.engine.is_shape_inference_io(n)]
        for ctx in self.contexts.values():
            self._bind_static(ctx)
        self.use_cuda_graph = cuda_graph and not self._host_inputs
        self.cuda_graph_error: str | None = None
        self._graph = None
        self._decode_runs = 0

    @classmethod
    def from_build(cls, build: Build | str | Path, **kwargs: Any) -> "TrtSession":
        if not isinstance(build, Build):
            build = load_build(build)
        if build.target not in ENGINE_TARGETS:
            raise BuildError(f"{build.root} is a '{build.target}' build, not a TensorRT one; open "
                             "it with g3export.runtimes.loader.open_build")
        _require_gpu(build.target)  # the clear message first, before the library is imported
        return cls(build, **kwargs)

    # -- binding --------------------------------------------------------------------------------
    def _bind_static(self, ctx: Any) -> None:
        for (past, present), buf in zip(self._kv_names, self.caches):
            ctx.set_input_shape(past, tuple(buf.shape))
            ctx.set_tensor_address(past, buf.data_ptr())
            ctx.set_tensor_address(present, buf.data_ptr())  # the same buffer: in-place update
        ctx.set_tensor_address("logits", self._logits.data_ptr())
        ctx.set_tensor_address("input_ids", self._ids.data_ptr())
        ctx.set_tensor_address("start_pos", self._start.data_ptr())
        ctx.set_input_shape("start_pos", (self.batch,))
        if self._feats is not None:
            ctx.set_tensor_address("image_features", self._feats.data_ptr())
            ctx.set_input_shape("image_features", (1, self.config.text.hidden_size))

    # -- Session interface --------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        return sum(int(c.numel()) * c.element_size() for c in self.caches)

    def reset(self) -> None:
        with self.torch.cuda.stream(self.stream):
            for c in self.caches:
                c.zero_()

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        comps = self._build.components
        if "vision" not in comps:
            raise BuildError(f"this build ({self.config.name}) has no vision component: it cannot "
                             "take images")
        if self._vision is None:
            import onnxruntime as ort

            from .ort_session import OrtVision

            cuda = "CUDAExecutionProvider" in ort.get_available_providers()
            io = comps["vision"]
            self._vision = OrtVision(self._build.path(io.file), io, "cuda" if cuda else "cpu")
        return self._vision(pixel_values)

    def check_chunk(self, start_pos: int, t: int) -> None:
        if t < 1 or t > self.prefill_chunk:
            raise ValueError(f"a chunk of {t} tokens; this engine takes 1..{self.prefill_chunk}")
        if start_pos < 0 or start_pos + t > self.max_context:
            raise ValueError(f"positions {start_pos}..{start_pos + t - 1} exceed max_context "
                             f"{self.max_context}")
        if self.chunk_align:
            from ..export.onnx_native_attention import check_chunk

            check_chunk(start_pos, t, int(self.chunk_align))

    def forward(self, input_ids: np.ndarray, start_pos: "int | np.ndarray",
                image_features: np.ndarray | None = None) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"input_ids must be [batch={self.batch}, T], got {ids.shape}")
        starts = self.row_starts(start_pos, ids.shape[1])
        for s in set(starts.tolist()):
            self.check_chunk(s, ids.shape[1])
        decode = ids.shape[1] == 1 and image_features is None
        ctx = self.contexts["decode" if decode else "prefill"]
        if not decode and self._row_bound is not None:
            self._bind_row(ctx, None)
        return self._run(ctx, ids, starts, image_features, self.batch, decode)

    def forward_row(self, row: int, input_ids: np.ndarray, start_pos: int,
                    image_features: np.ndarray | None = None) -> np.ndarray:
        ids = self.check_row(row, input_ids)
        self.check_chunk(start_pos, ids.shape[1])
        ctx = self.contexts["prefill"]
        if self._row_bound != row:
            self._bind_row(ctx, row)
        return self._run(ctx, ids, np.array([start_pos], dtype=np.int64), image_features, 1,
                         False)

    def _bind_row(self, ctx: Any, row: int | None) -> None:
        """Point the prefill context at row `row`'s slice of every cache (None: the whole caches)."""
        for (past, present), buf in zip(self._kv_names, self.caches):
            shape = tuple(buf.shape) if row is None else (1, *buf.shape[1:])
            ptr = buf.data_ptr() + (0 if row is None else row * buf[0].numel() * buf.element_size())
            ctx.set_input_shape(past, shape)
            ctx.set_tensor_address(past, ptr)
            ctx.set_tensor_address(present, ptr)
        ctx.set_input_shape("start_pos", (self.batch if row is None else 1,))
        self._row_bound = row

    def _run(self, ctx: Any, ids: np.ndarray, starts: np.ndarray, image_features, rows_b: int,
             decode: bool) -> np.ndarray:
        torch = self.torch
        t = ids.shape[1]
        if image_features is not None and self._feats is None:
            raise ValueError("this build's text graph takes no image_features (text-only export)")
        with torch.cuda.stream(self.stream):
            n = rows_b * t
            self._ids[:n].copy_(torch.from_numpy(ids.reshape(-1)), non_blocking=False)
            self._start[:rows_b].copy_(torch.from_numpy(starts), non_blocking=False)
            rows = 1
            if self._feats is not None:
                if image_features is not None:
                    f = torch.from_numpy(np.ascontiguousarray(image_features, np.float32))
                    rows = f.shape[0]
                    if rows > self._feats.shape[0]:
                        raise ValueError(f"{rows} image feature rows; at most "
                                         f"{self._feats.shape[0]} per chunk")
                    self._feats[:rows].copy_(f.to(self._feats.dtype))
                ctx.set_input_shape("image_features", (rows, self.config.text.hidden_size))
            ctx.set_input_shape("input_ids", (rows_b, t))
            if decode and self.use_cuda_graph:
                self._decode_step(ctx)
            elif not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            out = self._logits[:rows_b, -1, :].to("cpu", non_blocking=False)
        self.stream.synchronize()
        return out.numpy().astype(np.float32, copy=False)

    def _decode_step(self, ctx: Any) -> None:
        """Decode through a CUDA graph: the first step runs plainly (TensorRT's lazy set-up must
        not be captured), the second is captured, every later one is a replay."""
        torch = self.torch
        if self._graph is not None:
            self._graph.replay()
            return
        if self._decode_runs == 0:
            self._decode_runs += 1
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            return
        graph = torch.cuda.CUDAGraph()
        try:
            self.stream.synchronize()
            with torch.cuda.graph(graph, stream=self.stream):
                ok = ctx.execute_async_v3(self.stream.cuda_stream)
            if not ok:
                raise RuntimeError("execute_async_v3 failed during capture")
            self._graph = graph
            graph.replay()  # capture records, it does not run
        except Exception as e:  # a plugin or TensorRT version that cannot be captured
            self.cuda_graph_error = f"{type(e).__name__}: {e}"
            self.use_cuda_graph = False
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
