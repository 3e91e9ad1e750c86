"""The interface every runtime session implements (DESIGN §3.7).

A session owns one static KV cache (allocated once, never resized) and runs chunks of tokens
through the model. The generation loop (g3export.runtimes.generate) drives any session the same
way, so a compiled runtime is compared with the PyTorch reference token for token.

    session.batch                                    # number of sequence slots (rows), fixed
    logits = session.forward(input_ids, start_pos)   # int64 [B, T]; start_pos int64 [B] or int
                                                     #   -> float32 [B, V]
    logits = session.forward_row(row, input_ids, start_pos)  # one slot: [1, T], int -> [1, V]
    session.reset()                                  # forget the contents; the buffers stay

forward() runs one chunk: it reads the cache, attends, writes the chunk's K/V into the cache in
place and returns the logits of the chunk's last position. Rows are independent sequence slots
(DESIGN §3.3): row b's chunk is at positions start_pos[b] .. start_pos[b] + T - 1 (an int start
is every row's, the batch-1 CLI's call). A row restarted at 0 needs no reset: its old slots are
masked by position. image_features ([M, hidden], one row per image soft token of the chunk, in
order) replace the embeddings of image soft tokens.

forward_row() runs one chunk for one slot only and leaves the other rows' caches untouched; the
compiled sessions bind that row's slice of each cache buffer by address (no copy). It is how a
prompt joins a running batch (g3export.runtimes.scheduler): one prefill chunk of one row between
decode steps of all rows, rather than a batched prefill with per-row lengths (the graphs would
need a length per row and padding; BENCHMARKS.md has the measurement behind the choice).
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
    def forward(self, input_ids: np.ndarray, start_pos: "int | np.ndarray",
                image_features: np.ndarray | None = None) -> np.ndarray:
        """Run one chunk in every row; return float32 logits [B, V] of its last position."""

    @abstractmethod
    def forward_row(self, row: int, input_ids: np.ndarray, start_pos: int,
                    image_features: np.ndarray | None = None) -> np.ndarray:
        """Run one chunk [1, T] in slot `row` only; return float32 logits [1, V]."""

    def row_starts(self, start_pos: "int | np.ndarray", t: int) -> np.ndarray:
        """start_pos (an int or [B] ints) as int64 [B], checked against max_context."""
        starts = np.asarray(start_pos, dtype=np.int64).reshape(-1)
        if starts.size == 1:
            starts = np.repeat(starts, self.batch)
        if starts.size != self.batch:
            raise ValueError(f"start_pos must be an int or [batch={self.batch}] ints, got "
                             f"{starts.size} values")
        if t < 1:
            raise ValueError("empty chunk")
        if starts.min() < 0 or starts.max() + t > self.max_context:
            raise ValueError(f"positions {starts.tolist()} + {t} tokens exceed max_context "
                             f"{self.max_context}")
        return starts

    def check_row(self, row: int, input_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if not 0 <= row < self.batch:
            raise ValueError(f"row {row} out of range 0..{self.batch - 1}")
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"forward_row takes input_ids [1, T], got {ids.shape}")
        return ids

    @abstractmethod
    def reset(self) -> None:
        """Forget the cache contents (positions restart at 0) without reallocating."""

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, S, S] float32 -> [N, mm_tokens_per_image, hidden] float32."""
        raise NotImplementedError(f"{type(self).__name__} has no vision component")
