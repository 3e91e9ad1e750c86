"""`g3export bench`: time to first token, prefill and decode tokens/s, peak memory and KV bytes of a
build, on a synthetic prompt of fixed length (token ids drawn with a fixed seed, so runs compare).

The figures come from the same generation loop users run (greedy, no stop tokens). Peak memory is
the process's peak RSS (ru_maxrss) after the run: weights, cache and ORT's arenas together.
"""

from __future__ import annotations

import resource
import time

import numpy as np

from .generate import GenerationError, generate
from .loader import open_build


def bench(build_dir, prompt_len: int = 512, new_tokens: int = 64, provider: str = "cpu",
          repeat: int = 1) -> dict:
    t0 = time.perf_counter()
    session, _ = open_build(build_dir, provider=provider)
    load_s = time.perf_counter() - t0
    cfg = session.config
    if prompt_len + new_tokens > session.max_context:
        raise GenerationError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the "
                              f"build's max_context {session.max_context}; use smaller ones, or "
                              "rebuild with a larger `g3export build --max-context`")
    rng = np.random.default_rng(0)
    # ordinary text tokens: above the control/special ids (the first 1000 of Gemma's vocabulary),
    # below the image/unused ranges; tiny test vocabularies just skip bos/eos/pad
    v = cfg.text.vocab_size
    lo, hi = (1000, min(v, 200_000)) if v > 2000 else (3, v)
    ids = rng.integers(lo, hi, size=prompt_len)
    ids[ids == cfg.image_token_id] = lo
    ids = ids.tolist()
    runs = [generate(session, ids, new_tokens, stop_ids=[]) for _ in range(repeat)]
    best = min(runs, key=lambda r: r.prefill_s + r.decode_s)
    return {
        "build": str(build_dir), "provider": provider, "prompt_len": prompt_len,
        "new_tokens": len(best.token_ids), "session_load_s": round(load_s, 3),
        "time_to_first_token_s": round(best.time_to_first_token_s, 4),
        "prefill_tokens_per_s": round(best.prefill_tokens_per_s, 1),
        "decode_tokens_per_s": round(best.decode_tokens_per_s, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "kv_bytes": session.kv_bytes,
    }
