"""The lm_head of ONNX Runtime graphs: one row or many (DESIGN §3.6; issue 13).

`_tie_lm_head` (onnx_passes) stores the tied embedding once as E^T [1, hidden, vocab], because
for ONE row MLAS's unpacked kernel streams a 3-D weight fastest. For more rows it is the slowest
layout there is: MLAS packs the unpacked weight again on every call. Measured side by side
(`python benchmarks/lm_head.py --rows 1 2 8`, the 270M's 671 MB fp32 lm_head, 2 threads, quiet
machine, 2026-12-02): 3-D 19.5 / 76.9 / 86.8 ms at 1 / 2 / 8 rows, MLAS's pre-packed 2-D weight
21.6 / 23.6 / 28.7 ms. A batched decode step (the scheduler: one row per sequence) is rows > 1.

`split_lm_head_by_rows` keeps both kernels and picks one per call:

    If(rows == 1, then: MatMul(x, E^T [1, hidden, vocab]),             # unpacked, one row
                  else: Reshape(MatMul(Reshape(x, [rows, hidden]),     # pre-packed by ORT
                                       E^T viewed as [hidden, vocab]), [B, T, vocab]))

with rows = B*T for x [B, T, hidden] (T is 1 but in an all-logits build), counted from the graph's
inputs (start_pos [B], or input_ids [B, seq] in an all-logits build).

The 2-D initializer is an alias of E^T's bytes (the writer points both at one range of the .data
file, g3export.export.stream): the build holds the lm_head once. In memory, ONNX Runtime keeps
its pre-packed copy of the 2-D view, so a session that can see rows > 1 holds the lm_head twice
(+671 MB for the 270M in fp32). A batch-1 session does not pay it: OrtSession fixes the graph's
`batch` dimension to 1 (a free-dimension override), ORT's constant folding then resolves the If
to its first branch and drops the 2-D view before anything is pre-packed (tests/export/
test_lm_head.py checks the optimized graph).

Only a float lm_head is split: a quantized one (MatMulNBits, g3export.export.onnx_quant) is one
kernel for any row count, and the TensorRT graphs keep torch.onnx's own lm_head.
"""

from __future__ import annotations

import onnx_ir as ir

from .onnx_passes import _int64_initializer, _take_over
from .stream import StreamTensor, stream_tensor

EMBED_T = "model.language_model.embed_tokens.weight.T"


def split_lm_head_by_rows(m: ir.Model) -> bool:
    """Rewrite the float lm_head MatMul(x, E^T) into the If above; False if there is none (an
    untied or quantized lm_head)."""
    g = m.graph
    et = g.initializers.get(EMBED_T)
    st = stream_tensor(et) if et is not None else None
    if st is None:
        return False
    heads = [n for n, i in et.uses() if n.op_type == "MatMul" and i == 1]
    if len(heads) != 1:
        raise RuntimeError(f"expected one lm_head MatMul on {EMBED_T}, found {len(heads)}")
    (mm,) = heads
    _, hidden, vocab = st.recipe.shape
    w2 = ir.Value(name=EMBED_T + ".2d", shape=ir.Shape([hidden, vocab]), type=et.type,
                  const_value=StreamTensor(st.recipe.reshape((hidden, vocab)), EMBED_T + ".2d",
                                           alias_of=EMBED_T))
    g.register_initializer(w2)
    x = mm.inputs[0]  # [B, T, hidden]

    dims = ir.node("Shape", [x], attributes={"start": 0, "end": -1})  # [B, T]
    one_row = ir.node("MatMul", [x, et])
    then_g = ir.Graph([], one_row.outputs, nodes=[one_row], name="lm_head_one_row")
    flat = ir.node("Reshape", [x, _int64_initializer(g, "lm_head_rows_hidden", [-1, hidden])])
    packed = ir.node("MatMul", [flat.outputs[0], w2])
    shape = ir.node("Concat", [dims.outputs[0], _int64_initializer(g, "lm_head_vocab", [vocab])],
                    attributes={"axis": 0})
    back = ir.node("Reshape", [packed.outputs[0], shape.outputs[0]])
    else_g = ir.Graph([], back.outputs, nodes=[flat, packed, shape, back], name="lm_head_rows")

    # a subgraph names its values from its own counter: name them, so they cannot repeat an
    # outer name (ONNX graphs are single-assignment across scopes)
    for n, out in ((one_row, "one_row"), (flat, "flat"), (packed, "packed"), (shape, "shape"),
                   (back, "rows")):
        n.outputs[0].name = f"lm_head_{out}"
    # the row count from the graph's inputs, not from Shape(x): ORT's shape inference does not
    # carry [batch, seq] through the embedding lookup's Reshape to a computed shape
    # (onnx_passes._lookup_by_gather_elements), so Shape(x) would not fold. x is [B, 1, hidden]
    # (the last position: rows = B = Shape(start_pos), which a batch-1 session's override
    # makes a constant; ORT does not fold Shape(input_ids, end=1) while seq is symbolic) or
    # [B, seq, hidden] in an all-logits build (rows = B*seq, never a constant)
    last_only = x.shape is not None and len(x.shape) == 3 and x.shape[1] == 1
    (src,) = [v for v in g.inputs if v.name == ("start_pos" if last_only else "input_ids")]
    ids_dims = ir.node("Shape", [src])
    rows = ir.node("ReduceProd", [ids_dims.outputs[0]], attributes={"keepdims": 1})
    is_one = ir.node("Equal", [rows.outputs[0], _int64_initializer(g, "lm_head_one", [1])])
    pick = ir.node("If", [is_one.outputs[0]],
                   attributes={"then_branch": then_g, "else_branch": else_g})
    g.insert_before(mm, [dims, ids_dims, rows, is_one, pick])
    _take_over(mm.outputs[0], pick.outputs[0])
    g.remove(mm, safe=True)
    return True
