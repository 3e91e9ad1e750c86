"""Benchmark the Triton `g3::attention` kernels on a CUDA GPU (issue 8).

For Gemma 3 shapes (1b: 4 q / 1 kv heads, D 256; 12b: 16/8, D 256; 27b: 32/16, D 128; window
1024), in bf16:

* error of our kernels against the fp32 reference math (a subset of query rows at long context);
* time (CUDA events, median) side by side with torch `flex_attention` (compiled, with a sliding-
  window / causal block mask) and `F.scaled_dot_product_attention` with an explicit boolean mask:
  prefill of a whole 4K / 32K prompt (one chunk from position 0), for a sliding and a full layer;
  decode (T = 1) at 4K / 32K / 128K context, batch `--batch`;
* decode against the memory-bandwidth bound: bytes of K/V read / copy bandwidth measured with a
  large device-to-device torch copy.

Our timings include the cache write (in place); the baselines only attend.

    python benchmarks/attention_gpu.py                      # everything, table + JSON on stdout
    python benchmarks/attention_gpu.py --models 12b --prefill 4096 --decode 4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch

MODELS = {  # heads, kv_heads, head_dim, window, query_pre_attn_scalar
    "1b": dict(heads=4, kv_heads=1, head_dim=256, window=512, qpas=256),
    "12b": dict(heads=16, kv_heads=8, head_dim=256, window=1024, qpas=256),
    "27b": dict(heads=32, kv_heads=16, head_dim=128, window=1024, qpas=168),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="1b,12b,27b", help="comma list of " + ",".join(MODELS))
    ap.add_argument("--prefill", default="4096,32768", help="prefill context lengths")
    ap.add_argument("--decode", default="4096,32768,131072", help="decode context lengths")
    ap.add_argument("--batch", type=int, default=1, help="batch for prefill")
    ap.add_argument("--decode-batch", type=int, default=4, help="batch for decode")
    ap.add_argument("--window", type=int, default=0, help="override the sliding window (0: model)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-flex", action="store_true", help="skip flex_attention")
    ap.add_argument("--no-sdpa", action="store_true", help="skip SDPA with explicit mask")
    ap.add_argument("--err-rows", type=int, default=256, help="query rows checked vs fp32 math")
    ap.add_argument("--json", default=None, help="also write the JSON results to this file")
    return ap.parse_args(argv)


def cuda_time(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth(nbytes=2 << 30):
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x), 3, 10)
    del x, y
    return 2 * nbytes / (ms * 1e-3)  # read + write bytes per second


def run_or_none(fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as e:  # noqa: BLE001 - report and continue: a baseline may not support a case
        torch.cuda.empty_cache()
        return f"error: {type(e).__name__}: {str(e)[:120]}"


def ref_rows(q, k_all, v_all, pos_q, pos_k, window, scale):
    """fp32 masked attention for a few query rows: q [B,H,R,D], keys [B,KV,N,D] at pos_k."""
    b, h, r, d = q.shape
    kv = k_all.shape[1]
    vis = pos_k[None, :] <= pos_q[:, None]
    if window > 0:
        vis &= pos_k[None, :] > pos_q[:, None] - window
    qg = q.float().reshape(b, kv, h // kv, r, d)
    s = torch.einsum("bkgrd,bknd->bkgrn", qg, k_all.float()) * scale
    s = s.masked_fill(~vis, float("-inf"))
    return torch.einsum("bkgrn,bknd->bkgrd", s.softmax(-1), v_all.float()).reshape(b, h, r, d)


def bench_prefill(kt, flex, cfg, n, window, full, args):
    from torch.nn.attention.flex_attention import create_block_mask
    import torch.nn.functional as F

    b, h, kv, d = args.batch, cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    scale = cfg["qpas"] ** -0.5
    w = 0 if full else window
    s = n if full else window
    dt, dev = torch.bfloat16, "cuda"
    q = torch.randn(b, h, n, d, dtype=dt, device=dev)
    k = torch.randn(b, kv, n, d, dtype=dt, device=dev)
    v = torch.randn(b, kv, n, d, dtype=dt, device=dev)
    kc = torch.zeros(b, kv, s, d, dtype=dt, device=dev)
    vc = torch.zeros_like(kc)
    sp = torch.zeros(1, dtype=torch.int64, device=dev)
    ig = torch.full((b, n), -1, dtype=torch.int64, device=dev)
    out = torch.empty_like(q)
    row = {"case": "prefill", "layer": "full" if full else f"sliding W={window}", "ctx": n,
           "batch": b}

    ours = lambda: kt.attention_triton(q, k, v, kc, vc, sp, ig, w, scale, out=out)  # noqa: E731
    row["ours_ms"] = cuda_time(ours, args.warmup, args.iters)
    # error on the first and last rows against fp32 math
    rows = torch.cat([torch.arange(min(args.err_rows, n)),
                      torch.arange(max(0, n - args.err_rows), n)]).unique().to(dev)
    ours()
    ref = ref_rows(q[:, :, rows], k, v, rows, torch.arange(n, device=dev), w, scale)
    row["max_abs_err"] = (out[:, :, rows].float() - ref).abs().max().item()

    if not args.no_flex:
        def mask_mod(bb, hh, qi, ki):
            m = qi >= ki
            return m & (qi - ki < window) if not full else m
        def run_flex():
            bm = create_block_mask(mask_mod, None, None, n, n, device=dev)
            return cuda_time(lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True),
                             args.warmup, args.iters)
        row["flex_ms"] = run_or_none(run_flex)
    if not args.no_sdpa:
        def run_sdpa():
            i = torch.arange(n, device=dev)
            m = i[None, :] <= i[:, None]
            if not full:
                m &= i[:, None] - i[None, :] < window
            return cuda_time(lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, scale=scale, enable_gqa=True), args.warmup, args.iters)
        row["sdpa_mask_ms"] = run_or_none(run_sdpa)
    del q, k, v, kc, vc, out
    torch.cuda.empty_cache()
    return row


def bench_decode(kt, flex, cfg, n, window, full, args, bw):
    from torch.nn.attention.flex_attention import create_block_mask
    import torch.nn.functional as F
    from g3export.modeling.attention import attention_reference

    b, h, kv, d = args.decode_batch, cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    scale = cfg["qpas"] ** -0.5
    w = 0 if full else window
    s = n if full else window
    dt, dev = torch.bfloat16, "cuda"
    start = n - 1  # the new token is the n-th: n keys in view (full), W (sliding)
    q = torch.randn(b, h, 1, d, dtype=dt, device=dev)
    k = torch.randn(b, kv, 1, d, dtype=dt, device=dev)
    v = torch.randn(b, kv, 1, d, dtype=dt, device=dev)
    kc = torch.randn(b, kv, s, d, dtype=dt, device=dev)
    vc = torch.randn_like(kc)
    sp = torch.tensor([start], dtype=torch.int64, device=dev)
    ig = torch.full((b, 1), -1, dtype=torch.int64, device=dev)
    out = torch.empty_like(q)
    keys = min(n, window) if not full else n
    row = {"case": "decode", "layer": "full" if full else f"sliding W={window}", "ctx": n,
           "batch": b}
    ref = attention_reference(q, k, v, kc, vc, sp, ig, w, scale)[0] if b * h * s <= (1 << 27) \
        else None
    kc0, vc0 = kc.clone(), vc.clone()
    ours = lambda: kt.attention_triton(q, k, v, kc, vc, sp, ig, w, scale, out=out)  # noqa: E731
    ours()
    if ref is not None:
        row["max_abs_err"] = (out.float() - ref.float()).abs().max().item()
    kc.copy_(kc0)
    vc.copy_(vc0)
    del kc0, vc0
    row["ours_ms"] = cuda_time(ours, args.warmup, args.iters)
    kv_bytes = 2 * b * kv * (keys - 1) * d * 2
    row["kv_bytes"] = kv_bytes
    row["bound_ms"] = kv_bytes / bw * 1e3
    row["pct_of_bound"] = 100.0 * row["bound_ms"] / row["ours_ms"]

    # baselines attend over the cache slots (all valid at this position)
    if not args.no_flex:
        def run_flex():
            bm = create_block_mask(lambda bb, hh, qi, ki: ki >= 0, None, None, 1, s, device=dev)
            return cuda_time(lambda: flex(q, kc, vc, block_mask=bm, scale=scale, enable_gqa=True),
                             args.warmup, args.iters)
        row["flex_ms"] = run_or_none(run_flex)
    if not args.no_sdpa:
        def run_sdpa():
            m = torch.ones(1, s, dtype=torch.bool, device=dev)
            return cuda_time(lambda: F.scaled_dot_product_attention(
                q, kc, vc, attn_mask=m, scale=scale, enable_gqa=True), args.warmup, args.iters)
        row["sdpa_mask_ms"] = run_or_none(run_sdpa)
    del q, kc, vc
    torch.cuda.empty_cache()
    return row


def fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_gpu.py: no CUDA device (torch.cuda.is_available() is False); this benchmark "
              "needs a GPU. The kernels' numerics are checked on CPU by "
              "tests/kernels/test_attention_triton.py under TRITON_INTERPRET=1.", file=sys.stderr)
        return 2
    try:
        import triton
        from g3export.export.kernels import attention_triton as kt
    except ImportError as e:
        print(f"attention_gpu.py: cannot import triton kernels: {e}", file=sys.stderr)
        return 2
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)

    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    rows = []
    for name in args.models.split(","):
        cfg = MODELS[name]
        window = args.window or cfg["window"]
        for n in [int(x) for x in args.prefill.split(",") if x]:
            for full in (False, True):
                r = run_or_none(lambda: bench_prefill(kt, flex, cfg, n, window, full, args))
                r = r if isinstance(r, dict) else {"case": "prefill", "ctx": n, "result": r}
                r["model"] = name
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
        for n in [int(x) for x in args.decode.split(",") if x]:
            for full in (False, True):
                r = run_or_none(lambda: bench_decode(kt, flex, cfg, n, window, full, args, bw))
                r = r if isinstance(r, dict) else {"case": "decode", "ctx": n, "result": r}
                r["model"] = name
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)

    cols = ["model", "case", "layer", "ctx", "batch", "ours_ms", "flex_ms", "sdpa_mask_ms",
            "max_abs_err", "bound_ms", "pct_of_bound"]
    print(f"device: {dev}   copy bandwidth: {bw / 1e9:.0f} GB/s   triton {triton.__version__}   "
          f"torch {torch.__version__}")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")) for c in cols))
        for base in ("flex_ms", "sdpa_mask_ms"):
            if isinstance(r.get(base), float) and isinstance(r.get("ours_ms"), float):
                r[f"speedup_vs_{base[:-3]}"] = r[base] / r["ours_ms"]
    result = {"device": dev, "copy_bandwidth_Bps": bw, "triton": triton.__version__,
              "torch": torch.__version__, "argv": sys.argv, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
