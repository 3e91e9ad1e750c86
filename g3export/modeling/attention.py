"""The attention custom op `g3::attention`: the one place where sliding-window attention, the static
KV-cache update and the image-block mask meet (DESIGN §3.2, §3.3).

Contract (every argument positional and required: torch.export drops keyword arguments that equal
their defaults, and every translation needs all of them):

    out, k_cache_out, v_cache_out = torch.ops.g3.attention(
        q,            # [B, H,  T, D]  queries of the chunk, after QK-norm and RoPE
        k,            # [B, KV, T, D]  keys of the chunk, after k_norm and RoPE
        v,            # [B, KV, T, D]  values of the chunk
        k_cache,      # [B, KV, S, D]  static cache: S = max_context (full) or W (sliding ring)
        v_cache,      # [B, KV, S, D]
        start_pos,    # int64 [1]      absolute position of the chunk's first token (all rows alike)
        image_groups, # int64 [B, T]   -1 for text; tokens with the same id >= 0 are one image
        window,       # int            W for a sliding layer, 0 for a full layer
        scale,        # float          query_pre_attn_scalar ** -0.5
    )
    # out: [B, H, T, D]; the caches come back with the chunk written in (same shape, same layout).

The cache layout. Position p lives in slot p mod S. For a full layer S = max_context, so the slot
is the position. For a sliding layer S = W and the cache is a ring:

    W = 4, after positions 0..5 were written:   slot:      0  1  2  3
                                                 position:  4  5  2  3

Before a chunk starting at position `start` is written, slot s holds the largest position p < start
with p = s (mod S), i.e. p_s = start - 1 - ((start - 1 - s) mod S); p_s < 0 means empty.

The mask (GEMMA3_SPEC §2, §3c). Query at position i sees key j iff
    (j <= i  OR  i and j are tokens of the same image)   AND   (full layer OR j > i - W).
The queries of a chunk attend over the old cache contents *and* the chunk's own keys, and only
then is the chunk written: a chunk longer than one token on a ring would otherwise overwrite slots
its own earlier queries still need. Example, W = 4, cache holds positions 2..5 as above, chunk of
T = 3 at positions 6, 7, 8 (x = visible):

                old slots (p_s)        chunk
                4  5  2  3           6  7  8
    query 6:    x  x  .  x           x  .  .      sees 3..6
    query 7:    x  x  .  .           x  x  .      sees 4..7
    query 8:    .  x  .  .           x  x  x      sees 5..8

then positions 6, 7, 8 go to slots 2, 3, 0. If T > S only the last S keys of the chunk are kept.
Image tokens never straddle a chunk (the runtime's chunker keeps an image whole), so the image
overlay only concerns the chunk's own keys.

The reference implementation below is the real math in plain PyTorch (fp32 accumulation) and is
what every translation (ONNX Runtime, TensorRT plugin, Triton kernels) is tested against.
"""

from __future__ import annotations

import torch

OP_NAMESPACE = "g3"
OP_NAME = "attention"


def old_slot_positions(start: torch.Tensor, slots: int) -> torch.Tensor:
    """Position held by each cache slot before a chunk starting at `start` is written; < 0 = empty."""
    s = torch.arange(slots, device=start.device, dtype=torch.int64)
    return start - 1 - torch.remainder(start - 1 - s, slots)


def attention_mask(start: torch.Tensor, t: int, slots: int, image_groups: torch.Tensor,
                   window: int) -> torch.Tensor:
    """Boolean mask [B, T, S + T]: which old cache slots and which chunk keys each query sees."""
    pos_q = start + torch.arange(t, device=start.device, dtype=torch.int64)  # [T]
    p_old = old_slot_positions(start, slots)  # [S]
    old_ok = (p_old >= 0)[None, :].expand(t, slots)  # old keys all precede the chunk: causal
    u = torch.arange(t, device=start.device, dtype=torch.int64)
    new_ok = u[None, :] <= u[:, None]  # causal within the chunk
    g = image_groups
    block = (g[:, :, None] >= 0) & (g[:, :, None] == g[:, None, :])  # [B, T, T] same image
    new_ok = new_ok[None] | block
    if window > 0:
        old_ok = old_ok & (p_old[None, :] > pos_q[:, None] - window)
        new_ok = new_ok & ((u[:, None] - u[None, :]) < window)[None]
    b = image_groups.shape[0]
    return torch.cat([old_ok[None].expand(b, t, slots), new_ok], dim=-1)


def write_slots(start: torch.Tensor, t: int, slots: int) -> tuple[int, torch.Tensor]:
    """(first chunk index kept, slots it is written to): the last min(T, S) keys, slot = pos mod S."""
    n = min(t, slots)
    pos = start + torch.arange(t - n, t, device=start.device, dtype=torch.int64)
    return t - n, torch.remainder(pos, slots)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, start_pos: torch.Tensor, image_groups: torch.Tensor,
                        window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, t, d = q.shape
    kv, s = k.shape[1], k_cache.shape[2]
    start = start_pos.reshape(())
    mask = attention_mask(start, t, s, image_groups, window)  # [B, T, S+T]
    keys = torch.cat([k_cache, k], dim=2).float()  # [B, KV, S+T, D]
    vals = torch.cat([v_cache, v], dim=2).float()
    qg = q.float().reshape(b, kv, h // kv, t, d)  # GQA: query heads grouped under their KV head
    scores = torch.einsum("bkgtd,bksd->bkgts", qg, keys) * scale
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgts,bksd->bkgtd", probs, vals).reshape(b, h, t, d).to(q.dtype)
    first, slots = write_slots(start, t, s)
    k_out, v_out = k_cache.clone(), v_cache.clone()
    k_out[:, :, slots] = k[:, :, first:]
    v_out[:, :, slots] = v[:, :, first:]
    return out, k_out, v_out


@torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, start_pos: torch.Tensor, image_groups: torch.Tensor,
              window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_reference(q, k, v, k_cache, v_cache, start_pos, image_groups, window, scale)


@attention.register_fake
def _attention_fake(q, k, v, k_cache, v_cache, start_pos, image_groups, window, scale):
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)
