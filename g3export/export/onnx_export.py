"""Export the text component of Gemma 3 to ONNX (DESIGN §3.4): torch.export → ONNX with the
attention op translated for ONNX Runtime (g3export.export.onnx_attention), weights written tensor
by tensor as external data (one `text.onnx` + one `text.onnx.data`).

The text component's I/O contract (`text_io()` builds it; the manifest stores it):

    name               dtype            shape                      notes
    -----------------  ---------------  -------------------------  ---------------------------------
    input_ids          int64            [batch, seq]               a chunk of T >= 1 tokens
    start_pos          int64            [1]                        absolute position of input_ids[:,0]
    image_features     model dtype      [image_tokens, hidden]     only if exported with images=True:
                                                                   rows for the chunk's image soft
                                                                   tokens in order (text-only graphs
                                                                   do not have this input)
    past_key_{i}       model dtype      [batch, KV, S_i, D]        layer i, S_i = max_context (full)
    past_value_{i}     model dtype      [batch, KV, S_i, D]        or W (sliding ring), i = 0..L-1
    -----------------  ---------------  -------------------------  ---------------------------------
    logits             float32          [batch, 1, V]              last position ([batch, seq, V]
                                                                   when exported with all_logits)
    present_key_{i}    model dtype      [batch, KV, S_i, D]        aliases past_key_{i}
    present_value_{i}  model dtype      [batch, KV, S_i, D]        aliases past_value_{i}

"model dtype" is fp32 (CPU), fp16 or bf16 (GPU); the model is cast before export. Logits are
always float32 (cast in the graph) so sampling is dtype-independent. `present_*` alias `past_*`:
the runtime binds one buffer to both and the graph writes the chunk into it in place (ScatterND,
see onnx_attention for why that is ordered after every read). Cache slot rule: slot = position
mod S_i (g3export.modeling.cache).

Graph details that matter for memory and speed (the passes run in this order after export):
* `_tie_lm_head`: the tied 262144-row embedding is ONE initializer, stored transposed as
  [1, hidden, vocab]: `Gather(axis=2)` reads it for the lookup and the lm_head is a `MatMul` on
  it. The 3-D shape keeps ORT from pre-packing it; MLAS's unpacked single-row kernel streams it
  faster (0.85x the time of the packed `Gemm(transB=1)` it replaced, benchmarks/lm_head.py).
* `_fold_weight_transposes`: the other Linear weights come out of torch.onnx as
  `MatMul(x, Transpose(W))`; W^T is stored as the initializer (lazily, at write time) so ORT has
  nothing to fold and no weight is transposed at session start.
* `_fuse_rms_norm`: Gemma's RMSNorm (7 nodes) -> SimplifiedLayerNormalization.
* For the ONNX Runtime translation only (the TensorRT graphs keep standard ONNX):
  `_fuse_rotary` turns RoPE (7 nodes, twice per layer) into com.microsoft.RotaryEmbedding,
  `_fuse_sibling_matmuls` makes q/k/v and gate/up one MatMul each on weights concatenated along
  N (initializer named "a.T+b.T+...", which verify splits back), followed by a Split, and
  `_fuse_skip_norm` folds each residual Add into the following norm
  (com.microsoft.SkipSimplifiedLayerNormalization). With these and the attention translation's
  shared additive mask, the 270M's decode step is ~880 ORT kernels instead of ~1170, and
  measured side by side on 2 vCPUs its decode went from 0.91-1.02x to 1.09-1.22x ONNX Runtime
  GenAI's (BENCHMARKS.md section 1).
* The onnxscript optimizer is NOT run: on the tiny model it adds ~16 s to the export, and all it
  does that matters here is done by the passes above; ORT applies its own graph optimizations
  (ORT_ENABLE_ALL) at session start. The passes are hand-written on onnx_ir because each is a
  fixed pattern of our own exporter's output, checked by tests (test_graph_passes_applied) and
  by the parity tests; onnxscript's rewriter would need the same patterns spelled out.
* IR version 10 (opset 20): onnx 1.23 would write IR 14, which onnxruntime does not read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from ..modeling.cache import kv_layout
from ..modeling.config import ModelConfig
from ..modeling.text import Gemma3Model
from .onnx_attention import TRANSLATION_TABLE, reset_shared

OPSET = 20
IR_VERSION = 10  # what onnxruntime >= 1.18 reads; onnx 1.23 defaults to 14
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def ir_version_for(opset: int) -> int:
    """The lowest IR version that allows `opset` (onnx's VERSION_TABLE), at least IR_VERSION:
    onnxruntime rejects newer IR versions than it knows, and onnx 1.23 writes 14."""
    return max(IR_VERSION, {23: 11, 24: 12, 25: 13}.get(opset, IR_VERSION if opset <= 22 else 13))


# ---------------------------------------------------------------------------------------------
# The I/O contract, as data


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                          # numpy-style name: int64, float32, float16, bfloat16
    shape: tuple[int | str, ...]        # str = symbolic dim
    aliases: str | None = None          # output only: the input whose buffer it shares

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "aliases": self.aliases}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]), d.get("aliases"))


@dataclass(frozen=True)
class ComponentIO:
    """One component's graph: its file and its inputs/outputs (names, dtypes, symbolic shapes,
    which output aliases which input)."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "options": dict(self.options),
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ComponentIO":
        return cls(d["name"], d["file"], tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]), dict(d.get("options", {})))


def text_io(cfg: ModelConfig, max_context: int, dtype: str = "fp32", all_logits: bool = False,
            images: bool = False, batch: int | None = None, file: str = "text.onnx") -> ComponentIO:
    """The text component's contract (see the module docstring). batch=None: symbolic."""
    t = cfg.text
    b: int | str = "batch" if batch is None else batch
    mdt = ONNX_DTYPE_NAMES[dtype]
    layout = kv_layout(t, max_context, 1, dtype)
    inputs = [TensorSpec("input_ids", "int64", (b, "seq")), TensorSpec("start_pos", "int64", (1,))]
    if images:
        inputs.append(TensorSpec("image_features", mdt, ("image_tokens", t.hidden_size)))
    outputs = [TensorSpec("logits", "float32", (b, "seq" if all_logits else 1, t.vocab_size))]
    for lc in layout.layers:
        shape = (b, *lc.shape[1:])
        for past in (lc.k_name, lc.v_name):
            inputs.append(TensorSpec(past, mdt, shape))
            outputs.append(TensorSpec(past.replace("past_", "present_"), mdt, shape, aliases=past))
    return ComponentIO("text", file, tuple(inputs), tuple(outputs),
                       {"all_logits": all_logits, "images": images, "opset": OPSET})


# ---------------------------------------------------------------------------------------------
# The module that torch.export sees


class TextComponent(nn.Module):
    """Flat I/O wrapper: (input_ids, start_pos, [image_features,] *caches) -> (logits, *caches)."""

    def __init__(self, model: Gemma3Model, images: bool = False):
        super().__init__()
        self.model = model
        self.images = images

    def forward(self, input_ids, start_pos, *rest):
        if self.images:
            image_features, caches = rest[0], list(rest[1:])
        else:
            image_features, caches = None, list(rest)
        logits, new = self.model(input_ids, start_pos, caches, image_features)
        return (logits.float(), *new)


def export_text(model: Gemma3Model, out_dir: str | Path, max_context: int, dtype: str = "fp32",
                all_logits: bool = False, images: bool = False, dynamic_batch: bool = True,
                progress: bool = True, file: str = "text.onnx",
                translation_table: dict | None = None, opset: int = OPSET,
                quant: Any = None) -> ComponentIO:
    """Export the text component to `out_dir/file` (+ `file`.data). Returns its ComponentIO.

    The model is cast to `dtype` IN PLACE (the build owns it); its all_logits flag is set for the
    export and restored afterwards. translation_table/opset: another translation of g3.attention
    (default: this package's ONNX Runtime one, opset 20). quant: a weight-only
    g3export.export.quantize.QuantScheme, applied last (g3export.export.onnx_quant).
    """
    out_dir = Path(out_dir)
    cfg = model.config
    io = text_io(cfg, max_context, dtype, all_logits, images, None if dynamic_batch else 1, file)
    io.options["opset"] = opset
    torch_dtype = TORCH_DTYPES[dtype]
    model.to(torch_dtype).eval()
    layout = kv_layout(cfg.text, max_context, 1, dtype)
    caches = [torch.zeros(lc.shape, dtype=torch_dtype) for lc in layout.layers for _ in "kv"]
    ids = torch.zeros(1, 3, dtype=torch.int64)
    start = torch.zeros(1, dtype=torch.int64)
    args: list[Any] = [ids, start]
    batch = torch.export.Dim("batch", min=1, max=1024) if dynamic_batch else None
    seq = torch.export.Dim("seq", min=1, max=max_context)
    ds: list[Any] = [{0: batch, 1: seq} if batch else {1: seq}, None]
    rest_ds: list[Any] = []  # forward(input_ids, start_pos, *rest): one spec for the varargs tuple
    if images:
        img_tokens = torch.export.Dim("image_tokens", min=1, max=max_context)
        args.append(torch.zeros(2, cfg.text.hidden_size, dtype=torch_dtype))
        rest_ds.append({0: img_tokens})
    args.extend(caches)
    rest_ds.extend({0: batch} if batch else None for _ in caches)
    ds.append(tuple(rest_ds))

    old = model.all_logits
    model.all_logits = all_logits
    reset_shared()
    try:
        with _quiet():
            prog = torch.onnx.export(
                TextComponent(model, images), tuple(args), dynamo=True, dynamic_shapes=tuple(ds),
                custom_translation_table=translation_table or TRANSLATION_TABLE, optimize=False,
                opset_version=opset,
                input_names=[t.name for t in io.inputs], output_names=[t.name for t in io.outputs],
                verbose=False)
    finally:
        model.all_logits = old
        reset_shared()
    m = prog.model
    embed = model.language_model.embed_tokens.weight
    _tie_lm_head(m, embed)
    _fold_weight_transposes(m)
    _fuse_rms_norm(m)
    for_ort = translation_table is None or translation_table is TRANSLATION_TABLE
    if for_ort:
        _fuse_rotary(m)  # an ONNX Runtime contrib op: only in graphs for ONNX Runtime
        _fuse_sibling_matmuls(m)
        _fuse_skip_norm(m)
    if quant is not None:
        from .onnx_quant import quantize_graph

        io.options["quantization"] = quantize_graph(m, quant, "ort" if for_ort else "dq")
        opset = io.options["opset"] = m.opset_imports[""]  # blocked DQ raises it to 21
    _drop_unused_initializers(m)
    _strip_metadata(m)
    m.ir_version = ir_version_for(opset)
    _check_io(m, io)
    save_with_external_data(m, out_dir / file, progress=progress)
    return io


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """`new` replaces `old` everywhere (graph outputs too) and takes its name, shape and type, so
    the graph's I/O names stay those of the contract; `old` is renamed out of the way."""
    new.shape, new.type = old.shape, old.type
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = f"{name}_replaced"
    new.name = name


class _quiet:
    """Silence torch.onnx's progress prints (we show our own) and its registry's log lines about
    torchvision ops, which have nothing to do with Gemma."""

    _LOGGER = "torch.onnx._internal.exporter._registration"

    def __enter__(self):
        import contextlib
        import io as _io
        import logging
        import warnings

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(_io.StringIO()))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        logger = logging.getLogger(self._LOGGER)
        level = logger.level
        logger.setLevel(logging.ERROR)
        self._stack.callback(logger.setLevel, level)
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def _check_io(m: ir.Model, io: ComponentIO) -> None:
    got_in = [v.name for v in m.graph.inputs]
    got_out = [v.name for v in m.graph.outputs]
    want_in = [t.name for t in io.inputs]
    want_out = [t.name for t in io.outputs]
    if got_in != want_in or got_out != want_out:
        raise RuntimeError(f"exported graph I/O {got_in} -> {got_out} does not match the contract "
                           f"{want_in} -> {want_out}")


# ---------------------------------------------------------------------------------------------
# Graph passes


def _add_initializer(g: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    """Register `tensor` (concrete or lazy) as an initializer named like it; return its Value."""
    v = ir.Value(name=tensor.name, const_value=tensor, shape=ir.Shape(tensor.shape),
                 type=ir.TensorType(tensor.dtype))
    g.register_initializer(v)
    return v


def _int64_initializer(g: ir.Graph, name: str, values: list[int]) -> ir.Value:
    return _add_initializer(g, ir.tensor(np.asarray(values, dtype=np.int64), name=name))


def _find_initializer(m: ir.Model, tensor: torch.Tensor) -> ir.Value:
    for v in m.graph.initializers.values():
        cv = v.const_value
        raw = getattr(cv, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.data_ptr() == tensor.data_ptr() \
                and tuple(raw.shape) == tuple(tensor.shape):
            return v
    raise RuntimeError("the embedding weight is not an initializer of the exported graph")


def _tie_lm_head(m: ir.Model, embed: torch.Tensor) -> None:
    """Store the tied embedding once, as E^T of shape [1, hidden, vocab], for both of its uses:

        Gather(E, ids)          -> Squeeze(Transpose(Gather(E^T, ids, axis=2), [2, 3, 1, 0]), 3)
        MatMul(x, Transpose(E)) -> Reshape(MatMul(Reshape(x, [1, -1, hidden]), E^T), [..., vocab])

    Why this layout (measured on ONNX Runtime 1.32's CPU, 2 threads, 270M:
    benchmarks/lm_head.py): a 2-D constant MatMul/Gemm weight is pre-packed by MLAS at session
    start, and for one row (decode) the packed GEMM streams the 671 MB lm_head slower than
    MLAS's unpacked single-row kernel, which runs when the weight is 3-D (ORT pre-packs only 2-D
    weights): 24.2 vs 28.6 ms median. The lm_head is the largest read of a 270M decode step. The
    other Linear weights stay 2-D: for their sizes (0.6-5 MB) the packed path measured faster,
    at one row and at 512. x is flattened to [1, B*T, hidden] so a batch reads the weight once.
    The lookup gathers `hidden` strided elements per token (cheap). torch.onnx's own form,
    MatMul(x, Transpose(E)), would make ORT's constant folding store a second, transposed copy
    of the embedding (1 GiB at 12B bf16).
    """
    e = _find_initializer(m, embed)
    vocab, hidden = embed.shape
    g = m.graph
    raw = e.const_value.raw
    name = e.name + ".T"
    lazy = ir.LazyTensor(lambda: ir.tensor(raw.detach().t().contiguous().unsqueeze(0)),
                         dtype=e.const_value.dtype, shape=ir.Shape([1, hidden, vocab]), name=name)
    et = _add_initializer(g, lazy)
    const = functools.partial(_int64_initializer, g)

    n_lookup = n_head = 0
    for node, idx in list(e.uses()):
        axis = node.attributes.get("axis")
        if node.op_type == "Gather" and idx == 0 and (axis is None or axis.value == 0):
            gather = ir.node("Gather", [et, node.inputs[1]], attributes={"axis": 2})  # [1,H,B,T]
            tr = ir.node("Transpose", [gather.outputs[0]], attributes={"perm": [2, 3, 1, 0]})
            sq = ir.node("Squeeze", [tr.outputs[0], const(f"{node.name}_axis3", [3])])  # [B,T,H]
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
            x, y = mm.inputs[0], mm.outputs[0]
            n_flat = ir.node("Reshape", [x, const(f"{mm.name}_flat_shape", [1, -1, hidden])])
            n_mm = ir.node("MatMul", [n_flat.outputs[0], et])                   # [1, B*T, V]
            n_lead = ir.node("Shape", [x], attributes={"start": 0, "end": -1})
            n_shape = ir.node("Concat", [n_lead.outputs[0], const(f"{mm.name}_vocab_dim", [vocab])],
                              attributes={"axis": 0})
            n_out = ir.node("Reshape", [n_mm.outputs[0], n_shape.outputs[0]])
            g.insert_before(mm, [n_flat, n_mm, n_lead, n_shape, n_out])
            _take_over(y, n_out.outputs[0])
            g.remove(mm, safe=True)
            n_head += 1
        g.remove(node, safe=True)
    if (n_lookup, n_head) != (1, 1):
        raise RuntimeError(f"expected one embedding lookup and one lm_head MatMul on the "
                           f"embedding, rewrote {n_lookup} and {n_head}")
    g.initializers.pop(e.name)


def _fold_weight_transposes(m: ir.Model) -> None:
    """Transpose(W) of a 2-D initializer used only there -> initializer W^T (computed lazily)."""
    g = m.graph
    for v in list(g.initializers.values()):
        uses = list(v.uses())
        if len(uses) != 1 or uses[0][0].op_type != "Transpose" or v.const_value is None:
            continue
        tr = uses[0][0]
        perm = tr.attributes.get("perm")
        if len(v.shape) != 2 or perm is None or tuple(perm.value) != (1, 0):
            continue
        raw = getattr(v.const_value, "raw", None)
        if not isinstance(raw, torch.Tensor):
            continue
        out = tr.outputs[0]
        name = v.name + ".T"
        lazy = ir.LazyTensor(_transposer(raw), dtype=v.const_value.dtype,
                             shape=ir.Shape([raw.shape[1], raw.shape[0]]), name=name)
        nv = _add_initializer(g, lazy)
        ir.convenience.replace_all_uses_with(out, nv)
        g.remove(tr, safe=True)
        g.initializers.pop(v.name)


def _fuse_sibling_matmuls(m: ir.Model) -> int:
    """MatMuls of one input by different 2-D weights (q/k/v projections; gate/up) -> one MatMul by
    the weights concatenated along N, then a Split. Fewer, larger GEMMs: on a CPU decode step every
    MatMul is a thread-pool dispatch over a few MB of weights. The fused initializer is named by its
    parts joined with "+" (in order), so readers of the build (verify) can split it back.
    Returns the number of MatMuls removed."""
    g = m.graph
    removed = 0
    for x in [v for n in g for v in n.outputs]:
        group = []
        for node, idx in x.uses():
            w = node.inputs[1] if node.op_type == "MatMul" and idx == 0 else None
            if w is not None and w.const_value is not None and w.shape is not None \
                    and len(w.shape) == 2 and len(list(w.uses())) == 1 and w.name in g.initializers:
                group.append((node, w))
        if len(group) < 2 or len({w.const_value.dtype for _, w in group}) != 1 \
                or len({w.shape[0] for _, w in group}) != 1:
            continue
        order = {id(n): i for i, n in enumerate(g)}
        group.sort(key=lambda nw: order[id(nw[0])])
        weights = [w for _, w in group]
        widths = [w.shape[1] for w in weights]
        parts = [w.const_value for w in weights]
        name = "+".join(w.name for w in weights)
        lazy = ir.LazyTensor(lambda parts=parts: ir.tensor(
            np.concatenate([p.numpy() for p in parts], axis=1)), dtype=parts[0].dtype,
            shape=ir.Shape([weights[0].shape[0], sum(widths)]), name=name)
        fw = _add_initializer(g, lazy)
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


def _fuse_rotary(m: ir.Model) -> int:
    """x * cos + rotate_half(x) * sin  ->  com.microsoft.RotaryEmbedding(x, [0], cos_h, sin_h).

    torch.export writes RoPE (Attention.forward) as Slice, Slice, Neg, Concat, Mul, Mul, Add: per
    layer twice (q and k), 12 of a layer's ~60 ORT kernels, each costing a dispatch on a CPU
    decode step. ONNX Runtime's contrib RotaryEmbedding (CPU and CUDA, interleaved=0 is the
    rotate-half form) does it in one. Its input is x [B, heads, T, D]; position_ids of shape [1]
    means positions p0 + t, so with p0 = 0 and caches = the chunk's own cos/sin rows
    ([T, D/2]: the first half of the model's [T, D] cos/sin, whose two halves are equal), it
    computes exactly the model's expression. Only emitted for the ONNX Runtime translation.
    Returns the number of rotations fused.
    """
    g = m.graph
    halves: dict[int, ir.Value] = {}
    zero: list[ir.Value] = []
    const = functools.partial(_int64_initializer, g)

    def first_half(v: ir.Value, half: int) -> ir.Value:
        if id(v) not in halves:  # one Slice per cos/sin table, shared by the layers
            sl = ir.node("Slice", [v, const(f"{v.name}_h0", [0]), const(f"{v.name}_h1", [half]),
                                   const(f"{v.name}_hax", [-1])])
            g.insert_after(v.producer(), sl)
            halves[id(v)] = sl.outputs[0]
        return halves[id(v)]

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
        if not zero:
            zero.append(const("rotary_position_0", [0]))
        rot = ir.node("RotaryEmbedding",
                      [x, zero[0], first_half(cos, h), first_half(sin, h)],
                      attributes={"interleaved": 0}, domain="com.microsoft")
        y = add.outputs[0]
        g.insert_before(add, rot)
        _take_over(y, rot.outputs[0])
        for dead in (add, mul_c, mul_s, cat, neg, lo, hi):
            g.remove(dead, safe=True)
        fused += 1
    if fused:
        m.opset_imports["com.microsoft"] = 1
    return fused


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


def _transposer(t: torch.Tensor) -> Callable[[], ir.TensorProtocol]:
    return lambda: ir.tensor(t.detach().t().contiguous())


# ---------------------------------------------------------------------------------------------
# Writing


def save_with_external_data(m: ir.Model, path: str | Path, progress: bool = True,
                            align_large: int = 65536, large: int = 1 << 20,
                            inline_below: int = 1024) -> None:
    """Write every initializer, one at a time, into `path`.data and the graph into `path`.

    Tensors of `large` bytes or more start at a multiple of `align_large` (page/allocation
    granularity, so ONNX Runtime can memory-map them); the rest at a multiple of 64.
    """
    from tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    inits = list(m.graph.initializers.values())
    total = sum(v.const_value.nbytes for v in inits if v.const_value is not None)
    # (the progress total counts the few inline bytes too; they are negligible)
    offset = 0
    with open(path.parent / data_name, "wb") as f, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"writing {data_name}",
            disable=not progress, leave=False) as bar:
        for v in inits:
            t = v.const_value
            if t is None or t.nbytes < inline_below or t.dtype == ir.DataType.INT64:
                continue  # shape constants stay inline: ORT's shape inference reads them
            data = t.tobytes()
            align = align_large if len(data) >= large else 64
            pad = (-offset) % align
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            f.write(data)
            v.const_value = ir.ExternalTensor(data_name, offset, len(data), t.dtype, shape=t.shape,
                                              name=v.name, base_dir=path.parent)
            offset += len(data)
            bar.update(len(data))
            del data
        f.flush()
        os.fsync(f.fileno())
    ir.save(m, path)


def initializer_bytes(onnx_path: str | Path) -> dict[str, int]:
    """name -> bytes of every initializer of an ONNX file (without loading external data)."""
    import onnx

    mp = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for t in mp.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            out[t.name] = int(ext["length"])
        else:
            out[t.name] = len(t.raw_data) if t.raw_data else len(onnx.numpy_helper.to_array(t).tobytes())
    return out


def iter_initializers(onnx_path: str | Path) -> Iterable[tuple[str, Any]]:
    """(name, numpy array) of every initializer, external data loaded lazily one at a time."""
    m = ir.load(str(onnx_path))
    for name, v in m.graph.initializers.items():
        yield name, v.const_value.numpy()
