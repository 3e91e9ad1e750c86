"""The Triton attention kernels against `attention_reference`, under Triton's interpreter on CPU
(TRITON_INTERPRET=1): ring wrap-around, chunks longer than one token (T > W too), positions far
past W, GQA 1/2/4, image blocks, both layer types, split-K decode with batch 2, fp32/fp16/bf16, and
the caches after the in-place write equal the reference's returned caches."""

from __future__ import annotations

import importlib
import os
import sys

# Must be set before triton is first imported: triton decorates its own library functions
# (tl.max, tl.sum, ...) at import time, interpreted or compiled by this variable.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.9.0 "
                                              "--no-deps); the Triton kernels cannot be checked")

from g3export.modeling.attention import attention_reference  # noqa: E402


def _interpreted() -> bool:
    import triton.language as tl
    return type(tl.max).__name__ == "InterpretedFunction"


_MOD = "g3export.export.kernels.attention_triton"
if not _interpreted():
    # Another test module imported triton (directly or through torch) before this one set
    # TRITON_INTERPRET: re-import triton so its library functions are interpreted too. (The
    # lasting fix is `os.environ.setdefault("TRITON_INTERPRET", "1")` in tests/conftest.py.)
    for name in [n for n in sys.modules if (n == "triton" or n.startswith("triton."))
                 and not n.startswith("triton._C")]:  # the C extension cannot load twice
        del sys.modules[name]
    sys.modules.pop(_MOD, None)
    triton = importlib.import_module("triton")
if not _interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could take effect and could not be "
                "re-imported; set it in tests/conftest.py or run this file on its own",
                allow_module_level=True)
if _MOD in sys.modules:  # imported earlier without the interpreter: rebuild the kernels
    kt = importlib.reload(sys.modules[_MOD])
else:
    kt = importlib.import_module(_MOD)

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(b, h, kv, t, s, d, start, dtype, groups=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    q, k, v = r(b, h, t, d), r(b, kv, t, d), r(b, kv, t, d)
    kc, vc = r(b, kv, s, d), r(b, kv, s, d)
    sp = torch.tensor([start], dtype=torch.int64)
    ig = torch.full((b, t), -1, dtype=torch.int64) if groups is None else groups
    return q, k, v, kc, vc, sp, ig


def _check(q, k, v, kc, vc, sp, ig, window, scale=0.25):
    ref_out, ref_k, ref_v = attention_reference(q, k, v, kc, vc, sp, ig, window, scale)
    kc2, vc2 = kc.clone(), vc.clone()
    out = kt.attention_triton(q, k, v, kc2, vc2, sp, ig, window, scale)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    assert torch.equal(kc2, ref_k) and torch.equal(vc2, ref_v), "cache after write differs"
    return out


# ---- prefill --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv", [4, 2, 1])  # GQA ratios 1, 2, 4 (H = 4)
@pytest.mark.parametrize("start,t", [(0, 20), (20, 19), (37, 1 + 16)])
def test_prefill_full(kv, start, t):
    _check(*_inputs(1, 4, kv, t, 64, 16, start, torch.float32), window=0)


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("start,t", [
    (0, 20),    # cache empty, T < W
    (10, 20),   # partly filled ring, T < W
    (50, 40),   # ring wrapped, T > W: only the last W keys are kept
    (37, 3),    # short chunk across the wrap point
])
def test_prefill_sliding(kv, start, t):
    _check(*_inputs(1, 4, kv, t, 32, 16, start, torch.float32), window=32)


@pytest.mark.parametrize("t", [5, 20])
def test_prefill_far_past_window(t):
    # start 1000 with W 8: many wraps; T = 20 > W
    _check(*_inputs(2, 4, 2, t, 8, 16, 1000, torch.float32), window=8)


def test_prefill_full_far_position():
    _check(*_inputs(1, 2, 1, 6, 1040, 16, 1000, torch.float32), window=0)


def _two_images(b, t):
    g = torch.full((b, t), -1, dtype=torch.int64)
    g[0, 3:14] = 0   # image 0: 11 tokens, crosses a 16-wide tile boundary
    g[0, 14:34] = 1  # image 1: 20 tokens, right after image 0, spans three tiles
    if b > 1:
        g[1, 20:27] = 0
    return g


@pytest.mark.parametrize("window,s", [(0, 128), (16, 16), (64, 64)])
@pytest.mark.parametrize("kv", [2, 1])
def test_prefill_images(window, s, kv):
    t = 40
    _check(*_inputs(2, 4, kv, t, s, 16, 7, torch.float32, groups=_two_images(2, t)), window=window)


def test_prefill_head_dim_32_and_scale():
    _check(*_inputs(1, 2, 1, 18, 32, 32, 40, torch.float32), window=16, scale=32 ** -0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,s", [(0, 96), (16, 16)])
def test_prefill_half(dtype, window, s):
    _check(*_inputs(2, 4, 2, 33, s, 16, 21, dtype, groups=_two_images(2, 33)), window=window)


# ---- decode ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("start", [0, 5, 63, 200])
def test_decode_full(kv, start):
    _check(*_inputs(2, 4, kv, 1, 256, 16, start, torch.float32), window=0)


@pytest.mark.parametrize("kv", [4, 1])
@pytest.mark.parametrize("start,w", [(0, 32), (7, 32), (45, 32), (1000, 8), (1001, 64)])
def test_decode_sliding(kv, start, w):
    _check(*_inputs(2, 4, kv, 1, w, 16, start, torch.float32), window=w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_half(dtype):
    _check(*_inputs(2, 4, 2, 1, 64, 16, 300, dtype), window=64)
    _check(*_inputs(2, 4, 2, 1, 128, 16, 90, dtype), window=0)


def test_decode_splits():
    # enough slots that the static split count is > 1 and the live range divides unevenly
    ns = kt.decode_num_splits(2, 1, 512, 0, kt.decode_block_n(16))
    assert ns > 1
    _check(*_inputs(2, 2, 1, 1, 512, 16, 333, torch.float32), window=0)


# ---- a whole sequence: prefill chunks then decode steps, caches carried in place ------------------

@pytest.mark.parametrize("window,s", [(0, 96), (16, 16)])
def test_sequence(window, s):
    b, h, kv, d = 2, 4, 2, 16
    g = torch.Generator().manual_seed(1)
    kc_r = torch.zeros(b, kv, s, d)
    vc_r = torch.zeros(b, kv, s, d)
    kc_t, vc_t = kc_r.clone(), vc_r.clone()
    pos = 0
    for t in [9, 21, 1, 1, 1, 13, 1, 1]:
        q = torch.randn(b, h, t, d, generator=g)
        k = torch.randn(b, kv, t, d, generator=g)
        v = torch.randn(b, kv, t, d, generator=g)
        ig = torch.full((b, t), -1, dtype=torch.int64)
        if t == 21:
            ig[:, 4:12] = 0
        sp = torch.tensor([pos], dtype=torch.int64)
        ref, kc_r, vc_r = attention_reference(q, k, v, kc_r, vc_r, sp, ig, window, 0.3)
        out = kt.attention_triton(q, k, v, kc_t, vc_t, sp, ig, window, 0.3)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        assert torch.equal(kc_t, kc_r) and torch.equal(vc_t, vc_r)
        pos += t


def test_out_argument_and_workspace():
    q, k, v, kc, vc, sp, ig = _inputs(1, 2, 1, 17, 32, 16, 3, torch.float32)
    ref, _, _ = attention_reference(q, k, v, kc, vc, sp, ig, 8, 0.25)
    out = torch.full_like(q, float("nan"))
    ws = torch.empty(kt.workspace_bytes(1, 2, 1, 17, 32, 16, 8), dtype=torch.uint8)
    r = kt.attention_triton(q, k, v, kc, vc, sp, ig, 8, 0.25, out=out, workspace=ws)
    assert r is out
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


# ---- tiles outside the window are skipped, not masked ----------------------------------------------

def _expected_tiles(start, t, s, ig, window, bm, bn):
    """From the reference mask: per (query tile), how many BN-aligned key tiles (old cache in
    position order, then chunk keys) hold at least one visible key for some query of the tile."""
    from g3export.modeling.attention import attention_mask, old_slot_positions
    sp = torch.tensor([start])
    mask = attention_mask(sp, t, s, ig, window)[0]  # [T, S + T] (batch row 0)
    p_old = old_slot_positions(sp, s)[0]
    res = []
    for m0 in range(0, t, bm):
        rows = mask[m0:m0 + bm]
        old_vis = rows[:, :s].any(0)
        old_tiles = {int(p) // bn for p, vis in zip(p_old.tolist(), old_vis.tolist()) if vis}
        new_vis = rows[:, s:].any(0)
        new_tiles = {u // bn for u, vis in enumerate(new_vis.tolist()) if vis}
        res.append((len(old_tiles), len(new_tiles)))
    return res


@pytest.mark.parametrize("window,s,start,t,images", [
    (32, 32, 200, 64, False),   # T = 2W on a wrapped ring: late query tiles visit no old tile
    (32, 32, 1000, 40, True),
    (16, 16, 7, 48, True),
    (0, 256, 100, 40, True),    # full layer: only slots holding positions < start
    (0, 256, 0, 40, False),
])
def test_tiles_skipped(window, s, start, t, images):
    cfg = kt.prefill_config(16)
    b, h, kv = 1, 2, 1
    ig = _two_images(b, t) if images else None
    q, k, v, kc, vc, sp, ig = _inputs(b, h, kv, t, s, 16, start, torch.float32, groups=ig)
    n_mt = triton.cdiv(t, cfg.block_m)
    counts = torch.full((b * h, n_mt, 2), -1, dtype=torch.int32)
    ref, _, _ = attention_reference(q, k, v, kc, vc, sp, ig, window, 0.25)
    out = kt.attention_triton(q, k, v, kc.clone(), vc.clone(), sp, ig, window, 0.25,
                              _tile_counts=counts)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    want = _expected_tiles(start, t, s, ig, window, cfg.block_m, cfg.block_n)
    for hh in range(b * h):
        assert [tuple(x) for x in counts[hh].tolist()] == want


@pytest.mark.parametrize("window,s,start,t", [(0, 128, 40, 20), (0, 128, 40, 1), (32, 32, 5, 9),
                                              (32, 32, 20, 1)])
def test_empty_slots_never_read(window, s, start, t):
    """Empty slots (no position written yet) may hold anything, NaN included (torch.empty): the
    kernels never load them. (The reference would turn them into NaN: 0 * NaN in its einsum.)"""
    q, k, v, kc, vc, sp, ig = _inputs(2, 4, 2, t, s, 16, start, torch.float32)
    ref, ref_k, ref_v = attention_reference(q, k, v, kc, vc, sp, ig, window, 0.25)
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[:, :, start:] = float("nan")
    vc2[:, :, start:] = float("nan")
    out = kt.attention_triton(q, k, v, kc2, vc2, sp, ig, window, 0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


# ---- every row at its own position (issue 13) ------------------------------------------------------

@pytest.mark.parametrize("window,s", [(8, 8), (0, 64)])
@pytest.mark.parametrize("t", [1, 5])
def test_rows_at_own_positions(window, s, t):
    """Rows at 3, 37 (past the window, a wrapped ring) and 0 (a restarted row over old contents):
    prefill and split-K decode read each row's own start, against the reference."""
    q, k, v, kc, vc, _, ig = _inputs(3, 4, 2, t, s, 16, 0, torch.float32)
    sp = torch.tensor([3, 37, 0], dtype=torch.int64)
    out = _check(q, k, v, kc, vc, sp, ig, window)
    for r in range(3):  # and each row equals a batch-1 call of the reference at its start
        sl = slice(r, r + 1)
        want, _, _ = attention_reference(q[sl], k[sl], v[sl], kc[sl], vc[sl], sp[sl], ig[sl],
                                         window, 0.25)
        torch.testing.assert_close(out[sl], want, atol=2e-5, rtol=2e-5)


def test_rows_sequence_with_reset():
    """A chunked prefill then decode in two rows that started at different times; row 1 restarts
    at 0 midway while row 0 continues. The in-place caches follow the reference's throughout."""
    window, s = 8, 8
    g = torch.Generator().manual_seed(5)
    kc, vc = torch.randn(2, 2, s, 16, generator=g), torch.randn(2, 2, s, 16, generator=g)
    rk, rv = kc.clone(), vc.clone()
    pos = [0, 0]
    for i, t in enumerate([5, 4, 1, 1, 3, 1, 1, 1]):
        if i == 1:
            pos[1] = 0   # row 1 joins one chunk later
        if i == 5:
            pos[1] = 0   # and restarts later on
        sp = torch.tensor(pos, dtype=torch.int64)
        q = torch.randn(2, 4, t, 16, generator=g)
        k, v = torch.randn(2, 2, t, 16, generator=g), torch.randn(2, 2, t, 16, generator=g)
        ig = torch.full((2, t), -1, dtype=torch.int64)
        want, rk, rv = attention_reference(q, k, v, rk, rv, sp, ig, window, 0.25)
        out = kt.attention_triton(q, k, v, kc, vc, sp, ig, window, 0.25)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
        assert torch.equal(kc, rk) and torch.equal(vc, rv)
        pos = [p + t for p in pos]
    assert pos[0] > window
