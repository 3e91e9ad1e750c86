"""ONNX Runtime translation of `torch.ops.g3.attention` (DESIGN §3.2): standard ONNX ops only.

Used through `torch.onnx.export(..., dynamo=True, custom_translation_table=TRANSLATION_TABLE)`.
The contract is the op's (g3export.modeling.attention): inputs q [B,H,T,D], k/v [B,KV,T,D],
k_cache/v_cache [B,KV,S,D], start_pos int64 [B] (one start per row), image_groups int64 [B,T];
attributes window (0 = full layer) and scale; outputs out [B,H,T,D] and the two caches with the chunk written in.

What the emitted subgraph does (one per layer). Its top is one `If` per layer on T == 1, whose
three outputs are the attention product and the two caches:

* A decode step (T == 1) writes first, then reads: its key and value go to slot start mod S of
  each row (`ScatterND`, in place, see below), which held position start - S: outside every
  window on a sliding layer (S >= W), nothing on a full one, so no read of this step needs the
  old slot. (A position past a full layer's S, i.e. past max_context, which the runtimes refuse
  but the op defines as a wrap, or a ring shorter than its window, sends the step down the chunk
  path, which reads before it writes.)
  Then one product over the cache alone (the ring on sliding layers, slots 0..max(start) on full
  ones), the step's mask as bias, softmax, times the values: per layer 2 ScatterND, Reshape,
  FusedMatMul, Add, Softmax, MatMul (+ 2 Slices on full layers) where the chunk path below runs
  ~15 kernels (two score products, Concat, Add, Softmax, two Slices, two MatMuls, Add, then
  Shape, two update Slices and the two ScatterNDs). On the 270M int4 (ORT's profiler): 917 ->
  724 kernels per decode step, and attention at the kernel time of GenAI's GroupQueryAttention
  (3.61 vs 3.72 ms); step-by-step CPU time moved within this machine's noise (x0.90-0.99 int4,
  x0.97-1.03 fp32, benchmarks/ort_ab.py); BENCHMARKS.md section 1.3.
  A full layer's step in an fp32 graph is instead one `com.microsoft.GroupQueryAttention` with
  the cache as past_key/past_value (seqlens_k = start_b per row, total = max(start) + 1, no
  window): GQA writes the step's key at slot start_b = its position (a full layer's slot is its
  position) and attends over slots 0..start_b of each row, reading the cache where it lies. Its
  present outputs are the branch's outputs, which ONNX Runtime allocates in the `If`'s own,
  i.e. the bound present_* buffers, the same memory as past_*; GQA sees past == present and
  writes only the new slot (past_present_share_buffer in its CPU kernel). This replaces the
  two Slices of slots 0..max(start) (a copy of the used context per layer per step, growing
  with it: 0.43 ms of a 270M int4 step at position ~576 in ORT's profile) and the masked
  product; the shared decode bias of full layers is then not built at all. Run WITHOUT that
  binding (past and present separate buffers), GQA zeroes present and copies each row's slots
  0..start_b-1 before writing, so the returned full-layer cache holds zeros past each row's
  position instead of the input's stale slots: slots no step reads before writing them, but
  not bit-equal to the op's reference, and a copy of the whole cache per step.
  tests/export/test_rows.py runs the graph bound in place, as g3export.runtimes.ort_session does.
* Any other chunk (T > 1) reads first, then writes, as described in the rest of this list.
* The output: every branch returns its product in the order the model's o_proj reads it,
  [B,T,H,D] (GQA's [B,T,H*D], or a decode step's [B,KV,G,D], the same bytes when T = 1), and
  the translation returns `Transpose` of that to the op's [B,H,T,D]. The model transposes it
  straight back (Attention.forward), and onnx_passes._cancel_transposes removes the pair: the
  GQA paths copy nothing after the attention (they used to transpose GQA's output to [B,H,T,D]
  and back: 2 of the 4 q-sized Transposes per layer of a 512-token prefill, ~6 ms of 419 ms
  in ORT's profile on the 270M), and a decode step saves a kernel per layer.

* GQA without repeating K/V: q [B,H,T,D] is reshaped (free) to [B,KV,G*T,D] (row g*T+t), so one
  batched MatMul per KV head covers its G query heads. The scores are one
  `com.microsoft.FusedMatMul` (transB, alpha = the softmax scale): the kernel ONNX Runtime would
  fuse a Transpose + MatMul into anyway, with the scale folded in instead of a Mul on q (18
  kernels less per 270M step; the graph is for ONNX Runtime only, TensorRT has its own
  translations).
* Scores, softmax and the probability-weighted sum are computed in fp32 (q, k, v, cache reads are
  Cast to float when the graph is fp16/bf16), then cast back to q's dtype.
* Old keys and chunk keys are multiplied separately and their scores concatenated (not the keys:
  no copy of the cache is made to append the chunk). Probabilities are split the same way.
* Full layers read only the valid prefix of their cache, slots 0..max(start)-1 (`Slice` with the
  largest start of the batch; a row whose start is smaller has the rest masked), so decode cost
  grows with the used context, not with max_context. Sliding
  layers read their whole W-slot ring, masked (no `Slice`: ORT's CPU `Slice` copies, and copying
  every ring on every decode step measured ~10% slower decode on the 270M in one side-by-side
  run of a variant not kept in the code).
* First chunks attend over the chunk only. When every row starts at 0 (`max(start) == 0`: a
  prompt's first chunk) no cache slot is visible to any query, so the layer's product over the
  cache is skipped by an `If`: its then-branch is scores over the chunk's own keys, the chunk's
  mask as bias, softmax, times the chunk's values; its else-branch is the general path below. A
  second `If` per layer kind (on the same condition, shared by the layers) builds only the bias
  that branch needs ([B,1,G*T,T] or [B,1,G*T,L+T]). On the 270M (512-token prompt, sliding
  window 512) the first chunk used to multiply against the whole, still empty 512-slot ring on
  15 sliding layers: twice the attention products, a Concat of the two score blocks, Slices of
  the probabilities and a twice-wide mask Add/Softmax, ~17-20% of the prefill's kernel time in
  ORT's profiler (benchmarks/prefill_profile.py). With the `If`, prefill takes 0.83x the CPU time
  of the graph without it, and decode is unchanged (the `If` costs ~1 us per layer per step:
  measured with 18 `If`s around small MatMuls, and decode steps of the two 270M graphs
  interleaved one by one); BENCHMARKS.md section 1.1. The rows-at-different-positions contract
  is untouched: a batch where any row has a start > 0 takes the general path, whose mask hides
  what each row must not see. tests/export/test_onnx.py checks that a first chunk does not read
  the cache (a cache full of NaN leaves its logits unchanged) and that a later chunk does.
  A first chunk of text only (no image token, whose block mask is not causal) in an fp32 graph
  goes one step further: `com.microsoft.GroupQueryAttention` on the chunk's q/k/v ([B,T,n*D];
  seqlens T-1 per row, `local_window_size` = W on sliding layers, `scale`), ONNX Runtime's
  fused kernel that GenAI runs: on the 270M it cut a 512-token prefill's CPU time by 4%
  (benchmarks/ort_ab.py, BENCHMARKS.md section 1.1). Its window: in ONNX Runtime 1.32's CPU
  kernel a query sees itself and the W-1 keys before it when local_window_size = W (measured;
  the parity test past the window, tests/export/test_onnx.py, pins it). fp16/bf16 graphs, the
  ones built for CUDA, keep the branch below: ORT's CUDA GQA kernel takes fp16/bf16 only and
  the attention here computes in fp32, so a fp32 GQA would run on the CPU there (an fp32 graph
  on the CUDA provider does that: correct, slower).
  That GQA also writes the chunk into the cache and rotates q and k, as GenAI's does: the cache
  is its past_key/past_value, and since every row starts at 0 the chunk's slots are its
  positions 0..T-1, which it writes through its present outputs. Those are the `If`s' own
  outputs down to the bound present_* buffers, the same memory as past_*, so GQA writes in
  place (tests/export/test_onnx.py::test_first_chunk_writes_only_its_slots: the other slots
  keep their values; with present a separate buffer GQA zeroes them). Only while the chunk
  fits: T <= S on a sliding ring (always on a full layer, S = max_context); a longer first
  chunk takes the product below. RoPE: onnx_passes._rotary_into_gqa sets do_rotary with the
  graph's cos/sin tables and moves the RotaryEmbedding nodes into the branches that still
  need them. So a first chunk runs neither the two RotaryEmbeddings nor the update Slice and
  ScatterND of each layer (36 + 72 kernels fewer on the 270M: a 512-token prefill runs 543
  kernels, 661 before; BENCHMARKS.md section 1.9). Every chunk path writes its own chunk: the
  attention `If`s return the product and both caches.
  A second `If` inside the first-chunk branch picks GQA or the product below; the bias `If`
  likewise skips building the first chunk's mask for GQA.
  Measured (benchmarks/ort_ab.py, 270M fp32, 512-token prefill, 2-vCPU AVX-512 Xeon;
  BENCHMARKS.md section 1.9): the write in GQA alone took x0.998 the prefill's CPU time
  (2026-12-03), the write and RoPE together x0.968 and x0.982 that day and x0.978 and x0.985
  (either load order) on 2026-12-04, decode steps unchanged (x1.009, x1.008; one run right
  after building read x1.040 and x1.35, which did not reproduce), and x0.964 of the wall time
  paired with decode x1.007 in compare_ort_genai's steps run. On the AVX2 EPYC
  of 2026-12-02 the write alone took x1.046 and x1.013 and was not kept then (ORT's profiler put
  GQA with a past at ~1.3x its time without one there); the two together are not measured there.
  Measured and not kept: a sliding layer's decode step (fp32, S <= W) through GQA in ORT's
  "shared KV" form (the step written into the ring by ScatterND as now, then GQA with no new
  key, key/value [B,0,KV*D], the written ring as its past, seqlens_k = min(start_b, S-1),
  total = min(max(start)+1, S), only `output` declared): 50 ORT kernels fewer per 270M step
  and the same fp32 greedy tokens, but not faster: step CPU x0.990 (int4) and x0.993 (fp32) in
  benchmarks/ort_ab.py, and steps 1.05-1.07x slower taking turns with the current graph in
  benchmarks/compare_ort_genai.py --interleave steps (2026-12-03, AVX2 EPYC; BENCHMARKS.md
  section 1.5).
  Measured and not kept: no per-layer `If` in a decode step, by giving the step its own copy of
  the whole graph (the exported graph's top an `If(T == 1, copy reading input_ids reshaped to
  [B, 1], graph as exported)`, weights shared by outer scope; ORT's constant folding then
  inlines the copy's `If`s on T == 1): 574 instead of 632 ORT kernels and 5 instead of 20 `If`s
  per 270M int4 step, and no faster once the A/B loads each build twice in mirrored order
  (benchmarks/ort_ab.py), while a session's peak RSS at load grew (270M: int4 481 -> 625 MB,
  fp32 539 -> 902 MB). BENCHMARKS.md section 1.6.
  Measured and not kept: ONNX's own `Attention` (opset 23; ORT's CPU kernel takes q_num_heads
  4, kv_num_heads 1 and a float mask) in place of a sliding decode step's FusedMatMul, Add,
  Softmax and MatMul: correct, one kernel for four, each head a single-row product with no
  packing of the ring, and slower (int4 step x1.04 at 1 thread, x1.06-1.09 at 2; section 1.7).
  Where a decode step's time goes (section 1.7, `perf`, not ORT's profiler): the ring product
  above costs what GenAI's GroupQueryAttention does; what our step has more of is ~280 small
  kernels (the per-step position/mask/RoPE preamble, the q transposes, this product's
  separate kernels), ~4 us each.
  How the branches are built: the translation is traced by the exporter's OpRecorder, which
  appends every node it records to a list; `_if` moves the nodes a branch function recorded
  out of that list into an `ir.Graph` (reading the enclosing graph's values by outer scope),
  names them (the exporter names only the main graph's values; SSA needs unique names), and
  gives each branch its own constant farm so that no constant made inside a branch is reused
  outside it.
* The mask is an additive fp32 bias (0 or -inf) of shape [B,1,G*T,L+T] over the concatenated
  scores (L = max(start) on full layers, S on sliding ones; [B,1,G*T,T] in a first chunk's
  branch), built once per graph for each layer kind
  and added with one `Add` (broadcast over KV heads). `Where(mask, s, -inf)` per layer was 8% of
  a 512-token prefill on ORT's CPU (one ORT profile, session option enable_profiling): its
  broadcasting kernel is much slower than `Add`'s. Every row has its own start, so the bias is
  per row. What the bias encodes: full layers see slots j < start_b (the prefix of row b precedes
  the chunk); a sliding layer's slot s of row b holds position p_s = start_b-1 -
  ((start-1-s) mod S) (`Range`, `Mod` with fmod=0, i.e. Python's sign rule), visible iff p_s >=
  0 and p_s > pos_q - W. The chunk's own keys get the causal mask, OR'ed with the same-image
  block mask from image_groups, AND'ed with the window on sliding layers. Every query sees at
  least itself, so no row is all -inf. A decode step's bias ([B,1,G,L], its branch of the same
  shared `If`) is over the cache after its write: full layers see slots j <= start_b, a sliding
  slot holds p_s = start_b - ((start_b - s) mod S), visible iff p_s >= 0 and p_s > start_b - W.
* The write: the last n = min(T, S) rows of k/v go to slots (pos mod S) with `ScatterND`
  (indices [B,KV,n,3] = (b, kv, slot), slot = (start_b + u) mod S per row). ScatterND rather than ScatterElements: its indices are
  per row, not per element (n*3 instead of n*D integers), it exists from opset 11 (no opset 24
  needed, unlike `TensorScatter`), and ORT's CPU and CUDA kernels skip the input→output copy
  when the two buffers are the same (what the runtime's I/O binding arranges, see below).

Ordering of read and write. The runtime binds the same buffer to past_key_i (input) and
present_key_i (output), so the ScatterND writes into the memory the attention reads. In a
decode step the reads take the ScatterND's output (write first, by data dependency). In a chunk
every read of the old cache must run before the write. The graph enforces it by data dependency: the end of the
`updates` slice fed to ScatterND is taken from `Shape` of this layer's attention product
([B,T,H,D] or [B,T,H*D]: its T), not from q or k, so the ScatterND cannot be
scheduled before the attention has consumed the old cache. The shape is symbolic (T is dynamic),
so neither the exporter's nor ORT's constant folding can remove it (and the test below checks
that ORT's optimizer has not rewired it to another value's Shape). Each chunk path writes in
its own branch, after its own attention (a first chunk's GQA reads and writes in one kernel,
the only node of its branch that touches the cache). `tests/export/test_onnx.py::test_write_depends_on_attention` checks both orders on
the model that ORT actually runs (saved with optimized_model_filepath at ORT_ENABLE_ALL;
`cache_writes_ordered`: every other reader of a cache in the ScatterND's graph is one of its
ancestors), and the chunked-prefill parity tests would fail if a ring slot were overwritten
before it was read.

Node count. Masks, slot indices and small constants are identical for every layer of a kind, so
they are emitted once per graph (memoized on the start_pos/image_groups Values, `reset_shared()`
per export); on the 270M this takes the decode step from ~2400 to far fewer ORT kernel launches.

Findings on ONNX Runtime 1.32 CPU (measured here, 2-core machine shared with other jobs):
* Binding one OrtValue as both past_key_i and present_key_i is accepted. ScatterND writes the
  chunk into that buffer: after a step the numpy array behind the OrtValue holds the new rows,
  its address is unchanged, and logits/caches equal the PyTorch reference (tiny: logits 1e-5,
  caches 1e-6; 270M random weights: logits 2.4e-4, caches 2.7e-6, greedy tokens equal).
* No copy of the cache per step: with a 6-layer 270M-shaped model (benchmarks/ort_inplace.py,
  both sessions interleaved in one process), the decode step takes the same time whether the KV
  buffers are 7 MB (max_context 1024) or 72 MB (max_context 32768): 13.6 vs 14.0 ms, and in a
  second run 12.335 vs 12.339 ms. The 12 ScatterNDs together take 70-250 us per step in either
  case; copying the 32768 cache would move ~65 MB, ~2.5 ms at this machine's bandwidth. (The
  higher of those ScatterND figures came from first-touch page faults on lazily zeroed buffers;
  the session now touches its cache pages when it allocates them.)
* The writes inside the step's `If` are in place too: ONNX Runtime's `If` allocates a branch's
  outputs in the `If` node's own outputs, which are the bound present_* buffers, so the
  ScatterND sees one buffer for input and output. Measured after the decode branch landed
  (benchmarks/ort_inplace.py, 2026-12-02): decode 13.59 ms (7 MB cache) vs 13.62 ms (72 MB),
  ScatterND 63 vs 65 us per step.
* ORT_ENABLE_ALL keeps the dependency: in the optimized model every chunk branch's ScatterND
  still descends from the attention that read the same cache (cache_writes_ordered()).
  ORT fuses the K Transpose + MatMul into FusedMatMul (transB); the Slice of the full layers'
  valid prefix is a copy of start*D floats per layer (a chunk's, and an fp16/bf16 graph's decode
  step: fp32 graphs decode full layers through GQA, which reads the cache where it lies).
"""

from __future__ import annotations

import functools
import math

import onnx_ir as ir
import torch
from onnxscript import opset18 as op

from ..modeling import attention as _attention  # noqa: F401  (registers torch.ops.g3.attention)

_FLOAT = ir.DataType.FLOAT

# Names of the branch graphs that graph passes look for (an `If` named N has branches N_then and
# N_else): the decode step's (onnx_passes._late_q_transpose) and a first chunk's GQA
# (onnx_passes._rotary_into_gqa)
DECODE_BRANCH = "step_then"
FIRST_CHUNK_GQA_BRANCH = "attention_first_then"


def _declare(domain: str, name: str, version: int, inputs, outputs, types, attributes):
    """An onnxscript Op for a node the exporter's recorder must emit with a schema onnx does not
    have (the contrib ops) or has in a form it cannot count outputs from (`If`). inputs/outputs:
    names, a trailing "?" marking an optional input, all of type "T" unless given as
    (name, type); types: {type: [allowed]}; attributes: {name: onnx AttrType name}."""
    import onnx
    from onnxscript import values

    schema_cls = onnx.defs.OpSchema
    optional = schema_cls.FormalParameterOption.Optional

    def param(p):
        p, t = p if isinstance(p, tuple) else (p, "T")
        if p.endswith("?"):
            return schema_cls.FormalParameter(p[:-1], t, param_option=optional)
        return schema_cls.FormalParameter(p, t)

    schema = schema_cls(
        name, domain, version, inputs=[param(p) for p in inputs],
        outputs=[param(p) for p in outputs],
        type_constraints=[(t, allowed, t) for t, allowed in types.items()],
        attributes=[schema_cls.Attribute(a, getattr(schema_cls.AttrType, kind), a)
                    for a, kind in attributes.items()])
    return values.Op(values.Opset(domain, version if domain else 18), name, schema)


@functools.lru_cache(maxsize=None)
def _fused_matmul_op():
    """com.microsoft.FusedMatMul (alpha * A @ B^T with transB): what ONNX Runtime itself fuses a
    Transpose + MatMul into, here with the softmax scale as alpha, which saves the Mul on q."""
    return _declare("com.microsoft", "FusedMatMul", 1, ["A", "B"], ["Y"],
                    {"T": ["tensor(float)"]}, {"alpha": "FLOAT", "transB": "INT"})


@functools.lru_cache(maxsize=None)
def _gqa_op():
    """com.microsoft.GroupQueryAttention, with the inputs and attributes used here (per ONNX
    Runtime's ContribOperators documentation). Used without past (a first chunk), with the cache
    as past (a full layer's decode step), and without rotary (RoPE is applied before)."""
    return _declare(
        "com.microsoft", "GroupQueryAttention", 1,
        ["query", "key", "value", "past_key?", "past_value?", ("seqlens_k", "M"),
         ("total_sequence_length", "M")], ["output", "present_key", "present_value"],
        {"T": ["tensor(float)"], "M": ["tensor(int32)"]},
        {"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT", "local_window_size": "INT"})


@functools.lru_cache(maxsize=None)
def _if_op(n: int):
    """ONNX `If` declared with n outputs: the exporter's recorder takes the output count from the
    schema, and the standard one has a single variadic output."""
    return _declare("", "If", 16, [("cond", "B")], [f"out{i}" for i in range(n)],
                    {"B": ["tensor(bool)"],
                     "T": [f"tensor({t})" for t in ("float", "float16", "bfloat16")]},
                    {"then_branch": "GRAPH", "else_branch": "GRAPH"})


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _int(value: int):
    return op.Constant(value_int=value)


def _static(dim, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"g3.attention translation needs a static {what}, got {dim!r}")
    return dim


# Values that every layer would compute alike (masks, write indices) are emitted once per graph and
# reused: the exporter calls the translation once per layer with the same start_pos/image_groups
# Values, so they are memoized on those. Fewer nodes matter on CPU decode, where each ORT kernel
# launch costs microseconds. `reset_shared()` is called at the start of every export.
_SHARED: dict[tuple, object] = {}


def reset_shared() -> None:
    _SHARED.clear()


def _shared(key: tuple, make):
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


def _if(cond, then_branch, else_branch, name: str, dtypes=(_FLOAT,)):
    """`If(cond)` whose branches are recorded from two builder functions, each returning one Value
    (or a tuple of them, with `dtypes` giving each output's type). The exporter's tracer (an
    onnxscript OpRecorder) appends every node it records to a list; the nodes a branch function
    records are taken out of that list into the branch's subgraph, which reads the values it
    needs from the enclosing graph by name (ONNX outer scope). Each branch gets its own constant
    farm: a Python constant first seen inside a branch must not be reused outside it. Values
    shared between layers (`_shared`) must be made before, in the enclosing graph."""
    import onnxscript.evaluator

    tracer = onnxscript.evaluator.default()
    graphs = []
    for which, build in (("then", then_branch), ("else", else_branch)):
        n0, farm = len(tracer.nodes), tracer.constant_farm
        tracer.constant_farm = {}
        try:
            results = build()
        finally:
            tracer.constant_farm = farm
        results = results if isinstance(results, tuple) else (results,)
        body = tracer.nodes[n0:]
        del tracer.nodes[n0:]
        for node in body:  # the exporter names only the main graph's values: SSA needs unique ones
            n = _SHARED["#branch"] = _SHARED.get("#branch", 0) + 1
            node.name = f"{name}_{which}_{n}"
            for i, value in enumerate(node.outputs):
                value.name = f"{name}_{which}_{n}_{i}"
        for r, dt in zip(results, dtypes, strict=True):
            r.dtype = dt
        graphs.append(ir.Graph([], list(results), nodes=body, name=f"{name}_{which}"))
    if len(dtypes) == 1:
        out = op.If(cond, then_branch=graphs[0], else_branch=graphs[1])
        out.dtype = dtypes[0]
        return out
    outs = _if_op(len(dtypes))(cond, then_branch=graphs[0], else_branch=graphs[1])
    for o, dt in zip(outs, dtypes):
        o.dtype = dt
    return tuple(outs)


def g3_attention(q, k, v, k_cache, v_cache, start_pos, image_groups, window: int, scale: float):
    """Trace-only translation: called by the exporter with onnx_ir Values; emits ONNX nodes."""
    heads = _static(q.shape[1], "number of query heads")
    kv_heads = _static(k.shape[1], "number of KV heads")
    head_dim = _static(q.shape[3], "head_dim")
    slots = _static(k_cache.shape[2], "cache length")
    groups = heads // kv_heads
    window = int(window)
    sliding = window > 0

    def f32(x):
        return x if x.dtype == _FLOAT else op.Cast(x, to=_FLOAT)

    start = start_pos                                      # int64 [B], one start per row
    key = (id(start_pos), id(image_groups))
    _SHARED.setdefault(key + ("refs",), (start_pos, image_groups))  # keep ids unique
    zero = _shared(key + ("c0",), lambda: _ints(0))
    one = _shared(key + ("c1",), lambda: _ints(1))
    axis2 = _shared(key + ("c2",), lambda: _ints(2))
    # chunk length from image_groups [B, T] (shared by all layers; the write below takes its own
    # from the attention result)
    t_q = _shared(key + ("T",), lambda: op.Shape(image_groups, start=1, end=2))  # [1]
    t_scalar = _shared(key + ("Ts",), lambda: op.Squeeze(t_q, zero))
    start_col = _shared(key + ("start",), lambda: op.Unsqueeze(start, one))  # [B,1]
    u = _shared(key + ("u",), lambda: op.Range(_int(0), t_scalar, _int(1)))  # [T] chunk offsets

    # ---- reads of the old cache (all before the write, see module docstring) ----------------
    if sliding:  # the whole ring: no copy (see the module docstring for why not only filled slots)
        n_old = _shared(key + ("S", slots), lambda: _ints(slots))  # [1] L = S

        def old_kv():
            return k_cache, v_cache                        # [B,KV,S,D]
    else:        # the valid prefix of the longest row, slots 0..max(start)-1
        n_old = _shared(key + ("maxstart",), lambda: op.ReduceMax(start, keepdims=1))  # [1] L

        def old_kv():
            return (op.Slice(k_cache, zero, n_old, axis2),  # [B,KV,L,D]
                    op.Slice(v_cache, zero, n_old, axis2))

    qshape = _shared(key + ("qshape", kv_heads, head_dim), lambda: _ints(0, kv_heads, -1, head_dim))
    ohead = _shared(key + ("ohead", heads, head_dim), lambda: _ints(0, heads, -1, head_dim))

    def grouped_q():     # [B,KV,G*T,D], made in the branch that uses it (GQA's takes q as it is)
        return op.Reshape(f32(q), qshape)

    def scores(qg, keys):  # scale * qg @ keys^T in one kernel (no Mul on q: see the docstring)
        return _fused_matmul_op()(qg, f32(keys), alpha=float(scale), transB=1)

    # ---- the mask, as an additive bias shared by the layers of one kind ----------------------
    def chunk_ok():      # [B,T,T]: what the chunk's own keys may see (causal | image block, window)
        causal = op.LessOrEqual(op.Unsqueeze(u, zero), op.Unsqueeze(u, one))  # [T(q), T(k)]
        g_q = op.Unsqueeze(image_groups, axis2)            # [B,T,1]
        g_k = op.Unsqueeze(image_groups, one)              # [B,1,T]
        block = op.And(op.GreaterOrEqual(g_q, _int(0)), op.Equal(g_q, g_k))  # [B,T,T]
        new_ok = op.Or(op.Unsqueeze(causal, zero), block)  # [B,T,T]
        if sliding:
            dist = op.Sub(op.Unsqueeze(u, one), op.Unsqueeze(u, zero))  # u_q - u_k
            new_ok = op.And(new_ok, op.Unsqueeze(op.Less(dist, _int(window)), zero))
        return new_ok

    def as_bias(ok):     # [B,T,N] bool -> [B,1,G*T,N] fp32 additive bias
        # rows of the grouped scores are g*T + t: tile the [.., T, ..] mask G times
        ok = op.Unsqueeze(op.Tile(ok, _ints(1, groups, 1)), one)  # [B,1,G*T,N]
        return op.Where(ok, op.Constant(value_float=0.0), op.Constant(value_float=-math.inf))

    def make_bias():     # [B,1,G*T,L+T] over the old slots and the chunk
        new_ok = chunk_ok()
        b_dim = op.Shape(image_groups, start=0, end=1)
        old_shape = op.Concat(b_dim, t_q, n_old, axis=0)   # [B,T,L]
        if sliding:
            # slot s of row b holds position p_s = start_b-1 - ((start_b-1-s) mod S); < 0: empty
            s_idx = op.Range(_int(0), _int(slots), _int(1))  # [S]
            last = op.Sub(start_col, _int(1))                # [B,1]
            p_old = op.Sub(last, op.Mod(op.Sub(last, s_idx), _int(slots)))  # [B,S]
            pos_q = op.Add(start_col, u)                     # [B,T]
            p_old = op.Unsqueeze(p_old, one)                 # [B,1,S]
            old_ok = op.And(op.GreaterOrEqual(p_old, _int(0)),
                            op.Greater(p_old, op.Unsqueeze(op.Sub(pos_q, _int(window)), axis2)))
        else:        # slot j holds position j iff j < start_b: row b's prefix precedes its chunk
            j = op.Range(_int(0), op.Squeeze(n_old, zero), _int(1))  # [L]
            old_ok = op.Unsqueeze(op.Less(j, start_col), one)  # [B,1,L]
        old_ok = op.Expand(old_ok, old_shape)                # [B,T,L]
        return as_bias(op.Concat(old_ok, new_ok, axis=-1))   # [B,1,G*T,L+T]

    last_axis = _shared(key + ("c3",), lambda: _ints(3))
    n_all = _shared(key + ("n_all", sliding, slots), lambda: op.Add(n_old, t_q))

    def bthd(x):         # [B,KV,G*T,D] -> [B,H,T,D] (free) -> [B,T,H,D]: the layer's output order
        return op.Transpose(op.Reshape(x, ohead), perm=[0, 2, 1, 3])

    def with_cache(bias):  # softmax over old and new keys together, fp32
        k_old, v_old = old_kv()
        qg = grouped_q()
        s_old = scores(qg, k_old)                             # [B,KV,G*T,L]
        s_new = scores(qg, k)                                 # [B,KV,G*T,T]
        probs = op.Softmax(op.Add(op.Concat(s_old, s_new, axis=-1), bias), axis=-1)
        p_old = op.Slice(probs, zero, n_old, last_axis)      # [B,KV,G*T,L]
        p_new = op.Slice(probs, n_old, n_all, last_axis)     # [B,KV,G*T,T]
        return bthd(op.Add(op.MatMul(p_old, f32(v_old)), op.MatMul(p_new, f32(v))))

    def chunk_only(bias):  # the chunk's own keys only: a first chunk
        probs = op.Softmax(op.Add(scores(grouped_q(), k), bias), axis=-1)
        return bthd(op.MatMul(probs, f32(v)))

    # a first chunk of text only, in an fp32 graph, that fits the cache: ONNX Runtime's fused
    # GroupQueryAttention (causal, and the window on sliding layers) on the chunk's q/k/v, which
    # also writes the chunk into the cache (module docstring)
    gqa_ok = q.dtype == _FLOAT and k_cache.dtype == _FLOAT
    if gqa_ok:
        seqlens = _shared(key + ("gqa_seqlens",), lambda: op.Cast(  # [B] int32: T - 1 per row
            op.Expand(op.Sub(t_q, one), op.Shape(image_groups, start=0, end=1)), to=ir.DataType.INT32))
        total = _shared(key + ("gqa_total",), lambda: op.Cast(t_scalar, to=ir.DataType.INT32))
        text = _shared(key + ("text",), lambda: op.Less(  # no image token in the chunk
            op.ReduceMax(image_groups, keepdims=0), op.Constant(value_int=0)))
        # slot = position for every token of a first chunk only while T <= S (sliding rings)
        gqa_first = _shared(key + ("gqa_first", slots), lambda: op.And(
            text, op.LessOrEqual(t_scalar, _int(slots))))

    def bsd(x, n, one_token=False):  # [B,n,T,D] -> [B,T,n*D], GQA's layout: the same bytes,
        # no copy, when n == 1 or T == 1 (for q, onnx_passes._late_q_transpose removes this
        # Transpose and the model's before it: q arrives as [B,T,H*D])
        if n > 1 and not one_token:
            x = op.Transpose(x, perm=[0, 2, 1, 3])
        return op.Reshape(x, _ints(0, -1, n * head_dim))

    def chunk_gqa():     # -> [B,T,H*D] (already the layer's output order, see `ctx` below) and
        # the caches: GQA's present outputs, the If's own (bound) outputs, i.e. the same
        # buffers as k_cache/v_cache, so it writes the chunk's slots 0..T-1 in place
        return _gqa_op()(bsd(q, heads), bsd(k, kv_heads), bsd(v, kv_heads), k_cache, v_cache,
                         seqlens, total, num_heads=heads, kv_num_heads=kv_heads,
                         scale=float(scale), local_window_size=window if sliding else -1)

    def first_bias():
        if not gqa_ok:
            return as_bias(chunk_ok())
        return _if(gqa_first, lambda: op.Constant(value_floats=[0.0]),  # unused by GQA
                   lambda: as_bias(chunk_ok()), "bias_first")

    def decode_bias():   # [B,1,G,L] over the cache after this step's write (T = 1)
        if sliding:      # slot s now holds p_s = start_b - ((start_b - s) mod S); < 0: empty
            s_idx = op.Range(_int(0), _int(slots), _int(1))  # [S]
            p = op.Sub(start_col, op.Mod(op.Sub(start_col, s_idx), _int(slots)))  # [B,S]
            ok = op.And(op.GreaterOrEqual(p, _int(0)),
                        op.Greater(p, op.Sub(start_col, _int(window))))
        else:            # slots 0..start_b, this step's key included
            j = op.Range(_int(0), op.Squeeze(n_dec, zero), _int(1))  # [L]
            ok = op.LessOrEqual(j, start_col)                # [B,L]
        return as_bias(op.Unsqueeze(ok, one))                # [B,1,L] -> [B,1,G,L]

    # What each step takes (see the module docstring): T == 1 (a decode step) writes its key
    # first and attends over the cache alone; otherwise a first chunk (every row at 0) attends
    # over the chunk only and any other chunk over cache + chunk, and then writes. The masks are
    # one `If` per layer kind (shared by the layers), the step one `If` per layer, whose outputs
    # are the attention product and the two caches.
    max_start = _shared(key + ("max_start",), lambda: op.ReduceMax(start, keepdims=0))  # scalar
    first = _shared(key + ("first",), lambda: op.Equal(max_start, op.Constant(value_int=0)))
    one_token = _shared(key + ("T==1",), lambda: op.Equal(t_scalar, _int(1)))
    if sliding and slots >= window:  # the slot a step overwrites held a position out of its window
        decode = one_token
    else:  # exact only while no position reaches S (past max_context, which the runtime refuses,
        # a full layer's cache wraps like a ring and its oldest slot is still visible)
        decode = _shared(key + ("decode", slots), lambda: op.And(
            one_token, op.Less(max_start, _int(slots))))
    # a full layer's decode step in an fp32 graph: GroupQueryAttention over the cache (module
    # docstring); seqlens_k is start_b per row (the step's key lands at slot start_b) and the
    # total length max(start) + 1
    gqa_dec = gqa_ok and not sliding
    if gqa_dec:
        dec_seqlens = _shared(key + ("dec_seqlens",), lambda: op.Cast(start, to=ir.DataType.INT32))
        dec_total = _shared(key + ("dec_total",), lambda: op.Cast(
            op.Add(max_start, op.Constant(value_int=1)), to=ir.DataType.INT32))
    elif not sliding:
        n_dec = _shared(key + ("n_dec",), lambda: op.Add(n_old, one))  # [1] max(start) + 1

    def step_bias():     # GQA's decode step needs none
        return op.Constant(value_floats=[0.0]) if gqa_dec else decode_bias()
    bias = _shared(key + ("bias", window, slots, groups, gqa_dec, gqa_ok), lambda: _if(
        decode, step_bias, lambda: _if(first, first_bias, make_bias, "bias_chunk"), "bias"))

    # ---- the write ---------------------------------------------------------------------------
    # Slots and indices are shared by the layers with the same S (made here, before the If).
    # In a chunk, what makes the write wait for the attention is the update slice: its end is
    # Shape of this layer's attention product (dim 1 of [B,T,H,D], or of GQA's [B,T,H*D]: T),
    # so ScatterND's `updates` input depends on ctx. Its
    # start -S keeps the last min(T, S) rows (a negative start below -T is clamped to 0). A decode
    # step writes first: its key goes to slot start mod S, which held position start - S, outside
    # every window (sliding) or nothing (full), so no read of this step needs the old slot.
    first_w = _shared(key + ("-S", slots), lambda: _ints(-slots))

    def make_indices():
        n = op.Min(t_q, _ints(slots))
        first = op.Sub(t_q, n)
        pos = op.Add(start_col, op.Range(op.Squeeze(first, zero), t_scalar, _int(1)))  # [B,n]
        slot = op.Mod(pos, _int(slots))                       # [B,n]: each row from its start
        b_dim = op.Shape(image_groups, start=0, end=1)
        idx_shape = op.Concat(b_dim, _ints(kv_heads), n, one, axis=0)
        b_idx = op.Reshape(op.Range(_int(0), op.Squeeze(b_dim, zero), _int(1)),
                           _ints(-1, 1, 1, 1))
        h_idx = op.Reshape(op.Range(_int(0), _int(kv_heads), _int(1)), _ints(1, -1, 1, 1))
        s_idx4 = op.Unsqueeze(slot, _ints(1, 3))              # [B,1,n,1]
        return op.Concat(op.Expand(b_idx, idx_shape), op.Expand(h_idx, idx_shape),
                         op.Expand(s_idx4, idx_shape), axis=-1)  # [B,KV,n,3]

    indices = _shared(key + ("indices", slots, kv_heads), make_indices)

    def write(k_upd, v_upd):
        if k.dtype != k_cache.dtype:
            k_upd = op.Cast(k_upd, to=k_cache.dtype)
            v_upd = op.Cast(v_upd, to=v_cache.dtype)
        return op.ScatterND(k_cache, indices, k_upd), op.ScatterND(v_cache, indices, v_upd)

    def decode_gqa():    # a full layer's step: GQA over the cache itself, written in place
        # [B,1,H*D], which the Reshape after the If reads as [B,1,H,D]; the caches come back
        # as GQA's present outputs, i.e. the If's own (bound) outputs: the same buffers as
        # k_cache/v_cache, which GQA detects and then writes slot start_b only
        return _gqa_op()(bsd(q, heads, True), bsd(k, kv_heads, True), bsd(v, kv_heads, True),
                         k_cache, v_cache, dec_seqlens, dec_total, num_heads=heads,
                         kv_num_heads=kv_heads, scale=float(scale), local_window_size=-1)

    def decode_step():
        k_new, v_new = write(k, v)
        if sliding:
            k_all, v_all = k_new, v_new                       # [B,KV,S,D]
        else:
            k_all = op.Slice(k_new, zero, n_dec, axis2)       # [B,KV,L,D], L = max(start) + 1
            v_all = op.Slice(v_new, zero, n_dec, axis2)
        probs = op.Softmax(op.Add(scores(grouped_q(), k_all), bias), axis=-1)
        return op.MatMul(probs, f32(v_all)), k_new, v_new     # [B,KV,G,D]

    three = (_FLOAT, k_cache.dtype, v_cache.dtype)

    def then_write(read):  # a chunk path that reads (the attention), then writes the chunk
        def path():
            ctx = read()
            end_w = op.Shape(ctx, start=1, end=2)            # [1] T, after attention
            return (ctx, *write(op.Slice(k, first_w, end_w, axis2),   # [B,KV,n,D]
                                op.Slice(v, first_w, end_w, axis2)))
        return path

    def first_chunk():
        if not gqa_ok:
            return then_write(lambda: chunk_only(bias))()
        return _if(gqa_first, chunk_gqa, then_write(lambda: chunk_only(bias)),
                   FIRST_CHUNK_GQA_BRANCH.removesuffix("_then"), dtypes=three)

    def chunk_step():
        return _if(first, first_chunk, then_write(lambda: with_cache(bias)), "attention",
                   dtypes=three)

    ctx, k_new, v_new = _if(decode, decode_gqa if gqa_dec else decode_step, chunk_step,
                            DECODE_BRANCH.removesuffix("_then"), dtypes=three)
    # ctx is in the order the layer's o_proj reads, [B,T,H,D] (or [B,T,H*D] from GQA, or, in a
    # decode step, [B,KV,G,D], the same bytes when T = 1), so that the Transpose to the op's
    # [B,H,T,D] below meets the model's own transpose back (Attention.forward) and
    # onnx_passes._cancel_transposes removes both: no copy of the output on the GQA paths.
    out = op.Reshape(ctx, _shared(key + ("oshape", heads, head_dim),
                                  lambda: _ints(0, -1, heads, head_dim)))  # [B,T,H,D]
    if q.dtype != _FLOAT:
        out = op.Cast(out, to=q.dtype)
    return op.Transpose(out, perm=[0, 2, 1, 3]), k_new, v_new  # [B,H,T,D]

TRANSLATION_TABLE = {torch.ops.g3.attention.default: g3_attention}


def cache_writes_ordered(model_path: str) -> dict[str, bool]:
    """For an ONNX file (e.g. ORT's optimized model): for every node that writes a cache input
    (`past_*`, which the runtime binds to the same buffer as its `present_*`, so the write is in
    place: a ScatterND, or a GroupQueryAttention reading it as past; `_cache_writes`), in
    whichever graph it sits (the main graph or an `If` branch, recursively), whether
    every other node of that graph that reads the same cache (directly, or from its own branches
    by outer scope, as ONNX Runtime's planner counts an `If`'s inputs) is one of its ancestors,
    i.e. runs before it. A decode step's branch, which reads only what its ScatterND wrote (or
    whose GroupQueryAttention is the only reader), and a first chunk's GQA branch, pass
    trivially; the other chunk branches pass by the update slice's dependency on the attention. Keyed by the writer's output name."""
    import onnx

    m = onnx.load(model_path, load_external_data=False)
    caches = {i.name for i in m.graph.input if i.name.startswith("past_")}
    result: dict[str, bool] = {}

    def visit(g) -> None:
        producer = {o: n for n in g.node for o in n.output}
        inputs = {id(n): list(n.input) + sorted(_outer_scope_names(n)) for n in g.node}
        for node in g.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)
        for node, cache, written in _cache_writes(g, caches):
            seen: set[int] = set()
            stack = [i for i in inputs[id(node)] if i]
            while stack:  # the writer's ancestors in this graph
                p = producer.get(stack.pop())
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    stack.extend(i for i in inputs[id(p)] if i)
            readers = [n for n in g.node if n is not node and cache in inputs[id(n)]]
            result[written] = all(id(r) in seen for r in readers)

    visit(m.graph)
    return result


def _cache_writes(g, caches: set[str]):
    """(node, cache input, output name) for each in-place write of a cache in graph g: a
    ScatterND on it, or a GroupQueryAttention with it as past_key/past_value (its present
    output is the same buffer: a full layer's decode step)."""
    for node in g.node:
        if node.op_type == "ScatterND" and node.input[0] in caches:
            yield node, node.input[0], node.output[0]
        elif node.op_type == "GroupQueryAttention":
            for i in (3, 4):
                if len(node.input) > i and node.input[i] in caches:
                    yield node, node.input[i], node.output[i - 2]


def _outer_scope_names(node) -> set[str]:
    """Names a node's subgraphs (If branches, recursively) read from the enclosing scopes."""
    used: set[str] = set()
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            made = {o for n in g.node for o in n.output} | {i.name for i in g.initializer}
            for n in g.node:
                used |= {i for i in n.input if i and i not in made}
                used |= _outer_scope_names(n) - made
    return used


__all__ = ["g3_attention", "TRANSLATION_TABLE", "reset_shared", "cache_writes_ordered",
           "DECODE_BRANCH", "FIRST_CHUNK_GQA_BRANCH"]
