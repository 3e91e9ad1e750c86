"""The TensorRT side of the `plugin` attention translation: the class-based Python IPluginV3
`G3AttentionPlugin` and its creator (issue 7, DESIGN §3.2). The ONNX side (the node's schema, the
export translation, the mapping to the reference for ONNX Runtime) is
g3export.export.trt_plugin, which imports the names below; this module is what an engine runtime
needs and imports neither onnx, onnxscript nor onnx_ir (tests/export/test_trt.py checks that in a
fresh interpreter), so opening a TensorRT build does not load the exporter.

Node / plugin I/O (same order in the ONNX node and in enqueue):

    input/output   dtype          shape            notes
    q              model dtype    [B, H, T, D]     after q_norm and RoPE
    k, v           model dtype    [B, KV, T, D]
    k_cache        model dtype    [B, KV, S, D]    static layout (DESIGN §3.3): slot = pos mod S
    v_cache        model dtype    [B, KV, S, D]
    start_pos      int64          [B]              absolute position of each row's first chunk token
    image_groups   int64          [B, T]           -1 text, same id >= 0 = one image (prefill)
    out            model dtype    [B, H, T, D]
    k_cache_out    model dtype    [B, KV, S, D]    ALIASES k_cache (IPluginV3OneBuildV2
    v_cache_out    model dtype    [B, KV, S, D]    getAliasedInput): the update is in place

    plugin fields: window, num_heads H, num_kv_heads KV, head_dim D, cache_slots S (int32),
                   scale (float32)

The plugin works with TensorRT >= 10 and TensorRT-RTX (the module is passed in:
`register_plugins(trt)`, called before parsing a plugin graph and before deserializing an engine
that holds one). Its enqueue calls
`g3export.export.kernels.attention_triton.attention_triton_pointers` (Triton kernels, issue 8),
and falls back to the PyTorch reference on the device when Triton is unavailable. A Python plugin
needs Python at run time: the engine records only the plugin's name/version/fields. The
ahead-of-time route that embeds Triton kernels in the engine (`tensorrt.plugin` with `aot_impl`,
TensorRT >= 10.12) is not used: TensorRT-RTX 1.7's wheel ships a broken `tensorrt_rtx.plugin` (it
imports `tensorrt_rtx_bindings.plugin`, which is absent), so it cannot be built or checked here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...modeling import attention as _attention  # noqa: F401  (registers torch.ops.g3.attention)

PLUGIN_NAME = "G3Attention"
PLUGIN_NAMESPACE = "g3"
PLUGIN_VERSION = "1"
INPUTS = ("q", "k", "v", "k_cache", "v_cache", "start_pos", "image_groups")
OUTPUTS = ("out", "k_cache_out", "v_cache_out")
ALIASES = {1: 3, 2: 4}  # output index -> input index it shares memory with
INT_FIELDS = ("window", "num_heads", "num_kv_heads", "head_dim", "cache_slots")

_CLASSES: dict[str, tuple[type, type]] = {}
_CREATORS: dict[str, Any] = {}  # keeps registered creators alive


def _fields_to_attrs(trt: Any, fc: Any) -> dict[str, Any]:
    """PluginFieldCollection (from the parser or a deserialized engine) -> attribute dict."""
    out: dict[str, Any] = {}
    for f in fc or []:
        name = f.name
        data = np.asarray(f.data)
        if f.type == trt.PluginFieldType.CHAR:
            out[name] = bytes(data.astype(np.uint8).tobytes()).rstrip(b"\0").decode()
        elif f.type in (trt.PluginFieldType.FLOAT32, trt.PluginFieldType.FLOAT64):
            out[name] = float(data.reshape(-1)[0])
        else:
            out[name] = int(data.reshape(-1)[0])
    missing = [k for k in (*INT_FIELDS, "scale") if k not in out]
    if missing:
        raise ValueError(f"{PLUGIN_NAME}: missing plugin fields {missing}")
    return out


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.BF16: torch.bfloat16, trt.DataType.INT64: torch.int64}
    return table[dt]


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class _DeviceArray:
    """__cuda_array_interface__ over a raw device pointer (no ownership)."""

    _TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.int64: "<i8",
                torch.uint8: "|u1"}

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.__cuda_array_interface__ = {"shape": tuple(int(s) for s in shape),
                                         "typestr": self._TYPESTR[dtype],
                                         "data": (int(ptr), False), "version": 3,
                                         "strides": None}


def device_tensor(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A torch CUDA tensor over TensorRT-owned memory (bf16 goes through a 2-byte float view)."""
    if dtype == torch.bfloat16:
        return torch.as_tensor(_DeviceArray(ptr, shape, torch.float16), device="cuda").view(dtype)
    return torch.as_tensor(_DeviceArray(ptr, shape, dtype), device="cuda")


def run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, start_pos: torch.Tensor, image_groups: torch.Tensor,
                  out: torch.Tensor, window: int, scale: float, use_triton: bool | None = None) -> str:
    """The plugin's computation on tensors (any device): writes `out` and updates the caches IN
    PLACE. Triton kernels when available (and on CUDA), else the PyTorch reference. Returns which
    path ran ('triton' | 'reference'). Used by enqueue; testable on CPU."""
    if use_triton is None:
        use_triton = q.is_cuda
    if use_triton:
        try:
            from .attention_triton import attention_triton
        except ImportError:
            use_triton = False
    if use_triton:
        attention_triton(q, k, v, k_cache, v_cache, start_pos, image_groups, window, scale, out=out)
        return "triton"
    o, kc, vc = _attention.attention_reference(q, k, v, k_cache, v_cache, start_pos, image_groups,
                                               window, scale)
    out.copy_(o)
    k_cache.copy_(kc)
    v_cache.copy_(vc)
    return "reference"


def plugin_classes(trt: Any) -> tuple[type, type]:
    """(plugin class, creator class) bound to the given tensorrt / tensorrt_rtx module."""
    key = trt.__name__
    if key in _CLASSES:
        return _CLASSES[key]

    build_base = getattr(trt, "IPluginV3OneBuildV2", None) or trt.IPluginV3OneBuild

    class G3AttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, build_base,
                            trt.IPluginV3OneRuntime):
        """IPluginV3 for g3::attention (module docstring for I/O and fields)."""

        def __init__(self, attrs: dict[str, Any], phase: Any = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            build_base.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = len(OUTPUTS)
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.attrs = dict(attrs)
            self.phase = phase
            self.timing_cache_id = ""
            self.path: str | None = None

        # -- core / build ---------------------------------------------------------------------
        def get_capability_interface(self, capability_type: Any) -> Any:
            return self

        def clone(self) -> "G3AttentionPlugin":
            c = G3AttentionPlugin(self.attrs, self.phase)
            c.__dict__.update(self.__dict__)
            return c

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [input_types[0], input_types[3], input_types[4]]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any],
                              expr_builder: Any) -> list[Any]:
            return [trt.DimsExprs(inputs[0]), trt.DimsExprs(inputs[3]), trt.DimsExprs(inputs[4])]

        def get_aliased_input(self, output_index: int) -> int:
            return ALIASES.get(int(output_index), -1)

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos in (5, 6):  # start_pos, image_groups
                return desc.type == trt.DataType.INT64
            if pos == 0:
                return desc.type in (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)
            return desc.type == in_out[0].desc.type  # k, v, caches, outputs: q's dtype

        def configure_plugin(self, inputs: list[Any], outputs: list[Any]) -> None:
            pass

        def get_workspace_size(self, inputs: list[Any], outputs: list[Any]) -> int:
            # enough for every shape of the profile: decode (T = 1) and prefill use different
            # scratch layouts, so take the larger of T = 1 and T = max at the largest batch
            b, _, t, _ = (int(x) for x in inputs[0].max)
            return max(self.get_workspace_size_runtime(b, 1), self.get_workspace_size_runtime(b, t))

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            pass

        def get_fields_to_serialize(self) -> Any:
            a = self.attrs
            fields = [trt.PluginField(k, np.array([a[k]], dtype=np.int32),
                                      trt.PluginFieldType.INT32) for k in INT_FIELDS]
            fields.append(trt.PluginField("scale", np.array([a["scale"]], dtype=np.float32),
                                          trt.PluginFieldType.FLOAT32))
            return trt.PluginFieldCollection(fields)

        # -- runtime --------------------------------------------------------------------------
        def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
            pass

        def attach_to_context(self, context: Any) -> "G3AttentionPlugin":
            return self.clone()

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int],
                    outputs: list[int], workspace: int, stream: int) -> None:
            a = self.attrs
            b, h, t, d = (int(x) for x in input_desc[0].dims)
            kv, s = a["num_kv_heads"], a["cache_slots"]
            dt = _torch_dtype(trt, input_desc[0].type)
            try:
                from .attention_triton import attention_triton_pointers
            except ImportError:
                attention_triton_pointers = None
            if attention_triton_pointers is not None:
                ws_size = self.get_workspace_size_runtime(b, t)
                attention_triton_pointers(
                    q=inputs[0], k=inputs[1], v=inputs[2], k_cache=inputs[3], v_cache=inputs[4],
                    start_pos=inputs[5], image_groups=inputs[6], out=outputs[0],
                    k_cache_out=outputs[1], v_cache_out=outputs[2],
                    workspace=workspace or None, workspace_size=ws_size, batch=b, heads=h,
                    kv_heads=kv, t=t, slots=s, head_dim=d, dtype=_DTYPE_NAMES[dt],
                    window=a["window"], scale=a["scale"], stream=stream)
                self.path = "triton"
                return
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                cache_shape = (b, kv, s, d)
                tq = device_tensor(inputs[0], (b, h, t, d), dt)
                tk = device_tensor(inputs[1], (b, kv, t, d), dt)
                tv = device_tensor(inputs[2], (b, kv, t, d), dt)
                kc = device_tensor(outputs[1], cache_shape, dt)
                vc = device_tensor(outputs[2], cache_shape, dt)
                if outputs[1] != inputs[3]:
                    kc.copy_(device_tensor(inputs[3], cache_shape, dt))
                if outputs[2] != inputs[4]:
                    vc.copy_(device_tensor(inputs[4], cache_shape, dt))
                sp = device_tensor(inputs[5], (b,), torch.int64)  # one start per row
                gr = device_tensor(inputs[6], (b, t), torch.int64)
                out = device_tensor(outputs[0], (b, h, t, d), dt)
                self.path = run_attention(tq, tk, tv, kc, vc, sp, gr, out, a["window"],
                                          a["scale"], use_triton=False)

        def get_workspace_size_runtime(self, b: int, t: int) -> int:
            """Scratch of the Triton entry for batch b, chunk t; 0 where Triton is not
            importable (the reference path needs none). num_sms=256 bounds every GPU in the
            support matrices (H100: 132 SMs), so the split count at run time never needs more."""
            a = self.attrs
            try:
                from .attention_triton import workspace_bytes
            except ImportError:
                return 0
            return int(workspace_bytes(b, a["num_heads"], a["num_kv_heads"], t, a["cache_slots"],
                                       a["head_dim"], a["window"], num_sms=256))

    class G3AttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            fields = [trt.PluginField(k, np.array([]), trt.PluginFieldType.INT32)
                      for k in INT_FIELDS]
            fields.append(trt.PluginField("scale", np.array([]), trt.PluginFieldType.FLOAT32))
            self.field_names = trt.PluginFieldCollection(fields)

        def create_plugin(self, name: str, fc: Any, phase: Any) -> G3AttentionPlugin:
            attrs = _fields_to_attrs(trt, fc)
            if attrs["num_heads"] % attrs["num_kv_heads"]:
                raise ValueError(f"{PLUGIN_NAME} {name}: num_heads {attrs['num_heads']} is not a "
                                 f"multiple of num_kv_heads {attrs['num_kv_heads']}")
            return G3AttentionPlugin(attrs, phase)

    _CLASSES[key] = (G3AttentionPlugin, G3AttentionCreator)
    return _CLASSES[key]


def register_plugins(trt: Any) -> Any:
    """Register the G3Attention creator with `trt`'s plugin registry (idempotent). Call before
    parsing a plugin graph and before deserializing an engine that contains one."""
    key = trt.__name__
    if key in _CREATORS:
        return _CREATORS[key]
    _, creator_cls = plugin_classes(trt)
    creator = creator_cls()
    registry = trt.get_plugin_registry()
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        existing = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
        if existing is None:
            raise RuntimeError(f"could not register the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} "
                               "TensorRT plugin creator")
        creator = existing
    _CREATORS[key] = creator
    return creator


__all__ = ["PLUGIN_NAME", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "INPUTS", "OUTPUTS", "ALIASES",
           "INT_FIELDS", "register_plugins", "plugin_classes", "run_attention", "device_tensor"]
