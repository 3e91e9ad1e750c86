"""Block quantizers (g3export.export.quantize) against a direct numpy computation, and the byte
layouts against what ONNX Runtime's kernels read (run with accuracy_level 0: exact float math)."""

import numpy as np
import pytest

from g3export.export import quantize as Q


def direct(w, bits, block):
    """Dequantize(quantize(w)) written element by element from the scheme's definition."""
    qmax = 2 ** (bits - 1) - 1
    out = np.empty_like(w)
    for n in range(w.shape[0]):
        for b in range(w.shape[1] // block):
            blk = w[n, b * block:(b + 1) * block]
            s = np.abs(blk).max() / qmax
            out[n, b * block:(b + 1) * block] = (np.round(blk / s) * s) if s > 0 else 0
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_round_trip_within_half_a_step(bits, block):
    rng = np.random.default_rng(bits * block)
    w = (rng.standard_normal((24, 256)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    w[3, :block] = 0  # an all-zero block is exact
    q, s = Q.quantize_rows(w, bits, block)
    assert q.dtype == np.int8 and s.shape == (24, 256 // block)
    assert np.abs(q).max() <= 2 ** (bits - 1) - 1
    got = Q.dequantize_rows(q, s, block)
    np.testing.assert_allclose(got, direct(w, bits, block), rtol=1e-6, atol=1e-7)
    step = np.repeat(s, block, axis=1)
    assert np.all(np.abs(got - w) <= step / 2 * (1 + 1e-6) + 1e-12)
    assert np.all(got[3, :block] == 0)
    # rows are independent: a slice of rows (a streamed row block) quantizes to that slice
    q2, s2 = Q.quantize_rows(w[5:11], bits, block)
    np.testing.assert_array_equal(q2, q[5:11])
    np.testing.assert_array_equal(s2, s[5:11])


def test_blocks_run_along_k_not_n():
    """Transposed blocks would give each block one scale per column: a weight whose magnitude
    changes along N but not within a K block must be exact up to a half step of ITS row."""
    w = np.outer(np.geomspace(1e-3, 1e3, 16), np.linspace(-1, 1, 64)).astype(np.float32)
    q, s = Q.quantize_rows(w, 4, 32)
    err = np.abs(Q.dequantize_rows(q, s, 32) - w)
    assert np.all(err <= np.abs(w).max(axis=1, keepdims=True) / 7 / 2 * (1 + 1e-6))
    wrong = Q.dequantize_rows(*Q.quantize_rows(w.T.copy(), 4, 16), 16).T
    assert not np.all(np.abs(wrong - w) <= np.abs(w).max(axis=1, keepdims=True) / 14 * (1 + 1e-6))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack(bits):
    rng = np.random.default_rng(1)
    q = rng.integers(-(2 ** (bits - 1) - 1), 2 ** (bits - 1), (5, 64)).astype(np.int8)
    b = Q.pack_unsigned(q, bits)
    assert b.shape == (5, 64 * bits // 8) and b.dtype == np.uint8
    np.testing.assert_array_equal(Q.unpack_unsigned(b, bits), q)
    if bits == 4:  # lower k in the low nibble (MatMulNBits' and GatherBlockQuantized's order)
        assert b[0, 0] == ((int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4))


def _ort_graph(nodes, inits, feeds):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT if v.dtype == np.float32
                                         else TensorProto.INT64, list(v.shape))
           for k, v in feeds.items()]
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20),
                                            helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]


def _ort_run(node, inits, feeds):
    return _ort_graph([node], inits, feeds)


@pytest.mark.parametrize("bits", [4, 8])
def test_layouts_match_onnxruntime_kernels(bits):
    from onnx import helper

    rng = np.random.default_rng(2)
    n, k, block = 48, 128, 32
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    # symmetric int4 for ONNX Runtime: the searched full-range grid; int8: amax/127
    wq = Q.dequantize_rows(*(Q.quantize_rows_full if bits == 4 else Q.quantize_rows)(
        w, bits, block), block)
    b, s = Q.matmul_nbits(w, bits, block)
    assert b.shape == (n, k // block, block * bits // 8)
    node = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k,
                            N=n, bits=bits, block_size=block, accuracy_level=0)
    y = _ort_run(node, {"B": b, "s": s}, {"x": x})
    np.testing.assert_allclose(y, x @ wq.T, rtol=1e-5, atol=1e-5)
    data, s = Q.gather_block_quantized(w, bits, block)
    ids = np.array([[0, 47], [5, 5]], np.int64)
    node = helper.make_node("GatherBlockQuantized", ["d", "i", "s"], ["y"], domain="com.microsoft",
                            gather_axis=0, quantize_axis=1, bits=bits, block_size=block)
    np.testing.assert_array_equal(_ort_run(node, {"d": data, "s": s}, {"i": ids}), wq[ids])


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_linear_layout(bits):
    """The DQ layout through ONNX's own reference implementation of opset-21 blocked DQ."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 64)).astype(np.float32)
    q, s = Q.dequantize_linear(w, bits, 32)
    assert q.shape == (64, 40) and s.shape == (2, 40)
    qt = (helper.make_tensor("q", TensorProto.INT4, q.shape, q.reshape(-1).tolist()) if bits == 4
          else numpy_helper.from_array(q, "q"))
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0,
                                            block_size=32)], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [qt, numpy_helper.from_array(s, "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    got = ReferenceEvaluator(m).run(None, {})[0]
    np.testing.assert_array_equal(got, Q.dequantize_rows(*Q.quantize_rows(w, bits, 32), 32).T)


def test_check_scheme_errors():
    with pytest.raises(Q.QuantError, match="does not divide"):
        Q.check_scheme(Q.QuantScheme("int4", 128), "onnx", {"hidden_size": 96})
    with pytest.raises(Q.QuantError, match="TensorRT"):
        Q.check_scheme(Q.QuantScheme("fp8", None), "onnx", {})
    with pytest.raises(Q.QuantError, match="not supported"):
        Q.check_scheme(Q.QuantScheme("int8", 48), "onnx", {})
    Q.check_scheme(Q.QuantScheme("int4", 64), "onnx", {"hidden_size": 640, "intermediate_size": 2048})


def direct_asym(w, bits, block):
    """Asymmetric dequantize(quantize(w)) element by element from the scheme's definition:
    per block lo = min(0, min), hi = max(0, max), scale (hi - lo) / (2^bits - 1), integer zero
    point round(-lo / scale), codes clip(round(w / scale) + zero, 0, 2^bits - 1)."""
    top = 2 ** bits - 1
    out = np.empty_like(w)
    codes = np.empty(w.shape, np.int64)
    for n in range(w.shape[0]):
        for b in range(w.shape[1] // block):
            blk = w[n, b * block:(b + 1) * block]
            lo, hi = min(0.0, float(blk.min())), max(0.0, float(blk.max()))
            s = np.float32((hi - lo) / top)
            if s == 0:
                out[n, b * block:(b + 1) * block] = 0
                codes[n, b * block:(b + 1) * block] = 0
                continue
            z = min(max(round(-lo / s), 0), top)
            q = [min(max(round(float(x / s)) + z, 0), top) for x in blk]
            codes[n, b * block:(b + 1) * block] = q
            out[n, b * block:(b + 1) * block] = [(c - z) * s for c in q]
    return out, codes


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 128])
def test_asymmetric_round_trip_within_half_a_step(bits, block):
    rng = np.random.default_rng(bits + block)
    w = (rng.standard_normal((12, 256)) * rng.uniform(0.01, 3, (12, 1))).astype(np.float32)
    w[2, :block] = 0                                   # all zero: exact
    w[4, :block] = np.abs(w[4, :block]) + 1            # all positive: the grid starts at 0
    w[5, block:2 * block] = -np.abs(w[5, block:2 * block])  # all negative
    u, s, z = Q.quantize_rows_asym(w, bits, block, search=(1.0,))  # the plain min/max grid
    assert u.dtype == np.uint8 and z.dtype == np.uint8 and s.shape == z.shape == (12, 256 // block)
    assert u.max() <= 2 ** bits - 1 and z.max() <= 2 ** bits - 1
    got = Q.dequantize_rows(u, s, block, z)
    want, codes = direct_asym(w, bits, block)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # codes equal the definition's except where x / s sits on a rounding tie (float order)
    assert np.mean(u == codes) > 0.999
    step = np.repeat(s, block, axis=1)
    assert np.all(np.abs(got - w) <= step / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(got[2, :block] == 0) and z[4, 0] == 0 and z[5, 1] == 2 ** bits - 1
    # every level is used where the block spans it: a step no coarser than symmetric's
    sym_step = np.abs(w.reshape(12, -1, block)).max(axis=2) / (2 ** (bits - 1) - 1)
    assert np.all(s <= sym_step * (1 + 1e-6))
    # the searched grid (the default): never a larger block error than min/max, a smaller one
    # overall at 4 bits, every scale one of the candidates'; and no element outside the grid
    us, ss, zs = Q.quantize_rows_asym(w, bits, block)
    gs = Q.dequantize_rows(us, ss, block, zs)
    berr = lambda x: np.square(x - w).reshape(12, -1, block).sum(axis=2)  # noqa: E731
    assert np.all(berr(gs) <= berr(got) * (1 + 1e-5) + 1e-12)
    if bits == 4:  # at 8 bits clipping an outlier rarely pays: min/max is often the best
        assert berr(gs).sum() < berr(got).sum()
    ratio = np.where(s > 0, ss / np.where(s > 0, s, 1), 1)
    assert np.all(np.min(np.abs(ratio[..., None] - np.array(Q.SEARCH)), axis=-1) < 1e-5)
    assert np.all(np.abs(gs - w) <= np.repeat(ss, block, axis=1) * (2 ** bits))  # in range
    u2, s2, z2 = Q.quantize_rows_asym(w[3:9], bits, block)  # rows are independent
    np.testing.assert_array_equal(u2, us[3:9])
    np.testing.assert_array_equal(s2, ss[3:9])
    np.testing.assert_array_equal(z2, zs[3:9])


@pytest.mark.parametrize("bits", [4, 8])
def test_full_range_symmetric_grid(bits):
    """quantize_rows_full: codes over all 2^bits levels, per block the scale of least squared
    error among its candidates, checked block by block against a direct loop over them; never
    a larger block error than quantize_rows' amax/qmax grid or than ONNX Runtime's own
    (GenAI's) p / -2^(bits-1) grid; negative scales where p is positive."""
    rng = np.random.default_rng(11 + bits)
    block = 32
    w = (rng.standard_normal((10, 128)) * rng.uniform(0.01, 3, (10, 1))).astype(np.float32)
    w[1, :block] = 0                                      # all zero: exact
    w[3, 5] = 40.0                                        # a positive outlier
    w[4, 40] = -40.0                                      # a negative one
    q, s = Q.quantize_rows_full(w, bits, block)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert q.dtype == np.int8 and q.min() >= lo and q.max() <= hi and s.shape == (10, 4)
    got = Q.dequantize_rows(q, s, block)
    assert np.all(got[1, :block] == 0)

    def berr(x):
        return np.square(x - w).reshape(10, -1, block).sum(axis=2)

    for n in range(10):
        for b in range(4):
            blk = w[n, b * block:(b + 1) * block]
            p = blk[np.abs(blk).argmax()]
            cands = [p / lo * f for f in Q.SEARCH] + [p / hi]
            errs = [np.square(np.clip(np.rint(blk / c), lo, hi) * c - blk).sum() if c else 0.0
                    for c in np.float32(cands)]
            assert berr(got)[n, b] <= min(errs) * (1 + 1e-5) + 1e-12
            assert np.min(np.abs(np.float32(cands) - s[n, b])) <= 1e-6 * abs(p) + 1e-30
    assert np.all(berr(got) <= berr(Q.dequantize_rows(*Q.quantize_rows(w, bits, block), block))
                  * (1 + 1e-5) + 1e-12)
    peak = np.take_along_axis(w.reshape(10, -1, block),
                              np.abs(w.reshape(10, -1, block)).argmax(2)[..., None], 2)[..., 0]
    ort = np.where(peak != 0, peak / lo, 1).astype(np.float32)  # ONNX Runtime's quantizer's grid
    ort_q = np.clip(np.rint(w.reshape(10, -1, block) / ort[..., None]), lo, hi)
    assert np.all(berr(got) <= berr((ort_q * ort[..., None]).reshape(10, -1)) * (1 + 1e-5) + 1e-12)
    assert s[3, 0] < 0 < s[4, 1]  # the outlier's side gets the extra step (code -8)
    q2, s2 = Q.quantize_rows_full(w[2:7], bits, block)  # rows are independent
    np.testing.assert_array_equal(q2, q[2:7])
    np.testing.assert_array_equal(s2, s[2:7])


def test_zero_point_layouts():
    z = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)  # 3 blocks per row: each row padded
    np.testing.assert_array_equal(Q.zero_points_nbits(z, 4), [0x21, 0x03, 0x54, 0x06])
    np.testing.assert_array_equal(Q.zero_points_nbits(z, 8), z.reshape(-1))
    assert Q.zero_points_gather(z).shape == (2, 3, 1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 64])
def test_zero_point_layouts_match_onnxruntime_kernels(bits, block):
    """MatMulNBits and GatherBlockQuantized (both the quantize_axis 1 layout and the graph's
    quantize_axis 2 view of the shared table) with zero points, against numpy's dequantization
    of the same codes. 3 blocks per row for block 64 (K=192): the odd count pads each row's
    packed zero points."""
    from onnx import helper

    rng = np.random.default_rng(5)
    n, k = 40, 192
    w = (rng.standard_normal((n, k)) + rng.uniform(-2, 2, (n, 1))).astype(np.float32)  # skewed
    x = rng.standard_normal((3, k)).astype(np.float32)
    u, s, z = Q.quantize_rows_asym(w, bits, block)
    wq = Q.dequantize_rows(u, s, block, z)
    b, s2, zp = Q.matmul_nbits(w, bits, block, symmetric=False)
    assert b.shape == (n, k // block, block * bits // 8) and zp.dtype == np.uint8
    np.testing.assert_array_equal(s2, s)
    node = helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=0)
    y = _ort_graph([node], {"B": b, "s": s, "z": zp}, {"x": x})
    np.testing.assert_allclose(y, x @ wq.T, rtol=1e-5, atol=1e-4)
    ids = np.array([[0, 39], [7, 7]], np.int64)
    data, s3, zg = Q.gather_block_quantized(w, bits, block, symmetric=False)
    node = helper.make_node("GatherBlockQuantized", ["d", "i", "s", "z"], ["y"],
                            domain="com.microsoft", gather_axis=0, quantize_axis=1, bits=bits,
                            block_size=block)
    np.testing.assert_array_equal(_ort_graph([node], {"d": data, "s": s3, "z": zg}, {"i": ids}),
                                  wq[ids])
    if bits == 4:  # the graph's form: MatMulNBits' B viewed as [rows, K/block, block/2]
        node = helper.make_node("GatherBlockQuantized", ["d", "i", "s", "z"], ["y"],
                                domain="com.microsoft", gather_axis=0, quantize_axis=2,
                                bits=bits, block_size=block)
        got = _ort_graph([node], {"d": b, "s": s[:, :, None], "z": Q.zero_points_gather(z)},
                         {"i": ids})
        np.testing.assert_array_equal(got.reshape(2, 2, k), wq[ids])


def test_resolve_symmetric_default():
    assert Q.QuantScheme("int4", 32).resolve("onnx").symmetric is True
    assert Q.QuantScheme("int8", 32).resolve("onnx").symmetric is True
    assert Q.QuantScheme("int4", 32).resolve("trt-rtx").symmetric is True
    assert Q.QuantScheme("int4", 32, symmetric=True).resolve("onnx").symmetric is True
    with pytest.raises(Q.QuantError, match="--target onnx"):
        Q.QuantScheme("int4", 32, symmetric=False).resolve("trt")
    assert Q.QuantScheme("int4", 32, symmetric=False).resolve("onnx").symmetric is False
    d = Q.QuantScheme("int4", 32, symmetric=False).resolve("onnx").to_dict()
    assert (d["symmetric"], d["zero_points"]) == (False, True)
