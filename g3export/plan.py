"""`g3export plan`: parameter counts, weight bytes, KV-cache bytes and the batch-1 decode bound of a
preset, from the config alone (no weights).

Parameters are counted from the module itself, built on the meta device, so the count can never
drift from the model definition. The decode bound follows GEMMA3_SPEC §5c: every decode step reads
all text weights (decoder + the tied embedding once, for the lm_head) and the whole KV cache at
that context (sliding layers min(ctx, W) slots, full layers ctx), at the GPU's memory bandwidth.
"""

from __future__ import annotations

import torch

from .dtypes import DTYPES
from .modeling.cache import kv_layout
from .modeling.config import SIZES, preset
from .modeling.text import Gemma3Model

# Peak HBM bandwidth, bytes/s (NVIDIA datasheets: H100 SXM 3.35 TB/s, H200 4.8 TB/s).
GPU_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
GIB = 2**30


def param_counts(name: str) -> dict[str, int]:
    cfg = preset(name)
    with torch.device("meta"):
        model = Gemma3Model(cfg)
    counts = {"embedding": 0, "decoder": 0, "vision": 0, "projector": 0}
    for n, p in model.named_parameters():
        if n.startswith("language_model.embed_tokens"):
            counts["embedding"] += p.numel()
        elif n.startswith("language_model."):
            counts["decoder"] += p.numel()
        elif n.startswith("vision_tower."):
            counts["vision"] += p.numel()
        else:
            counts["projector"] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def plan(name: str, max_context: int | None = None, dtype: str = "bf16", batch: int = 1) -> dict:
    cfg = preset(name)
    t = cfg.text
    ctx = max_context or t.max_position_embeddings
    layout = kv_layout(t, ctx, batch, dtype)  # validates ctx against the model
    nbytes = DTYPES[dtype].bytes
    counts = param_counts(name)
    text_weight_bytes = (counts["embedding"] + counts["decoder"]) * nbytes
    kv = layout.bytes
    kv_global = kv_layout(t, ctx, batch, dtype, all_global=True).bytes
    bound = {gpu: {"window_layout": batch * bw / (text_weight_bytes + kv),
                   "all_global": batch * bw / (text_weight_bytes + kv_global)}
             for gpu, bw in GPU_BANDWIDTH.items()}
    return {
        "size": name, "dtype": dtype, "batch": batch, "max_context": ctx,
        "layers": {"sliding": t.layer_types.count("sliding_attention"),
                   "full": t.layer_types.count("full_attention"), "window": t.sliding_window},
        "parameters": counts,
        "weight_bytes": counts["total"] * nbytes,
        "text_weight_bytes_read_per_token": text_weight_bytes,
        "kv_bytes": kv, "kv_bytes_all_global": kv_global,
        "kv_saving": kv_global / kv,
        "decode_bound_tokens_per_s": bound,
        "bandwidth_bytes_per_s": GPU_BANDWIDTH,
    }


def format_plan(p: dict) -> str:
    c = p["parameters"]
    lines = [
        f"Gemma 3 {p['size']}  dtype={p['dtype']}  batch={p['batch']}  context={p['max_context']}",
        f"  layers: {p['layers']['sliding']} sliding (window {p['layers']['window']}) + "
        f"{p['layers']['full']} full",
        f"  parameters: {c['total'] / 1e6:,.1f}M  (embedding {c['embedding'] / 1e6:,.1f}M, decoder "
        f"{c['decoder'] / 1e6:,.1f}M, vision {c['vision'] / 1e6:,.1f}M, projector {c['projector'] / 1e6:,.2f}M)",
        f"  weights: {p['weight_bytes'] / GIB:.2f} GiB",
        f"  KV cache: {p['kv_bytes'] / GIB:.2f} GiB with the window layout, "
        f"{p['kv_bytes_all_global'] / GIB:.2f} GiB if every layer were global "
        f"({p['kv_saving']:.1f}x less)",
        "  decode bound at this context (batch tokens/s, bandwidth / bytes read per step):",
    ]
    for gpu, b in p["decode_bound_tokens_per_s"].items():
        lines.append(f"    {gpu}: {b['window_layout']:,.0f} (window layout)   "
                     f"{b['all_global']:,.0f} (all global)")
    return "\n".join(lines)


def plot_kv(path: str, dtype: str = "bf16", batch: int = 1) -> None:
    """PNG of KV bytes against context for every size, window layout vs all-global."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FileNotFoundError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in SIZES:
        t = preset(name).text
        ctxs = [2**k for k in range(10, 18) if 2**k <= t.max_position_embeddings]
        line, = ax.plot(ctxs, [kv_layout(t, c, batch, dtype).bytes / GIB for c in ctxs],
                        label=f"{name} window layout")
        ax.plot(ctxs, [kv_layout(t, c, batch, dtype, all_global=True).bytes / GIB for c in ctxs], "--",
                color=line.get_color(), label=f"{name} all global")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"KV cache, GiB ({dtype}, batch {batch})")
    ax.set_title("Gemma 3 KV cache: sliding-window layout vs every layer global")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
