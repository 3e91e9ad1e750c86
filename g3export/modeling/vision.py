"""Gemma 3's vision path: the SigLIP encoder and the multimodal projector (GEMMA3_SPEC §3).

Shapes (4B/12B/27B: S = image_size = 896, p = patch_size = 14, C = 1152, n = S/p = 64,
P = n*n = 4096 patches, k = pool kernel = 4, M = mm_tokens_per_image = 256, d = text hidden):

    SiglipVisionModel     pixel_values [N, 3, S, S] -> [N, P, C]   (after post_layernorm)
        patch embed       Conv2d(3, C, kernel=stride=p) -> [N, C, n, n] -> [N, P, C] (row-major)
                          + learned position embedding [P, C]; no CLS token, no pooling head
        encoder layer     x += Attn(LN1(x))   bidirectional, H heads of C/H, q/k/v/out with bias
                          x += fc2(gelu_tanh(fc1(LN2(x))))
    MultiModalProjector   [N, P, C] -> [N, C, n, n] -> AvgPool2d(k, k) -> [N, M, C]
                          -> Gemma RMSNorm (1 + w) -> @ W [C, d] -> [N, M, d] in the input dtype

Parameter names equal transformers' `SiglipVisionModel` and `Gemma3MultiModalProjector`, so a HF
state dict loads as it is (under `vision_tower.` / `multi_modal_projector.`). Unlike HF there is
no `position_ids` buffer: the position embedding weight is added directly, so nothing but
parameters is created in __init__ and the modules can be built on the meta device.
Attention is written as plain matmul + fp32 softmax so it exports to ONNX as ordinary ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, VisionConfig
from .layers import RMSNorm


class SiglipEmbeddings(nn.Module):
    """[N, 3, S, S] -> [N, P, C]: patchify with a strided conv, add the learned position table."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size,
                                         kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side ** 2, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipAttention(nn.Module):
    """Full bidirectional multi-head attention, scale head_dim ** -0.5, softmax in fp32."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj = nn.Linear(c, c), nn.Linear(c, c)
        self.v_proj, self.out_proj = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:  # [N, T, C] -> [N, H, T, hd]
            return y.view(n, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(n, t, c)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class SiglipVisionModel(nn.Module):
    """pixel_values [N, 3, S, S] -> last hidden state [N, P, C] (after post_layernorm)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not SigLIP's tanh-GELU")
        self.config = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)


class MultiModalProjector(nn.Module):
    """[N, P, C] -> [N, mm_tokens_per_image, text hidden], in the dtype of its input."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vision is not None, f"{cfg.name} has no vision config"
        v = cfg.vision
        self.side = v.patches_per_side
        self.kernel = cfg.pool_kernel
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(v.hidden_size, cfg.text.hidden_size))
        self.mm_soft_emb_norm = RMSNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, c = x.shape
        grid = x.transpose(1, 2).reshape(n, c, self.side, self.side)   # patch i -> (i // n, i % n)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        out = torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight)
        return out.to(x.dtype)
