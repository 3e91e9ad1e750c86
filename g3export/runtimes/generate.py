"""The generation loop shared by every runtime: chunked prefill, then decode, sampling, stop tokens,
streaming (DESIGN §3.7). Batch 1 (the CLI's case); the sessions themselves take a batch dimension.

Prefill runs the prompt in chunks of at most `chunk_size` tokens; a run of image soft tokens is
never split across chunks (the bidirectional image mask only looks inside a chunk, see
g3export.modeling.attention), so a chunk may end early or, for an image longer than chunk_size,
grow to hold the whole image. A session may also limit chunks (Session.prefill_chunk: the longest
chunk its graph accepts; Session.chunk_align: no chunk crosses a multiple of it, for the native
TensorRT translation); an image that cannot be placed within those limits is a GenerationError.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from ..modeling.cache import DEFAULT_PREFILL_CHUNK
from .sampling import Sampler, SamplingConfig
from .session import Session


class GenerationError(UserError, ValueError):
    """Bad input to generation (prompt too long, ids out of range, ...); the message says what to do."""


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    stop_reason: str                 # "stop_token" | "max_new_tokens" | "max_context"
    time_to_first_token_s: float
    prefill_s: float
    decode_s: float
    text: str = ""

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_token_ids) / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1  # the first token comes out of prefill
        return n / self.decode_s if n > 0 and self.decode_s else float("nan")


def prefill_chunks(ids: Sequence[int], chunk_size: int, image_token_id: int,
                   align: int | None = None) -> list[tuple[int, int]]:
    """[start, end) chunks of at most chunk_size tokens that never split a run of image tokens.
    align: no chunk crosses a multiple of it (an image that would have to is a GenerationError)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    is_img = np.asarray(ids) == image_token_id
    chunks, start, n = [], 0, len(ids)
    while start < n:
        end = min(start + chunk_size, n)
        if align:
            end = min(end, (start // align + 1) * align)
        if end < n and is_img[end - 1] and is_img[end]:  # would cut an image
            run_start = end - 1
            while run_start > start and is_img[run_start - 1]:
                run_start -= 1
            if run_start > start:
                end = run_start                      # end before the image
            else:                                    # the image itself is longer than a chunk
                while end < n and is_img[end]:
                    end += 1
                if align and (end - 1) // align != start // align:
                    raise GenerationError(
                        f"the image at tokens [{start}, {end}) crosses position "
                        f"{(start // align + 1) * align}, a multiple of {align}: this build (native "
                        f"TensorRT attention) prefills in chunks that never cross the sliding "
                        f"window's ring boundary, and an image is never split. Move the image in "
                        f"the prompt, or use a build with --attention plugin or --target onnx")
        chunks.append((start, end))
        start = end
    return chunks


def check_logits(logits: np.ndarray, position: int) -> np.ndarray:
    """logits, if every value is finite; else a GenerationError. NaN or inf logits mean a broken
    graph or weights (argmax of NaN is token 0, and sampling would fail): stop rather than print
    tokens chosen from them. One vectorized check of [B, V] float32 per step, ~0.1 ms at V=262k."""
    if not np.isfinite(logits).all():
        raise GenerationError(
            f"the model produced non-finite logits (NaN or inf) at position {position}: its "
            "weights or graph are broken; run `g3export verify` on the build, or rebuild it")
    return logits


def check_prompt(ids: Sequence[int], session: Session) -> None:
    cfg = session.config
    if not ids:
        raise GenerationError("the prompt is empty")
    bad = [i for i in ids if not 0 <= i < cfg.text.vocab_size]
    if bad:
        raise GenerationError(f"token ids out of range 0..{cfg.text.vocab_size - 1}: {bad[:5]}")
    if len(ids) >= session.max_context:
        raise GenerationError(
            f"the prompt has {len(ids)} tokens but the context holds {session.max_context}; "
            f"shorten the prompt or {session.context_hint}")


def plan_prompt(session: Session, ids: list[int], image_features: np.ndarray | None,
                chunk_size: int) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
    """Check a prompt (and its images) against the session; return the image features as
    [M, hidden] float32 (or None) and the prefill chunks. Raises GenerationError."""
    cfg = session.config
    check_prompt(ids, session)
    feats = None
    n_img_tokens = sum(1 for i in ids if i == cfg.image_token_id) if cfg.has_vision else 0
    if image_features is not None:
        feats = np.asarray(image_features, dtype=np.float32).reshape(-1, cfg.text.hidden_size)
        if feats.shape[0] != n_img_tokens:
            raise GenerationError(
                f"{feats.shape[0] // cfg.mm_tokens_per_image} image(s) given but the prompt holds "
                f"{n_img_tokens} image tokens ({cfg.mm_tokens_per_image} per image)")
    elif n_img_tokens:
        raise GenerationError(f"the prompt holds {n_img_tokens} image tokens but no image was given")
    limit = session.prefill_chunk
    chunks = prefill_chunks(ids, min(chunk_size, limit or chunk_size), cfg.image_token_id,
                            session.chunk_align)
    if limit and any(e - s > limit for s, e in chunks):
        raise GenerationError(f"an image needs a prefill chunk longer than this build's longest "
                              f"({limit} tokens); rebuild with a larger --prefill-chunk")
    return feats, chunks


def generate(session: Session, prompt_ids: Sequence[int], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_ids: Sequence[int] | None = None,
             chunk_size: int = DEFAULT_PREFILL_CHUNK, image_features: np.ndarray | None = None,
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate up to max_new_tokens after prompt_ids; call on_token(id) as each token is chosen.

    image_features: [N, mm_tokens, hidden] for the N images whose soft tokens are in prompt_ids.
    """
    cfg = session.config
    ids = [int(i) for i in prompt_ids]
    stop = set(cfg.text.eos_token_ids if stop_ids is None else stop_ids)
    feats, chunks = plan_prompt(session, ids, image_features, chunk_size)
    sampler = Sampler(sampling)
    session.reset()
    t0 = time.perf_counter()
    used = 0
    logits = None
    for s, e in chunks:
        chunk = np.asarray([ids[s:e]], dtype=np.int64)
        f = None
        if feats is not None:
            m = int((chunk == cfg.image_token_id).sum())
            f, used = (feats[used:used + m], used + m) if m else (None, used)
        logits = session.forward(chunk, s, f)
    token = int(sampler(check_logits(logits, len(ids) - 1))[0])
    t1 = time.perf_counter()
    out = [token]
    if on_token:
        on_token(token)
    pos = len(ids)
    reason = "max_new_tokens"
    while True:
        if token in stop:
            reason = "stop_token"
            break
        if len(out) >= max_new_tokens:
            break
        if pos >= session.max_context:
            reason = "max_context"
            break
        logits = session.forward(np.asarray([[token]], dtype=np.int64), pos)
        token = int(sampler(check_logits(logits, pos))[0])
        pos += 1
        out.append(token)
        if on_token:
            on_token(token)
    t2 = time.perf_counter()
    return GenerationResult(ids, out, reason, t1 - t0, t1 - t0, t2 - t1)
