"""The static KV-cache layout (DESIGN §3.3), as data: what every runtime allocates and every manifest
records.

Per layer i, K and V each have shape [batch, kv_heads, S_i, head_dim] where
    S_i = max_context       for a full (global) layer: slot = position
    S_i = W                 for a sliding (local) layer: a ring, slot = position mod W
Buffers are allocated once per session and never resized; graphs take them as inputs and return the
updated caches as outputs, and the runtime binds the same buffer to both. The write rule and mask
are in g3export.modeling.attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ConfigError, TextConfig

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class LayerCache:
    layer: int
    layer_type: str          # sliding_attention | full_attention
    slots: int               # S_i
    window: int | None       # W for sliding layers
    shape: tuple[int, ...]   # [batch, kv_heads, slots, head_dim], for K and for V
    k_name: str
    v_name: str


@dataclass(frozen=True)
class KVLayout:
    max_context: int
    batch: int
    dtype: str
    layers: tuple[LayerCache, ...]

    @property
    def bytes(self) -> int:
        """Bytes of all K and V buffers."""
        per = DTYPE_BYTES[self.dtype]
        total = 0
        for lc in self.layers:
            n = 1
            for d in lc.shape:
                n *= d
            total += 2 * n * per
        return total

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bytes"] = self.bytes
        d["rule"] = "slot = position mod slots (full layers: slots = max_context)"
        return d


def kv_layout(cfg: TextConfig, max_context: int, batch: int = 1, dtype: str = "fp32") -> KVLayout:
    if not 0 < max_context <= cfg.max_position_embeddings:
        raise ConfigError(f"max_context {max_context} must be in 1..{cfg.max_position_embeddings} "
                         "(the model's max_position_embeddings)")
    layers = tuple(
        LayerCache(i, cfg.layer_types[i], cfg.cache_length(i, max_context), cfg.window(i),
                   (batch, cfg.num_key_value_heads, cfg.cache_length(i, max_context), cfg.head_dim),
                   f"past_key_{i}", f"past_value_{i}")
        for i in range(cfg.num_hidden_layers))
    return KVLayout(max_context, batch, dtype, layers)
