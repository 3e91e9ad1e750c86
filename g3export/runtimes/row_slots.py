"""RowSlotsSession: the serving contract's Session (SERVING_CONTRACT.md) over `batch` independent
batch-1 sequence slots of one ONNX Runtime build: exact, not batched.

    session = RowSlotsSession.from_build("builds/270m", batch=8)
    logits = session.forward_row(r, ids[1, T], start_pos)   # slot r only -> float32 [1, V]
    logits = session.forward(ids[B, T], start_pos[B])        # every row, one after another

A stand-in until the batched sessions (one start position per row inside the graph) land: row r
runs the batch-1 graph with row r's own cache buffers bound, so each row computes exactly what
`generate()` computes at batch 1 (the server tests compare token for token), and a step over B
rows costs B batch-1 steps. The weights are loaded once: one InferenceSession, `batch` sets of
cache buffers, switched by rebinding them (ORT's IOBinding; no copy). Built on OrtSession's
private cache list on purpose: this file goes away when the batched session replaces it.
"""

from __future__ import annotations

import numpy as np

from .ort_session import OrtSession
from .session import Session


class RowSlotsSession(Session):
    def __init__(self, base: OrtSession, batch: int):
        if base.batch != 1:
            raise ValueError(f"RowSlotsSession wraps a batch-1 session, got batch {base.batch}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        import onnxruntime as ort

        self.base = base
        self.config, self.max_context, self.batch = base.config, base.max_context, batch
        self.prefill_chunk, self.chunk_align = base.prefill_chunk, base.chunk_align
        if base.device != "cpu":
            raise ValueError("RowSlotsSession keeps its row caches in host memory (CPU provider)")
        self._rows = [(base._cache_values, base._buffers)]
        for _ in range(batch - 1):
            values, buffers = [], []
            for past, present, ov in base._cache_values:
                host = np.zeros_like(base._buffers[len(buffers)])
                buffers.append(host)
                values.append((past, present, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    host, ov.element_type())))
            self._rows.append((values, buffers))
        self._current = 0

    @classmethod
    def from_build(cls, build_dir, batch: int, provider: str = "cpu",
                   **kwargs) -> "RowSlotsSession":
        return cls(OrtSession.from_build(build_dir, provider=provider, batch=1, **kwargs), batch)

    def _use(self, row: int) -> None:
        if not 0 <= row < self.batch:
            raise IndexError(f"row {row} out of range for batch {self.batch}")
        if row != self._current:
            self.base._cache_values, self.base._buffers = self._rows[row]
            self.base._bind_static()  # binds this row's buffers as past_* and present_*
            self._current = row

    @property
    def kv_bytes(self) -> int:
        return self.base.kv_bytes * self.batch

    def forward_row(self, row: int, input_ids: np.ndarray, start_pos: int,
                    image_features: np.ndarray | None = None) -> np.ndarray:
        self._use(row)
        return self.base.forward(input_ids, int(start_pos), image_features)

    def forward(self, input_ids: np.ndarray, start_pos, image_features=None) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"input_ids must be [batch={self.batch}, T], got {ids.shape}")
        if image_features is not None and self.batch != 1:
            raise ValueError("image_features with several rows: use forward_row")
        pos = np.broadcast_to(np.asarray(start_pos, dtype=np.int64), (self.batch,))
        return np.concatenate([self.forward_row(r, ids[r:r + 1], int(pos[r]), image_features)
                               for r in range(self.batch)])

    def reset(self) -> None:
        for _, buffers in self._rows:
            for a in buffers:
                a.fill(0)

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.base.image_features(pixel_values)
