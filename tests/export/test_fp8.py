"""`--quant fp8` (issue 14) without TensorRT: the E4M3 quantizer against a direct ml_dtypes
computation; the calibrated activation ranges against the whole PyTorch model run with hooks
(and streamed from a weight source against the materialised model); the TensorRT graph's
Q/DQ structure and its streamed bytes against direct numpy; ONNX Runtime's CPU run of the fp32
fp8 graph against a fake-quantized PyTorch reference and the unquantized graph; bad options.
TensorRT-RTX engine builds from fp8 graphs: tests/export/test_fp8_trt.py."""

from __future__ import annotations

import copy
import re

import ml_dtypes
import numpy as np
import pytest
import torch

from g3export.export import quantize as Q
from g3export.export.calibrate import LINEARS, calibration_ids, linear_input_amax
from g3export.modeling.config import preset
from g3export.modeling.weights import build_model, open_weights

MAX_CONTEXT = 48
WINDOW = 8
E4M3 = ml_dtypes.float8_e4m3fn


def _bound(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """E4M3's rounding error for x = w / s: half an ulp, 2^-4 |x| relative for normal values
    (3 mantissa bits), 2^-10 absolute below 2^-6 (subnormal step 2^-9); times the scale."""
    return np.maximum(np.abs(w) * 2.0 ** -4, s * 2.0 ** -10) * (1 + 1e-6)


@pytest.mark.parametrize("scale_dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_fp8_round_trip_against_ml_dtypes(scale_dtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 96)) * np.exp(rng.uniform(-6, 6, (48, 1)))).astype(np.float32)
    w[5] = 0  # an all-zero row: scale 1, codes 0, exact
    w[7, 3] = 1e-9  # far below the row's smallest subnormal step
    q, s = Q.quantize_fp8_rows(w, scale_dtype)
    assert q.dtype == E4M3 and s.dtype == np.dtype(scale_dtype) and s.shape == (48,)
    amax = np.abs(w).max(axis=1)
    s_ref = np.where(amax > 0, amax / np.float32(448), 1).astype(scale_dtype).astype(np.float32)
    np.testing.assert_array_equal(s.astype(np.float32), s_ref)
    q_ref = np.clip(w / s_ref[:, None], -448, 448).astype(E4M3)  # ml_dtypes rounds to nearest even
    np.testing.assert_array_equal(q.view(np.uint8), q_ref.view(np.uint8))
    assert np.isfinite(q.astype(np.float32)).all()  # saturated, never NaN
    back = Q.dequantize_fp8_rows(q, s)
    # a scale rounded down saturates the row's max at 448: its error is the rounding of s
    sat = np.abs(w) > 448 * s_ref[:, None]
    err = np.abs(back - w)
    assert (err[~sat] <= _bound(w, s_ref[:, None])[~sat]).all()
    assert (err[sat] <= np.abs(w[sat]) * 2.0 ** -8).all()
    assert (back[5] == 0).all() and (s[5] == 1)
    # every row uses E4M3's full range: its largest code is (within rounding) +-448
    big = np.abs(q.astype(np.float32)).max(axis=1)
    assert (big[amax > 0] >= 448 * (1 - 2.0 ** -8)).all()


def test_to_fp8_saturates_and_packs_int4():
    np.testing.assert_array_equal(Q.to_fp8(np.array([500, -1e6, 0.3], np.float32)).astype(
        np.float32), np.array([448, -448, np.float32(0.3).astype(E4M3)], np.float32))
    q = np.array([[-8, 7, -1, 0, 3, -4]], np.int8)
    np.testing.assert_array_equal(Q.pack_int4_signed(q), [[0x78, 0x0F, 0xC3]])


# --- calibration ---------------------------------------------------------------------------


def _direct_amax(model, ids) -> dict[str, float]:
    """The whole model on the ids as one chunk, hooks on every decoder linear: the reference."""
    from g3export.runtimes.reference import TorchSession

    got: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            def hook(m, args, key=name):
                got[key] = max(got.get(key, 0.0), float(args[0].abs().max()))
            hooks.append(mod.register_forward_pre_hook(hook))
    TorchSession(model, len(ids)).forward(np.array([ids]), 0)
    for h in hooks:
        h.remove()
    return got


def test_calibration_equals_the_whole_model_with_hooks():
    model = build_model("tiny", weights="random", seed=4)
    ids, how = calibration_ids(Q.default_text().read_text(), None, model.config, 40)
    assert len(ids) == 40 and ids[0] == model.config.text.bos_token_id and "bytes" in how
    direct = _direct_amax(model, ids)
    got = linear_input_amax(model, None, ids)
    assert len(direct) == 6 * len(LINEARS) and set(got) == set(direct)
    for k in direct:
        assert got[k] == pytest.approx(direct[k], rel=1e-5), k
    # q/k/v read one tensor (and gate/up another): equal ranges
    assert got["language_model.layers.2.self_attn.q_proj"] == got[
        "language_model.layers.2.self_attn.v_proj"]
    # streamed from a weight source (meta model, weights read layer by layer): the same
    meta, src = open_weights("tiny", weights="random", seed=4)
    streamed = linear_input_amax(meta, src, ids)
    assert all(p.is_meta for p in meta.parameters())
    for k in direct:
        assert streamed[k] == pytest.approx(direct[k], rel=1e-5), k


# --- the TensorRT graph ---------------------------------------------------------------------


def _export(tmp_path, quant, dtype="fp32", amax=None, name="g"):
    """The text graph exactly as a --target trt-rtx --attention native build writes it (no
    engine: that needs TensorRT), from the tiny random model."""
    from g3export.export.onnx_export import export_text
    from g3export.export.trt import plan_engines

    model = build_model("tiny", weights="random", seed=4)
    plan = plan_engines(model.config, "trt-rtx", dtype, MAX_CONTEXT, attention="native",
                        compute_capabilities=["8.9"])
    io = export_text(model, tmp_path / name, MAX_CONTEXT, dtype, progress=False, quant=quant,
                     activation_amax=amax, **plan.export_options())
    return tmp_path / name / "text.onnx", io


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    model = build_model("tiny", weights="random", seed=4)
    ids, _ = calibration_ids(Q.default_text().read_text(), None, model.config, MAX_CONTEXT)
    amax = linear_input_amax(model, None, ids)
    from g3export.export import stream

    mp = pytest.MonkeyPatch()
    mp.setattr(stream, "BLOCK_BYTES", 3 * 64 * 4)  # 3-row blocks: odd, many per weight
    try:
        f8, io8 = _export(root, Q.QuantScheme("fp8", None, False), amax=amax, name="fp8")
    finally:
        mp.undo()
    f32, io32 = _export(root, None, name="fp32")
    return {"model": model, "amax": amax, "fp8": f8, "io8": io8, "fp32": f32, "io32": io32}


def _producer(node_value):
    return node_value.producer()


def test_graph_has_qdq_on_every_linear_and_nothing_else(graphs):
    import onnx_ir as ir

    m = ir.load(str(graphs["fp8"]))
    assert m.opset_imports[""] >= 21
    inits = m.graph.initializers
    lin = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight\.T\.f8$")
    seen, act_scales = 0, set()
    for node in m.graph:
        if node.op_type != "MatMul":
            continue
        a, b = (v.producer() for v in node.inputs)
        if b is None or b.op_type != "DequantizeLinear":
            continue  # the attention core and the lm_head: not quantized
        codes, scales = b.inputs
        assert lin.search(codes.name), codes.name
        assert codes.const_value.dtype == ir.DataType.FLOAT8E4M3FN
        k, n = codes.shape
        assert list(scales.shape) == [n] and b.attributes["axis"].value == 1
        assert a.op_type == "DequantizeLinear"
        q = a.inputs[0].producer()
        assert q.op_type == "QuantizeLinear" and q.inputs[2].const_value.dtype == \
            ir.DataType.FLOAT8E4M3FN and q.inputs[1] is a.inputs[1]
        assert list(q.inputs[1].shape) == []  # one static scale per tensor
        act_scales.add(q.inputs[1].name)
        seen += 1
    assert seen == 6 * 7 and len(act_scales) == 6 * 4  # q/k/v share one, gate/up one
    assert not any(v.const_value is not None and v.const_value.dtype ==
                   ir.DataType.FLOAT8E4M3FN and "embed" in name for name, v in inits.items())
    assert any(n.op_type == "Gather" and "embed_tokens" in n.inputs[0].name for n in m.graph)
    assert graphs["io8"].options["quantization"] == {"linear": 42, "activation": 24,
                                                     "embedding": 0}


def test_streamed_bytes_equal_direct_numpy(graphs):
    """Weights streamed in odd 3-row blocks (columns written strided) and the activation
    scales: equal to quantizing each whole weight directly and to amax / 448."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx.load(str(graphs["fp8"])).graph.initializer}
    p = dict(graphs["model"].named_parameters())
    amax = graphs["amax"]
    for layer in (0, 3):
        for name in LINEARS:
            key = f"language_model.layers.{layer}.{name}"
            w = p[key + ".weight"].detach().numpy()
            t = inits[f"model.{key}.weight.T.f8"]
            assert t.data_type == onnx.TensorProto.FLOAT8E4M3FN
            codes = np.frombuffer(numpy_helper.to_array(t).tobytes(), np.uint8).reshape(t.dims)
            amax_n = np.abs(w).max(axis=1)
            s = amax_n / np.float32(448)
            want = np.clip(w / s[:, None], -448, 448).astype(E4M3).T
            np.testing.assert_array_equal(codes, want.view(np.uint8))
            scales = numpy_helper.to_array(inits[f"model.{key}.weight.T.scales"])
            np.testing.assert_array_equal(scales, s)
        qkv = max(amax[f"language_model.layers.{layer}.self_attn.{x}_proj"] for x in "qkv")
        (got,) = [numpy_helper.to_array(inits[n]) for n in inits if n in [
            f"language_model.layers.{layer}.self_attn.{x}_proj.input_scale" for x in "qkv"]]
        assert float(got) == pytest.approx(qkv / 448, rel=1e-7)


@pytest.mark.parametrize("bits", [4, 8])
def test_dq_path_streams_the_same_bytes(tmp_path, monkeypatch, bits):
    """The int4/int8 TensorRT layout (blocked DQ on W^T [K, N], the untied embedding along axis
    1), streamed in odd 3-row blocks, equals Q.dequantize_linear / quantize_rows on the whole
    weight (INT4 packed two per byte, low nibble first, across the carried odd row)."""
    import onnx
    from onnx import numpy_helper

    from g3export.export import stream

    monkeypatch.setattr(stream, "BLOCK_BYTES", 3 * 64 * 4)
    path, _ = _export(tmp_path, Q.QuantScheme(f"int{bits}", 32))
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    p = dict(build_model("tiny", weights="random", seed=4).named_parameters())
    for key in ("layers.1.mlp.down_proj", "layers.4.self_attn.k_proj"):
        w = p[f"language_model.{key}.weight"].detach().numpy()
        q, s = Q.dequantize_linear(w, bits, 32)
        np.testing.assert_array_equal(inits[f"model.language_model.{key}.weight.T.q{bits}"], q)
        np.testing.assert_array_equal(inits[f"model.language_model.{key}.weight.T.scales"], s)
    e = p["language_model.embed_tokens.weight"].detach().numpy()
    q, s = Q.quantize_rows(e, bits, 32)
    np.testing.assert_array_equal(inits[f"model.language_model.embed_tokens.weight.q{bits}"], q)
    np.testing.assert_array_equal(inits["model.language_model.embed_tokens.weight.scales"], s)


def test_row_quant_eager_form_is_the_packed_layout():
    """A RowQuant read whole (numpy(), or an initializer small enough to stay inline) runs the
    streamed loop into memory: INT4 codes of W^T from a source without a recipe, an odd N."""
    import onnx_ir as ir

    from g3export.export.quant_stream import RowQuant, source_recipe

    w = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    v = ir.Value(name="w.T", const_value=ir.tensor(np.ascontiguousarray(w.T)),
                 shape=ir.Shape([64, 6]))
    t = RowQuant(source_recipe(v, True), lambda x: Q.quantize_rows(x, 4, 32)[0], True,
                 ir.DataType.INT4, [64, 6], "q")
    q, _ = Q.dequantize_linear(w, 4, 32)
    np.testing.assert_array_equal(t.numpy().astype(np.int8), q)
    assert t.tobytes() == Q.pack_int4_signed(q).tobytes()
    odd = ir.Value(name="o.T", const_value=ir.tensor(np.ascontiguousarray(w[:5].T)),
                   shape=ir.Shape([64, 5]))
    with pytest.raises(ValueError, match="even N"):
        RowQuant(source_recipe(odd, True), lambda x: Q.quantize_rows(x, 4, 32)[0], True,
                 ir.DataType.INT4, [64, 5], "q").tobytes()


# --- parity on ONNX Runtime's CPU EP --------------------------------------------------------


def _fake_quantized(model, amax):
    """The model an fp8 graph computes, from the scheme's definition with ml_dtypes: each
    decoder linear's weight -> E4M3 per output channel, its input -> E4M3 with amax/448."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if not (isinstance(mod, torch.nn.Linear) and ".layers." in name):
                continue
            w = mod.weight.detach().numpy()
            amax_n = np.abs(w).max(axis=1, keepdims=True)
            s = amax_n / np.float32(448)
            mod.weight.copy_(torch.from_numpy(
                np.clip(w / s, -448, 448).astype(E4M3).astype(np.float32) * s))
            qkv = re.sub(r"(q|k|v)_proj$", "{}_proj", name)
            keys = [qkv.format(x) for x in "qkv"] if "{}" in qkv else (
                [name.replace(name.rsplit(".", 1)[1], x) for x in ("gate_proj", "up_proj")]
                if name.endswith(("gate_proj", "up_proj")) else [name])
            sx = np.float32(max(amax[k] for k in keys) / 448)

            def fq(mod, args, sx=sx):
                x = args[0].numpy()
                return (torch.from_numpy(np.clip(x / sx, -448, 448).astype(E4M3)
                                         .astype(np.float32) * sx),)
            mod.register_forward_pre_hook(fq)
    return m


def _ort(path, io):
    from g3export.runtimes.ort_session import OrtSession

    cfg = preset("tiny")
    return OrtSession(cfg, path, io, MAX_CONTEXT, "fp32", max_chunk=None)


def _logits(sess, ids):
    """Prefill in window-aligned chunks (what the native translation's engine takes), then
    teacher-forced decode steps."""
    out, pos = [], 0
    for c in (8, 8, 8, 8):
        out.append(sess.forward(ids[:, pos:pos + c], pos))
        pos += c
    for _ in range(8):
        out.append(sess.forward(ids[:, pos:pos + 1], pos))
        pos += 1
    return np.concatenate(out)


def test_ort_runs_the_fp8_graph_as_the_fake_quantized_reference(graphs):
    """ONNX Runtime's CPU EP runs float8 QuantizeLinear/DequantizeLinear + MatMul (in fp32).
    Its logits equal the fake-quantized reference up to float order (a wrong scale, a
    transposed layout or a missed activation moves them by the quantization's own effect);
    against the unquantized graph they differ by about that effect, e_q = max|ref - ref~|,
    which E4M3's 2^-4 relative rounding bounds."""
    from g3export.runtimes.reference import TorchSession

    model, amax = graphs["model"], graphs["amax"]
    ids = np.random.default_rng(7).integers(0, 512, (1, 40))
    ref = _logits(TorchSession(copy.deepcopy(model), MAX_CONTEXT), ids)
    fq = _logits(TorchSession(_fake_quantized(model, amax), MAX_CONTEXT), ids)
    got = _logits(_ort(graphs["fp8"], graphs["io8"]), ids)
    base = _logits(_ort(graphs["fp32"], graphs["io32"]), ids)
    e_q = float(np.abs(ref - fq).max())
    err = float(np.abs(got - fq).max())
    print(f"fp8: quantization effect {e_q:.4f}, graph vs ref~ {err:.2e}, graph vs fp32 graph "
          f"{np.abs(got - base).max():.4f}, fp32 graph vs ref {np.abs(base - ref).max():.2e}")
    assert float(np.abs(base - ref).max()) < 1e-3  # the unquantized graph is the reference
    assert e_q > 1e-3  # the quantization does something measurable
    assert err < 0.05 * e_q  # and the graph computes exactly it
    assert float(np.abs(got - base).max()) <= 1.5 * e_q
    # the effect is E4M3's: the logits' spread times a few 2^-4 relative steps at most
    assert e_q < 8 * 2.0 ** -4 * float(np.abs(ref).max())


# --- bad options ----------------------------------------------------------------------------


@pytest.mark.parametrize("args,match", [
    (["--quant", "fp8", "--target", "trt-rtx", "--calibration", "EMPTY"], "is empty"),
    (["--quant", "fp8", "--target", "trt-rtx", "--calibration", "LATIN1"],
     "cannot be read as UTF-8"),
    (["--quant", "int8", "--calibration", "EMPTY"], "option of --quant fp8"),
    (["--quant", "fp8", "--target", "trt-rtx", "--compute-capability", "8.6"],
     "needs compute capability 8.9 or newer"),
])
def test_bad_fp8_options_are_one_line_errors(tmp_path, args, match):
    from click.testing import CliRunner

    from g3export.cli import main

    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / "latin1.txt")
            if a == "LATIN1" else a for a in args]
    r = CliRunner().invoke(main, ["build", "--size", "tiny", "--weights", "random", "--out",
                                  str(tmp_path / "x"), *args])
    assert r.exit_code != 0
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and match in errors[0], r.output
    assert "Traceback" not in r.output and not (tmp_path / "x").exists()
