"""A sanity bound before allocating a model: refuse, with a ConfigError, what cannot fit in this
machine's memory, instead of a MemoryError minutes later or the OOM killer.

A config.json that says `hidden_size: 65536` passes the type and range checks of
g3export.modeling.validate and still describes ~10^13 bytes of weights. Callers that allocate
call `require_memory(nbytes, what)` with what they are about to allocate:

* the reference run materializes every weight and its KV cache: `weight_bytes + kv bytes`;
* a build that streams weights to disk holds only its graph and one tensor at a time, so it
  passes only what it really holds (the bound has no opinion on sizes it is not given).

Parameters are counted from the config by formula (`param_count`), not by building the module
on the meta device: the formula cannot allocate, whatever the config says.
tests/fuzz/test_config_fuzz.py checks it against g3export.plan.param_counts (which counts the
module) for every preset, so the two cannot drift.

Available memory: MemAvailable from /proc/meminfo (Linux: free plus reclaimable cache), else
os.sysconf's available pages, else no bound (we do not refuse what we cannot measure).
"""

from __future__ import annotations

import os

from .config import ModelConfig
from .validate import ConfigError


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the model (text decoder with its tied embedding, vision tower, projector)."""
    t = cfg.text
    attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    norms = 4 * t.hidden_size + 2 * t.head_dim  # 4 RMSNorms per layer + q_norm, k_norm
    n = t.vocab_size * t.hidden_size + t.num_hidden_layers * (attn + mlp + norms) + t.hidden_size
    if cfg.vision is not None:
        v = cfg.vision
        d, f = v.hidden_size, v.intermediate_size
        layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d  # q,k,v,o; fc1, fc2; 2 LayerNorms
        patches = v.patches_per_side ** 2
        n += (v.num_channels * v.patch_size ** 2 * d + d  # patch embedding (conv)
              + patches * d                               # position embedding
              + v.num_hidden_layers * layer + 2 * d       # layers, post LayerNorm
              + d + d * t.hidden_size)                    # projector: soft-emb norm, projection
    return n


def available_bytes() -> int | None:
    """Memory this process could still get, or None when it cannot be measured."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_memory(nbytes: int, what: str) -> None:
    """ConfigError if nbytes cannot fit in the memory available now."""
    have = available_bytes()
    if have is not None and nbytes > have:
        raise ConfigError(f"{what} needs {nbytes / 2**30:.1f} GiB but this machine has "
                          f"{have / 2**30:.1f} GiB available; use a smaller model, --max-context "
                          "or dtype, or a machine with more memory")


def require_weight_memory(size: str | None, checkpoint=None, dtype: str = "fp32") -> None:
    """require_memory for the weights of a preset or a checkpoint (its config is read from the
    headers only), before build_model materializes them."""
    from ..dtypes import DTYPES
    from .config import preset

    if checkpoint:
        from .weights import resolve_checkpoint
        cfg = resolve_checkpoint(checkpoint)[0]
    else:
        cfg = preset(size)
    require_memory(param_count(cfg) * DTYPES[dtype].bytes, f"model {cfg.name!r} ({dtype} weights)")
