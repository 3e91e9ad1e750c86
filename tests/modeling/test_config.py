"""Presets against the shared per-size configs (gathered from Google's and HF's code, not by us),
and HF config.json reading in both key generations."""

import json
from pathlib import Path

import pytest

from g3export.modeling.config import (FULL, SLIDING, ConfigError, PRESETS, SIZES, bf16_round,
                                      config_from_hf, preset)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "gemma3_configs.json"


@pytest.fixture(scope="module")
def shared_configs():
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not present (it sits beside the repository in CI and dev checkouts)")
    return json.loads(SHARED.read_text())


@pytest.mark.parametrize("size", SIZES)
def test_presets_match_the_shared_configs(size, shared_configs):
    ref = shared_configs[size.upper()]
    c = preset(size)
    t = c.text
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
                "max_position_embeddings"):
        assert getattr(t, key) == ref[key], key
    assert t.vocab_size == ref["vocab_size_hf"]
    assert t.embed_scale == ref["embed_scale_bf16"]
    assert t.rope[FULL].theta == ref["rope_theta_global"]
    assert t.rope[SLIDING].theta == ref["rope_theta_local"]
    scaling = ref["rope_scaling_global"]
    assert t.rope[FULL].factor == (scaling["factor"] if scaling else 1.0)
    assert t.rope[SLIDING].factor == 1.0
    assert c.has_vision == ref["vision"]
    # layer i is global iff (i+1) % 6 == 0 (the shared file's note), first layer local
    assert t.layer_types == tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(ref["num_hidden_layers"]))


def test_bf16_rounding_examples():
    # GEMMA3_SPEC §1a: sqrt(3072) = 55.4256 becomes 55.5 in bf16
    assert bf16_round(3072 ** 0.5) == 55.5
    assert bf16_round(640 ** 0.5) == 25.25


def test_27b_scale_and_head_dim():
    t = preset("27b").text
    assert t.head_dim == 128 and t.query_pre_attn_scalar == 168
    assert abs(t.scaling - 0.077152) < 1e-6


def test_unknown_size_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid sizes: 270m, 1b, 4b, 12b, 27b"):
        preset("7b")


def test_hf_old_keys_with_defaults():
    # The 4B Hub text_config omits heads, KV heads, head_dim, vocab and max positions (GEMMA3_SPEC §7.7).
    d = {"model_type": "gemma3", "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024}, "vision_config": {
        "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}
    c = config_from_hf(d)
    ref = preset("4b")
    assert c.text == ref.text and c.vision == ref.vision
    assert c.image_token_id == 262144 and c.boi_token_id == 255999


def test_hf_new_keys():
    d = {"model_type": "gemma3_text", "num_hidden_layers": 4, "hidden_size": 64,
         "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
         "vocab_size": 100, "sliding_window": 8,
         "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    t = config_from_hf(d).text
    assert t.layer_types == (FULL, SLIDING, SLIDING, FULL)
    assert (t.rope[FULL].theta, t.rope[FULL].factor) == (5e5, 4.0)
    assert t.rope[SLIDING].theta == 1e4 and t.window(0) is None and t.window(1) == 8


@pytest.mark.parametrize("bad, msg", [
    ({"model_type": "llama"}, "not Gemma 3"),
    ({"model_type": "gemma3_text", "num_attention_heads": 6, "num_key_value_heads": 4}, "multiple"),
    ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "softcapping"),
    ({"model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn", "factor": 2}}, "rope_type"),
])
def test_bad_configs_are_refused(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_hf(bad)


def test_tiny_presets_reach_every_path():
    for name in ("tiny", "tiny-vision"):
        t = PRESETS[name].text
        assert {SLIDING, FULL} <= set(t.layer_types)
        assert t.num_kv_groups == 2 and t.sliding_window == 8
    assert PRESETS["tiny-vision"].has_vision


def test_config_round_trips_through_a_dict():
    from g3export.modeling.config import ModelConfig
    for name in ("12b", "tiny-vision"):
        c = preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
