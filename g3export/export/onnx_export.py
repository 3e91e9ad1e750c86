"""Export the text component of Gemma 3 to ONNX (DESIGN §3.4): torch.export → ONNX with the
attention op translated for ONNX Runtime (g3export.export.onnx_attention), weights streamed into
external data (one `text.onnx` + one `text.onnx.data`).

Weights stream (DESIGN §3.6): the model may be on the meta device. It is traced with every
parameter a placeholder; each initializer then gets a recipe naming its source tensor
(`weights`, a WeightSource; or the model's own tensors when it is materialised), the graph
passes (g3export.export.onnx_passes) compose layout changes into the recipes, and
g3export.export.stream writes them block by block, hashed as written. A build's memory does not
grow with the model.

The text component's I/O contract (`text_io()` builds it; the manifest stores it):

    name               dtype            shape                      notes
    -----------------  ---------------  -------------------------  ---------------------------------
    input_ids          int64            [batch, seq]               a chunk of T >= 1 tokens
    start_pos          int64            [batch]                    absolute position of input_ids[b,0]:
                                                                   one per row, rows are independent
                                                                   sequences (DESIGN §3.3)
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

"model dtype" is fp32 (CPU), fp16 or bf16 (GPU); the model is cast before export (weights are
cast as they stream). Logits are
always float32 (cast in the graph) so sampling is dtype-independent. `present_*` alias `past_*`:
the runtime binds one buffer to both and the graph writes the chunk into it in place (ScatterND,
or GroupQueryAttention's present outputs; see onnx_attention for why that is ordered after
every read). Cache slot rule: slot = position
mod S_i (g3export.modeling.cache).

Graph details that matter for memory and speed (the passes run in this order after export):
* `_tie_lm_head`: the tied 262144-row embedding is ONE initializer, stored transposed as
  [1, hidden, vocab]: `Gather(axis=2)` reads it for the lookup and the lm_head is a `MatMul` on
  it, on the token rows [B, T, hidden] as they come (no Reshape around it, whose copy of the
  logits into the bound output buffer was 1 MB per 270M decode step). The 3-D shape keeps ORT
  from pre-packing it; MLAS's unpacked single-row kernel streams it
  faster (0.85x the time of the packed `Gemm(transB=1)` it replaced, benchmarks/lm_head.py).
  ONNX Runtime graphs only: TensorRT targets export with tie_lm_head=False and keep torch.onnx's
  [vocab, hidden] form, which TensorRT stores once (this layout twice; g3export.export.trt.graph).
  Last (after quantization), a float lm_head becomes an `If` on the row count: the 3-D weight
  for one row, a 2-D view of the same bytes (pre-packed by ORT) for a batched decode step
  (g3export.export.onnx_lm_head: at 8 rows the 3-D weight is 3x slower), and a quantized one a
  MatMulNBits (g3export.export.onnx_quant), which takes the B*T rows in one GEMM. After it,
  `_lookup_by_gather_elements` turns a float lookup's Gather into a GatherElements of the same
  elements, which ONNX Runtime's CPU runs in less than half the time (its docstring).
* `_fold_weight_transposes`: the other Linear weights come out of torch.onnx as
  `MatMul(x, Transpose(W))`; W^T is stored as the initializer (lazily, at write time) so ORT has
  nothing to fold and no weight is transposed at session start.
* `_fuse_rms_norm`: Gemma's RMSNorm (7 nodes) -> SimplifiedLayerNormalization.
* For the ONNX Runtime translation only (the TensorRT graphs keep standard ONNX):
  `_fuse_rotary` turns RoPE (7 nodes, twice per layer) into com.microsoft.RotaryEmbedding
  reading constant cos/sin tables of max_context positions at the model's positions (no RoPE
  work per step; four tables of max_context x head_dim/2: 17 MB in fp32 at 8192 positions),
  `_late_q_transpose` keeps q in [B, T, H, D] through its norm and RoPE so that only the
  attention branches that want [B, H, T, D] transpose it (not the first chunk's GQA, which wants
  [B, T, H*D], nor a decode step, where T = 1 makes the two the same bytes),
  `_rotary_into_gqa` lets a first chunk's GroupQueryAttention rotate q and k itself and moves
  each RotaryEmbedding into the If branches that still read its output, so a first chunk runs
  none,
  `_fuse_sibling_matmuls` makes q/k/v (and, in quantized graphs, gate/up: its docstring says
  why not in float ones) one MatMul each on weights concatenated along N (initializer named
  "a.T+b.T+...", which verify splits back), followed by a Split, and
  `_fuse_skip_norm` folds each residual Add into the following norm
  (com.microsoft.SkipSimplifiedLayerNormalization). With these and the attention translation's
  shared additive mask, the 270M's decode step is ~880 ORT kernels instead of ~1170, and
  measured side by side on 2 vCPUs its decode went from 0.91-1.02x to 1.09-1.22x ONNX Runtime
  GenAI's (BENCHMARKS.md section 1). Then `_cancel_transposes` removes the Transpose pair
  around each attention output (the translation returns o_proj's order, onnx_attention),
  `_unit_transposes_to_reshape` turns transposes of size-1 axes into Reshapes and
  `_merge_reshapes` folds the Reshape chains these leave.
* The onnxscript optimizer is NOT run: on the tiny model it adds ~16 s to the export, and all it
  does that matters here is done by the passes above; ORT applies its own graph optimizations
  (ORT_ENABLE_ALL) at session start. The passes are hand-written on onnx_ir because each is a
  fixed pattern of our own exporter's output, checked by tests (test_graph_passes_applied) and
  by the parity tests; onnxscript's rewriter would need the same patterns spelled out.
* IR version 10 (opset 20): onnx 1.23 would write IR 14, which onnxruntime does not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import onnx_ir as ir
import torch
from torch import nn

from ..modeling.cache import kv_layout
from ..modeling.config import ModelConfig
from ..modeling.sources import TensorSource, WeightSource
from ..modeling.text import Gemma3Model
from .graph_io import OPSET, ComponentIO, TensorSpec, text_io
from .onnx_attention import TRANSLATION_TABLE, reset_shared
from .onnx_passes import (_cancel_transposes, _drop_unused_initializers, _fold_weight_transposes,
                          _fuse_rms_norm, _fuse_rotary, _fuse_sibling_matmuls, _fuse_skip_norm,
                          _late_q_transpose, _lookup_by_gather_elements, _rotary_into_gqa,
                          _merge_reshapes, _strip_metadata, _take_over, _tie_lm_head,
                          _unit_transposes_to_reshape)
from .stream import attach_recipes, save_with_external_data

__all__ = ["OPSET", "IR_VERSION", "TensorSpec", "ComponentIO", "text_io", "export_text",
           "save_with_external_data", "initializer_bytes", "iter_initializers", "_take_over"]

IR_VERSION = 10  # what onnxruntime >= 1.18 reads; onnx 1.23 defaults to 14
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def ir_version_for(opset: int) -> int:
    """The lowest IR version that allows `opset` (onnx's VERSION_TABLE), at least IR_VERSION:
    onnxruntime rejects newer IR versions than it knows, and onnx 1.23 writes 14."""
    return max(IR_VERSION, {23: 11, 24: 12, 25: 13}.get(opset, IR_VERSION if opset <= 22 else 13))


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
                weights: WeightSource | None = None,
                hashes: dict[str, dict] | None = None, tie_lm_head: bool = True,
                graph_passes: Sequence[Callable[[ir.Model], Any]] = (),
                quant: Any = None,
                activation_amax: dict[str, float] | None = None) -> ComponentIO:
    """Export the text component to `out_dir/file` (+ `file`.data). Returns its ComponentIO.

    model: a Gemma3Model, on the meta device (then `weights` gives every parameter) or
    materialised (then its own tensors are streamed, unless `weights` is given). It is cast to
    `dtype` IN PLACE (the build owns it); its all_logits flag is set for the export and restored
    afterwards. translation_table/opset: another translation of g3.attention (default: this
    package's ONNX Runtime one, opset 20). hashes: if given, receives {data file: {"size",
    "sha256", "mtime_ns"}} of the streamed .data file. tie_lm_head=False keeps torch.onnx's
    embedding layout ([vocab, hidden], Gather + MatMul(x, Transpose(E))) instead of
    `_tie_lm_head`'s: TensorRT stores the ORT layout twice (g3export.export.trt.graph).
    graph_passes: run in order on the finished graph before it is written (a TensorRT target's
    finalization, `EnginePlan.export_options()`), so the file is what its consumer parses. quant: a
    g3export.export.quantize.QuantScheme, applied after the other passes
    (g3export.export.onnx_quant; fp8: g3export.export.onnx_fp8, with activation_amax from
    g3export.export.calibrate).
    """
    out_dir = Path(out_dir)
    cfg = model.config
    io = text_io(cfg, max_context, dtype, all_logits, images, None if dynamic_batch else 1, file)
    io.options["opset"] = opset
    torch_dtype = TORCH_DTYPES[dtype]
    model.to(torch_dtype).eval()
    dev = _device(model)
    layout = kv_layout(cfg.text, max_context, 1, dtype)
    caches = [torch.zeros(lc.shape, dtype=torch_dtype, device=dev)
              for lc in layout.layers for _ in "kv"]
    ids = torch.zeros(1, 3, dtype=torch.int64, device=dev)
    start = torch.zeros(1, dtype=torch.int64, device=dev)
    args: list[Any] = [ids, start]
    batch = torch.export.Dim("batch", min=1, max=1024) if dynamic_batch else None
    seq = torch.export.Dim("seq", min=1, max=max_context)
    ds: list[Any] = [{0: batch, 1: seq} if batch else {1: seq}, {0: batch} if batch else None]
    rest_ds: list[Any] = []  # forward(input_ids, start_pos, *rest): one spec for the varargs tuple
    if images:
        img_tokens = torch.export.Dim("image_tokens", min=1, max=max_context)
        args.append(torch.zeros(2, cfg.text.hidden_size, dtype=torch_dtype, device=dev))
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
    attach_recipes(m, weight_lookup(model, weights))
    if tie_lm_head:
        _tie_lm_head(m, "model.language_model.embed_tokens.weight")
    _fold_weight_transposes(m)
    _fuse_rms_norm(m)
    for_ort = translation_table is None or translation_table is TRANSLATION_TABLE
    if for_ort:
        _fuse_rotary(m, max_context)  # ONNX Runtime contrib op: only in graphs for ORT
        _late_q_transpose(m)
        _rotary_into_gqa(m)
        _fuse_sibling_matmuls(m, min_group=2 if quant is not None else 3)  # gate/up: quantized
        _fuse_skip_norm(m)
        _cancel_transposes(m)
        _unit_transposes_to_reshape(m)
        _merge_reshapes(m)
    if quant is not None and quant.scheme == "fp8":
        from .onnx_fp8 import fp8_graph

        if for_ort or activation_amax is None:
            raise ValueError("fp8 is for the TensorRT graphs, with calibrated activation_amax")
        io.options["quantization"] = fp8_graph(m, activation_amax)
        opset = io.options["opset"] = m.opset_imports[""]
    elif quant is not None:
        from .onnx_quant import quantize_graph

        io.options["quantization"] = quantize_graph(m, quant, "ort" if for_ort else "dq")
        opset = io.options["opset"] = m.opset_imports[""]  # blocked DQ raises it to 21
    if tie_lm_head and for_ort:
        from .onnx_lm_head import split_lm_head_by_rows

        split_lm_head_by_rows(m)
        _lookup_by_gather_elements(m)
    _drop_unused_initializers(m)
    _strip_metadata(m)
    m.ir_version = ir_version_for(opset)
    for graph_pass in graph_passes:
        graph_pass(m)
    _check_io(m, io)
    digests = save_with_external_data(m, out_dir / file, progress=progress)
    if hashes is not None:
        hashes.update(digests)
    return io


def _device(model: nn.Module) -> torch.device:
    """Where to make the example inputs: meta when the model's weights are placeholders."""
    return torch.device("meta") if any(p.is_meta for p in model.parameters()) else \
        torch.device("cpu")


def weight_lookup(model: nn.Module, weights: WeightSource | None, prefix: str = "model."):
    """initializer name -> (source, name in it): the model's parameters from `weights` (or from
    the model's own tensors), its buffers (RoPE tables) computed on the CPU when they are
    placeholders. Initializer names are the wrapper's (`model.` + the parameter name)."""
    from ..modeling.weights import buffer_values

    own = TensorSource({**dict(model.named_parameters()), **dict(model.named_buffers())})
    buffers = TensorSource(buffer_values(model), label="computed buffers") if any(
        b.is_meta for b in model.buffers()) else own
    params = weights if weights is not None else own
    param_names = set(dict(model.named_parameters()))
    buffer_names = set(dict(model.named_buffers()))

    def lookup(name: str):
        key = name.removeprefix(prefix)
        if key in param_names:
            return params, key
        if key in buffer_names:
            return buffers, key
        return None
    return lookup


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
# Writing


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
