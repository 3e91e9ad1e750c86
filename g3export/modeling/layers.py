"""The building blocks of Gemma 3 that the text decoder (g3export.modeling.text) and the vision
tower's projector (g3export.modeling.vision) share: Gemma's RMSNorm, the gated MLP, the scaled
token embedding and rotary position embeddings. Their own module so that text and vision both
import them and neither imports the other for them.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LAYER_TYPES, TextConfig


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in fp32, scaled by (1 + w) with w stored zero-centred."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class ScaledEmbedding(nn.Embedding):
    """Token embedding times sqrt(hidden), the scale rounded to bf16 (TextConfig.embed_scale)."""

    def __init__(self, num_embeddings: int, dim: int, scale: float):
        super().__init__(num_embeddings, dim)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.scale


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = nn.functional.gelu(self.gate_proj(x), approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin per layer type, from TextConfig.rope (base theta, linear factor)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.types = [lt for lt in LAYER_TYPES if lt in cfg.layer_types]
        d = cfg.head_dim
        for lt in self.types:
            r = cfg.rope[lt]
            inv = 1.0 / (r.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)) / r.factor
            self.register_buffer(f"inv_freq_{lt}", inv, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple]:
        """positions int64 [B, T] -> per layer type (cos, sin), each [B, 1, T, D]: one row of
        angles per batch row (each row at its own position), broadcast over the heads."""
        out = {}
        for lt in self.types:
            ang = positions.float()[..., None] * getattr(self, f"inv_freq_{lt}")  # [B, T, D/2]
            emb = torch.cat([ang, ang], dim=-1)[:, None]  # [B, 1, T, D]
            # HF computes cos/sin in fp32 and casts to the activation dtype (GEMMA3_SPEC §1b).
            out[lt] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out


