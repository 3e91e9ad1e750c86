"""Gemma 3 configuration: frozen, validated dataclasses, the named presets and HF config.json reading.

Everything about a model's shape is said once here. The per-layer attention type is derived once
(`TextConfig.layer_types`) and every module reads it; the RoPE base and scaling of each layer
type, the window and the embedding scale are properties of the config, never literals elsewhere.

Sources for every number: ../shared/GEMMA3_SPEC.md §1 and §3 (Google's JAX code, gemma_pytorch,
transformers, Hub configs). Layer types use Hugging Face's names so that config.json files read
as they are.

    >>> cfg = preset("12b")
    >>> cfg.text.layer_types[:6]
    ('sliding_attention', 'sliding_attention', 'sliding_attention', 'sliding_attention', 'sliding_attention', 'full_attention')
    >>> cfg.text.embed_scale        # sqrt(3840) = 61.9677, rounded to bf16 as every reference does
    62.0
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .validate import (ConfigError, read_float, read_ids, read_int, read_layer_types,
                       read_mapping, read_str, where as _where)

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


def bf16_round(x: float) -> float:
    """Round a float to the nearest bfloat16 (round-to-nearest-even), as torch's .to(bfloat16) does."""
    (bits,) = struct.unpack("<I", struct.pack("<f", x))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def pattern_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's interleave: (pattern - 1) sliding layers, then one full layer, starting with sliding.

    The only place the pattern is turned into layer types (GEMMA3_SPEC §1 "layer pattern").
    """
    if pattern < 1:
        raise ConfigError(f"sliding_window_pattern must be >= 1, got {pattern}")
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type: base frequency and linear position scaling."""

    theta: float
    # Linear scaling ("rope_type": "linear"): inv_freq /= factor. 1.0 = none.
    factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.theta > 0:
            raise ConfigError(f"rope theta must be positive, got {self.theta}")
        if not self.factor >= 1.0:
            raise ConfigError(f"rope linear factor must be >= 1, got {self.factor}")


@dataclass(frozen=True)
class TextConfig:
    """The text decoder (Gemma3ForCausalLM / the language model of Gemma3ForConditionalGeneration)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # Attention scale is query_pre_attn_scalar ** -0.5 (168 for 27B, else head_dim).
    query_pre_attn_scalar: float
    # W: a sliding layer's query at position i sees keys j with i - W < j <= i (W keys incl. itself).
    sliding_window: int
    layer_types: tuple[str, ...]
    # RoPE per layer type: local layers theta 1e4; global layers theta 1e6, linear x8 on 4B+.
    rope: Mapping[str, RopeConfig]
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106)
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "rope", dict(self.rope))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ConfigError(f"unknown layer types {bad}; expected {list(LAYER_TYPES)}")
        missing = sorted(set(self.layer_types) - set(self.rope))
        if missing:
            raise ConfigError(f"no RoPE parameters for layer types {missing}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not Gemma 3's "
                              "gated tanh-GELU (gelu_pytorch_tanh)")
        if not self.query_pre_attn_scalar > 0:
            raise ConfigError(f"query_pre_attn_scalar must be positive, got {self.query_pre_attn_scalar}")

    # --- derived, read by every module ---
    @property
    def scaling(self) -> float:
        """Attention logit scale (GEMMA3_SPEC §1: query_pre_attn_scalar ** -0.5)."""
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def embed_scale(self) -> float:
        """sqrt(hidden_size) rounded to bf16: HF, JAX and gemma_pytorch all cast the scalar to the
        bf16 weight dtype before multiplying (GEMMA3_SPEC §1a), so the trained model saw this value.
        We use it in every dtype so fp32/fp16 graphs match the bf16 references."""
        return bf16_round(math.sqrt(self.hidden_size))

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer, or None for a full (global) layer."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def cache_length(self, layer: int, max_context: int) -> int:
        """Slots of a layer's static KV cache (DESIGN §3.3): W for sliding layers, max_context for full."""
        w = self.window(layer)
        return max_context if w is None else min(w, max_context)


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP vision encoder (siglip_vision_model, no head)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 896
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be a multiple of patch_size "
                              f"({self.patch_size})")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    """A whole Gemma 3 model: the text decoder and, for 4B and up, the vision tower and projector."""

    name: str
    text: TextConfig
    vision: VisionConfig | None = None
    mm_tokens_per_image: int = 256
    boi_token_id: int = 255999
    eoi_token_id: int = 256000
    image_token_id: int = 262144

    def __post_init__(self) -> None:
        if self.vision is not None:
            side = math.isqrt(self.mm_tokens_per_image)
            if side * side != self.mm_tokens_per_image:
                raise ConfigError(f"mm_tokens_per_image ({self.mm_tokens_per_image}) must be a square")
            if self.vision.patches_per_side % side:
                raise ConfigError(f"{self.vision.patches_per_side} patches per side cannot be pooled "
                                  f"to {side} tokens per side")
            if self.image_token_id >= self.text.vocab_size:
                raise ConfigError(f"image_token_id {self.image_token_id} is outside the vocabulary "
                                  f"({self.text.vocab_size} rows)")

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @property
    def pool_kernel(self) -> int:
        """Average-pool kernel and stride that turn the patch grid into mm_tokens_per_image tokens."""
        assert self.vision is not None
        return self.vision.patches_per_side // math.isqrt(self.mm_tokens_per_image)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of to_dict (what a build manifest stores)."""
        t = dict(d["text"])
        t["rope"] = {k: RopeConfig(**v) for k, v in t["rope"].items()}
        vision = VisionConfig(**d["vision"]) if d.get("vision") else None
        rest = {k: v for k, v in d.items() if k not in ("text", "vision")}
        return cls(text=TextConfig(**t), vision=vision, **rest)


# ---------------------------------------------------------------------------------------------
# Presets (GEMMA3_SPEC §1, §3; gemma3_configs.json)

_GLOBAL_THETA = 1_000_000.0
_LOCAL_THETA = 10_000.0


def _text(layers: int, hidden: int, inter: int, heads: int, kv: int, head_dim: int, window: int,
          global_factor: float, max_pos: int, qpas: float | None = None,
          vocab: int = 262144, pattern: int = 6) -> TextConfig:
    return TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        query_pre_attn_scalar=qpas if qpas is not None else head_dim, sliding_window=window,
        layer_types=pattern_layer_types(layers, pattern),
        rope={SLIDING: RopeConfig(_LOCAL_THETA), FULL: RopeConfig(_GLOBAL_THETA, global_factor)},
        max_position_embeddings=max_pos)


_V_HF = 262_208  # 262144 SentencePiece pieces + 64 rows HF appends (the image soft token is 262144)
_SIGLIP_400M = VisionConfig()  # Gemma 3's SigLIP So400m/14 at 896 px (GEMMA3_SPEC §3)

PRESETS: dict[str, ModelConfig] = {
    # The real sizes. Text-only sizes have 262144 rows (as their checkpoints and GGUF files do);
    # the multimodal sizes take the HF checkpoints' 262208 rows, since row 262144 is the image soft
    # token (GEMMA3_SPEC §1 vocab_size). A checkpoint's own config.json wins over these.
    "270m": ModelConfig("270m", _text(18, 640, 2048, 4, 1, 256, 512, 1.0, 32768)),
    "1b": ModelConfig("1b", _text(26, 1152, 6912, 4, 1, 256, 512, 1.0, 32768)),
    "4b": ModelConfig("4b", _text(34, 2560, 10240, 8, 4, 256, 1024, 8.0, 131072, vocab=_V_HF),
                      _SIGLIP_400M),
    "12b": ModelConfig("12b", _text(48, 3840, 15360, 16, 8, 256, 1024, 8.0, 131072, vocab=_V_HF),
                       _SIGLIP_400M),
    "27b": ModelConfig("27b", _text(62, 5376, 21504, 32, 16, 128, 1024, 8.0, 131072, qpas=168,
                                    vocab=_V_HF), _SIGLIP_400M),
    # Tiny presets for tests: every code path (both layer types, a window of 8 shorter than test
    # prompts, GQA with 2 query heads per KV head, global RoPE scaling, a small SigLIP).
    "tiny": ModelConfig("tiny", _text(6, 64, 128, 4, 2, 16, 8, 8.0, 256, vocab=512, pattern=3)),
    "tiny-vision": ModelConfig(
        "tiny-vision", _text(6, 64, 128, 4, 2, 16, 8, 8.0, 512, vocab=520, pattern=3),
        VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, image_size=32, patch_size=4),
        mm_tokens_per_image=4, boi_token_id=510, eoi_token_id=511, image_token_id=519),
}
SIZES = ("270m", "1b", "4b", "12b", "27b")


def preset(name: str) -> ModelConfig:
    """A named preset; an unknown name lists the valid ones."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown size {name!r}; valid sizes: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json

# transformers' defaults for keys the Hub configs omit (Gemma3TextConfig / Gemma3Config /
# SiglipVisionConfig). The 4B Hub config, for one, omits heads, KV heads, head_dim, vocab and
# max_position_embeddings (GEMMA3_SPEC §7.7).
_HF_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131_072, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
    sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None,
    bos_token_id=2, eos_token_id=1, pad_token_id=0, sliding_window_pattern=6,
    rope_theta=_GLOBAL_THETA, rope_local_base_freq=_LOCAL_THETA, rope_scaling=None,
)
_HF_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
)


def _rope_from_params(p: Any, default_theta: float, what: str) -> RopeConfig:
    p = read_mapping(p, what)
    kind = p.get("rope_type", p.get("type", "default"))
    theta = read_float({**p, "rope_theta": p.get("rope_theta", default_theta)}, "rope_theta", what)
    if kind == "default":
        return RopeConfig(theta)
    if kind == "linear":
        if "factor" not in p:
            raise ConfigError(f"config field {what} has rope_type 'linear' but no factor")
        return RopeConfig(theta, read_float(p, "factor", what))
    raise ConfigError(f"rope_type {kind!r:.80} is not used by Gemma 3 (expected 'default' or 'linear')")


_TEXT_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
              "max_position_embeddings")


def text_config_from_hf(d: Mapping[str, Any], section: str = "") -> TextConfig:
    """A TextConfig from a HF `gemma3_text` config dict (old or new key names, HF defaults filled).
    Every field is type- and range-checked (g3export.modeling.validate) before it is used."""
    d = read_mapping(d, section or "the config", optional=False)
    g = {**_HF_TEXT_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k in (
        "final_logit_softcapping", "attn_logit_softcapping", "rope_scaling")}}
    if g.get("attn_logit_softcapping") is not None:
        raise ConfigError("attn_logit_softcapping is set; Gemma 3 replaced it with QK-norm and "
                          "g3export does not implement it")
    if g.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True is an embedding model, not a Gemma 3 decoder")
    ints = {k: read_int(g, k, section) for k in _TEXT_INTS}
    layers = ints["num_hidden_layers"]
    layer_types = (read_layer_types(g["layer_types"], layers, section) if g.get("layer_types")
                   else pattern_layer_types(layers, read_int(g, "sliding_window_pattern", section)))
    theta = read_float(g, "rope_theta", section)
    local_theta = read_float(g, "rope_local_base_freq", section)
    # Newer configs: rope_parameters keyed by layer type. Older: rope_theta / rope_local_base_freq /
    # rope_scaling, where rope_scaling applies to the full-attention layers only (as in HF).
    params = read_mapping(g.get("rope_parameters"), _where("rope_parameters", section))
    if params and (SLIDING in params or FULL in params):
        rope = {FULL: _rope_from_params(params.get(FULL), theta, f"rope_parameters.{FULL}"),
                SLIDING: _rope_from_params(params.get(SLIDING), local_theta,
                                           f"rope_parameters.{SLIDING}")}
    else:
        scaling = read_mapping(g["rope_scaling"], _where("rope_scaling", section))
        if params:  # a flat rope_parameters dict is the full layers' (HF standardization)
            scaling, theta = params, params.get("rope_theta", theta)
        rope = {FULL: _rope_from_params({"rope_theta": theta, **scaling}, theta,
                                        _where("rope_scaling", section)),
                SLIDING: RopeConfig(local_theta)}
    # Stop at <end_of_turn> too: the chat template ends every turn with it (IT configs list both).
    eos = tuple(dict.fromkeys((*read_ids(g, "eos_token_id", section), 1, 106)))
    return TextConfig(
        **ints, layer_types=layer_types, rope=rope,
        query_pre_attn_scalar=read_float(g, "query_pre_attn_scalar", section),
        rms_norm_eps=read_float(g, "rms_norm_eps", section),
        hidden_activation=read_str(g, "hidden_activation", section),
        final_logit_softcapping=read_float(g, "final_logit_softcapping", section, optional=True),
        bos_token_id=read_int(g, "bos_token_id", section, lo=0), eos_token_ids=eos,
        pad_token_id=read_int(g, "pad_token_id", section, lo=0))


def vision_config_from_hf(d: Mapping[str, Any]) -> VisionConfig:
    d = read_mapping(d, "vision_config", optional=False)
    g = {**_HF_VISION_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if g.get("vision_use_head"):
        raise ConfigError("vision_use_head=True: Gemma 3's SigLIP has no pooling head")
    ints = {k: read_int(g, k, "vision_config") for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "image_size", "patch_size", "num_channels")}
    return VisionConfig(**ints, layer_norm_eps=read_float(g, "layer_norm_eps", "vision_config"),
                        hidden_act=read_str(g, "hidden_act", "vision_config"))


def _token_id(d: Mapping[str, Any], keys: tuple[str, str], default: int) -> int:
    for k in keys:
        if d.get(k) is not None:
            return read_int(d, k, lo=0)
    return default


def config_from_hf(d: Mapping[str, Any], name: str = "checkpoint") -> ModelConfig:
    """A ModelConfig from a HF config.json dict: `gemma3_text` (CausalLM) or `gemma3` (multimodal).
    Anything that is not a Gemma 3 config of sane types and sizes is a ConfigError naming the
    field (g3export.modeling.validate)."""
    d = read_mapping(d, "the config (top level)", optional=False)
    model_type = d.get("model_type")
    if model_type == "gemma3_text":
        return ModelConfig(name, text_config_from_hf(d))
    if model_type == "gemma3":
        text = text_config_from_hf(d.get("text_config") or {}, "text_config")
        vision = vision_config_from_hf(d.get("vision_config") or {})
        mm = d.get("mm_tokens_per_image")
        return ModelConfig(
            name, text, vision,
            mm_tokens_per_image=256 if mm is None else read_int(d, "mm_tokens_per_image"),
            boi_token_id=_token_id(d, ("boi_token_index", "boi_token_id"), 255999),
            eoi_token_id=_token_id(d, ("eoi_token_index", "eoi_token_id"), 256000),
            image_token_id=_token_id(d, ("image_token_index", "image_token_id"), 262144))
    raise ConfigError(f"model_type {model_type!r:.80} is not Gemma 3 (expected 'gemma3_text' or "
                      "'gemma3')")


def load_hf_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself): a regular UTF-8 file
    holding a JSON object (g3export.userfiles: a FIFO or a device is refused, never opened)."""
    from ..userfiles import read_json_object

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"{p} not found: a HF checkpoint directory needs its config.json")
    return config_from_hf(read_json_object(p, ConfigError, "config file"), name=p.parent.name)
