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

    @torch.inference_mode()
    def forward(self, input_ids, start_pos, image_features=None):
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.int64)
        feats = None if image_features is None else torch.as_tensor(np.asarray(image_features))
        logits, new = self.model(ids, torch.tensor([start_pos]), self.caches, feats)
        for c, n in zip(self.caches, new):  # the op is functional; keep our buffers fixed
            c.copy_(n)
        return logits[:, -1].float().numpy()

    @torch.inference_mode()
    def image_features(self, pixel_values):
        return self.model.image_features(torch.as_tensor(pixel_values)).float().numpy()
