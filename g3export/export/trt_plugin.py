"""The `plugin` TensorRT translation of `torch.ops.g3.attention` (DESIGN §3.2, issue 7): one ONNX
node per attention layer that TensorRT's ONNX parser turns into our IPluginV3.

The node (emitted at export time by `TRANSLATION_TABLE`, op type = plugin name):

    out, k_cache_out, v_cache_out = g3.G3Attention(q, k, v, k_cache, v_cache, start_pos, image_groups)

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

    attributes: window (int, 0 = full layer), scale (float), layer_type ("sliding"|"full"),
                num_heads H, num_kv_heads KV (GQA ratio H/KV), head_dim D, cache_slots S,
                plugin_namespace "g3", plugin_version "1"

The node's domain is "g3" (the same as plugin_namespace); TensorRT's parser finds the creator by
op type, `plugin_version` and `plugin_namespace`, and hands every other attribute to the creator
as a PluginField.

The plugin itself (`G3AttentionPlugin`, a class-based Python IPluginV3, and its creator;
`register_plugins(trt)`) is g3export.export.kernels.trt_plugin: what an engine runtime imports,
without onnx, onnxscript or onnx_ir. This module is the export side only.

ONNX Runtime check: ORT does not know the plugin node; `plugin_to_reference(model)` rewrites each
one into the ONNX Runtime translation (g3export.export.onnx_attention) with the same inputs,
outputs and attributes, so the plugin graph, everything around the plugin nodes unchanged, runs
on CPU and is compared with the reference.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir
import torch
from onnxscript import values as _osv

from .kernels.trt_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

DOMAIN = PLUGIN_NAMESPACE
NAME = "plugin"



# ---------------------------------------------------------------------------------------------
# ONNX side: the node


def _schema() -> onnx.defs.OpSchema:
    fp = onnx.defs.OpSchema.FormalParameter
    at = onnx.defs.OpSchema.Attribute
    aty = onnx.defs.OpSchema.AttrType
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return onnx.defs.OpSchema(
        PLUGIN_NAME, DOMAIN, 1, doc="g3::attention as a TensorRT plugin (g3export.export.trt_plugin)",
        inputs=[fp("q", "T"), fp("k", "T"), fp("v", "T"), fp("k_cache", "T"), fp("v_cache", "T"),
                fp("start_pos", "I"), fp("image_groups", "I")],
        outputs=[fp("out", "T"), fp("k_cache_out", "T"), fp("v_cache_out", "T")],
        type_constraints=[("T", floats, "model dtype"), ("I", ["tensor(int64)"], "int64")],
        attributes=[at("window", aty.INT, "W, 0 = full layer"),
                    at("scale", aty.FLOAT, "softmax scale"),
                    at("layer_type", aty.STRING, "sliding | full"),
                    at("num_heads", aty.INT, "H"), at("num_kv_heads", aty.INT, "KV"),
                    at("head_dim", aty.INT, "D"), at("cache_slots", aty.INT, "S"),
                    at("plugin_namespace", aty.STRING, "TensorRT plugin namespace"),
                    at("plugin_version", aty.STRING, "TensorRT plugin version")])


_OPSET = _osv.Opset(DOMAIN, 1)
_OP = _osv.Op(_OPSET, PLUGIN_NAME, _schema())


def _static(dim: Any, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"g3.attention (plugin) needs a static {what}, got {dim!r}")
    return dim


def node_attributes(heads: int, kv_heads: int, head_dim: int, slots: int, window: int,
                    scale: float) -> dict[str, Any]:
    return {"window": int(window), "scale": float(scale),
            "layer_type": "sliding" if window > 0 else "full", "num_heads": int(heads),
            "num_kv_heads": int(kv_heads), "head_dim": int(head_dim), "cache_slots": int(slots),
            "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def g3_attention_plugin(q, k, v, k_cache, v_cache, start_pos, image_groups, window: int,
                        scale: float):
    """Trace-only translation (the exporter calls it with onnx_ir Values): one plugin node."""
    attrs = node_attributes(_static(q.shape[1], "number of query heads"),
                            _static(k.shape[1], "number of KV heads"),
                            _static(q.shape[3], "head_dim"),
                            _static(k_cache.shape[2], "cache length"), window, scale)
    out, k_new, v_new = _OP(q, k, v, k_cache, v_cache, start_pos, image_groups, **attrs)
    return out, k_new, v_new


TRANSLATION_TABLE = {torch.ops.g3.attention.default: g3_attention_plugin}


def plugin_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == PLUGIN_NAME and n.domain == DOMAIN]


def plugin_to_reference(model: ir.Model) -> int:
    """Rewrite every plugin node of `model` (in place) into the ONNX Runtime translation of the
    same op (g3export.export.onnx_attention.g3_attention), so ONNX Runtime can run the plugin graph
    with the plugin's numerics replaced by the reference math. Returns the number rewritten."""
    import onnxscript
    from torch.onnx._internal.exporter import _building

    from .onnx_attention import g3_attention

    g = model.graph
    opset = onnxscript.values.Opset("", model.opset_imports.get("", 18))
    n = 0
    for node in plugin_nodes(model):
        a = {k: v.value for k, v in node.attributes.items()}
        ins = list(node.inputs)
        # the ORT translation reads static dims from the values: make sure they are there
        b_dim = ins[0].shape[0] if ins[0].shape is not None else None
        _ensure_shape(ins[0], (b_dim, a["num_heads"], None, a["head_dim"]))
        for i in (1, 2):
            _ensure_shape(ins[i], (b_dim, a["num_kv_heads"], None, a["head_dim"]))
        for i in (3, 4):
            _ensure_shape(ins[i], (b_dim, a["num_kv_heads"], a["cache_slots"], a["head_dim"]))
        with onnxscript.evaluator.default_as(tracer := _building.OpRecorder(opset, {})):
            outs = g3_attention(*ins, int(a["window"]), float(a["scale"]))
        g.insert_before(node, tracer.nodes)
        for old, new in zip(node.outputs, outs):
            name = old.name
            new.shape, new.type = old.shape, old.type
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            old.name = None
            new.name = name
        g.remove(node, safe=True)
        n += 1
    if n:  # the translation uses contrib ops (FusedMatMul, GroupQueryAttention)
        model.opset_imports.setdefault("com.microsoft", 1)
    if n and not plugin_nodes(model) and DOMAIN in model.opset_imports:
        del model.opset_imports[DOMAIN]
    return n


def _ensure_shape(value: ir.Value, dims: tuple[Any, ...]) -> None:
    if value.shape is not None and all(isinstance(d, int) for i, d in enumerate(value.shape.dims)
                                       if dims[i] is not None):
        return
    old = list(value.shape.dims) if value.shape is not None else [None] * len(dims)
    value.shape = ir.Shape([d if d is not None else old[i] for i, d in enumerate(dims)])



__all__ = ["PLUGIN_NAME", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "TRANSLATION_TABLE",
           "g3_attention_plugin", "plugin_nodes", "plugin_to_reference", "node_attributes"]
