"""The Gemma 3 text decoder, written to be traced by torch.export.

Module names equal the Hugging Face checkpoint names (`embed_tokens`, `layers.N.self_attn.q_proj`,
`q_norm`, `pre_feedforward_layernorm`, ...), so loading weights is nearly the identity
(g3export.modeling.weights). The building blocks shared with the vision tower (RMSNorm, MLP,
RoPE, the scaled embedding) are in g3export.modeling.layers. The forward pass is GEMMA3_SPEC §2; the attention and the static KV
cache are one custom op (g3export.modeling.attention), so the same module is the eager reference
and the thing torch.export captures.

    logits, caches = model(input_ids, start_pos, caches)              # text only
    logits, caches = model(input_ids, start_pos, caches, image_features)

    input_ids       int64 [B, T]       a chunk of tokens; image soft tokens are config.image_token_id
    start_pos       int64 [B]          absolute position of input_ids[b, 0], one per row (rows are
                                       independent sequences, DESIGN §3.3); [1] = all rows alike
    caches          2 * L tensors      k_0, v_0, k_1, v_1, ...; layer i: [B, KV, S_i, D] (S_i from
                                       TextConfig.cache_length: W for sliding, max_context for full)
    image_features  float [M, hidden]  features of the M image soft tokens of the chunk, in order
    logits          float [B, 1, V]    last position only (or [B, T, V] with all_logits=True)
"""

from __future__ import annotations

import torch
from torch import nn

from . import attention as _attention  # noqa: F401  (registers torch.ops.g3.attention)
from .config import ModelConfig, TextConfig
from .layers import MLP, RMSNorm, RotaryEmbedding, ScaledEmbedding, rotate_half  # noqa: F401
from .vision import MultiModalProjector, SiglipVisionModel


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.window = cfg.window(layer) or 0  # 0 = full layer, as the op's contract says
        self.scale = cfg.scaling
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, start_pos, image_groups):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE; v is not normed
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out, k_cache, v_cache = torch.ops.g3.attention(
            q, k, v, k_cache, v_cache, start_pos, image_groups, self.window, self.scale)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), k_cache, v_cache


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer_type = cfg.layer_types[layer]
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos, sin, k_cache, v_cache, start_pos, image_groups):
        a, k_cache, v_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, k_cache, v_cache, start_pos, image_groups)
        x = x + self.post_attention_layernorm(a)  # post-norm before the residual add
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, k_cache, v_cache


def image_groups_from_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, T] int64: -1 for text, else the index (within the chunk) of the run of image tokens."""
    is_img = input_ids == image_token_id
    prev = torch.nn.functional.pad(is_img, (1, 0), value=False)[:, :-1]
    starts = (is_img & ~prev).to(torch.int64)
    return torch.where(is_img, torch.cumsum(starts, dim=1) - 1, torch.full_like(input_ids, -1))


class TextModel(nn.Module):
    """Gemma3TextModel: embedding, decoder layers, final norm (HF prefix `model.` / `language_model.`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.embed_scale)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class Gemma3Model(nn.Module):
    """The whole model. Submodules carry HF 5.x names below `model.`: `language_model`,
    `vision_tower` and `multi_modal_projector` (the last two only when the config has vision).

    lm_head is tied to language_model.embed_tokens (no separate weight).
    """

    def __init__(self, cfg: ModelConfig, all_logits: bool = False):
        super().__init__()
        self.config = cfg
        self.all_logits = all_logits
        self.language_model = TextModel(cfg.text)
        if cfg.vision is not None:
            self.vision_tower = SiglipVisionModel(cfg.vision)
            self.multi_modal_projector = MultiModalProjector(cfg)

    # -- vision --------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, image_size, image_size] -> [N, mm_tokens_per_image, text hidden]."""
        if self.config.vision is None:
            raise ValueError(f"{self.config.name} has no vision encoder")
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    # -- text ----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        x = self.language_model.embed_tokens(input_ids)
        if image_features is not None:
            # Image soft tokens take the features in order of appearance, unscaled (GEMMA3_SPEC §1a).
            # Indexing the [M, hidden] features with a [B, T] index gives [B, T, hidden] directly,
            # with no Reshape of float data in the graph: the earlier form,
            # feats.reshape(-1, hidden)[flat_idx].reshape(x.shape), made TensorRT-RTX 1.7's Myelin
            # fail on the native translation ("CHECK(is_const()) failed", tiny multimodal).
            if image_features.dim() != 2:  # [N, mm_tokens, hidden] from an eager caller
                image_features = image_features.reshape(-1, x.shape[-1])
            is_img = input_ids == self.config.image_token_id
            idx = (torch.cumsum(is_img.reshape(-1).to(torch.int64), 0) - 1).clamp(min=0)
            feats = image_features.to(x.dtype)[idx.reshape(input_ids.shape)]
            x = torch.where(is_img[..., None], feats, x)
        return x

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor,
                caches: list[torch.Tensor] | tuple[torch.Tensor, ...],
                image_features: torch.Tensor | None = None):
        lm = self.language_model
        t = input_ids.shape[1]
        x = self.embed(input_ids, image_features)
        b = input_ids.shape[0]
        start_pos = start_pos.reshape(-1).expand(b)  # [B]; a [1] start is every row's
        positions = start_pos[:, None] + torch.arange(t, dtype=torch.int64, device=x.device)
        rope = lm.rotary_emb(positions, x.dtype)
        image_groups = image_groups_from_ids(input_ids, self.config.image_token_id)
        new_caches = []
        for i, layer in enumerate(lm.layers):
            cos, sin = rope[layer.layer_type]
            x, k, v = layer(x, cos, sin, caches[2 * i], caches[2 * i + 1], start_pos, image_groups)
            new_caches += [k, v]
        if not self.all_logits:
            x = x[:, -1:]
        x = lm.norm(x)
        logits = x @ lm.embed_tokens.weight.T
        cap = self.config.text.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits, new_caches
