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

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..dtypes import DTYPES
from .config import FULL, ConfigError, TextConfig

# Tokens one graph call writes into the cache by default: generate()'s prefill chunk, ORT's
# longest chunk, the longest chunk of the TensorRT engines' profile. One constant, read by all.
DEFAULT_PREFILL_CHUNK = 512


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
        """Bytes of all K and V buffers (the one KV-bytes formula; `plan` reads it too)."""
        per = DTYPES[self.dtype].bytes
        return sum(2 * math.prod(lc.shape) * per for lc in self.layers)

    def for_batch(self, batch: int) -> "KVLayout":
        """The same layout with `batch` rows (a manifest records batch 1)."""
        return dataclasses.replace(self, batch=batch, layers=tuple(
            dataclasses.replace(lc, shape=(batch, *lc.shape[1:])) for lc in self.layers))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bytes"] = self.bytes
        d["rule"] = "slot = position mod slots (full layers: slots = max_context)"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KVLayout":
        """Inverse of to_dict (what a manifest records). Types are the caller's to check
        (g3export.export.manifest validates the manifest first); `bytes` and `rule` are derived."""
        layers = tuple(LayerCache(**{**lc, "shape": tuple(lc["shape"])}) for lc in d["layers"])
        return cls(d["max_context"], d["batch"], d["dtype"], layers)


def kv_layout(cfg: TextConfig, max_context: int, batch: int = 1, dtype: str = "fp32",
              all_global: bool = False) -> KVLayout:
    """The layout of `cfg`'s cache. all_global: as if every layer were full (global) attention,
    what a cache without sliding windows would hold (`g3export plan` compares the two)."""
    if all_global:
        cfg = dataclasses.replace(cfg, layer_types=(FULL,) * cfg.num_hidden_layers)
    if not 0 < max_context <= cfg.max_position_embeddings:
        raise ConfigError(f"max_context {max_context} must be in 1..{cfg.max_position_embeddings} "
                         "(the model's max_position_embeddings)")
    layers = tuple(
        LayerCache(i, cfg.layer_types[i], cfg.cache_length(i, max_context), cfg.window(i),
                   (batch, cfg.num_key_value_heads, cfg.cache_length(i, max_context), cfg.head_dim),
                   f"past_key_{i}", f"past_value_{i}")
        for i in range(cfg.num_hidden_layers))
    return KVLayout(max_context, batch, dtype, layers)
