"""FP8 (E4M3) quantization of a TensorRT text graph (DESIGN §3.9 "FP8"): the graph pass of
`--quant fp8`, run where onnx_quant's weight-only pass runs (after the layout passes, before
the writer), on the graphs of --target trt / trt-rtx only.

Every decoder Linear, MatMul(x, W^T) with W^T a 2-D initializer named
`...layers.<i>.(self_attn|mlp).<x>_proj.weight.T`, becomes

    MatMul(DequantizeLinear(QuantizeLinear(x, s_x, 0_e4m3), s_x),
           DequantizeLinear(W8 [K, N] float8e4m3fn, s_w [N], axis=1))

standard ONNX Q/DQ (opset 19+; the graph is raised to 21 like the blocked int4/int8 path),
which TensorRT fuses into an FP8 GEMM: it builds for compute capability 8.9 and 12.0 on a
CPU-only machine with TensorRT-RTX 1.7 (tests/export/test_fp8_trt.py).

* Weights: one scale per output channel n, s_w[n] = max_k |W[n, k]| / 448 (TensorRT's FP8
  GEMM takes per-tensor or per-channel weight scales; per channel keeps each row's full E4M3
  range, and a row block quantizes on its own, so the weight streams: quant_stream.RowQuant).
* Activations: one static scale per tensor, s_x = amax / 448, amax the largest |x| the
  PyTorch reference saw at that input over the calibration text (g3export.export.calibrate).
  q/k/v read one tensor (and gate/up another): one Q/DQ pair on it, with the largest of
  their amaxes, so each activation is quantized once.
* Scales are stored in the graph's float type (DequantizeLinear's output type); codes are
  computed against the rounded scale (quantize.quantize_fp8_rows).

Kept in the build dtype, and why: the embedding lookup and the lm_head (one [vocab, hidden]
table read by both, and the lm_head's error goes straight into the logits; it is also the only
GEMM whose output is not renormalised), the attention core (QK^T, softmax, PV: TensorRT's FP8
attention needs its own fused pattern and an FP8 KV cache), norms and RoPE (elementwise, cheap,
and where the residual stream's range lives), and the vision tower (a separate graph).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from . import quantize as Q
from .onnx_quant import _is_linear


def _module(init_name: str) -> str:
    """`model.language_model.layers.3.mlp.up_proj.weight.T` ->
    `language_model.layers.3.mlp.up_proj`."""
    return init_name.removeprefix("model.").removesuffix(".weight.T")


def fp8_graph(m: ir.Model, amax: dict[str, float]) -> dict[str, int]:
    """Rewrite `m` in place (module docstring); amax: calibrate.linear_input_amax's result.
    Returns counts {'linear': n, 'activation': n Q/DQ pairs, 'embedding': 0}."""
    g = m.graph
    order = {node: i for i, node in enumerate(g)}
    groups: dict[ir.Value, list[tuple[ir.Value, ir.Node]]] = {}
    for v in list(g.initializers.values()):
        if v.const_value is None or v.shape is None or len(v.shape) != 2 or \
                not _is_linear(v.name) or "+" in v.name:
            continue
        uses = list(v.uses())
        if len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 1:
            raise RuntimeError(f"{v.name}: expected one MatMul reading it as B, got {uses}")
        groups.setdefault(uses[0][0].inputs[0], []).append((v, uses[0][0]))
    if not groups:
        raise RuntimeError("fp8_graph found no decoder linear layer to quantize")
    zero = _initializer(g, "fp8_zero_point", np.zeros((), np.float32), ir.DataType.FLOAT8E4M3FN)
    n_linear = 0
    for x, lins in groups.items():
        missing = [_module(v.name) for v, _ in lins if _module(v.name) not in amax]
        if missing:
            raise RuntimeError(f"no calibrated input range for {', '.join(missing)}")
        dt = lins[0][0].const_value.dtype
        a = max(amax[_module(v.name)] for v, _ in lins)
        first = min((mm for _, mm in lins), key=order.__getitem__)
        s = _initializer(g, f"{_module(first.inputs[1].name)}.input_scale",
                         np.array(Q.fp8_scale(a), np.float32), dt)
        q = ir.node("QuantizeLinear", [x, s, zero], attributes={"saturate": 1})
        dq = ir.node("DequantizeLinear", [q.outputs[0], s])
        g.insert_before(first, [q, dq])
        for v, mm in lins:
            w = _weight(g, v)
            g.insert_before(mm, w)
            mm.replace_input_with(0, dq.outputs[0])
            mm.replace_input_with(1, w.outputs[0])
            g.initializers.pop(v.name)
            n_linear += 1
    if m.opset_imports.get("", 0) < 21:
        m.opset_imports[""] = 21  # float8 Q/DQ need 19; 21 as the blocked int4/int8 graphs
    return {"linear": n_linear, "activation": len(groups), "embedding": 0}


def _weight(g: ir.Graph, v: ir.Value) -> ir.Node:
    """DequantizeLinear(W8 [K, N], s_w [N], axis=1) == W~^T, both streamed from W's rows."""
    from .quant_stream import row_quant, source_recipe

    k, n = v.shape
    dt = v.const_value.dtype
    recipe = source_recipe(v, transposed=True)
    sdt = dt.numpy()
    codes = row_quant(g, f"{v.name}.f8", recipe, lambda w: Q.quantize_fp8_rows(w, sdt)[0],
                      True, ir.DataType.FLOAT8E4M3FN, [k, n])
    scales = row_quant(g, f"{v.name}.scales", recipe, lambda w: Q.quantize_fp8_rows(w, sdt)[1],
                       False, dt, [n])
    return ir.node("DequantizeLinear", [codes, scales], attributes={"axis": 1})


def _initializer(g: ir.Graph, name: str, value: np.ndarray, dtype: ir.DataType) -> ir.Value:
    t = ir.Tensor(value.astype(dtype.numpy()), dtype=dtype, name=name)
    v = ir.Value(name=name, const_value=t, shape=ir.Shape(value.shape), type=ir.TensorType(dtype))
    g.register_initializer(v)
    return v
