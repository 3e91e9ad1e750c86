"""Graph passes over the exported text/vision graphs (onnx_ir), in the order export_text runs
them; why each exists, and what it measured, is in g3export.export.onnx_export's docstring.

Each pass is a fixed pattern of our own exporter's output, checked by tests
(test_graph_passes_applied) and by the parity tests. Weights are never touched here: the passes
that change a weight's layout (`_tie_lm_head`, `_fold_weight_transposes`,
`_fuse_sibling_matmuls`) compose the initializers' recipes (g3export.export.stream), applied
when the weights stream into the .data file.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnx_ir.tensor_adapters import TorchTensor

from ..dtypes import DTYPES
from .onnx_attention import DECODE_BRANCH
from .stream import Recipe, StreamTensor, stream_tensor


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """`new` replaces `old` everywhere (graph outputs too) and takes its name, shape and type, so
    the graph's I/O names stay those of the contract; `old` is renamed out of the way."""
    new.shape, new.type = old.shape, old.type
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = f"{name}_replaced"
    new.name = name


def _add_initializer(g: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    """Register `tensor` (concrete or lazy) as an initializer named like it; return its Value."""
    v = ir.Value(name=tensor.name, const_value=tensor, shape=ir.Shape(tensor.shape),
                 type=ir.TensorType(tensor.dtype))
    g.register_initializer(v)
    return v


def _int64_initializer(g: ir.Graph, name: str, values: list[int]) -> ir.Value:
    return _add_initializer(g, ir.tensor(np.asarray(values, dtype=np.int64), name=name))


def _tie_lm_head(m: ir.Model, embed_name: str) -> None:
    """Store the tied embedding once, as E^T of shape [1, hidden, vocab], for both of its uses:

        Gather(E, ids)          -> Squeeze(Transpose(Gather(E^T, ids, axis=2), [0, 2, 3, 1]), 0)
        MatMul(x, Transpose(E)) -> MatMul(x, E^T)

    Why this layout (measured on ONNX Runtime 1.32's CPU, 2 threads, 270M:
    benchmarks/lm_head.py): a 2-D constant MatMul/Gemm weight is pre-packed by MLAS at session
    start, and for one row (decode) the packed GEMM streams the 671 MB lm_head slower than
    MLAS's unpacked single-row kernel, which runs when the weight is 3-D (ORT pre-packs only 2-D
    weights): 24.2 vs 28.6 ms median. The lm_head is the largest read of a 270M decode step. The
    other Linear weights stay 2-D: for their sizes (0.6-5 MB) the packed path measured faster,
    at one row and at 512. x [B, T, hidden] is left as it comes: for one row (B*T = 1) the
    MatMul is the unpacked kernel, and the passes that follow own what more rows need (the float
    lm_head's If on the row count, g3export.export.onnx_lm_head, whose batched branch flattens
    the rows onto a pre-packed 2-D view so a batch reads the weight once; a quantized lm_head's
    MatMulNBits, which takes [B, T, hidden] as B*T rows of one GEMM). No Reshape of the logits,
    which would copy them (1 MB per 270M decode step) into the bound output buffer.
    The lookup gathers `hidden` strided elements per token (6.9 ms for a 512-token prefill of
    the 270M; GenAI's graph, which keeps a second, transposed copy of the table in memory, reads
    rows in 0.2 ms), and its Transpose moves one axis (hidden, to the end), which ONNX Runtime's
    CPU Transpose does in a fast path: 1.06 ms where the perm [2, 3, 1, 0] it replaced took
    3.07 ms, same result (`benchmarks/prefill_profile.py --runs 3 --threads 2` on the 270M fp32,
    2-vCPU Xeon, 2026-12-03; BENCHMARKS.md 1.8). This is the form the later passes match (the
    quantizer's GatherBlockQuantized); a float lookup ends as a GatherElements of the same
    elements (`_lookup_by_gather_elements`, after quantization). torch.onnx's own form,
    MatMul(x, Transpose(E)), would make ORT's constant folding store a second, transposed copy
    of the embedding (1 GiB at 12B bf16).
    """
    g = m.graph
    e = g.initializers.get(embed_name)
    st = stream_tensor(e) if e is not None else None
    if st is None or len(st.recipe.shape) != 2:
        raise RuntimeError(f"the embedding {embed_name} is not a weight initializer of the graph")
    vocab, hidden = st.recipe.shape
    name = e.name + ".T"
    et = _add_initializer(g, StreamTensor(st.recipe.transpose().reshape((1, hidden, vocab)), name))
    const = functools.partial(_int64_initializer, g)

    n_lookup = n_head = 0
    for node, idx in list(e.uses()):
        axis = node.attributes.get("axis")
        if node.op_type == "Gather" and idx == 0 and (axis is None or axis.value == 0):
            gather = ir.node("Gather", [et, node.inputs[1]], attributes={"axis": 2})  # [1,H,B,T]
            tr = ir.node("Transpose", [gather.outputs[0]], attributes={"perm": [0, 2, 3, 1]})
            sq = ir.node("Squeeze", [tr.outputs[0], const(f"{node.name}_axis0", [0])])  # [B,T,H]
            g.insert_before(node, [gather, tr, sq])
            _take_over(node.outputs[0], sq.outputs[0])
            g.remove(node, safe=True)
            n_lookup += 1
            continue
        perm = node.attributes.get("perm")
        if node.op_type != "Transpose" or perm is None or tuple(perm.value) != (1, 0):
            raise RuntimeError(f"unexpected use of the embedding: {node.op_type}")
        for mm, i in list(node.outputs[0].uses()):
            if mm.op_type != "MatMul" or i != 1:
                raise RuntimeError(f"unexpected use of the transposed embedding: {mm.op_type}")
            mm.replace_input_with(1, et)  # [B, T, hidden] x [1, hidden, vocab]
            n_head += 1
        g.remove(node, safe=True)
    if (n_lookup, n_head) != (1, 1):
        raise RuntimeError(f"expected one embedding lookup and one lm_head MatMul on the "
                           f"embedding, rewrote {n_lookup} and {n_head}")
    g.initializers.pop(e.name)


def _lookup_by_gather_elements(m: ir.Model) -> int:
    """The float embedding lookup that `_tie_lm_head` writes, Squeeze(Transpose(Gather(E^T, ids,
    axis=2), [0, 2, 3, 1]), 0), becomes

        Reshape(Transpose(GatherElements(E^T, Expand(Reshape(ids, [1, 1, -1]), [1, hidden, 1]),
                                         axis=2), [0, 2, 1]), Concat(Shape(ids), [hidden]))

    the same values: E^T[0, h, ids[b, t]] for every (b, t, h), read by GatherElements over the
    [1, hidden, B*T] indices (the tokens of all rows along the last axis, because
    GatherElements' index dims may not exceed the data's: E^T's batch axis is 1).
    Why: both read `hidden` strided elements per token from the one stored table (a cache miss
    each), and ONNX Runtime 1.32's CPU GatherElements does it in less than half the time of its
    Gather on the inner axis: `python benchmarks/embedding_lookup.py` (512 tokens of the 270M's
    table, caches evicted before every run, 2 threads, 2-vCPU AVX-512 Xeon, 2026-12-04): median
    2.18 ms against 5.45 ms (BENCHMARKS.md section 1.9); in a 512-token prefill's profile the
    lookup went from 6.5 ms (Gather + Transpose) to 2.5 ms.
    Run after quantization, which replaces a quantized lookup by GatherBlockQuantized (then
    there is nothing to rewrite). Only in graphs for ONNX Runtime. Returns the lookups
    rewritten."""
    from onnx_ir.convenience import get_const_tensor

    g = m.graph
    done = 0
    for gather in [n for n in g if n.op_type == "Gather"]:
        e, ids = gather.inputs
        axis = gather.attributes.get("axis")
        tr = _single_use(gather.outputs[0], "Transpose")
        sq = _single_use(tr.outputs[0], "Squeeze") if tr is not None else None
        if axis is None or axis.value != 2 or e is None or e.const_value is None \
                or e.shape is None or len(e.shape) != 3 or e.shape[0] != 1 or sq is None \
                or list(tr.attributes["perm"].value) != [0, 2, 3, 1]:
            continue
        axes = get_const_tensor(sq.inputs[1]) if len(sq.inputs) > 1 else None
        if axes is None or axes.numpy().tolist() != [0]:
            continue
        hidden = e.shape[1]
        const = functools.partial(_int64_initializer, g)
        flat = ir.node("Reshape", [ids, const(f"{gather.name}_flat", [1, 1, -1])])
        idx = ir.node("Expand", [flat.outputs[0], const(f"{gather.name}_rows", [1, hidden, 1])])
        ge = ir.node("GatherElements", [e, idx.outputs[0]], attributes={"axis": 2})
        tr2 = ir.node("Transpose", [ge.outputs[0]], attributes={"perm": [0, 2, 1]})
        shp = ir.node("Shape", [ids])
        full = ir.node("Concat", [shp.outputs[0], const(f"{gather.name}_hidden", [hidden])],
                       attributes={"axis": 0})
        out = ir.node("Reshape", [tr2.outputs[0], full.outputs[0]])  # [B, T, hidden]
        g.insert_before(gather, [flat, idx, ge, tr2, shp, full, out])
        _take_over(sq.outputs[0], out.outputs[0])
        g.remove([sq, tr, gather], safe=True)
        done += 1
    return done


def _fold_weight_transposes(m: ir.Model) -> None:
    """Transpose(W) of a 2-D weight initializer used only there -> initializer W^T (a transposed
    recipe: applied as the weight streams)."""
    g = m.graph
    for v in list(g.initializers.values()):
        uses = list(v.uses())
        if len(uses) != 1 or uses[0][0].op_type != "Transpose" or v.const_value is None:
            continue
        tr = uses[0][0]
        perm = tr.attributes.get("perm")
        if len(v.shape) != 2 or perm is None or tuple(perm.value) != (1, 0):
            continue
        st = stream_tensor(v)
        if st is None or st.recipe.transposed:
            continue
        out = tr.outputs[0]
        nv = _add_initializer(g, StreamTensor(st.recipe.transpose(), v.name + ".T"))
        ir.convenience.replace_all_uses_with(out, nv)
        g.remove(tr, safe=True)
        g.initializers.pop(v.name)


def _fuse_sibling_matmuls(m: ir.Model, min_group: int = 2) -> int:
    """MatMuls of one input by different 2-D weights (q/k/v projections; gate/up) -> one MatMul by
    the weights concatenated along N, then a Split. Fewer, larger GEMMs: on a CPU decode step every
    MatMul is a thread-pool dispatch over a few MB of weights. The fused initializer is named by its
    parts joined with "+" (in order), so readers of the build (verify) can split it back.
    Only groups of at least `min_group` MatMuls are fused: float graphs pass 3 (q/k/v, not
    gate/up), because ORT's Split copies its outputs and the [T, 2 x intermediate] gate/up product
    is the largest activation of a prefill: unfused, the 270M fp32 prefill took x0.993 and x0.976
    the CPU time with decode unchanged (x0.970, x1.008; benchmarks/ort_ab.py, BENCHMARKS.md
    section 1.5). Quantized graphs fuse gate/up too: one MatMulNBits of 2N columns dispatches
    faster than two of N in a decode step (ORT profile, section 1.5). Returns the number of
    MatMuls removed."""
    g = m.graph
    removed = 0
    for x in [v for n in g for v in n.outputs]:
        group = []
        for node, idx in x.uses():
            w = node.inputs[1] if node.op_type == "MatMul" and idx == 0 else None
            if w is not None and w.const_value is not None and w.shape is not None \
                    and len(w.shape) == 2 and len(list(w.uses())) == 1 and w.name in g.initializers:
                group.append((node, w))
        if len(group) < min_group or len({w.const_value.dtype for _, w in group}) != 1 \
                or len({w.shape[0] for _, w in group}) != 1:
            continue
        order = {id(n): i for i, n in enumerate(g)}
        group.sort(key=lambda nw: order[id(nw[0])])
        weights = [w for _, w in group]
        widths = [w.shape[1] for w in weights]
        name = "+".join(w.name for w in weights)
        fw = _add_initializer(g, _concat_columns(weights, name))
        split_v = _int64_initializer(g, name + "_split", widths)
        mm = ir.node("MatMul", [x, fw])
        sp = ir.node("Split", [mm.outputs[0], split_v], attributes={"axis": -1},
                     num_outputs=len(group))
        g.insert_before(group[0][0], [mm, sp])
        for (node, w), out in zip(group, sp.outputs):
            _take_over(node.outputs[0], out)
            g.remove(node, safe=True)
            g.initializers.pop(w.name)
        removed += len(group) - 1
    return removed


def _concat_columns(weights: list[ir.Value], name: str) -> ir.TensorProtocol:
    """The weights side by side along N: a recipe when every part is a transposed recipe (the
    usual case: _fold_weight_transposes ran first), else computed lazily from their values."""
    sts = [stream_tensor(w) for w in weights]
    if all(st is not None and st.recipe.transposed for st in sts):
        return StreamTensor(Recipe.concat_columns([st.recipe for st in sts]), name)
    parts = [w.const_value for w in weights]
    return ir.LazyTensor(lambda: ir.tensor(np.concatenate([p.numpy() for p in parts], axis=1)),
                         dtype=parts[0].dtype,
                         shape=ir.Shape([weights[0].shape[0], sum(w.shape[1] for w in weights)]),
                         name=name)


def _fuse_skip_norm(m: ir.Model) -> int:
    """s = x + y; SimplifiedLayerNormalization(s, w) -> com.microsoft.SkipSimplifiedLayer
    Normalization(x, y, w), whose 4th output is s (still read by the next residual Add).
    Gemma's residual adds are each followed by the next norm: two per layer, one ORT kernel
    fewer each. Returns the number fused."""
    g = m.graph
    fused = 0
    for add in [n for n in g if n.op_type == "Add"]:
        s = add.outputs[0]
        norms = [u for u, i in s.uses() if u.op_type == "SimplifiedLayerNormalization" and i == 0]
        x, y = add.inputs
        if len(norms) != 1 or s.is_graph_output() or x.shape is None or y.shape is None \
                or len(x.shape) != 3 or list(x.shape) != list(y.shape):
            continue
        norm = norms[0]
        eps = norm.attributes.get("epsilon")
        fusedn = ir.node("SkipSimplifiedLayerNormalization", [x, y, norm.inputs[1]],
                         attributes={"epsilon": eps.value if eps is not None else 1e-5},
                         domain="com.microsoft", num_outputs=4)
        g.insert_before(norm, fusedn)  # after x, y and the gamma are computed
        _take_over(norm.outputs[0], fusedn.outputs[0])
        _take_over(s, fusedn.outputs[3])
        g.remove(norm, safe=True)
        g.remove(add, safe=True)
        fused += 1
    if fused:
        m.opset_imports["com.microsoft"] = 1
    return fused


def _single_use(v: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(v.uses())
    if len(uses) == 1 and uses[0][0].op_type == op_type and not v.is_graph_output():
        return uses[0][0]
    return None


def _other(node: ir.Node, v: ir.Value) -> ir.Value | None:
    a, b = node.inputs
    return b if a is v else a if b is v else None


def _const_scalar(v: ir.Value | None) -> float | None:
    """The value of a one-element constant: an initializer, a Constant node, or either behind
    Reshape/Cast (the exporter writes Slice bounds as Reshape(Cast(Constant))). None otherwise."""
    if v is None:
        return None
    cv = v.const_value
    p = v.producer()
    if cv is None and p is not None and p.op_type == "Constant":
        attr = p.attributes.get("value")
        cv = attr.value if attr is not None else None
    if cv is None and p is not None and p.op_type in ("Reshape", "Cast"):
        return _const_scalar(p.inputs[0])
    if cv is None or cv.size != 1:
        return None
    return float(cv.numpy().reshape(()))


def _fuse_rms_norm(m: ir.Model) -> int:
    """x * 1/sqrt(mean(x^2, -1) + eps) * s  ->  SimplifiedLayerNormalization(x, s).

    torch.export writes Gemma's RMSNorm as Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul: seven
    kernels, times 2 + 4 per layer. ORT's contrib SimplifiedLayerNormalization (onnx domain, CPU
    and CUDA) does it in one, in fp32 (stash_type 1), which is what RMSNorm.forward computes.
    Returns the number of norms fused.
    """
    g = m.graph
    fused = 0
    for rm in [n for n in g if n.op_type == "ReduceMean"]:
        pw = rm.inputs[0].producer()
        if pw is None or pw.op_type != "Pow" or _const_scalar(pw.inputs[1]) != 2.0:
            continue
        # a mean over the last axis only, keepdims (read from the shapes: the axes input is a
        # small Reshape-of-Constant chain in the exported graph)
        si, so = rm.inputs[0].shape, rm.outputs[0].shape
        if si is None or so is None or len(si) != len(so) or so[-1] != 1 or \
                isinstance(si[-1], ir.SymbolicDim) or list(si)[:-1] != list(so)[:-1]:
            continue
        x = pw.inputs[0]
        add = _single_use(rm.outputs[0], "Add")
        eps = _const_scalar(_other(add, rm.outputs[0])) if add else None
        sq = _single_use(add.outputs[0], "Sqrt") if add else None
        rc = _single_use(sq.outputs[0], "Reciprocal") if sq else None
        mul = _single_use(rc.outputs[0], "Mul") if rc else None
        if eps is None or mul is None or _other(mul, rc.outputs[0]) is not x:
            continue
        mul2 = _single_use(mul.outputs[0], "Mul")
        if mul2 is None:
            continue
        scale = _other(mul2, mul.outputs[0])
        if scale is None or scale.shape is None or len(scale.shape) != 1:
            continue
        y = mul2.outputs[0]
        n = ir.node("SimplifiedLayerNormalization", [x, scale],
                    attributes={"axis": -1, "epsilon": float(eps), "stash_type": 1})
        g.insert_before(mul2, n)
        _take_over(y, n.outputs[0])
        for dead in (mul2, mul, rc, sq, add, rm):
            g.remove(dead, safe=True)
        if not list(pw.outputs[0].uses()):
            g.remove(pw, safe=True)
        fused += 1
    return fused


def _rope_table(v: ir.Value, rows: int) -> tuple[ir.Value, ir.TensorProtocol] | None:
    """RoPE's cos (or sin) as a constant table, when `v` is what torch.export writes for
    g3export.modeling.layers.RotaryEmbedding:

        v = [Cast](Cos|Sin(Unsqueeze(Concat(a, a), 1))),  a = Unsqueeze(Cast(pos, FLOAT), -1) * inv

    with pos the int64 positions [B, T] and inv the layer type's inv_freq [D/2] (a constant, or
    in an fp16/bf16 graph a Cast to float of one).
    Returns (pos, table) with table[p] = Cos|Sin(p * inv) for p < rows, [rows, D/2], computed in
    float32 by torch as the model computes it (same multiply, same function) and cast as v is.
    None for any other form (the caller then keeps the per-step computation)."""
    p = v.producer()
    cast_to = None
    if p is not None and p.op_type == "Cast":
        cast_to = ir.DataType(p.attributes["to"].value)
        p = p.inputs[0].producer()
    if p is None or p.op_type not in ("Cos", "Sin"):
        return None
    un = p.inputs[0].producer()
    cat = un.inputs[0].producer() if un is not None and un.op_type == "Unsqueeze" else None
    if cat is None or cat.op_type != "Concat" or len(cat.inputs) != 2 \
            or cat.inputs[0] is not cat.inputs[1] or _const_scalar(un.inputs[1]) != 1 \
            or cat.attributes["axis"].value not in (-1, 2):
        return None
    mul = cat.inputs[0].producer()
    if mul is None or mul.op_type != "Mul":
        return None
    def float_const(x: ir.Value):  # a constant, or a Cast to float of one (an fp16/bf16
        # model's inv_freq buffer, which the model casts up to multiply): its float32 values
        c = x.producer()
        if c is not None and c.op_type == "Cast" and c.attributes["to"].value == ir.DataType.FLOAT:
            x = c.inputs[0]
        return x.const_value.numpy().astype(np.float32) if x.const_value is not None else None

    inv_freq = ang = None
    for x in mul.inputs:
        if (values := float_const(x)) is not None:
            inv_freq, ang = values, _other(mul, x)
    un2 = ang.producer() if ang is not None else None
    cast = un2.inputs[0].producer() if un2 is not None and un2.op_type == "Unsqueeze" else None
    if cast is None or cast.op_type != "Cast" or _const_scalar(un2.inputs[1]) not in (-1, 2) \
            or cast.attributes["to"].value != ir.DataType.FLOAT or inv_freq.ndim != 1:
        return None
    pos = cast.inputs[0]
    if pos.dtype != ir.DataType.INT64 or pos.shape is None or len(pos.shape) != 2:
        return None
    inv_freq = torch.from_numpy(inv_freq)
    angles = torch.arange(rows, dtype=torch.float32)[:, None] * inv_freq
    table = (torch.cos if p.op_type == "Cos" else torch.sin)(angles)
    if cast_to is not None:
        table = table.to(next(d.torch for d in DTYPES.values() if d.onnx_type == cast_to))
    return pos, TorchTensor(table.contiguous(), name=f"rope_{v.name}_table")


def _fuse_rotary(m: ir.Model, table_rows: int | None = None) -> int:
    """x * cos + rotate_half(x) * sin  ->  com.microsoft.RotaryEmbedding(x, ids, cos_h, sin_h).

    torch.export writes RoPE (Attention.forward) as Slice, Slice, Neg, Concat, Mul, Mul, Add: per
    layer twice (q and k), 12 of a layer's ~60 ORT kernels, each costing a dispatch on a CPU
    decode step. ONNX Runtime's contrib RotaryEmbedding (CPU and CUDA, interleaved=0 is the
    rotate-half form) does it in one. Its input is x [B, heads, T, D]; it computes exactly the
    model's expression, with cos_cache/sin_cache [rows, D/2] (the first half: the two halves of
    the model's cos/sin are equal) indexed by position_ids [B, T] (the op's 2-D form: every batch
    row has its own positions; its [1] form, one offset for all rows, cannot express them).

    With `table_rows` (the build's max_context), cos/sin become constant tables of that many
    positions (_rope_table) and position_ids are the model's positions themselves: no per-step
    work at all, where computing the angles, Cos, Sin and their slices took 28 of a 270M decode
    step's 630 kernels. The tables hold rows x D/2 values four times (cos and sin per layer
    type), in the graph's dtype: 17 MB in fp32 at the default 8192 positions (head_dim 256), and
    at 131072 positions 268 MB for 4B/12B in fp32, 134 MB in bf16 (a decode step reads one row).
    ONNX Runtime's CPU kernel rejects a position outside [0, rows) with an error (the runtimes
    never pass one: they check positions against max_context first).
    Without it (or for another form of cos/sin), the model's per-step [B, 1, T, D] cos/sin are
    flattened to [B*T, D/2] by one Slice+Reshape each, and position_ids = arange(B*T) picks row
    b*T + t for token t of row b.

    Shared by all layers of a type: one table (or Slice+Reshape) per cos/sin and one
    position_ids. Only emitted for the ONNX Runtime translation. Returns the number of rotations
    fused.
    """
    g = m.graph
    halves: dict[int, ir.Value] = {}
    ids_memo: list[ir.Value] = []
    tables: dict[int, tuple[ir.Value, ir.Value] | None] = {}
    const = functools.partial(_int64_initializer, g)

    def table(v: ir.Value) -> tuple[ir.Value, ir.Value] | None:
        """(positions, table initializer) for a cos/sin value, once per value."""
        if id(v) not in tables:
            found = _rope_table(v, table_rows) if table_rows else None
            tables[id(v)] = (found[0], _add_initializer(g, found[1])) if found else None
        return tables[id(v)]

    def caches(cos: ir.Value, sin: ir.Value, half: int) -> list[ir.Value]:
        """RotaryEmbedding's position_ids, cos_cache, sin_cache."""
        tc, ts = table(cos), table(sin)
        if tc is not None and ts is not None and tc[0] is ts[0]:
            return [tc[0], tc[1], ts[1]]
        return [position_ids(cos), first_half(cos, half), first_half(sin, half)]

    def first_half(v: ir.Value, half: int) -> ir.Value:
        if id(v) not in halves:  # one Slice + Reshape per cos/sin table, shared by the layers
            sl = ir.node("Slice", [v, const(f"{v.name}_h0", [0]), const(f"{v.name}_h1", [half]),
                                   const(f"{v.name}_hax", [-1])])
            flat = ir.node("Reshape", [sl.outputs[0], const(f"{v.name}_hflat", [-1, half])])
            g.insert_after(v.producer(), [sl, flat])  # [B, 1, T, D/2] -> [B*T, D/2]
            halves[id(v)] = flat.outputs[0]
        return halves[id(v)]

    def position_ids(v: ir.Value) -> ir.Value:
        """[B, T] = arange(B*T).reshape(B, T), from the shape of a [B, 1, T, D] cos table."""
        if not ids_memo:
            bt = [ir.node("Shape", [v], attributes={"start": 0, "end": 1}),
                  ir.node("Shape", [v], attributes={"start": 2, "end": 3})]
            shape = ir.node("Concat", [n.outputs[0] for n in bt], attributes={"axis": 0})
            n = ir.node("ReduceProd", [shape.outputs[0]], attributes={"keepdims": 0})
            scalar = [_add_initializer(g, ir.tensor(np.asarray(x, dtype=np.int64),
                                                    name=f"rotary_range_{x}")) for x in (0, 1)]
            rng = ir.node("Range", [scalar[0], n.outputs[0], scalar[1]])
            ids = ir.node("Reshape", [rng.outputs[0], shape.outputs[0]])
            g.insert_after(v.producer(), [*bt, shape, n, rng, ids])
            ids_memo.append(ids.outputs[0])
        return ids_memo[0]

    fused = 0
    for neg in [n for n in g if n.op_type == "Neg"]:
        hi = neg.inputs[0].producer()
        cat = _single_use(neg.outputs[0], "Concat")
        if hi is None or hi.op_type != "Slice" or cat is None or len(cat.inputs) != 2 \
                or cat.inputs[0] is not neg.outputs[0]:
            continue
        x = hi.inputs[0]
        lo = cat.inputs[1].producer()
        if lo is None or lo.op_type != "Slice" or lo.inputs[0] is not x or x.shape is None \
                or len(x.shape) != 4 or not isinstance(x.shape[-1], int):
            continue
        d = x.shape[-1]
        h = d // 2
        bounds = [_const_scalar(v) for v in (*hi.inputs[1:4], *lo.inputs[1:4])]
        if bounds[0] != h or bounds[2] not in (-1, 3) or bounds[3] != 0 or bounds[4] != h \
                or bounds[5] not in (-1, 3) or (bounds[1] is not None and bounds[1] < d):
            continue
        mul_s = _single_use(cat.outputs[0], "Mul")
        sin = _other(mul_s, cat.outputs[0]) if mul_s else None
        add = _single_use(mul_s.outputs[0], "Add") if mul_s else None
        mul_c = _other(add, mul_s.outputs[0]).producer() if add else None
        if sin is None or mul_c is None or mul_c.op_type != "Mul" or \
                _single_use(mul_c.outputs[0], "Add") is not add:
            continue
        cos = _other(mul_c, x)
        if cos is None or cos.producer() is None or sin.producer() is None:
            continue
        rot = ir.node("RotaryEmbedding", [x, *caches(cos, sin, h)],
                      attributes={"interleaved": 0}, domain="com.microsoft")
        y = add.outputs[0]
        g.insert_before(add, rot)
        _take_over(y, rot.outputs[0])
        for dead in (add, mul_c, mul_s, cat, neg, lo, hi):
            g.remove(dead, safe=True)
        fused += 1
    if fused:
        m.opset_imports["com.microsoft"] = 1
    if any(tables.values()):  # the per-step cos/sin computation is now unused
        RemoveUnusedNodesPass()(m)
    return fused


def _late_q_transpose(m: ir.Model) -> int:
    """q stays [B, T, H, D] through its norm and RoPE; only the attention branches that want the
    op's [B, H, T, D] transpose it. torch's Attention.forward transposes q to [B, H, T, D] first
    (the g3::attention contract), and ONNX Runtime's GroupQueryAttention, which a first chunk
    runs, wants [B, T, H*D]: the translation transposed it back (onnx_attention `bsd`), two
    copies of q per layer per prefill (8.2 of a 512-token 270M prefill's 514 ms, BENCHMARKS.md
    1.8). After this pass:

        SimplifiedLayerNormalization(view)        [B, T, H, D]   (normalizes the last axis)
        RotaryEmbedding(Reshape(., [0, 0, H*D]))  [B, T, H*D]    (its 3-D form, same positions)

    and each use of the old [B, H, T, D] value, in the If branches of the translation, becomes:
    * Reshape(Transpose(q), [0, -1, H*D]) (GQA's first chunk)  -> the 3-D value itself;
    * a Reshape of q in the decode branch (DECODE_BRANCH: T = 1, where [B, 1, H*D] has the bytes
      of [B, H, 1, D])                                        -> the same Reshape of it;
    * any other Reshape (the chunk paths with a cache)         -> of Transpose(Reshape(it,
      [0, 0, H, D]), [0, 2, 1, 3]) made in that branch.
    k is left alone (its cache writes read [B, KV, T, D]): a value with any other use is skipped,
    as are non-fp32 graphs (their uses are Casts). Returns the number of layers rewritten."""
    from onnx_ir.convenience import get_const_tensor

    g = m.graph
    n_done = 0
    for rot in [n for n in g if n.op_type == "RotaryEmbedding"]:
        sln = rot.inputs[0].producer()
        tr = sln.inputs[0].producer() if sln is not None and \
            sln.op_type == "SimplifiedLayerNormalization" else None
        perm = tr.attributes.get("perm") if tr is not None and tr.op_type == "Transpose" else None
        if perm is None or list(perm.value) != [0, 2, 1, 3] or len(list(sln.outputs[0].uses())) != 1 \
                or len(list(tr.outputs[0].uses())) != 1:
            continue
        view = tr.inputs[0]
        if view.shape is None or len(view.shape) != 4 or \
                not all(isinstance(x, int) for x in view.shape[2:]):
            continue
        h, d = view.shape[2], view.shape[3]
        q = rot.outputs[0]

        def target(node: ir.Node) -> list[int] | None:
            t = get_const_tensor(node.inputs[1]) if node.op_type == "Reshape" else None
            return t.numpy().tolist() if t is not None else None

        plan = []  # (kind, node)
        for user, _ in q.uses():
            nxt = list(user.outputs[0].uses()) if user.op_type == "Transpose" else []
            if user.op_type == "Transpose" and list(user.attributes["perm"].value) == [0, 2, 1, 3] \
                    and len(nxt) == 1 and target(nxt[0][0]) == [0, -1, h * d]:
                plan.append(("gqa", user))
            elif user.op_type == "Reshape" and target(user) is not None:
                plan.append(("step" if user.graph is not None and user.graph.name == DECODE_BRANCH
                             else "chunk", user))
            else:
                plan = []
                break
        if not plan:
            continue  # not q: k also feeds its cache writes and the score products
        flat_shape = _int64_initializer(g, f"{q.name}_q3_shape", [0, 0, h * d])
        heads_shape = _int64_initializer(g, f"{q.name}_q4_shape", [0, 0, h, d])
        sln.replace_input_with(0, view)
        sln.outputs[0].shape = view.shape
        flat = ir.node("Reshape", [sln.outputs[0], flat_shape])
        rot3 = ir.node("RotaryEmbedding", [flat.outputs[0], *rot.inputs[1:]],
                       attributes={"interleaved": 0}, domain="com.microsoft")
        g.insert_before(rot, [flat, rot3])
        flat.outputs[0].name = f"{q.name}_flat"
        q3 = rot3.outputs[0]
        q3.name = f"{q.name}_q3"  # named: a subgraph names its own values from its own counter,
        # which can repeat an outer name (ONNX graphs are single-assignment across scopes)
        for i, (kind, user) in enumerate(plan):
            sub = user.graph
            if kind == "gqa":
                (reshape, _), = list(user.outputs[0].uses())
                reshape.outputs[0].replace_all_uses_with(q3)
                sub.remove([reshape, user], safe=True)
            elif kind == "step":
                user.replace_input_with(0, q3)
            else:
                r = ir.node("Reshape", [q3, heads_shape])
                t = ir.node("Transpose", [r.outputs[0]], attributes={"perm": [0, 2, 1, 3]})
                sub.insert_before(user, [r, t])
                r.outputs[0].name, t.outputs[0].name = f"{q.name}_q4_{i}", f"{q.name}_qt_{i}"
                user.replace_input_with(0, t.outputs[0])
        g.remove([rot, tr], safe=True)
        n_done += 1
    return n_done


def _rotary_into_gqa(m: ir.Model) -> int:
    """A first chunk's GroupQueryAttention (the branch FIRST_CHUNK_GQA_BRANCH of the attention
    translation) rotates q and k itself: do_rotary=1 with the layer's constant cos/sin tables as
    cos_cache/sin_cache, reading q and k before `_fuse_rotary`'s RotaryEmbedding (through the
    same Reshape/Transpose that lay them out for it). Then each of those RotaryEmbeddings runs
    only in the If branches that still read its output (a copy at the top of each branch graph
    that uses it), not in the main graph, where it ran whatever branch was taken. A first chunk
    thus runs no RotaryEmbedding (GenAI's graph leaves RoPE to its GQA too), and a decode step
    or a later chunk runs the same two per layer as before, inside its branch.
    GQA's rotary positions in a first prompt (seqlens_k = T - 1 = total - 1) are 0..T-1, the
    model's own for a chunk where every row starts at 0. Only with the constant tables
    (`_fuse_rotary(m, max_context)`): the per-step form indexes its cos/sin by arange(B*T).
    Not done for the full layers' decode-step GQA (DECODE_BRANCH), whose positions would be right
    too (seqlens_k = start_b): in benchmarks/ort_ab.py (270M int4, 2-vCPU Xeon, 2026-12-03) it
    measured x1.010 the decode step's CPU time against x1.000 without it, inside the noise floor
    but no gain to show for it. Returns the number of GQA nodes changed."""
    from .onnx_attention import FIRST_CHUNK_GQA_BRANCH

    g = m.graph

    def through_layout(v: ir.Value, sub: ir.Graph):
        """(rotary node, [layout nodes from its output to v]) if v is a RotaryEmbedding output of
        the main graph reached by Reshapes/Transposes made in `sub`, else None."""
        chain = []
        while True:
            p = v.producer()
            if p is None:
                return None
            if p.op_type == "RotaryEmbedding" and p.graph is g:
                return p, chain[::-1]
            if p.op_type not in ("Reshape", "Transpose") or p.graph is not sub:
                return None
            chain.append(p)
            v = p.inputs[0]

    moved: dict[int, ir.Node] = {}
    for gqa in [n for n in g.all_nodes() if n.op_type == "GroupQueryAttention"]:
        sub = gqa.graph
        if sub is g or sub.name != FIRST_CHUNK_GQA_BRANCH or "do_rotary" in gqa.attributes:
            continue
        found = [through_layout(gqa.inputs[i], sub) for i in (0, 1)]
        if None in found:
            continue
        (rq, q_chain), (rk, k_chain) = found
        if rq.inputs[2] is not rk.inputs[2] or rq.inputs[3] is not rk.inputs[3] \
                or rq.inputs[2].const_value is None:
            continue  # not one layer's tables
        for i, (rot, chain) in enumerate(((rq, q_chain), (rk, k_chain))):
            x = rot.inputs[0]
            for j, node in enumerate(chain):  # the same layout, of the unrotated value
                copy = ir.node(node.op_type, [x, *node.inputs[1:]],
                               attributes=dict(node.attributes))
                sub.insert_before(gqa, copy)
                copy.outputs[0].name = f"{gqa.name}_{rot.outputs[0].name}_unrot_{j}"
                x = copy.outputs[0]
            gqa.replace_input_with(i, x)
            moved[id(rot)] = rot
        for node in [*q_chain[::-1], *k_chain[::-1]]:  # from the GQA back: a user first
            if not any(True for _ in node.outputs[0].uses()):
                sub.remove(node, safe=True)
        if len(gqa.inputs) < 9:
            gqa.resize_inputs(9)
        gqa.replace_input_with(7, rq.inputs[2])
        gqa.replace_input_with(8, rq.inputs[3])
        gqa.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 1)
        gqa.attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", 0)
    for rot in moved.values():  # one copy per branch graph that reads it
        uses = list(rot.outputs[0].uses())
        if any(u.graph is g for u, _ in uses) or rot.outputs[0].is_graph_output():
            continue
        copies: dict[int, ir.Value] = {}
        for user, i in uses:
            sub = user.graph
            if id(sub) not in copies:
                copy = ir.node("RotaryEmbedding", list(rot.inputs),
                               attributes=dict(rot.attributes), domain="com.microsoft")
                sub.insert_before(next(iter(sub)), copy)
                copy.outputs[0].name = f"{rot.outputs[0].name}_{sub.name}"
                copies[id(sub)] = copy.outputs[0]
            user.replace_input_with(i, copies[id(sub)])
        g.remove(rot, safe=True)
    return len(moved) // 2


def _unit_transposes_to_reshape(m: ir.Model) -> int:
    """Transpose that moves only axes of static size 1 -> Reshape (the same bytes in the same
    order, so no copy). On the 1-KV-head sizes (270M, 1B) the k/v [B,T,1,D] -> [B,1,T,D]
    transposes are such: ONNX Runtime's CPU Transpose copies them (9 ms of a 512-token prefill
    on the 270M, 36 kernels), its Reshape only relabels. The target shape copies a symbolic dim
    that stays at its index (0) and infers at most one that moves (-1). Returns the number
    rewritten."""
    g = m.graph
    n_done = 0
    for node in [n for n in g if n.op_type == "Transpose"]:
        x, y = node.inputs[0], node.outputs[0]
        perm = node.attributes.get("perm")
        if x.shape is None or perm is None:
            continue
        perm, dims = list(perm.value), list(x.shape.dims)
        kept = [p for p in perm if dims[p] != 1]
        if len(perm) != len(dims) or kept != sorted(kept):
            continue  # a non-unit axis moves: a real transpose
        target, inferred = [], 0
        for i, p in enumerate(perm):
            d = dims[p]
            if isinstance(d, int):
                target.append(d)
            elif p == i:
                target.append(0)
            else:
                target.append(-1)
                inferred += 1
        if inferred > 1:
            continue
        shape = _int64_initializer(g, f"{y.name}_unit_shape", target)
        r = ir.node("Reshape", [x, shape])
        g.insert_before(node, r)
        _take_over(y, r.outputs[0])
        g.remove(node, safe=True)
        n_done += 1
    return n_done


def _cancel_transposes(m: ir.Model) -> int:
    """Transpose(Transpose(x, p), q) whose permutations compose to the identity -> x. The
    attention translation returns its [B,H,T,D] output as a Transpose of the [B,T,H,D] its
    branches compute, and the model transposes it straight back for o_proj
    (onnx_attention, `ctx`): one Transpose pair per layer. Returns the number removed."""
    n_done = 0
    for node in [n for n in m.graph if n.op_type == "Transpose"]:
        first = node.inputs[0].producer()
        if first is None or first.op_type != "Transpose" or first.graph is not node.graph:
            continue
        p, q = (n.attributes.get("perm") for n in (first, node))
        if p is None or q is None:
            continue
        p, q = list(p.value), list(q.value)
        if len(p) != len(q) or [p[i] for i in q] != list(range(len(p))):
            continue
        y = node.outputs[0]
        if y.is_graph_output():
            continue
        y.replace_all_uses_with(first.inputs[0])
        m.graph.remove(node, safe=True)
        if not list(first.outputs[0].uses()) and not first.outputs[0].is_graph_output():
            m.graph.remove(first, safe=True)
        n_done += 1
    return n_done


def _merge_reshapes(m: ir.Model) -> int:
    """Reshape(Reshape(x, s1), s2) -> Reshape(x, s2): ONNX Runtime keeps both (each one kernel
    launch). They come from _unit_transposes_to_reshape after torch's view (k/v of the 1-KV-head
    sizes, two per layer) and from the attention's output reshape before the model's view, once
    _cancel_transposes has removed the Transpose pair between them (one per layer). s2 must be
    a constant whose 0 entries (copy the input's dim i) copy the same dim from x as from the
    intermediate (both shapes known there and equal: a named symbolic dim or the same int), or
    any shape with allowzero=1 (torch's view: a 0 there is a 0, nothing is copied from the
    input). Returns the number merged."""
    from onnx_ir.convenience import get_const_tensor

    def dim(v: ir.Value, i: int):
        if v.shape is None or i >= len(v.shape):
            return None
        d = v.shape[i]
        return d if isinstance(d, int) else d.value  # a SymbolicDim: its name, None if unknown

    n_done = 0
    for node in [n for n in m.graph if n.op_type == "Reshape"]:
        first = node.inputs[0].producer()
        if first is None or first.op_type != "Reshape" or first.graph is not node.graph:
            continue
        x, mid = first.inputs[0], first.outputs[0]
        allowzero = node.attributes.get("allowzero")
        if not (allowzero is not None and allowzero.value == 1):  # else s2 reads nothing of x
            target = get_const_tensor(node.inputs[1])
            if target is None:
                continue
            zeros = [i for i, d in enumerate(target.numpy().tolist()) if d == 0]
            if any(dim(x, i) is None or dim(x, i) != dim(mid, i) for i in zeros):
                continue
        node.replace_input_with(0, x)
        if not list(mid.uses()) and not mid.is_graph_output():
            m.graph.remove(first, safe=True)
        n_done += 1
    return n_done


def _drop_unused_initializers(m: ir.Model) -> None:
    g = m.graph
    inputs = set(id(v) for v in g.inputs)
    for name, v in list(g.initializers.items()):
        if not list(v.uses()) and not v.is_graph_output() and id(v) not in inputs:
            g.initializers.pop(name)


def _strip_metadata(m: ir.Model) -> None:
    """Drop the exporter's per-node stack traces (they made text.onnx 7 MB at 270M)."""
    for n in m.graph:
        n.metadata_props.clear()
