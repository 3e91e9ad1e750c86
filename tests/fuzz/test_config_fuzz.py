"""config.json from someone else (issue 15): anything that is not a Gemma 3 config of sane types
and sizes is a ConfigError naming the field, read without blocking and before anything is
allocated. On main: a list, `null`, string or float sizes, a non-mapping rope_scaling, zero heads
were tracebacks; `hidden_size: 1e9` tried to allocate 2 TB and `num_hidden_layers: 1e9` ran 80 s
into a MemoryError; a FIFO blocked until killed; bools and floats passed as integers."""

from __future__ import annotations

import copy
import json
import math
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from g3export.modeling.config import ConfigError, ModelConfig, config_from_hf, load_hf_config, preset

from .conftest import assert_refused, cli, invoke, snapshot

BASE = {  # the tiny preset as a HF gemma3_text config.json
    "model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "sliding_window": 8, "sliding_window_pattern": 3, "max_position_embeddings": 256,
    "query_pre_attn_scalar": 16, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "eos_token_id": [1, 106],
    "bos_token_id": 2, "pad_token_id": 0, "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
}
MM = {"model_type": "gemma3", "text_config": {**BASE, "vocab_size": 520},
      "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "image_size": 32, "patch_size": 4},
      "mm_tokens_per_image": 4, "boi_token_index": 510, "eoi_token_index": 511,
      "image_token_index": 519}


def test_base_configs_are_the_tiny_presets():
    assert config_from_hf(BASE).text == preset("tiny").text
    assert config_from_hf(MM).vision == preset("tiny-vision").vision


FIELD_CASES = [  # (key, value): the message must name the key. Each a traceback or accepted on main:
    ("hidden_size", "640"), ("hidden_size", True), ("hidden_size", 64.0), ("hidden_size", 1e9),
    ("hidden_size", 10**9), ("hidden_size", [64]), ("num_hidden_layers", 1e9),
    ("num_hidden_layers", 10**9), ("head_dim", 10**6), ("vocab_size", 10**12),
    ("sliding_window", "8"), ("max_position_embeddings", 2**40),
    ("rope_scaling", [1, 2]), ("rope_scaling", "linear"), ("rope_scaling", 8),
    ("rope_scaling", {"rope_type": "linear"}), ("rope_scaling", {"rope_type": "linear", "factor": "x"}),
    ("rope_theta", "abc"), ("rope_theta", float("inf")), ("layer_types", 5),
    ("eos_token_id", "1"), ("eos_token_id", []), ("eos_token_id", [-1]), ("bos_token_id", 1.5),
    ("rms_norm_eps", -1.0), ("rms_norm_eps", "tiny"), ("final_logit_softcapping", "x"),
    ("sliding_window_pattern", 10**9), ("rope_parameters", [1]),
] + [  # guards: already refused on main, kept so they stay refused
    ("hidden_size", -64), ("hidden_size", 0), ("num_hidden_layers", 0), ("num_attention_heads", 0),
    ("num_key_value_heads", 0), ("num_key_value_heads", 3), ("head_dim", 15), ("vocab_size", 0),
    ("intermediate_size", -1), ("max_position_embeddings", 0.5),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}), ("rope_theta", float("nan")),
    ("rope_theta", -1.0), ("rope_local_base_freq", False), ("layer_types", ["x"] * 6),
    ("layer_types", ["sliding_attention"] * 3), ("hidden_activation", 5),
    ("hidden_activation", "relu"), ("sliding_window_pattern", 0), ("query_pre_attn_scalar", 0),
    ("model_type", None), ("model_type", ["gemma3_text"]), ("attn_logit_softcapping", 50.0),
]


@pytest.mark.parametrize("key,value", FIELD_CASES, ids=lambda v: repr(v)[:30])
def test_text_field(key, value):
    d = {**BASE, key: value}
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        config_from_hf(d)
    assert time.monotonic() - t0 < 1
    words = {"layer_types": "layer", "model_type": "model_type", "rope_scaling": "rope",
             "eos_token_id": "eos_token_id", "hidden_activation": "activation",
             "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim",
             "attn_logit_softcapping": "softcapping", "query_pre_attn_scalar":
             "query_pre_attn_scalar", "rope_parameters": "rope_parameters"}
    assert words.get(key, key) in str(e.value) or "rope" in str(e.value), str(e.value)


@pytest.mark.parametrize("key,value", [
    ("text_config", [1]), ("text_config", "x"), ("vision_config", 5), ("vision_config", [1]),
    ("mm_tokens_per_image", "4"), ("image_token_index", "x"), ("boi_token_index", -1),
    ("mm_tokens_per_image", 5), ("image_token_index", 10**9),  # guards (refused on main too)
], ids=lambda v: repr(v)[:30])
def test_multimodal_field(key, value):
    with pytest.raises(ConfigError, match=key.split("_")[0]):
        config_from_hf({**MM, key: value})


@pytest.mark.parametrize("vkey,value", [("hidden_size", "32"), ("patch_size", 0),
                                        ("num_attention_heads", 0), ("image_size", 1e9),
                                        ("hidden_act", 5), ("layer_norm_eps", float("nan"))])
def test_vision_field(vkey, value):
    d = copy.deepcopy(MM)
    d["vision_config"][vkey] = value
    with pytest.raises(ConfigError, match=f"vision_config.{vkey}"):
        config_from_hf(d)


FILE_CASES = {  # guards (refused on main too): not JSON, empty, NUL bytes
    "a list": b"[1, 2, 3]", "null": b"null", "a string": b'"gemma"', "a number": b"42",
    "not JSON": b"{model_type: gemma3_text", "empty": b"", "not UTF-8": b'{"a": "\xff\xfe"}',
    "UTF-16": json.dumps(BASE).encode("utf-16"), "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "NUL bytes": b"\x00" * 64,
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_config_file(tmp_path, case):
    (tmp_path / "config.json").write_bytes(FILE_CASES[case])
    with pytest.raises(ConfigError, match="config.json"):
        load_hf_config(tmp_path)


def test_config_json_directory_and_fifo(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match="directory"):
        load_hf_config(tmp_path / "config.json")
    fifo = tmp_path / "f" / "config.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="regular file"):
        load_hf_config(fifo.parent)  # main: blocked until killed
    assert time.monotonic() - t0 < 1


def test_cli_on_bad_configs(tmp_path):
    """The same through the CLI, in a fresh process (a FIFO must not block it)."""
    cases = {"list": b"[]", "fifo": None, "null": b"null", "string size": json.dumps(
        {**BASE, "hidden_size": "64"}).encode()}
    before = snapshot(tmp_path)
    for name, data in cases.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        if data is None:
            os.mkfifo(d / "config.json")
        else:
            (d / "config.json").write_bytes(data)
        before = snapshot(tmp_path)
        r = cli("run", "--reference", "--checkpoint", d, "--weights", "random",
                "--prompt-ids", "2,3", timeout=60)
        assert_refused(r, "config")
        assert snapshot(tmp_path) == before


def test_memory_bound_before_allocating(tmp_path):
    """Types and caps pass, but the weights cannot fit: refused before any allocation
    (main: `hidden_size: 1e9` tried to allocate 2 TB)."""
    big = {**BASE, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_hidden_layers": 512,
           "vocab_size": 1 << 22}
    (tmp_path / "config.json").write_text(json.dumps(big))
    t0 = time.monotonic()
    r = invoke("run", "--reference", "--checkpoint", tmp_path, "--weights", "random",
               "--prompt-ids", "2,3")
    assert_refused(r, "GiB", "available")
    assert time.monotonic() - t0 < 30


def test_param_count_matches_the_module():
    from g3export.modeling.memory import param_count
    from g3export.plan import param_counts

    for name in ("tiny", "tiny-vision", "270m", "4b", "27b"):
        assert param_count(preset(name)) == param_counts(name)["total"], name


# --- property tests ----------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=6)
KEYS = sorted(BASE) + ["layer_types", "rope_parameters", "use_bidirectional_attention",
                       "attn_logit_softcapping", "text_config", "vision_config"]


def _mutations():
    one = st.one_of(
        st.tuples(st.just("set"), st.sampled_from(KEYS), JSON),
        st.tuples(st.just("del"), st.sampled_from(KEYS), st.none()),
        st.tuples(st.just("swap"), st.sampled_from(KEYS), st.sampled_from(
            [str, float, lambda v: [v], lambda v: {"v": v}, lambda v: None, lambda v: -1])))
    return st.lists(one, min_size=1, max_size=4)


def _apply(d, mutations):
    d = copy.deepcopy(d)
    for op, key, arg in mutations:
        if op == "set":
            d[key] = arg
        elif op == "del":
            d.pop(key, None)
        elif key in d:
            try:
                d[key] = arg(d[key])
            except (TypeError, ValueError, OverflowError):
                pass
    return d


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations(), st.booleans())
def test_mutated_config_is_read_or_refused(mutations, multimodal):
    """Random JSON values at random keys, deletions and type swaps: the reader returns a valid
    ModelConfig or raises ConfigError, never anything else, and quickly."""
    base = MM if multimodal else BASE
    if multimodal:
        d = copy.deepcopy(MM)
        d["text_config"] = _apply(d["text_config"], mutations)
    else:
        d = _apply(base, mutations)
    t0 = time.monotonic()  # a time limit per example, not hypothesis' deadline (flaky under load)
    try:
        cfg = config_from_hf(d)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    finally:
        assert time.monotonic() - t0 < 5
    assert isinstance(cfg, ModelConfig)
    t = cfg.text
    assert all(isinstance(getattr(t, f), int) and not isinstance(getattr(t, f), bool)
               for f in ("hidden_size", "num_hidden_layers", "vocab_size", "head_dim"))
    assert all(math.isfinite(r.theta) and math.isfinite(r.factor) for r in t.rope.values())
    assert math.isfinite(t.rms_norm_eps) and t.rms_norm_eps > 0


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_config_json(data):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "wb") as f:
            f.write(data)
        t0 = time.monotonic()
        with pytest.raises(ConfigError):
            load_hf_config(tmp)
        assert time.monotonic() - t0 < 5
