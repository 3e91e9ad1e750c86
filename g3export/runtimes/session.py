"""The interface every runtime session implements (DESIGN §3.7).

A session owns one static KV cache (allocated once, never resized) and runs chunks of tokens
through the model. The generation loop (g3export.runtimes.generate) drives any session the same
way, so a compiled runtime is compared with the PyTorch reference token for token.

    logits = session.forward(input_ids, start_pos)   # int64 [B, T] at positions start_pos.. -> float32 [B, V]
    session.reset()                                  # forget the contents; the buffers stay

forward() runs one chunk: it reads the cache, attends, writes the chunk's K/V into the cache in
place and returns the logits of the chunk's last position. image_features ([M, hidden], one row
per image soft token of the chunk, in order) replace the embeddings of image soft tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..modeling.config import ModelConfig


class Session(ABC):
    config: ModelConfig
    max_context: int
    batch: int
    # Limits of a compiled graph that the generation loop honours when it chunks a prefill
    # (g3export.runtimes.generate.prefill_chunks). None = no limit.
    prefill_chunk: int | None = None  # the longest chunk the graph accepts (a TensorRT profile)
    chunk_align: int | None = None    # no chunk may cross a multiple of this (the native TensorRT
    #                                   translation: a chunk must not wrap a sliding layer's ring)
    # What to say when a prompt does not fit: a build's context is fixed when it is built.
    context_hint: str = "rebuild with a larger `g3export build --max-context`"

    @property
    @abstractmethod
    def kv_bytes(self) -> int:
        """Bytes of the K/V buffers this session allocated, measured from the buffers themselves."""

    @abstractmethod
    def forward(self, input_ids: np.ndarray, start_pos: int,
                image_features: np.ndarray | None = None) -> np.ndarray:
        """Run one chunk; return float32 logits [B, V] of its last position."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the cache contents (positions restart at 0) without reallocating."""

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, S, S] float32 -> [N, mm_tokens_per_image, hidden] float32."""
        raise NotImplementedError(f"{type(self).__name__} has no vision component")
