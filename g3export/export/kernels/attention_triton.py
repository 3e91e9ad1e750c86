"""Triton kernels for the `g3::attention` op (DESIGN §3.2, §3.3; issue 8).

Same math and the same static cache layout as `g3export.modeling.attention.attention_reference`:

    q [B, H, T, D], k/v [B, KV, T, D], k_cache/v_cache [B, KV, S, D], start_pos int64 [B] (on the
    device; one start per row: every program loads its own row's), image_groups int64 [B, T],
    window W (0 = full layer), scale.

Query at position i sees key j iff (j <= i OR same image) AND (full OR j > i - W); the queries
attend over the old cache contents and the chunk's own keys, and only then are the last min(T, S)
chunk keys written to slot = pos mod S.

**Functional vs in place.** The reference returns new caches (`out, k_cache_out, v_cache_out`) and
leaves its inputs alone. `attention_triton` writes the chunk into `k_cache`/`v_cache` IN PLACE and
returns only `out`; after the call `k_cache`/`v_cache` equal the reference's returned caches. That
is what the runtime wants (the graph's cache input and output are bound to one buffer).

Kernels (all grids depend only on static shapes; `start_pos` is read on the device, so nothing
syncs with the host and a launch can be captured in a CUDA graph or run from a TensorRT enqueue):

* `_image_extent_kernel` (prefill only, grid [T/BLOCK_M, B]): for each query tile, the end of the
  chunk keys it can see: the causal end, extended to the last key sharing an image group with a
  query of the tile. The prefill kernel loops up to that and never past it.
* `_prefill_kernel` (grid [T/BLOCK_M, B*H], one query head per program; its KV head is h // (H/KV),
  K/V are never repeated): flash-attention style online softmax in fp32 (exp2 with the scale folded
  in). Phase 1 walks the OLD cache in *position* order, tile by tile, slot = p mod S:
  positions [max(0, start - S), start) for a full layer (only slots that hold something), and
  additionally >= start + m0 - W + 1 for a sliding layer (m0 = first query of the tile), so key
  tiles wholly outside the tile's window are never visited (skipped, not masked). Phase 2 walks the
  chunk's own keys from max(0, m0 - W + 1) (sliding) or 0 (full) up to the tile's extent from the
  pre-pass. Masks are applied only inside the tiles visited. Tiles start at multiples of
  BLOCK_N in position space, so when S % BLOCK_N == 0 (W = 512/1024, max_context a multiple of 64)
  a tile never wraps the ring and its slots are contiguous (RING_ALIGNED: vectorised loads);
  otherwise slots are gathered element-wise with p mod S.
* `_decode_split_kernel` (T == 1, grid [NUM_SPLITS, B*KV]): split-K over the old keys
  [lo, start), lo = max(0, start - S, start - W + 1 if sliding): the live range is divided evenly
  among the splits on the device (so a full layer at position 4K of a 128K cache reads 4K keys, not
  128K). One program handles all H/KV query heads of one KV head, so each K/V byte is read once.
  Writes partial (max, sum, unnormalised acc) per split.
* `_decode_combine_kernel` (grid [B*H]): merges the splits plus the new token's own key, writes
  the output, and (fused) writes the new K/V into slot start mod S: it runs after the split kernel
  in stream order, so every read of the old slot is done.
* `_cache_write_kernel` (prefill, separate launch after the attention kernel, grid
  [min(T,S)/BLOCK, B*KV]): copies the last min(T, S) chunk keys/values into slot = pos mod S.

bf16 under Triton's interpreter: the interpreter (triton 3.9) stores bf16 as uint16 and its
`tl.dot`/arithmetic on bf16 are wrong, so when interpreting with bf16 the dot inputs are upcast to
fp32 (after the same bf16 rounding of P the GPU path does); on a GPU the dots run in the input
dtype on tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _image_extent_kernel(G, KVHI, T, stride_gb, n_mtiles, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    gq = tl.load(G + b * stride_gb + offs_m, mask=offs_m < T, other=-1)
    hi = tl.minimum(m0 + BLOCK_M, T)
    for u0 in range(m0 + BLOCK_M, T, BLOCK_N):
        u = u0 + tl.arange(0, BLOCK_N)
        gk = tl.load(G + b * stride_gb + u, mask=u < T, other=-2)
        match = (gq[:, None] == gk[None, :]) & (gq[:, None] >= 0)
        cand = tl.where(match, u[None, :] + 1, 0)
        hi = tl.maximum(hi, tl.max(tl.max(cand, axis=1), axis=0))
    tl.store(KVHI + b * n_mtiles + pid_m, hi)


@triton.jit
def _online_update(qk, vis, v, m_i, l_i, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step; qk is already in log2 units (scale * log2 e folded in)."""
    qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if UPCAST:
        pv = p.to(v.dtype).to(tl.float32)
        acc += tl.dot(pv, v.to(tl.float32), input_precision=DOT_PREC)
    else:
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(Q, K, V, KC, VC, O, START, G, KVHI, CNT,
                    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sc_b, sc_h, sc_s, so_b, so_h, so_t, sg_b,
                    H, GROUP, T, S, W, n_mtiles, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    SLIDING: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                    COUNT: tl.constexpr, RING_ALIGNED: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    start = tl.load(START + b)  # int64: this row's start
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < T
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    pos_q = start + offs_m  # int64 positions of the queries

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # ---- phase 1: the old cache, in position order; slot = p mod S -------------------------------
    kc_base = KC + b * sc_b + kvh * sc_h
    vc_base = VC + b * sc_b + kvh * sc_h
    lo = tl.maximum(start - S, 0)  # oldest position still held
    if SLIDING:
        lo = tl.maximum(lo, start + m0 - W + 1)  # first position the tile's first query sees
    lo_al = (lo // BLOCK_N) * BLOCK_N
    p_end = tl.where(lo < start, start, lo_al)  # nothing old in the window: no tile at all
    n_old = 0
    for p0 in range(lo_al, p_end, BLOCK_N):
        n_old += 1
        p = p0 + offs_n
        ok = (p >= lo) & (p < start)
        if RING_ALIGNED:  # S % BLOCK_N == 0 and p0 is aligned: the tile never wraps, contiguous
            slot = (p0 % S) + offs_n
        else:
            slot = p % S
        kt = tl.load(kc_base + slot[:, None] * sc_s + offs_d[None, :], mask=ok[:, None], other=0.0)
        vt = tl.load(vc_base + slot[:, None] * sc_s + offs_d[None, :], mask=ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        vis = ok[None, :]
        if SLIDING:
            vis = vis & (p[None, :] > pos_q[:, None] - W)
        m_i, l_i, acc = _online_update(qk, vis, vt, m_i, l_i, acc, DOT_PREC, UPCAST)

    # ---- phase 2: the chunk's own keys ----------------------------------------------------------
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sk_b + kvh * sk_h
    gq = tl.load(G + b * sg_b + offs_m, mask=m_ok, other=-1)
    hi = tl.load(KVHI + b * n_mtiles + pid_m)  # causal end, extended over the tile's images
    u_lo = 0
    if SLIDING:
        u_lo = tl.maximum(m0 - W + 1, 0)
    u_lo = (u_lo // BLOCK_N) * BLOCK_N
    n_new = 0
    for u0 in range(u_lo, hi, BLOCK_N):
        n_new += 1
        u = u0 + offs_n
        ok = u < T
        kt = tl.load(k_base + u[:, None] * sk_t + offs_d[None, :], mask=ok[:, None], other=0.0)
        vt = tl.load(v_base + u[:, None] * sk_t + offs_d[None, :], mask=ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        gk = tl.load(G + b * sg_b + u, mask=ok, other=-2)
        same = (gq[:, None] == gk[None, :]) & (gq[:, None] >= 0)
        vis = ((u[None, :] <= offs_m[:, None]) | same) & ok[None, :]
        if SLIDING:
            vis = vis & ((offs_m[:, None] - u[None, :]) < W)
        m_i, l_i, acc = _online_update(qk, vis, vt, m_i, l_i, acc, DOT_PREC, UPCAST)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None])
    if COUNT:  # debug/test only: key tiles visited by this program (old cache, chunk)
        c = (pid_bh * n_mtiles + pid_m) * 2
        tl.store(CNT + c, n_old)
        tl.store(CNT + c + 1, n_new)


@triton.jit
def _cache_write_kernel(K, V, KC, VC, START, sk_b, sk_h, sk_t, sc_b, sc_h, sc_s, KVN, T, S,
                        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // KVN).to(tl.int64)
    kvh = (pid_bk % KVN).to(tl.int64)
    start = tl.load(START + b)  # this row's start
    n = tl.minimum(T, S)
    i = pid * BLOCK + tl.arange(0, BLOCK)  # index among the kept keys
    ok = i < n
    u = T - n + i  # chunk index
    slot = (start + u) % S
    offs_d = tl.arange(0, HEAD_DIM)
    src = b * sk_b + kvh * sk_h + u[:, None] * sk_t + offs_d[None, :]
    dst = b * sc_b + kvh * sc_h + slot[:, None] * sc_s + offs_d[None, :]
    tl.store(KC + dst, tl.load(K + src, mask=ok[:, None]), mask=ok[:, None])
    tl.store(VC + dst, tl.load(V + src, mask=ok[:, None]), mask=ok[:, None])


@triton.jit
def _decode_split_kernel(Q, KC, VC, START, MP, LP, AP,
                         sq_b, sq_h, sc_b, sc_h, sc_s,
                         KVN, GROUP, S, W, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, SLIDING: tl.constexpr,
                         DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, RING_ALIGNED: tl.constexpr):
    split = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // KVN).to(tl.int64)
    kvh = (pid_bk % KVN).to(tl.int64)
    start = tl.load(START + b)  # this row's start
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < GROUP
    heads = kvh * GROUP + offs_g  # the query heads sharing this KV head
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=g_ok[:, None],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    lo = tl.maximum(start - S, 0)
    if SLIDING:
        lo = tl.maximum(lo, start - W + 1)
    lo_al = (lo // BLOCK_N) * BLOCK_N
    n_tiles = (start - lo_al + BLOCK_N - 1) // BLOCK_N
    per = (n_tiles + NUM_SPLITS - 1) // NUM_SPLITS  # tiles per split, decided on the device
    s_lo = lo_al + split * per * BLOCK_N
    s_hi = tl.minimum(s_lo + per * BLOCK_N, start)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    kc_base = KC + b * sc_b + kvh * sc_h
    vc_base = VC + b * sc_b + kvh * sc_h
    for p0 in range(s_lo, s_hi, BLOCK_N):
        p = p0 + offs_n
        ok = (p >= lo) & (p < s_hi)
        if RING_ALIGNED:
            slot = (p0 % S) + offs_n
        else:
            slot = p % S
        kt = tl.load(kc_base + slot[:, None] * sc_s + offs_d[None, :], mask=ok[:, None], other=0.0)
        vt = tl.load(vc_base + slot[:, None] * sc_s + offs_d[None, :], mask=ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        m_i, l_i, acc = _online_update(qk, ok[None, :], vt, m_i, l_i, acc, DOT_PREC, UPCAST)

    # partials laid out [B, H, NUM_SPLITS] and [B, H, NUM_SPLITS, D], fp32
    row = (b * KVN * GROUP + heads) * NUM_SPLITS + split
    tl.store(MP + row, m_i, mask=g_ok)
    tl.store(LP + row, l_i, mask=g_ok)
    tl.store(AP + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _decode_combine_kernel(Q, K, V, KC, VC, O, START, MP, LP, AP,
                           sq_b, sq_h, sk_b, sk_h, sc_b, sc_h, sc_s, so_b, so_h,
                           H, GROUP, S, qk_scale,
                           HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                           SPLITS_P2: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    kvh = h // GROUP
    start = tl.load(START + b)  # this row's start
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < NUM_SPLITS
    row = (b * H + h) * NUM_SPLITS + offs_s
    m_s = tl.load(MP + row, mask=s_ok, other=float("-inf"))
    l_s = tl.load(LP + row, mask=s_ok, other=0.0)
    a_s = tl.load(AP + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    # the new token's own key: always visible to itself
    q = tl.load(Q + b * sq_b + h * sq_h + offs_d).to(tl.float32)
    kn_raw = tl.load(K + b * sk_b + kvh * sk_h + offs_d)
    vn_raw = tl.load(V + b * sk_b + kvh * sk_h + offs_d)
    s_new = tl.sum(q * kn_raw.to(tl.float32), axis=0) * qk_scale
    m = tl.maximum(tl.max(m_s, axis=0), s_new)
    w_s = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m))
    w_new = tl.exp2(s_new - m)
    l_tot = tl.sum(w_s * l_s, axis=0) + w_new
    acc = tl.sum(w_s[:, None] * a_s, axis=0) + w_new * vn_raw.to(tl.float32)
    out = acc / l_tot
    tl.store(O + b * so_b + h * so_h + offs_d, out.to(O.dtype.element_ty))
    # fused cache write: one program per KV head writes the new key/value into slot start mod S
    if h % GROUP == 0:
        slot = start % S
        dst = b * sc_b + kvh * sc_h + slot * sc_s + offs_d
        tl.store(KC + dst, kn_raw)
        tl.store(VC + dst, vn_raw)


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int, interpret: bool | None = None) -> PrefillConfig:
    """Tile sizes (not autotuned: the plugin wants a fixed, reproducible launch).

    GPU (H100-class, bf16): D <= 64 -> 128x64; D = 128 -> 128x64, 8 warps; D = 256 -> 64x64,
    8 warps (Q tile 32 KiB + K/V tiles 2 x 32 KiB x 2 stages fit in shared memory). Under the
    interpreter: 16x16 so that small tests exercise many tiles (wrap, skips, partial tiles)."""
    if interpret is None:
        interpret = _interpreting()
    if interpret:
        return PrefillConfig(16, 16, 1, 1)
    if head_dim <= 64:
        return PrefillConfig(128, 64, 4, 3)
    if head_dim <= 128:
        return PrefillConfig(128, 64, 8, 3)
    return PrefillConfig(64, 64, 8, 2)


def decode_block_n(head_dim: int, interpret: bool | None = None) -> int:
    if interpret is None:
        interpret = _interpreting()
    if interpret:
        return 16
    return 64 if head_dim <= 128 else 32


def decode_num_splits(batch: int, kv_heads: int, slots: int, window: int, block_n: int,
                      num_sms: int = 132) -> int:
    """Static split count (from shapes only): enough programs to fill ~2 waves of SMs, each split
    covering at least 4 key tiles of the largest possible key range."""
    max_keys = min(slots, window) if window > 0 else slots
    max_splits = max(1, triton.cdiv(max_keys, 4 * block_n))
    want = max(1, triton.cdiv(2 * num_sms, batch * kv_heads))
    return int(min(max_splits, want, 256))


def workspace_bytes(batch: int, heads: int, kv_heads: int, t: int, slots: int, head_dim: int,
                    window: int, num_sms: int = 132, interpret: bool | None = None) -> int:
    """Scratch the entry needs (decode partials or the prefill tile extents), for a TensorRT
    plugin's getWorkspaceSize. 256-byte aligned pieces."""
    if t == 1:
        bn = decode_block_n(head_dim, interpret)
        ns = decode_num_splits(batch, kv_heads, slots, window, bn, num_sms)
        n = batch * heads * ns
        return _align(4 * n) * 2 + _align(4 * n * head_dim)
    cfg = prefill_config(head_dim, interpret)
    return _align(8 * batch * triton.cdiv(t, cfg.block_m))


def _align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


# --------------------------------------------------------------------------------------------------
# entries
# --------------------------------------------------------------------------------------------------


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, start_pos: torch.Tensor, image_groups: torch.Tensor,
                     window: int, scale: float, out: torch.Tensor | None = None,
                     workspace: torch.Tensor | None = None,
                     _tile_counts: torch.Tensor | None = None) -> torch.Tensor:
    """`g3::attention` on Triton kernels. Writes the chunk into k_cache/v_cache IN PLACE and returns
    out [B, H, T, D] (the reference instead returns fresh caches; after this call the caches equal
    those). No host sync: start_pos stays on the device. `workspace`: optional uint8 scratch of at
    least `workspace_bytes(...)` (the plugin's workspace); allocated here when None.

    Requirements: last dim contiguous for q/k/v/caches/out; D a power of two >= 16; H % KV == 0;
    T == 1 takes the split-K decode path (image groups are irrelevant there: a single token).
    `_tile_counts` (tests only, prefill only): int32 [B*H, T/BLOCK_M, 2] receives the number of
    old-cache and chunk key tiles each program visited."""
    b, h, t, d = q.shape
    kvn, s = k_cache.shape[1], k_cache.shape[2]
    assert k.shape == (b, kvn, t, d) and v.shape == k.shape, (q.shape, k.shape, v.shape)
    assert v_cache.shape == k_cache.shape == (b, kvn, s, d), (k_cache.shape, v_cache.shape)
    assert h % kvn == 0, "query heads must be a multiple of KV heads"
    assert d >= 16 and d & (d - 1) == 0, "head dim must be a power of two >= 16"
    assert image_groups.shape == (b, t), image_groups.shape
    for x in (q, k, v, k_cache, v_cache):
        assert x.stride(-1) == 1, "last dim must be contiguous"
    assert k_cache.dtype == k.dtype and v_cache.dtype == v.dtype
    window = int(window)
    sliding = window > 0
    group = h // kvn
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    start_pos = start_pos.reshape(-1)
    if start_pos.dtype != torch.int64:
        start_pos = start_pos.to(torch.int64)
    if start_pos.numel() == 1 and b > 1:  # the old all-rows-alike form
        start_pos = start_pos.expand(b).contiguous()
    assert start_pos.numel() == b and start_pos.stride(0) == 1, "start_pos must be int64 [B]"
    interp = _interpreting()
    upcast = interp and q.dtype == torch.bfloat16
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = float(scale) * LOG2E
    dev = q.device
    nsm = _num_sms(dev)
    need = workspace_bytes(b, h, kvn, t, s, d, window, nsm, interp)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.uint8, device=dev)
    assert workspace.numel() >= need, f"workspace needs {need} bytes"

    if t == 1:
        bn = decode_block_n(d, interp)
        ns = decode_num_splits(b, kvn, s, window, bn, nsm)
        n = b * h * ns
        off_l = _align(4 * n)
        off_a = 2 * off_l
        mp = workspace[:4 * n].view(torch.float32)
        lp = workspace[off_l:off_l + 4 * n].view(torch.float32)
        ap = workspace[off_a:off_a + 4 * n * d].view(torch.float32)
        block_g = max(16, triton.next_power_of_2(group))
        _decode_split_kernel[(ns, b * kvn)](
            q, k_cache, v_cache, start_pos, mp, lp, ap,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            kvn, group, s, window, qk_scale,
            HEAD_DIM=d, BLOCK_G=block_g, BLOCK_N=bn, NUM_SPLITS=ns, SLIDING=sliding,
            DOT_PREC=prec, UPCAST=upcast, RING_ALIGNED=s % bn == 0,
            num_warps=4 if d <= 128 else 8, num_stages=2)
        _decode_combine_kernel[(b * h,)](
            q, k, v, k_cache, v_cache, out, start_pos, mp, lp, ap,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
            h, group, s, qk_scale,
            HEAD_DIM=d, NUM_SPLITS=ns, SPLITS_P2=triton.next_power_of_2(ns), num_warps=4)
        return out

    cfg = prefill_config(d, interp)
    n_mt = triton.cdiv(t, cfg.block_m)
    kvhi = workspace[:8 * b * n_mt].view(torch.int64)
    groups = image_groups if image_groups.dtype == torch.int64 else image_groups.to(torch.int64)
    groups = groups.contiguous()
    _image_extent_kernel[(n_mt, b)](groups, kvhi, t, groups.stride(0), n_mt,
                                    BLOCK_M=cfg.block_m, BLOCK_N=64 if not interp else 16,
                                    num_warps=4)
    count = _tile_counts is not None
    _prefill_kernel[(n_mt, b * h)](
        q, k, v, k_cache, v_cache, out, start_pos, groups, kvhi,
        _tile_counts if count else kvhi,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2), groups.stride(0),
        h, group, t, s, window, n_mt, qk_scale,
        HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SLIDING=sliding, DOT_PREC=prec,
        UPCAST=upcast, COUNT=count, RING_ALIGNED=s % cfg.block_n == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # the write goes after every read of the old slots (stream order)
    assert v.stride() == k.stride() and v_cache.stride() == k_cache.stride()
    n_keep = min(t, s)
    wb = 16 if interp else 32
    _cache_write_kernel[(triton.cdiv(n_keep, wb), b * kvn)](
        k, v, k_cache, v_cache, start_pos, k.stride(0), k.stride(1), k.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), kvn, t, s,
        HEAD_DIM=d, BLOCK=wb, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------------
# raw-pointer entry (TensorRT plugin enqueue)
# --------------------------------------------------------------------------------------------------

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                 "int64": torch.int64, "uint8": torch.uint8}
_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<V2", torch.int64: "<i8",
            torch.uint8: "|u1"}


class _DeviceArray:
    """A view of raw device memory with `__cuda_array_interface__`, for torch.as_tensor."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.__cuda_array_interface__ = {
            "shape": tuple(int(x) for x in shape), "typestr": _TYPESTR[dtype],
            "data": (int(ptr), False), "version": 3, "strides": None}


def tensor_from_pointer(ptr: int, shape: tuple[int, ...], dtype: torch.dtype,
                        device: torch.device | str = "cuda") -> torch.Tensor:
    """A contiguous torch tensor over existing device memory (no copy, no ownership)."""
    if dtype == torch.bfloat16:  # the CUDA array interface has no bf16 typestr: go through int16
        t = torch.as_tensor(_DeviceArray(ptr, shape, torch.float16), device=device)
        return t.view(torch.bfloat16)
    return torch.as_tensor(_DeviceArray(ptr, shape, dtype), device=device)


def attention_triton_pointers(*, q: int, k: int, v: int, k_cache: int, v_cache: int,
                              start_pos: int, image_groups: int, out: int,
                              k_cache_out: int | None = None, v_cache_out: int | None = None,
                              workspace: int | None = None, workspace_size: int = 0,
                              batch: int, heads: int, kv_heads: int, t: int, slots: int,
                              head_dim: int, dtype: str, window: int, scale: float,
                              stream: int = 0) -> None:
    """Entry for a TensorRT plugin's `enqueue` (IPluginV3, Python): every tensor arrives as a device
    pointer with the shapes/dtype from the plugin's tensor descriptors, and the launch must go on
    TensorRT's `stream`. Layouts are the op's contiguous ones:

        q, out [B, H, T, D]; k, v [B, KV, T, D]; caches [B, KV, S, D]; start_pos int64 [B];
        image_groups int64 [B, T]; dtype 'bf16' | 'fp16' | 'fp32'.

    In the plugin's enqueue:

        attention_triton_pointers(q=inputs[0], k=inputs[1], v=inputs[2], k_cache=inputs[3],
            v_cache=inputs[4], start_pos=inputs[5], image_groups=inputs[6], out=outputs[0],
            k_cache_out=outputs[1], v_cache_out=outputs[2], workspace=workspace,
            workspace_size=<getWorkspaceSize>, batch=..., ..., stream=stream)

    If the cache outputs are bound to the same buffers as the cache inputs (the runtime's contract,
    DESIGN §3.3) the update is in place; otherwise the old caches are first copied to the outputs
    (on the stream) and updated there. `workspace_bytes(...)` gives getWorkspaceSize."""
    dt = _TORCH_DTYPES[dtype]
    cache_shape = (batch, kv_heads, slots, head_dim)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        tq = tensor_from_pointer(q, (batch, heads, t, head_dim), dt)
        tk = tensor_from_pointer(k, (batch, kv_heads, t, head_dim), dt)
        tv = tensor_from_pointer(v, (batch, kv_heads, t, head_dim), dt)
        tkc = tensor_from_pointer(k_cache, cache_shape, dt)
        tvc = tensor_from_pointer(v_cache, cache_shape, dt)
        if k_cache_out is not None and k_cache_out != k_cache:
            o = tensor_from_pointer(k_cache_out, cache_shape, dt)
            o.copy_(tkc)
            tkc = o
        if v_cache_out is not None and v_cache_out != v_cache:
            o = tensor_from_pointer(v_cache_out, cache_shape, dt)
            o.copy_(tvc)
            tvc = o
        tsp = tensor_from_pointer(start_pos, (batch,), torch.int64)  # one start per row
        tg = tensor_from_pointer(image_groups, (batch, t), torch.int64)
        to = tensor_from_pointer(out, (batch, heads, t, head_dim), dt)
        ws = None
        if workspace is not None and workspace_size > 0:
            ws = tensor_from_pointer(workspace, (workspace_size,), torch.uint8)
        attention_triton(tq, tk, tv, tkc, tvc, tsp, tg, window, scale, out=to, workspace=ws)


def default_scale(query_pre_attn_scalar: float) -> float:
    return 1.0 / math.sqrt(query_pre_attn_scalar)
