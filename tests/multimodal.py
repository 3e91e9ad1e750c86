"""A tiny random Hugging Face Gemma3ForConditionalGeneration shared by the multimodal tests:
the HF config (matching g3export's 'tiny-vision' preset: both layer types, window 8, GQA 2:1,
SigLIP at 32 px with 4 tokens per image), the saved checkpoint with randomized norms, a few
pictures, and prompts with one or two images that are longer than the window.

Import the fixtures into a test module to use them: `from tests.multimodal import models, pixels`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from g3export.modeling.config import preset
from g3export.modeling.weights import CheckpointError, build_model
from g3export.runtimes.images import prepare_images

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

TINY = preset("tiny-vision")
BOI, EOI, IMG, MM = TINY.boi_token_id, TINY.eoi_token_id, TINY.image_token_id, TINY.mm_tokens_per_image
DECODE = 20


def _hf_config():
    v, t = TINY.vision, TINY.text
    vision = transformers.SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act, vision_use_head=False)
    text = transformers.Gemma3TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
        sliding_window=t.sliding_window, sliding_window_pattern=3, max_position_embeddings=512,
        query_pre_attn_scalar=16, rope_scaling={"rope_type": "linear", "factor": 8.0},
        rope_local_base_freq=10000.0, eos_token_id=[1, 106])
    cfg = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=MM, boi_token_index=BOI,
        eoi_token_index=EOI, image_token_index=IMG)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    return cfg


def _hub_named_copy(src, dst):
    """The checkpoint with Hub naming for the vision tower (`vision_tower.vision_model.*`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            sd = load_file(f)
            sd = {("vision_tower.vision_model." + k[len("vision_tower."):]
                   if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
                   else k): v for k, v in sd.items()}
            save_file(sd, dst / f.name, metadata={"format": "pt"})
        elif f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(_hf_config()).eval()
    assert set(hf.config.text_config.layer_types) == {"sliding_attention", "full_attention"}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "mm_soft_emb_norm" in name or "mm_input_projection" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif "vision_tower" in name and "norm" in name:      # LayerNorm: weight ~1, bias ~0
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif "norm" in name and name.endswith("weight"):     # Gemma RMSNorm (1 + w)
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("hf_tiny_vision")
    hf.save_pretrained(path)
    try:
        ours = build_model(checkpoint=path, all_logits=True)
        loaded_directly = True
    except CheckpointError:
        ours = build_model(checkpoint=_hub_named_copy(path, path.parent / (path.name + "_hub")),
                           all_logits=True)
        loaded_directly = False
    return hf, ours, path, loaded_directly


def _picture(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 / w, yy * 255 / h, rng.uniform(0, 255, (h, w))], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, (h, w) in enumerate([(40, 64), (50, 30), (32, 32)]):
        paths.append(d / f"p{i}.png")
        _picture(h, w, i).save(paths[-1])
    pv, counts = prepare_images(paths, TINY)
    assert counts == [1, 1, 1] and pv.shape == (3, 3, 32, 32)
    return torch.from_numpy(pv)


def _prompt(n_images: int, seed: int) -> torch.Tensor:
    """text, boi, 4 x image, eoi, text, ...: longer than the window of 8."""
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 20] if n_images == 1 else [5, 7, 12]
    ids = []
    for i, n in enumerate(lengths):
        ids += torch.randint(3, 500, (n,), generator=g).tolist()
        if i < n_images:
            ids += [BOI] + [IMG] * MM + [EOI]
    return torch.tensor([ids])


def _hf_prefill(hf, ids, pv, bidirectional=True):
    kw = {"token_type_ids": (ids == IMG).long()} if bidirectional else {}
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pv, **kw).logits[0]


def _hf_features(hf, pv):
    with torch.no_grad():
        out = hf.model.get_image_features(pv, return_dict=True)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return feats.reshape(pv.shape[0], MM, -1)
