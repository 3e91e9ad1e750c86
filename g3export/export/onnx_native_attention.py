"""The `native` TensorRT translation of `torch.ops.g3.attention` (DESIGN §3.2): standard ONNX only,
opset 24 `Attention` + `TensorScatter`, which TensorRT 10.15+/11 and TensorRT-RTX compile to their
own attention and KV-cache-update layers and ONNX Runtime (>= 1.32) runs on CPU.

Used like the ONNX Runtime translation: `torch.onnx.export(..., dynamo=True, opset_version=OPSET,
custom_translation_table=TRANSLATION_TABLE)`. The graph must be written with opset >= 24 (OPSET)
and an IR version that ONNX Runtime reads (IR_VERSION).

The op's contract is g3export.modeling.attention's: q [B,H,T,D], k/v [B,KV,T,D], k_cache/v_cache
[B,KV,S,D] (slot = position mod S), start_pos int64 [B] (one start per row), image_groups int64
[B,T], window (0 = full), scale; outputs out [B,H,T,D] and the caches with the chunk written in.

What one layer becomes:

    keys   = Concat(k_cache, k, axis=2)                     [B, KV, S+T, D]   (old slots, then chunk)
    values = Concat(v_cache, v, axis=2)
    mask   = [B, 1, T, S+T] bool, True = visible            (the reference's `attention_mask`)
    out    = Attention(q, keys, values, mask, scale=scale)  GQA from the 4-D shapes (H % KV == 0)
    k_out  = TensorScatter(k_cache, k, write_indices=start mod S, axis=2, mode="linear")
                                                            (write_indices [B]: one per row)
    v_out  = TensorScatter(v_cache, v, ...)

The mask is the reference formula, built per row from start_pos [B] with Range/Mod (fmod=0:
Python's sign rule), so prefill, decode, a ring that has wrapped and rows at different positions
share one expression:
    old slot s holds p_s = start-1 - ((start-1-s) mod S); visible iff p_s >= 0 (and, sliding,
    p_s > pos_q - W); chunk key u' visible to chunk query u iff u' <= u or same image (and,
    sliding, u - u' < W).
`is_causal` is not used: Attention's causal flag is top-left aligned, wrong against a cache.

Limits (TensorRT-RTX 1.7, measured; they are the runtime's contract for this translation, and
`check_chunk` / `aligned_chunks` state them in code):
* `TensorScatter` is accepted only with mode="linear": the chunk is written to slots
  [start mod S, start mod S + T) and must not run past the end of the buffer. On a sliding layer
  (S = W) a prefill chunk must therefore not wrap the ring: chunks aligned to the window (every
  chunk starts at a multiple of its length and the length divides W; decode, T = 1, always fits).
  On a full layer S = max_context, so start + T <= max_context. In particular T <= W. TensorRT
  checks it at build time only for the profile's OPT shape: an opt T beyond the smallest ring is
  refused ("IKVCacheUpdateLayer `update` ... sequence length must be less than or equal to
  `cache` ... max sequence length"); a max T beyond it only gives a warning ("Profile kMAX values
  are not self-consistent") and the engine is built. The text engine's profile has opt T = 1
  (trt/engine.text_profile), so g3export's plan refuses such a prefill chunk itself
  (trt/options.py). Prefill chunk = W is the natural choice.
* Images: an image's tokens must be in one chunk (bidirectional block) AND the chunk must not
  cross a multiple of W. An image that straddles a multiple of W cannot be prefilled by this
  translation; the runtime has to refuse such a prompt for a native build (or place images).
* `softcap`, `past_key`/`present_key` and multi-output `Attention` are refused, hence the
  explicit Concat + TensorScatter instead of Attention's own cache inputs.
* fp32 `Attention` builds only when the layer is decomposable (g3export.export.trt marks every
  attention layer decomposable for fp32 networks); bf16/fp16 build as fused attention.
* bf16/fp16 with two or more full layers failed in TensorRT-RTX 1.7's Myelin compiler ("Graph
  contains more than one op named <mask>_iota") while the full layers' old-slot mask was [1, S]
  (independent of the query) and the mask ended in Unsqueeze(Concat(...)): both masks are built
  [B, 1, T, S+T] directly and depend on the query position on every layer type (the extra
  `p_s <= pos_q` test is always true for a filled slot).
Read before write: ONNX semantics are functional (the Concat reads the old cache, TensorScatter
returns a new one). When a runtime binds one buffer to past_key_i and present_key_i, TensorRT's
KV-cache-update layer writes in place, ordered by TensorRT after the Concat that consumes the old
contents (its data dependency), which cannot be verified without a GPU. ONNX Runtime on CPU
(ScatterND-like copy semantics for TensorScatter when the buffers differ) is verified here.
"""

from __future__ import annotations

import onnx_ir as ir
import torch
from onnxscript.onnx_opset import opset24 as op

from ..modeling import attention as _attention  # noqa: F401  (registers torch.ops.g3.attention)

OPSET = 24          # TensorScatter is new in opset 24; Attention in 23
IR_VERSION = 11     # opset 24 needs IR >= 11 (onnx checker); ONNX Runtime 1.32 reads it
NAME = "native"


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _int(value: int):
    return op.Constant(value_int=value)


def _static(dim, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"g3.attention (native) needs a static {what}, got {dim!r}")
    return dim


def g3_attention_native(q, k, v, k_cache, v_cache, start_pos, image_groups, window: int,
                        scale: float):
    """Trace-only translation (the exporter calls it with onnx_ir Values): emits the nodes above."""
    heads = _static(q.shape[1], "number of query heads")
    kv_heads = _static(k.shape[1], "number of KV heads")
    slots = _static(k_cache.shape[2], "cache length")
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} not a multiple of KV heads {kv_heads}")
    window = int(window)
    sliding = window > 0
    zero, one = _ints(0), _ints(1)

    t_q = op.Shape(q, start=2, end=3)                          # [1] T
    t_s = op.Squeeze(t_q, zero)
    start_col = op.Unsqueeze(start_pos, one)                    # [B,1], one start per row
    u = op.Range(_int(0), t_s, _int(1))                         # [T] offsets in the chunk
    u_q, u_k = op.Unsqueeze(u, one), op.Unsqueeze(u, zero)      # [T,1], [1,T]

    # old slots: position held by each, visible iff filled (and inside the window), per row
    last = op.Sub(start_col, _int(1))                           # [B,1]
    s_idx = op.Range(_int(0), _int(slots), _int(1))             # [S]
    p_old = op.Unsqueeze(op.Sub(last, op.Mod(op.Sub(last, s_idx), _int(slots))), one)  # [B,1,S]
    pos_q = op.Unsqueeze(op.Add(start_col, u_k), _ints(2))      # [B,T,1]
    # p_s <= pos_q always holds for a filled slot (old positions precede the chunk), but the
    # full layers' mask must depend on the query like the sliding one: with a [1,S] old-slot
    # mask, TensorRT-RTX 1.7 fails to build two full layers in bf16/fp16 (Myelin: "Graph
    # contains more than one op named ..._iota"; measured, fp32 decomposed builds are fine).
    old_ok = op.And(op.GreaterOrEqual(p_old, _int(0)), op.LessOrEqual(p_old, pos_q))  # [B,T,S]
    if sliding:
        old_ok = op.And(old_ok, op.Greater(p_old, op.Sub(pos_q, _int(window))))  # [B,T,S]
    b_dim = op.Shape(q, start=0, end=1)                         # [1] B
    old_shape = op.Concat(b_dim, one, t_q, _ints(slots), axis=0)  # [B,1,T,S]
    # The Expand is a no-op on the shape, but without it (old_ok = Unsqueeze(And(...)) straight
    # into the Concat) TensorRT-RTX 1.7 fails the bf16/fp16 build with two full layers (the same
    # Myelin "more than one op named <mask>_iota"; measured, tests/export/test_trt.py).
    old_ok = op.Expand(op.Unsqueeze(old_ok, one), old_shape)    # [B,1,T,S]

    # chunk keys: causal, OR same image, AND (sliding) within the window. Built 4-D from the
    # start ([.., 1, T, ..]: the head axis) so no Unsqueeze follows the Concat: TensorRT-RTX 1.7's
    # fused bf16 attention fails on a mask `Unsqueeze(Concat(...))` ("Graph contains more than
    # one op named ..._iota", a Myelin IR verifier error).
    new_ok = op.Unsqueeze(op.LessOrEqual(u_k, u_q), _ints(0, 1))  # [1,1,T,T]
    g_q = op.Unsqueeze(image_groups, _ints(1, 3))               # [B,1,T,1]
    g_k = op.Unsqueeze(image_groups, _ints(1, 2))               # [B,1,1,T]
    block = op.And(op.GreaterOrEqual(g_q, _int(0)), op.Equal(g_q, g_k))  # [B,1,T,T]
    new_ok = op.Or(new_ok, block)                               # [B,1,T,T]
    if sliding:
        near = op.Less(op.Sub(u_q, u_k), _int(window))          # [T,T]
        new_ok = op.And(new_ok, op.Unsqueeze(near, _ints(0, 1)))

    mask = op.Concat(old_ok, new_ok, axis=-1)                   # [B,1,T,S+T]

    keys = op.Concat(k_cache, k, axis=2)                        # [B,KV,S+T,D]
    values = op.Concat(v_cache, v, axis=2)
    # the exporter gives this node all 4 of Attention's outputs; `finalize` trims it to one
    out = op.Attention(q, keys, values, mask, scale=float(scale))[0]  # [B,H,T,D]

    write_at = op.Mod(start_pos, _ints(slots))                   # [B] start mod S, per row
    k_new = op.TensorScatter(k_cache, k, write_at, axis=2, mode="linear")
    v_new = op.TensorScatter(v_cache, v, write_at, axis=2, mode="linear")
    return out, k_new, v_new


TRANSLATION_TABLE = {torch.ops.g3.attention.default: g3_attention_native}


def finalize(model: ir.Model) -> int:
    """Post-export pass (required): rebuild every `Attention` node with only its first output.
    The exporter creates all four outputs of the schema (Y, present_key, present_value,
    qk_matmul_output) even when unused, and TensorRT-RTX refuses a multi-output Attention.
    Returns the number of nodes rewritten."""
    g = model.graph
    n = 0
    for node in list(g):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.outputs) == 1:
            continue
        for extra in node.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                raise ValueError(f"{node.name}: Attention output {extra.name} is used; the native "
                                 "translation emits single-output Attention only")
        new = ir.node("Attention", list(node.inputs), attributes=list(node.attributes.values()),
                      num_outputs=1, name=node.name)
        y_old, y_new = node.outputs[0], new.outputs[0]
        y_new.shape, y_new.type = y_old.shape, y_old.type
        g.insert_before(node, new)
        name = y_old.name
        ir.convenience.replace_all_uses_with(y_old, y_new, replace_graph_outputs=True)
        g.remove(node, safe=True)
        y_new.name = name
        n += 1
    return n


def check_chunk(start: int, t: int, slots: int) -> None:
    """The runtime's rule for this translation: a chunk of t tokens at `start` must fit in the
    layer's buffer without wrapping (TensorScatter linear). Raises ValueError otherwise."""
    if (start % slots) + t > slots:
        raise ValueError(
            f"chunk [{start}, {start + t}) wraps a {slots}-slot cache: the native TensorRT "
            f"translation writes with TensorScatter(mode=linear); align prefill chunks to the "
            f"window (chunk length dividing {slots}, chunks starting at multiples of it)")


def aligned_chunks(start: int, n: int, chunk: int, slots: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """Split tokens [start, start+n) into (start, length) chunks of at most `chunk` tokens that wrap
    no layer's buffer: every chunk ends at or before the next multiple of the smallest ring."""
    ring = min(slots)
    out = []
    pos, end = start, start + n
    while pos < end:
        room = ring - pos % ring
        t = min(chunk, room, end - pos)
        out.append((pos, t))
        pos += t
    return out


def count_ops(model: ir.Model) -> dict[str, int]:
    """op_type -> count over the main graph (for tests and build logs)."""
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


__all__ = ["OPSET", "IR_VERSION", "NAME", "TRANSLATION_TABLE", "g3_attention_native",
           "finalize", "check_chunk", "aligned_chunks", "count_ops"]
