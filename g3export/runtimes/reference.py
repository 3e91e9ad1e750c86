"""The PyTorch reference session: the eager Gemma3Model (whose attention is the reference op) with
a static KV cache in the layout of g3export.modeling.cache. Every compiled runtime is compared with
it token for token.
"""

from __future__ import annotations

import numpy as np
import torch

from ..modeling.cache import kv_layout
from ..modeling.text import Gemma3Model
from .session import Session


class TorchSession(Session):
    context_hint = "use a larger --max-context"

    def __init__(self, model: Gemma3Model, max_context: int, batch: int = 1):
        self.model = model.eval()
        self.config = model.config
        self.max_context = max_context
        self.batch = batch
        dtype = next(model.parameters()).dtype
        self.layout = kv_layout(self.config.text, max_context, batch)
        self.caches = [torch.zeros(lc.shape, dtype=dtype) for lc in self.layout.layers for _ in "kv"]

    @property
    def kv_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.caches)

    def reset(self) -> None:
        for c in self.caches:
            c.zero_()

    def forward(self, input_ids, start_pos, image_features=None):
        ids = np.asarray(input_ids)
        starts = self.row_starts(start_pos, ids.shape[1])
        return self._run(ids, starts, image_features, self.caches)

    def forward_row(self, row, input_ids, start_pos, image_features=None):
        ids = self.check_row(row, input_ids)
        if start_pos < 0 or start_pos + ids.shape[1] > self.max_context:
            raise ValueError(f"positions {start_pos}.. exceed max_context {self.max_context}")
        views = [c[row:row + 1] for c in self.caches]  # views: the update lands in the buffers
        return self._run(ids, np.array([start_pos]), image_features, views)

    @torch.inference_mode()
    def _run(self, ids, starts, image_features, caches):
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
        feats = None if image_features is None else torch.as_tensor(np.asarray(image_features))
        logits, new = self.model(ids, torch.as_tensor(starts, dtype=torch.int64), caches, feats)
        for c, n in zip(caches, new):  # the op is functional; keep our buffers fixed
            c.copy_(n)
        return logits[:, -1].float().numpy()

    @torch.inference_mode()
    def image_features(self, pixel_values):
        return self.model.image_features(torch.as_tensor(pixel_values)).float().numpy()
