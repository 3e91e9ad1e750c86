"""Quantize an exported text graph (DESIGN §3.9): the last graph pass of onnx_export, run after
the layout passes (tied embedding, folded transposes, fused siblings) and before the writer.

What is quantized: every decoder Linear, i.e. every MatMul whose B is a 2-D initializer named
`...layers.<i>.(self_attn|mlp).<x>_proj.weight.T` (or a "+"-joined fusion of those: q/k/v and
gate/up are one MatMul each in ONNX Runtime graphs), and, when `scheme.embedding`, the tied
embedding [1, hidden, vocab] in both of its uses (the lookup and the lm_head). Norm scales, the
RoPE tables and everything else stay in the build dtype; the vision tower is a separate graph
that this pass never sees (it stays in the build dtype too).

Each quantized initializer stays lazy: the quantizer (g3export.export.quantize, a per-tensor
numpy function) runs when the writer asks for the bytes. For ONNX Runtime's layout, whose rows
are the source weights' rows (n), a `StreamedQuant` writes itself block by block as the weight
streams from its source (g3export.export.stream: `write_blocks`): each source row block is
quantized and packed on its own (rows are independent), so no whole weight is ever in memory;
codes and scales are two passes over the source (the scales pass re-reads the rows: cheaper
than holding them). The TensorRT layout is [K, N] (a transpose of the source): a
`quant_stream.RowQuant` quantizes each source row block and writes it as a block of output
columns with strided writes (as stream writes a transposed recipe), so it streams too.

Per target (`form`):
* "ort" (ONNX Runtime): MatMul(x, W^T) -> com.microsoft.MatMulNBits(x, B, scales) with
  accuracy_level 4 (the CPU kernel quantizes the activations per block to int8 and uses int8
  dot products: that is where MLAS's int4/int8 GEMV speed comes from; its error is part of what
  `g3export eval` measures). The embedding lookup Gather(E^T, ids, axis=2) -> Transpose ->
  Squeeze becomes GatherBlockQuantized(B, ids, Unsqueeze(scales)) on the lm_head's own B viewed
  as [vocab, K/block, block*bits/8] with quantize_axis 2, then a Reshape to [.., hidden]: one
  quantized copy of the 262144-row table on disk, used twice. Asymmetric (scheme.symmetric
  False, `--quant-asymmetric`): MatMulNBits' fourth input holds the zero points (packed two per byte),
  GatherBlockQuantized's fourth its own copy of them one per byte (what the op reads with
  quantize_axis 2: 5 MB for the 270M's table, beside the 84 MB of codes they share).
* "dq" (TensorRT, TensorRT-RTX): MatMul(x, DequantizeLinear(q [K, N], scales [K/block, N],
  axis 0, block_size)) with q stored as ONNX INT4/INT8 (opset 21 blocked DQ), which TensorRT
  compiles to a weight-only quantized GEMM. The tied embedding [1, hidden, vocab] is one
  DequantizeLinear along axis 1 read by both its Gather and its MatMul.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import onnx_ir as ir

from . import quantize as Q

_LINEAR = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight\.T$")
ACCURACY_LEVEL = 4


def _is_linear(name: str) -> bool:
    return all(_LINEAR.search(p) for p in name.split("+"))


class _Pair:
    """Run `fn` once and hand out its `n` results to n lazy tensors, in any order."""

    def __init__(self, fn: Callable[[], tuple[np.ndarray, ...]], n: int = 2):
        self.fn, self.got, self.taken, self.n = fn, None, 0, n

    def get(self, i: int) -> np.ndarray:
        if self.got is None:
            self.got = self.fn()
        out = self.got[i]
        self.taken += 1
        if self.taken == self.n:
            self.got = None  # all written: let the arrays go
        return out


def _ort_parts(w: np.ndarray, bits: int, block: int, symmetric: bool) -> list[np.ndarray]:
    """ONNX Runtime's arrays for the [N, K] weight w: [B, scales] (symmetric) or [B, scales,
    MatMulNBits' zero points, GatherBlockQuantized's zero points] (g3export.export.quantize).
    Every one is row-wise: a block of w's rows gives that block of each array's bytes."""
    if symmetric:
        return list(Q.matmul_nbits(w, bits, block))
    u, scales, zero = Q.quantize_rows_asym(w, bits, block)
    n, k = w.shape
    return [Q.pack_codes(u, bits).reshape(n, k // block, block * bits // 8), scales,
            Q.zero_points_nbits(zero, bits), Q.zero_points_gather(zero)]


class StreamedQuant(ir.LazyTensor):
    """Part `part` of `_ort_parts` (0 codes, 1 scales, 2 and 3 zero points) of a weight whose
    source streams (a transposed stream Recipe: output rows = the parts' source rows, in order)."""

    def __init__(self, recipe, part: int, bits: int, block: int, symmetric: bool,
                 dtype: ir.DataType, shape, name: str, whole: Callable[[], np.ndarray]):
        super().__init__(lambda: ir.Tensor(whole().astype(dtype.numpy()), dtype=dtype, name=name),
                         dtype=dtype, shape=ir.Shape(shape), name=name)
        self.recipe, self.part, self.bits, self.block = recipe, part, bits, block
        self.symmetric = symmetric
        self.side: dict | None = None  # shared by one weight's parts: its small parts' bytes
        self.n_parts = 2                 # how many of _ort_parts' arrays the graph holds

    def _rows(self, block_bytes: int):
        import torch

        for p in self.recipe.parts:
            for _, rows in p.source.blocks(p.name, block_bytes):
                yield _ort_parts(rows.to(self.recipe.dtype).to(torch.float32).numpy(),
                                 self.bits, self.block, self.symmetric)

    def write_blocks(self, write: Callable[[np.ndarray], None], block_bytes: int, bar) -> None:
        """Quantize and write row block by row block, in the tensor's byte order. The codes
        take one pass over the source; the small parts (scales, zero points: 1/8 of the codes'
        bytes or less) one pass together, the first of them to be written keeping the others'
        bytes in `side` for them."""
        if self.part == 0 or self.side is None:
            for parts in self._rows(block_bytes):
                out = self._bytes(parts[self.part])
                write(out)
                bar.update(out.nbytes)
            return
        if self.part not in self.side:
            got: dict[int, list] = {}
            for parts in self._rows(block_bytes):
                for i in range(1, self.n_parts):
                    got.setdefault(i, []).append(parts[i])
            self.side.update(got)
        out = self._bytes(np.concatenate(self.side.pop(self.part)))
        write(out)
        bar.update(out.nbytes)

    def _bytes(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a.astype(self.dtype.numpy(), copy=False))
        return a.reshape(-1).view(np.uint8)


def _lazy(g: ir.Graph, name: str, shape, dtype: ir.DataType, fn, stream=None) -> ir.Value:
    """A lazy initializer computed by `fn`; stream = (recipe, part, bits, block, symmetric): a
    StreamedQuant that the writer streams row block by row block."""
    if stream is not None:
        t = StreamedQuant(*stream, dtype, shape, name, fn)
        v = ir.Value(name=name, const_value=t, shape=ir.Shape(shape), type=ir.TensorType(dtype))
        g.register_initializer(v)
        return v
    t = ir.LazyTensor(lambda: ir.Tensor(fn().astype(dtype.numpy()), dtype=dtype, name=name),
                      dtype=dtype,
                      shape=ir.Shape(shape), name=name)
    v = ir.Value(name=name, const_value=t, shape=ir.Shape(shape), type=ir.TensorType(dtype))
    g.register_initializer(v)
    return v


def _source_nk(v: ir.Value) -> Callable[[], np.ndarray]:
    """W [N, K] as float32 from an initializer holding W^T [K, N] (or E^T [1, hidden, vocab])."""
    cv = v.const_value

    def get() -> np.ndarray:
        a = cv.numpy()
        return np.ascontiguousarray((a[0] if a.ndim == 3 else a).T.astype(np.float32))
    return get


def _float_dtype(v: ir.Value) -> ir.DataType:
    return v.const_value.dtype


def quantize_graph(m: ir.Model, scheme: Q.QuantScheme, form: str) -> dict[str, int]:
    """Rewrite `m` in place (module docstring). Returns counts {'linear': n, 'embedding': 0|1}."""
    if form not in ("ort", "dq"):
        raise ValueError(f"form {form!r}")
    if scheme.scheme not in Q.WEIGHT_ONLY:
        raise ValueError(f"quantize_graph does weight-only schemes, not {scheme.scheme!r}")
    g = m.graph
    bits, block = scheme.bits, scheme.block
    sym = scheme.symmetric is not False
    if form == "dq" and not sym:
        raise ValueError("the DequantizeLinear form is symmetric only (QuantScheme.resolve)")
    n_linear = n_embed = 0
    for v in list(g.initializers.values()):
        if v.const_value is None or v.shape is None:
            continue
        if len(v.shape) == 2 and _is_linear(v.name):
            uses = list(v.uses())
            if len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 1:
                raise RuntimeError(f"{v.name}: expected one MatMul reading it as B, got {uses}")
            if form == "ort":
                _ort_linear(g, v, uses[0][0], bits, block, sym)
            else:
                _dq_linear(g, v, uses[0][0], bits, block)
            n_linear += 1
        elif len(v.shape) == 3 and v.shape[0] == 1 and v.name.endswith("embed_tokens.weight.T") \
                and scheme.embedding:
            if form == "ort":
                _ort_embedding(g, v, bits, block, sym)
            else:
                _dq_embedding(g, v, bits, block)
            n_embed += 1
        elif len(v.shape) == 2 and v.name.endswith("embed_tokens.weight") and scheme.embedding \
                and form == "dq":
            _dq_untied_embedding(g, v, bits, block)
            n_embed += 1
    if n_linear == 0:
        raise RuntimeError("quantize_graph found no decoder linear layer to quantize")
    if form == "ort":
        m.opset_imports["com.microsoft"] = 1
    elif m.opset_imports.get("", 0) < 21:
        m.opset_imports[""] = 21  # blocked DequantizeLinear and INT4 need opset 21
    return {"linear": n_linear, "embedding": n_embed}


def _nbits_pair(g: ir.Graph, v: ir.Value, bits: int, block: int, sym: bool = True,
                gather: bool = False) -> list[ir.Value]:
    """Lazy initializers of MatMulNBits for the W^T initializer `v`: [B, scales], and with
    sym=False its zero points, and with gather=True also GatherBlockQuantized's zero points."""
    k, n = (v.shape[1], v.shape[2]) if len(v.shape) == 3 else (v.shape[0], v.shape[1])
    if k % block:
        raise Q.QuantError(f"{v.name}: K={k} is not a multiple of the block {block}")
    nb = k // block
    specs = [("q%d" % bits, [n, nb, block * bits // 8], ir.DataType.UINT8),
             ("scales", [n, nb], _float_dtype(v))]
    if not sym:
        specs.append(("zero_points", [n * -(-nb * bits // 8)], ir.DataType.UINT8))
        if gather:
            specs.append(("zero_points_gather", [n, nb, 1], ir.DataType.UINT8))
    src = _source_nk(v)
    pair = _Pair(lambda: _ort_parts(src(), bits, block, sym), len(specs))
    base = v.name.removesuffix(".T") if "+" not in v.name else v.name
    recipe = getattr(v.const_value, "recipe", None)
    streams = recipe is not None and recipe.transposed
    out = [_lazy(g, f"{base}.{suffix}", shape, dt, (lambda i=i: pair.get(i)),
                 (recipe, i, bits, block, sym) if streams else None)
           for i, (suffix, shape, dt) in enumerate(specs)]
    if streams:
        side: dict = {}
        for v in out:
            v.const_value.side, v.const_value.n_parts = side, len(out)
    return out


def _matmul_nbits(x: ir.Value, q: list[ir.Value], k: int, n: int, bits: int,
                  block: int) -> ir.Node:
    """MatMulNBits(x, B, scales[, zero_points]) from q = _nbits_pair(...)[:2 or 3]."""
    return ir.node("MatMulNBits", [x, *q], domain="com.microsoft",
                   attributes={"K": k, "N": n, "bits": bits, "block_size": block,
                               "accuracy_level": ACCURACY_LEVEL})


def _replace_matmul(g: ir.Graph, mm: ir.Node, new: list[ir.Node]) -> None:
    from .onnx_passes import _take_over

    g.insert_before(mm, new)
    _take_over(mm.outputs[0], new[-1].outputs[0])
    g.remove(mm, safe=True)


def _ort_linear(g: ir.Graph, v: ir.Value, mm: ir.Node, bits: int, block: int,
                sym: bool = True) -> None:
    k, n = v.shape
    q = _nbits_pair(g, v, bits, block, sym)
    _replace_matmul(g, mm, [_matmul_nbits(mm.inputs[0], q, k, n, bits, block)])
    g.initializers.pop(v.name)


def _ort_embedding(g: ir.Graph, v: ir.Value, bits: int, block: int, sym: bool = True) -> None:
    from .onnx_passes import _int64_initializer, _take_over

    _, hidden, vocab = v.shape
    q = _nbits_pair(g, v, bits, block, sym, gather=True)
    b, s = q[:2]
    axis2 = _int64_initializer(g, f"{v.name}_scales_axis", [2])
    flat = _int64_initializer(g, f"{v.name}_lookup_shape", [0, 0, hidden])
    n_lookup = n_head = 0
    for node, idx in list(v.uses()):
        if node.op_type == "MatMul" and idx == 1:  # the lm_head, x [B, T, hidden] as it comes
            # (_tie_lm_head): MatMulNBits takes it as B*T rows and writes the logits output
            _replace_matmul(g, node, [_matmul_nbits(node.inputs[0], q[:3], hidden, vocab, bits,
                                                    block)])
            n_head += 1
            continue
        axis = node.attributes.get("axis")
        tr = node.outputs[0].uses() and list(node.outputs[0].uses())[0][0]
        sq = tr and list(tr.outputs[0].uses())[0][0]
        if node.op_type != "Gather" or axis is None or axis.value != 2 or not tr \
                or tr.op_type != "Transpose" or sq.op_type != "Squeeze":
            raise RuntimeError(f"unexpected use of the tied embedding: {node.op_type}")
        us = ir.node("Unsqueeze", [s, axis2])
        gq = ir.node("GatherBlockQuantized", [b, node.inputs[1], us.outputs[0], *q[3:]],
                     domain="com.microsoft", attributes={"gather_axis": 0, "quantize_axis": 2,
                                                         "bits": bits, "block_size": block})
        rs = ir.node("Reshape", [gq.outputs[0], flat])
        g.insert_before(node, [us, gq, rs])
        _take_over(sq.outputs[0], rs.outputs[0])
        for dead in (sq, tr, node):
            g.remove(dead, safe=True)
        n_lookup += 1
    if (n_lookup, n_head) != (1, 1):
        raise RuntimeError(f"expected one lookup and one lm_head on the tied embedding, "
                           f"rewrote {n_lookup} and {n_head}")
    g.initializers.pop(v.name)


def _dq_pair(g: ir.Graph, v: ir.Value, bits: int, block: int, axis: int) -> ir.Node:
    """DequantizeLinear(q, scales) == W^T for the W^T initializer `v` ([K, N], or E^T
    [1, hidden, vocab] with axis 1)."""
    shape = list(v.shape)
    k = shape[axis]
    if k % block:
        raise Q.QuantError(f"{v.name}: K={k} is not a multiple of the block {block}")
    q, s = _dq_weights(g, v, bits, block, shape, axis, columns=True)
    return ir.node("DequantizeLinear", [q, s], attributes={"axis": axis, "block_size": block})


def _dq_weights(g: ir.Graph, v: ir.Value, bits: int, block: int, shape: list, axis: int,
                columns: bool) -> tuple[ir.Value, ir.Value]:
    """Codes and scales of v's weight as RowQuant initializers that stream (quant_stream):
    quantize_rows of each source row block, stored transposed ([K, N]: columns) or as is."""
    from .quant_stream import row_quant, source_recipe

    recipe = source_recipe(v, transposed=columns)
    sshape = list(shape)
    sshape[axis] = shape[axis] // block
    qtype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
    q = row_quant(g, f"{v.name}.q{bits}", recipe, lambda w: Q.quantize_rows(w, bits, block)[0],
                  columns, qtype, shape)
    s = row_quant(g, f"{v.name}.scales", recipe, lambda w: Q.quantize_rows(w, bits, block)[1],
                  columns, _float_dtype(v), sshape)
    return q, s


def _dq_linear(g: ir.Graph, v: ir.Value, mm: ir.Node, bits: int, block: int) -> None:
    dq = _dq_pair(g, v, bits, block, axis=0)
    g.insert_before(mm, dq)
    mm.replace_input_with(1, dq.outputs[0])
    g.initializers.pop(v.name)


def _dq_untied_embedding(g: ir.Graph, v: ir.Value, bits: int, block: int) -> None:
    """The TensorRT graphs keep the embedding as torch.onnx writes it, E [vocab, hidden], read by
    the lookup Gather and by the lm_head's Transpose -> MatMul (one copy in the engine:
    g3export.export.trt.graph). One DequantizeLinear along axis 1 (blocks along hidden, the
    lm_head's K) feeds both; codes and scales are quantize_rows(E) as they are, streamed row
    block by row block."""
    vocab, hidden = v.shape
    if hidden % block:
        raise Q.QuantError(f"{v.name}: hidden={hidden} is not a multiple of the block {block}")
    q, s = _dq_weights(g, v, bits, block, [vocab, hidden], 1, columns=False)
    dq = ir.node("DequantizeLinear", [q, s], attributes={"axis": 1, "block_size": block})
    g.insert_before(next(iter(g)), dq)
    for node, idx in list(v.uses()):
        node.replace_input_with(idx, dq.outputs[0])
    g.initializers.pop(v.name)


def _dq_embedding(g: ir.Graph, v: ir.Value, bits: int, block: int) -> None:
    dq = _dq_pair(g, v, bits, block, axis=1)
    g.insert_before(next(iter(g)), dq)
    for node, idx in list(v.uses()):
        node.replace_input_with(idx, dq.outputs[0])
    g.initializers.pop(v.name)
