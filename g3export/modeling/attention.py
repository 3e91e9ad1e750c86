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
        start_pos,    # int64 [B]      absolute position of each row's first chunk token
        image_groups, # int64 [B, T]   -1 for text; tokens with the same id >= 0 are one image
        window,       # int            W for a sliding layer, 0 for a full layer
        scale,        # float          query_pre_attn_scalar ** -0.5
    )
    # out: [B, H, T, D]; the caches come back with the chunk written in (same shape, same layout).

Rows are independent sequence slots (DESIGN §3.3): row b's chunk sits at positions
start_pos[b] .. start_pos[b] + T - 1, and everything below (the mask, the slots read and the slots
written) is computed per row from its own start, so a server can batch sequences that started at
different times. A row restarted at 0 needs no clearing: every old slot of it is masked by
position (p_s < 0 below). A [1]-shaped start_pos is broadcast to every row by the reference (the
old contract); the translations and the graphs take [B].

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
    """Position held by each cache slot before a chunk starting at `start` is written; < 0 = empty.
    start: int64 [B] -> [B, S] (a 0-d start gives [S])."""
    s = torch.arange(slots, device=start.device, dtype=torch.int64)
    last = start[..., None] - 1
    return last - torch.remainder(last - s, slots)


def attention_mask(start: torch.Tensor, t: int, slots: int, image_groups: torch.Tensor,
                   window: int) -> torch.Tensor:
    """Boolean mask [B, T, S + T]: which old cache slots and which chunk keys each query sees.
    start: int64 [B], one start per row."""
    u = torch.arange(t, device=start.device, dtype=torch.int64)
    pos_q = start[:, None] + u  # [B, T]
    p_old = old_slot_positions(start, slots)[:, None, :]  # [B, 1, S]
    old_ok = (p_old >= 0).expand(-1, t, -1)  # old keys all precede the chunk: causal
    new_ok = u[None, :] <= u[:, None]  # causal within the chunk
    g = image_groups
    block = (g[:, :, None] >= 0) & (g[:, :, None] == g[:, None, :])  # [B, T, T] same image
    new_ok = new_ok[None] | block
    if window > 0:
        old_ok = old_ok & (p_old > pos_q[:, :, None] - window)
        new_ok = new_ok & ((u[:, None] - u[None, :]) < window)[None]
    return torch.cat([old_ok, new_ok], dim=-1)


def write_slots(start: torch.Tensor, t: int, slots: int) -> tuple[int, torch.Tensor]:
    """(first chunk index kept, slots it is written to): the last min(T, S) keys, slot = pos mod S.
    start: int64 [B] -> slots [B, min(T, S)]."""
    n = min(t, slots)
    pos = start[..., None] + torch.arange(t - n, t, device=start.device, dtype=torch.int64)
    return t - n, torch.remainder(pos, slots)


def row_starts(start_pos: torch.Tensor, batch: int) -> torch.Tensor:
    """start_pos as int64 [B]: one start per row ([1] is broadcast: the old, all-rows-alike form)."""
    start = start_pos.reshape(-1).to(torch.int64)
    if start.numel() == 1:
        return start.expand(batch)
    if start.numel() != batch:
        raise ValueError(f"start_pos has {start.numel()} entries for a batch of {batch} rows")
    return start


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, start_pos: torch.Tensor, image_groups: torch.Tensor,
                        window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, t, d = q.shape
    kv, s = k.shape[1], k_cache.shape[2]
    start = row_starts(start_pos, b)
    mask = attention_mask(start, t, s, image_groups, window)  # [B, T, S+T]
    keys = torch.cat([k_cache, k], dim=2).float()  # [B, KV, S+T, D]
    vals = torch.cat([v_cache, v], dim=2).float()
    qg = q.float().reshape(b, kv, h // kv, t, d)  # GQA: query heads grouped under their KV head
    scores = torch.einsum("bkgtd,bksd->bkgts", qg, keys) * scale
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgts,bksd->bkgtd", probs, vals).reshape(b, h, t, d).to(q.dtype)
    first, slots = write_slots(start, t, s)  # [B, n]
    rows = torch.arange(b, device=q.device)[:, None]
    k_out, v_out = k_cache.clone(), v_cache.clone()
    # advanced indices on dims 0 and 2 put their [B, n] shape first: [B, n, KV, D]
    k_out[rows, :, slots] = k[:, :, first:].transpose(1, 2)
    v_out[rows, :, slots] = v[:, :, first:].transpose(1, 2)
    return out, k_out, v_out


@torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, start_pos: torch.Tensor, image_groups: torch.Tensor,
              window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_reference(q, k, v, k_cache, v_cache, start_pos, image_groups, window, scale)


@attention.register_fake
def _attention_fake(q, k, v, k_cache, v_cache, start_pos, image_groups, window, scale):
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)
