"""Typed reads of untrusted config values (config.json, GGUF metadata turned into a HF dict): each
returns the value or raises a ConfigError that names the field, what it holds and what it must be.

Why not `int(d["hidden_size"])`: a JSON config is written by someone else. `int("abc")` is a
traceback, `int(True)` and `int(1e9)` pass silently, and an absurd but well-typed size (1e9
layers) makes `pattern_layer_types` build a billion-entry tuple before anything else can refuse
it. So integer fields must be JSON integers (not booleans, not floats) inside [lo, hi], real
fields must be finite numbers inside their range, and maps must be maps. The upper bounds are
sanity caps far above any Gemma 3 (the 27B: 62 layers, hidden 5376, vocabulary 262208, context
131072); whether a config that passes them fits in memory is a separate question, asked by the
caller that allocates (g3export.modeling.memory).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot describe a Gemma 3 model; the message says which field and why."""


# Sanity caps on sizes (see the module docstring): above these a config is not a Gemma 3 model.
CAPS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
    "head_dim": 4096, "sliding_window": 1 << 24, "max_position_embeddings": 1 << 24,
    "sliding_window_pattern": 1024, "image_size": 1 << 14, "patch_size": 1 << 10,
    "num_channels": 16, "mm_tokens_per_image": 1 << 16,
}
TOKEN_ID_CAP = 1 << 24


def where(key: str, section: str) -> str:
    return f"{section}.{key}" if section else key


def read_int(d: Mapping[str, Any], key: str, section: str = "", lo: int = 1,
             hi: int | None = None) -> int:
    """d[key] as an int in [lo, hi] (hi defaults to CAPS[key], else TOKEN_ID_CAP)."""
    v = d[key]
    hi = CAPS.get(key, TOKEN_ID_CAP) if hi is None else hi
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"config field {where(key, section)} must be an integer, got {v!r:.80}")
    if not lo <= v <= hi:
        raise ConfigError(f"config field {where(key, section)} is {v}; it must be in "
                          f"[{lo}, {hi}] for a Gemma 3 model")
    return v


def read_float(d: Mapping[str, Any], key: str, section: str = "", positive: bool = True,
               optional: bool = False) -> float | None:
    """d[key] as a finite float (> 0 when positive); None allowed when optional."""
    v = d[key]
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"config field {where(key, section)} must be a finite number, got {v!r:.80}")
    if positive and not v > 0:
        raise ConfigError(f"config field {where(key, section)} must be positive, got {v!r:.80}")
    return float(v)


def read_str(d: Mapping[str, Any], key: str, section: str = "") -> str:
    v = d[key]
    if not isinstance(v, str):
        raise ConfigError(f"config field {where(key, section)} must be a string, got {v!r:.80}")
    return v


def read_mapping(v: Any, what: str, optional: bool = True) -> Mapping[str, Any]:
    """v as a mapping ({} for None when optional)."""
    if v is None and optional:
        return {}
    if not isinstance(v, Mapping):
        raise ConfigError(f"config field {what} must be a JSON object, got {v!r:.80}")
    return v


def read_ids(d: Mapping[str, Any], key: str, section: str = "") -> tuple[int, ...]:
    """A token id or a list of token ids (HF's eos_token_id takes both)."""
    v = d[key]
    items = v if isinstance(v, list) else [v]
    if not items:
        raise ConfigError(f"config field {where(key, section)} is an empty list")
    return tuple(read_int({key: x}, key, section, lo=0) for x in items)


def read_layer_types(v: Any, layers: int, section: str = "") -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"config field {where('layer_types', section)} must be a list of "
                          f"strings, got {v!r:.80}")
    if len(v) != layers:
        raise ConfigError(f"config field {where('layer_types', section)} has {len(v)} entries "
                          f"for {layers} layers")
    return tuple(v)
