"""ONNX export + ONNX Runtime session on the tiny preset: parity with the eager model (prefill in
chunks that wrap the sliding ring, decode), in-place cache binding, KV bytes from the buffers, the
tied embedding stored once, and the build directory's refusals and atomicity.

One tiny build is exported per module (torch.export dominates the run time)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from g3export.export.build import build
from g3export.export.manifest import FORMAT_VERSION, BuildError, load_build
from g3export.export.onnx_attention import FIRST_CHUNK_GQA_BRANCH, cache_writes_ordered
from g3export.export.onnx_export import initializer_bytes
from g3export.runtimes.verify import verify
from g3export.modeling.cache import kv_layout
from g3export.modeling.config import preset
from g3export.modeling.text import Gemma3Model
from g3export.runtimes.ort_session import OrtSession
from g3export.runtimes.reference import TorchSession

MAX_CONTEXT = 96


def _model() -> Gemma3Model:
    torch.manual_seed(0)
    return Gemma3Model(preset("tiny")).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Gemma3Model]:
    root = tmp_path_factory.mktemp("builds")
    tok = root / "tok.json"
    tok.write_text('{"model": "dummy"}')
    out = build(_model(), tok, root / "tiny-onnx", max_context=MAX_CONTEXT, progress=False)
    return out, _model()


def _greedy_run(sess, prompt: np.ndarray, chunks: list[int], new_tokens: int):
    """Prefill `prompt` in the given chunk sizes, then greedy decode; returns (logits list, tokens)."""
    out, pos = [], 0
    for c in chunks:
        out.append(sess.forward(prompt[:, pos:pos + c], pos))
        pos += c
    assert pos == prompt.shape[1]
    toks = []
    for _ in range(new_tokens):
        t = int(out[-1][0].argmax())
        toks.append(t)
        out.append(sess.forward(np.array([[t]], dtype=np.int64), pos))
        pos += 1
    return out, toks


# (20, [20]): a first chunk longer than the sliding layers' ring (window 8), which takes the
# product path instead of GroupQueryAttention (onnx_attention: GQA writes the chunk only if T <= S)
@pytest.mark.parametrize("prompt_len,chunks", [(3, [3]), (40, [5, 11, 24]), (20, [20])])
def test_parity_with_eager(built, prompt_len, chunks):
    out, model = built
    sess = OrtSession.from_build(out)
    ref = TorchSession(model, MAX_CONTEXT)
    prompt = np.random.default_rng(prompt_len).integers(0, 512, (1, prompt_len))
    a, ta = _greedy_run(sess, prompt, chunks, 30)
    b, tb = _greedy_run(ref, prompt, chunks, 30)
    assert ta == tb
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < 1e-4
    # the caches: the arrays bound to ORT are the ones that hold the written chunks
    for got, want in zip(sess.cache_arrays, ref.caches):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    # reset forgets: the same run again gives the same result
    sess.reset()
    a2, ta2 = _greedy_run(sess, prompt, chunks, 3)
    assert ta2 == ta[:3]


def test_fp16_graph_parity(tmp_path):
    """An fp16 graph for ONNX Runtime (the CUDA builds' dtype; ORT's CPU kernels run it too)
    takes the attention's non-GQA branches and casts their output before the Transpose that
    cancels with the model's own (onnx_attention, `ctx`): its logits follow the fp32 eager
    model to fp16 precision over chunks past the window, then greedy decode, same tokens."""
    torch.manual_seed(0)
    model = Gemma3Model(preset("tiny")).eval()
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": "dummy"}')
    out = build(model, tok, tmp_path / "fp16", max_context=MAX_CONTEXT, progress=False,
                dtype="fp16")
    prompt = np.random.default_rng(5).integers(0, 512, (1, 40))
    assert prompt.shape[1] > preset("tiny").text.sliding_window
    a, ta = _greedy_run(OrtSession.from_build(out), prompt, [5, 11, 24], 12)
    b, tb = _greedy_run(TorchSession(model, MAX_CONTEXT), prompt, [5, 11, 24], 12)
    assert ta == tb
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < 0.1
    # RoPE reads fp16 tables here too (the model's fp16 inv_freq is cast up before its multiply)
    import onnx_ir as ir

    m = ir.load(out / "text.onnx")
    assert not [n for n in m.graph if n.op_type in ("Cos", "Sin")]
    tables = [v for k, v in m.graph.initializers.items() if k.startswith("rope_")]
    assert len(tables) == 4 and all(v.dtype == ir.DataType.FLOAT16 for v in tables)


def _branch_ops(graph) -> list[str]:
    """Op types of every node inside the If branches of `graph` (an onnx GraphProto), nested too."""
    ops = []
    for n in graph.node:
        for a in n.attribute:
            if a.HasField("g"):
                ops += [x.op_type for x in a.g.node] + _branch_ops(a.g)
    return ops


def test_one_kv_head_first_chunk_and_transposes(tmp_path):
    """The 270M and 1B have one KV head: their k/v [B,T,1,D] -> [B,1,T,D] transposes become
    Reshapes (onnx_passes._unit_transposes_to_reshape) and the first chunk's GroupQueryAttention
    reads k/v without a transpose (onnx_attention). Parity with the eager model over a first
    chunk longer than the window (GQA's local window), later chunks that wrap the ring, and
    decode; batch 2 with rows at different positions."""
    import dataclasses

    import onnx

    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, name="tiny-kv1",
                              text=dataclasses.replace(cfg.text, num_key_value_heads=1))
    torch.manual_seed(1)
    model = Gemma3Model(cfg).eval()
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": "dummy"}')
    out = build(model, tok, tmp_path / "kv1", max_context=MAX_CONTEXT, progress=False)
    graph = onnx.load(str(out / "text.onnx"), load_external_data=False).graph
    layers = cfg.text.num_hidden_layers
    main_ops = [n.op_type for n in graph.node]
    # none per layer: q stays [B,T,H,D] through norm and RoPE (onnx_passes._late_q_transpose),
    # k and v are Reshapes now, and the output's way back cancels the translation's own
    # transpose (onnx_passes._cancel_transposes)
    assert main_ops.count("Transpose") == 1  # the embedding lookup's
    # and torch's view before each is merged into it (onnx_passes._merge_reshapes)
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    assert not [n for n in graph.node if n.op_type == "Reshape" and made_by.get(n.input[0]) == "Reshape"]
    inner = _branch_ops(graph)
    # every layer's first chunk, and each full layer's decode step (over its cache, in place)
    full = cfg.text.layer_types.count("full_attention")
    assert full > 0
    assert inner.count("GroupQueryAttention") == layers + full
    # the two chunk branches with a mask: q in to [B,H,T,D] and the output back to [B,T,H,D];
    # the first chunk's GQA (q, k, v and its output) and the decode step: none
    assert inner.count("Transpose") == 4 * layers
    sess = OrtSession.from_build(out, batch=2)
    ref = TorchSession(model, MAX_CONTEXT, batch=2)
    prompt = np.random.default_rng(3).integers(0, 512, (2, 40))
    pos, worst = 0, 0.0
    for c in [20, 7, 13]:
        got, want = sess.forward(prompt[:, pos:pos + c], pos), ref.forward(prompt[:, pos:pos + c], pos)
        worst, pos = max(worst, float(np.abs(got - want).max())), pos + c
    for _ in range(12):  # greedy decode of both rows, each on the reference's token
        ids = want.reshape(2, -1).argmax(-1)[:, None]
        assert (got.reshape(2, -1).argmax(-1)[:, None] == ids).all()
        got, want = sess.forward(ids, pos), ref.forward(ids, pos)
        worst, pos = max(worst, float(np.abs(got - want).max())), pos + 1
    assert worst < 1e-4
    # rows at different positions: row 1 restarts at 0 (its first chunk) while row 0 goes on
    starts = np.array([40 + 12, 0])
    ids = np.random.default_rng(4).integers(0, 512, (2, 5))
    np.testing.assert_allclose(sess.forward(ids, starts), ref.forward(ids, starts), atol=1e-4)


def test_first_chunk_reads_only_its_own_keys(built):
    """A chunk at position 0 attends over its own keys only (the graph's `If` on max(start_pos)
    == 0, onnx_attention): a cache full of NaN does not reach its logits. A later chunk does read
    the cache (its NaN slots are masked, but 0 * NaN poisons the sum), which shows the test can
    tell the two paths apart."""
    out, model = built
    sess = OrtSession.from_build(out)
    prompt = np.random.default_rng(7).integers(0, 512, (1, 20))
    want = sess.forward(prompt, 0)
    for a in sess.cache_arrays:
        a.fill(np.nan)
    got = sess.forward(prompt, 0)
    np.testing.assert_array_equal(got, want)
    ref = TorchSession(model, MAX_CONTEXT)
    np.testing.assert_allclose(got, ref.forward(prompt, 0), atol=1e-4)
    for a in sess.cache_arrays:
        a.fill(np.nan)
    assert np.isnan(sess.forward(prompt[:, :5], 20)).all()
    import onnx

    graph = onnx.load(str(out / "text.onnx"), load_external_data=False).graph
    ifs = [n for n in graph.node if n.op_type == "If"]
    # one per layer and one per layer kind (the shared bias), and the lm_head's on the row count
    # (g3export.export.onnx_lm_head)
    assert len(ifs) == preset("tiny").text.num_hidden_layers + 2 + 1


def test_cache_is_written_in_place(built):
    out, _ = built
    sess = OrtSession.from_build(out)
    arrays = sess.cache_arrays
    ptrs = [a.ctypes.data for a in arrays]
    assert [ov.data_ptr() for ov in sess.cache_ortvalues()] == ptrs
    sess.forward(np.array([[1, 2, 3]]), 0)
    assert all(np.abs(a[:, :, :3]).max() > 0 for a in arrays)  # chunk landed in our buffers
    assert [a.ctypes.data for a in sess.cache_arrays] == ptrs
    assert [ov.data_ptr() for ov in sess.cache_ortvalues()] == ptrs


def test_first_chunk_writes_only_its_slots(built):
    """A first chunk's cache write (GroupQueryAttention's present, onnx_attention) changes the
    chunk's slots and nothing else of the bound buffers: GQA writes in place only when its past
    and present are one buffer, through the three `If`s above it; a separate present would come
    back zeroed past the chunk (and cost a copy)."""
    out, model = built
    sess = OrtSession.from_build(out)
    for a in sess.cache_arrays:
        a.fill(7.0)
    prompt = np.random.default_rng(5).integers(0, 512, (1, 6))
    sess.forward(prompt, 0)
    ref = TorchSession(model, MAX_CONTEXT)
    ref.forward(prompt, 0)
    for got, want in zip(sess.cache_arrays, ref.caches):
        np.testing.assert_allclose(got[:, :, :6], want.numpy()[:, :, :6], atol=1e-5)
        assert (got[:, :, 6:] == 7.0).all()


def test_kv_bytes_measured(built):
    out, _ = built
    sess = OrtSession.from_build(out)
    measured = sum(a.nbytes for a in sess.cache_arrays)
    assert sess.kv_bytes == measured == kv_layout(preset("tiny").text, MAX_CONTEXT).bytes
    # sliding layers hold W slots, not max_context
    shapes = {a.shape[2] for a in sess.cache_arrays}
    assert shapes == {preset("tiny").text.sliding_window, MAX_CONTEXT}


def test_embedding_stored_once(built):
    out, model = built
    import onnx
    import onnxruntime as ort

    from g3export.runtimes.ort_session import session_options

    # the lm_head's 2-D view (g3export.export.onnx_lm_head) names the embedding's own bytes:
    # count ranges of the data file, not initializers
    sizes = initializer_bytes(out / "text.onnx")
    ranges = {}
    for t in onnx.load(str(out / "text.onnx"), load_external_data=False).graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        ranges[(ext["location"], ext.get("offset")) if ext else t.name] = sizes[t.name]
    emb = model.language_model.embed_tokens.weight
    emb_bytes = emb.numel() * emb.element_size()
    assert sum(1 for s in ranges.values() if s == emb_bytes) == 1
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # RoPE's cos and sin tables per layer type (onnx_passes._fuse_rotary), [max_context, D/2]
    cfg = model.config.text
    rope = 2 * len(set(cfg.layer_types)) * MAX_CONTEXT * cfg.head_dim // 2 * 4
    # every parameter once, plus a few bytes of inline shape constants
    assert params + rope <= sum(ranges.values()) < params + rope + 4096
    # and ORT does not fold a transposed copy either (a batch-1 session: the run command's)
    opt = out.parent / "opt.onnx"
    ort.InferenceSession(str(out / "text.onnx"), session_options(optimized_path=str(opt),
                                                                 batch=1),
                         providers=["CPUExecutionProvider"])
    m = onnx.load(str(opt), load_external_data=False)
    vocab, hidden = emb.shape
    big = [t.name for t in m.graph.initializer
           if sorted(d for d in t.dims if d != 1) == sorted([vocab, hidden])]
    assert len(big) == 1, big


def test_graph_passes_applied(built):
    """The exporter's rewrites for ONNX Runtime took effect on this graph (parity is checked by
    the tests above): RoPE fused to RotaryEmbedding for q and k, or into GroupQueryAttention,
    reading constant cos/sin tables of max_context positions (one pair per layer type) at the
    model's positions, with nothing of RoPE computed per step (no Cos/Sin), q/k/v one MatMul
    on concatenated weights (gate/up are not fused in a float graph: _fuse_sibling_matmuls),
    residual Adds fused into the next norm, and
    the tied embedding read by a GatherElements (the lookup, _lookup_by_gather_elements) and a
    MatMul on the same [1, hidden, vocab] initializer."""
    import onnx_ir as ir

    out, model = built
    m = ir.load(out / "text.onnx")
    ops = [n.op_type for n in m.graph]
    cfg = model.config.text
    layers, full = cfg.num_hidden_layers, cfg.layer_types.count("full_attention")
    assert "Neg" not in ops and "Cos" not in ops and "Sin" not in ops
    # a first chunk's GQA rotates q and k itself (onnx_passes._rotary_into_gqa), on every layer;
    # RotaryEmbedding runs only in the branches that still read rotated q/k (a decode step, whose
    # full layers' GQA does not rotate, and the chunk paths with a mask), none of them on a first
    # chunk's path
    everything = list(m.graph.all_nodes())
    gqa = [n for n in everything if n.op_type == "GroupQueryAttention"]
    first = [n for n in gqa if n.graph.name == FIRST_CHUNK_GQA_BRANCH]
    assert len(first) == layers and len(gqa) == layers + full
    assert all(n.attributes["do_rotary"].value == 1 for n in first)
    assert not [n for n in gqa if n not in first and "do_rotary" in n.attributes]
    rotary = [n for n in everything if n.op_type == "RotaryEmbedding"]
    first_path = {"step_else", "attention_then", FIRST_CHUNK_GQA_BRANCH}
    assert rotary and not [n for n in rotary if n.graph.name in first_path or n.graph is m.graph]
    # the constant cos/sin tables of max_context positions, one pair per layer type, shared
    tables = {id(v): v for n in rotary for v in n.inputs[2:]}
    assert {id(v) for n in first for v in n.inputs[7:9]} <= set(tables)
    head_dim, types = cfg.head_dim, set(cfg.layer_types)
    assert len(tables) == 2 * len(types) == 4  # cos and sin, sliding and full
    assert all(list(v.shape) == [MAX_CONTEXT, head_dim // 2] and v.const_value is not None
               for v in tables.values())
    (positions,) = {id(n.inputs[1]): n.inputs[1] for n in rotary}.values()
    assert positions.producer().op_type == "Add"  # start_pos + arange(T): the model's positions
    fused = [tuple(p.split(".")[-3] for p in k.split("+"))
             for k in m.graph.initializers if "+" in k and k.endswith(".T")]
    assert sorted(fused) == [("q_proj", "k_proj", "v_proj")] * layers
    assert ops.count("Split") == layers
    # every residual Add but the last (which feeds the last-position Slice) fused into the norm
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers - 1
    vocab, hidden = model.language_model.embed_tokens.weight.shape
    (emb,) = [v for v in m.graph.initializers.values() if list(v.shape) == [1, hidden, vocab]]
    assert sorted(n.op_type for n, _ in emb.uses()) == ["GatherElements", "MatMul"]
    assert not [n for n in m.graph if n.op_type == "Gather"]  # the lookup's strided Gather


def test_write_depends_on_attention(built):
    """Every cache write (ScatterND, or GQA's present) is ordered after the attention reads, in
    the graph ORT runs."""
    import onnxruntime as ort

    from g3export.runtimes.ort_session import session_options

    out, _ = built
    opt = out.parent / "opt2.onnx"
    ort.InferenceSession(str(out / "text.onnx"), session_options(optimized_path=str(opt)),
                         providers=["CPUExecutionProvider"])
    deps = cache_writes_ordered(str(opt))
    # k and v of every layer, in its four paths: the decode step (a ScatterND, or GQA's in-place
    # present on full layers), a first chunk through GQA (its present) or not (ScatterND), and
    # any other chunk (ScatterND)
    assert len(deps) == 8 * preset("tiny").text.num_hidden_layers
    assert all(deps.values()), deps


@pytest.mark.parametrize("writer", ["ScatterND", "GroupQueryAttention"])
def test_cache_write_order_check_fails_on_unordered_write(tmp_path, writer):
    """cache_writes_ordered flags a write that a read of the same cache does not precede (so the
    test above can fail), and passes the same graph once the write depends on the read; for both
    kinds of in-place writer (a ScatterND on the cache, a GQA with it as past_key)."""
    import onnx
    from onnx import TensorProto, helper

    def graph(ordered: bool):
        read = helper.make_node("ReduceSum", ["past_key_0"], ["r"], keepdims=1)
        upd = helper.make_node("Add", ["u", "r" if ordered else "u"], ["upd"])
        if writer == "ScatterND":
            write = helper.make_node("ScatterND", ["past_key_0", "idx", "upd"], ["present_key_0"])
        else:  # outputs: attention, present_key (the cache's buffer), present_value
            write = helper.make_node(
                "GroupQueryAttention", ["upd", "upd", "upd", "past_key_0", "", "idx", "idx"],
                ["o", "present_key_0", "pv"], domain="com.microsoft", num_heads=1, kv_num_heads=1)
        g = helper.make_graph(
            [read, upd, write], "g",
            [helper.make_tensor_value_info("past_key_0", TensorProto.FLOAT, [1, 1, 4, 2]),
             helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 1, 1, 3]),
             helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, 1, 1, 2])],
            [helper.make_tensor_value_info("present_key_0", TensorProto.FLOAT, [1, 1, 4, 2]),
             helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
        path = tmp_path / f"{ordered}.onnx"
        onnx.save(helper.make_model(g), str(path))
        return cache_writes_ordered(str(path))

    assert graph(ordered=False) == {"present_key_0": False}
    assert graph(ordered=True) == {"present_key_0": True}


def test_verify_report(built):
    out, _ = built
    rep = verify(out)  # weights read back from the build's initializers
    assert rep.ok and not rep.failed and rep.tokens_equal, rep.to_dict()
    assert rep.max_logit_diff < 1e-4


def test_manifest_contents(built):
    out, _ = built
    man = json.loads((out / "manifest.json").read_text())
    assert man["format_version"] == FORMAT_VERSION
    assert man["target"] == "onnx" and man["dtype"] == "fp32" and man["max_context"] == MAX_CONTEXT
    assert set(man["files"]) == {"text.onnx", "text.onnx.data", "tokenizer.json"}
    io = man["components"]["text"]
    assert io["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"],
                               "aliases": None}
    assert io["outputs"][1]["aliases"] == "past_key_0"
    assert man["kv_layout"]["bytes"] == kv_layout(preset("tiny").text, MAX_CONTEXT).bytes
    for k in ("torch", "onnx", "onnxruntime"):
        assert man["versions"][k]
    b = load_build(out, expect_target="onnx")
    assert b.config == preset("tiny") and b.tokenizer.name == "tokenizer.json"


# ---- refusals --------------------------------------------------------------------------------

@pytest.fixture
def copy(built, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(built[0], dst)
    return dst


def _refused(path, match, **kw):
    with pytest.raises(BuildError, match=match) as e:
        load_build(path, **kw)
    assert "build" in str(e.value)  # says what to do


def test_refuse_missing_dir(tmp_path):
    _refused(tmp_path / "nope", "does not exist")


def test_refuse_missing_manifest(copy):
    (copy / "manifest.json").unlink()
    _refused(copy, "no manifest.json")


def test_refuse_hash_mismatch(copy):
    p = copy / "text.onnx.data"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    _refused(copy, "sha256")


def test_refuse_missing_file(copy):
    (copy / "text.onnx.data").unlink()
    _refused(copy, "missing text.onnx.data")


def test_refuse_future_format(copy):
    p = copy / "manifest.json"
    man = json.loads(p.read_text())
    man["format_version"] = FORMAT_VERSION + 1
    p.write_text(json.dumps(man))
    _refused(copy, "format")


def test_refuse_wrong_target(copy):
    _refused(copy, "'onnx' build", expect_target="trt")


def test_refuse_partial_dir(copy):
    partial = copy.parent / "b.partial-123-abcd"
    copy.rename(partial)
    _refused(partial, "interrupted")


def test_provider_unavailable(built):
    from g3export.runtimes.ort_session import ProviderError
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(ProviderError, match="CUDAExecutionProvider is not available"):
        OrtSession.from_build(built[0], provider="cuda")


def test_interrupted_build_then_rebuild(tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    import g3export.export.onnx_export as ox

    orig = ox.save_with_external_data

    def boom(*a, **k):
        orig(*a, **k)  # the weights were written ...
        raise KeyboardInterrupt  # ... and then the build was interrupted

    monkeypatch.setattr(ox, "save_with_external_data", boom)
    with pytest.raises(KeyboardInterrupt):
        build(_model(), None, out, max_context=32, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial dir was removed
    with pytest.raises(BuildError):
        load_build(out)
    monkeypatch.setattr(ox, "save_with_external_data", orig)
    # a leftover from a killed build (no manifest) is refused, and does not block a rebuild
    dead = tmp_path / "tiny.partial-999999-dead"
    dead.mkdir()
    (dead / "text.onnx").write_bytes(b"junk")
    _refused(dead, "interrupted")
    build(_model(), None, out, max_context=32, progress=False)
    assert not dead.exists()
    assert load_build(out).max_context == 32
    # an existing build is refused without force and replaced with it
    with pytest.raises(BuildError, match="--force"):
        build(_model(), None, out, max_context=32, progress=False)
