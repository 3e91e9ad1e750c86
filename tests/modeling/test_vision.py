"""Vision path (g3export.modeling.vision): parity with transformers' Gemma 3 on a tiny random model,
parameter counts of the real SigLIP on the meta device, and torch.export / ONNX export of
`Gemma3Model.image_features` with a dynamic number of images.

Shapes (tiny-vision): pixel_values [N, 3, 32, 32] -> 8x8 = 64 patches of 32 -> pooled 2x2 -> [N, 4, 64].
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from g3export.modeling.config import preset
from g3export.modeling.text import Gemma3Model
from g3export.modeling.vision import MultiModalProjector, SiglipVisionModel

TINY = preset("tiny-vision")


def _hf_tiny_model():
    """A random HF Gemma3ForConditionalGeneration whose vision part is TINY's."""
    from tests.multimodal import _hf_config, transformers

    cfg = _hf_config()
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    # HF initialises every norm weight to 1 (LayerNorm) or 0 (Gemma RMSNorm); randomise them (and
    # the zero-initialised projection) so the biases, the (1 + w) and the projection are exercised.
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if not name.startswith(("vision_tower.", "multi_modal_projector.")):
                continue
            if "mm_soft_emb_norm" in name or "mm_input_projection" in name:
                p.copy_(torch.randn_like(p) * 0.5)          # (1 + w) around 1
            elif "norm" in name:                            # LayerNorm weight around 1, bias around 0
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


def _sub_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def _hf_tower_state(hf) -> dict[str, torch.Tensor]:
    """HF's vision tower state dict in checkpoint naming (`vision_model.` first).

    Hub checkpoints store `vision_tower.vision_model.*`. transformers 5.x builds SiglipVisionModel
    without the `vision_model` level and strips that prefix when loading (a PrefixChange in its
    conversion_mapping), so its in-memory (and save_pretrained) names lack it; older versions
    keep it. Ours keep it, as the checkpoints do.
    """
    sd = _sub_state(hf, "model.vision_tower.")
    return {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in sd.items()}


def test_parity_with_transformers():
    hf = _hf_tiny_model()
    hf_tower = _hf_tower_state(hf)
    hf_proj = _sub_state(hf, "model.multi_modal_projector.")
    # HF's vision embeddings keep a non-persistent position_ids buffer; it is not in the state dict.
    assert not any("position_ids" in k for k in hf_tower)

    tower, proj = SiglipVisionModel(TINY.vision).eval(), MultiModalProjector(TINY).eval()
    assert set(tower.state_dict()) == set(hf_tower)
    assert set(proj.state_dict()) == set(hf_proj)
    tower.load_state_dict(hf_tower, strict=True)
    proj.load_state_dict(hf_proj, strict=True)

    torch.manual_seed(1)
    px = torch.randn(2, 3, TINY.vision.image_size, TINY.vision.image_size)
    with torch.no_grad():
        out = hf.model.get_image_features(px)
        ref_hidden = out.last_hidden_state
        ref = out.pooler_output if hasattr(out, "pooler_output") else out
        hidden = tower(px)
        ours = proj(hidden)

    v = TINY.vision
    assert hidden.shape == (2, v.patches_per_side ** 2, v.hidden_size)
    assert ours.shape == (2, TINY.mm_tokens_per_image, TINY.text.hidden_size)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours.abs().max() > 0.1  # the comparison is not of near-zero tensors

    # The same weights through Gemma3Model.image_features.
    model = Gemma3Model(TINY).eval()
    model.vision_tower.load_state_dict(hf_tower)
    model.multi_modal_projector.load_state_dict(hf_proj)
    with torch.no_grad():
        torch.testing.assert_close(model.image_features(px), ref, atol=1e-5, rtol=1e-5)


def test_projector_pools_row_major_and_keeps_dtype():
    """Patch i sits at grid (i // side, i % side); each token averages a kernel x kernel block."""
    proj = MultiModalProjector(TINY)
    side, k, c = TINY.vision.patches_per_side, TINY.pool_kernel, TINY.vision.hidden_size
    with torch.no_grad():
        proj.mm_input_projection_weight.copy_(torch.randn_like(proj.mm_input_projection_weight))
    x = torch.randn(1, side * side, c)
    grid = x.reshape(1, side, side, c)
    manual = grid.reshape(1, side // k, k, side // k, k, c).mean((2, 4)).reshape(1, -1, c)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), proj.mm_soft_emb_norm(manual) @ proj.mm_input_projection_weight)
        assert proj.to(torch.bfloat16)(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_tiny_vision_builds():
    model = Gemma3Model(TINY)
    px = torch.randn(3, 3, TINY.vision.image_size, TINY.vision.image_size)
    with torch.no_grad():
        assert model.image_features(px).shape == (3, TINY.mm_tokens_per_image, TINY.text.hidden_size)
    assert not list(model.vision_tower.buffers()) and not list(model.multi_modal_projector.buffers())


def test_4b_vision_parameter_counts_on_meta():
    cfg = preset("4b")
    with torch.device("meta"):
        tower, proj = SiglipVisionModel(cfg.vision), MultiModalProjector(cfg)
    assert sum(p.numel() for p in tower.parameters()) == 416_866_032  # GEMMA3_SPEC §5a
    assert sum(p.numel() for p in proj.parameters()) == 1152 * 2560 + 1152 == 2_950_272
    assert all(p.is_meta for p in (*tower.parameters(), *proj.parameters()))
    # Filled later: to_empty + a state dict of real tensors.
    tower.to_empty(device="cpu")
    assert not any(p.is_meta for p in tower.parameters())


class _ImageFeatures(nn.Module):
    def __init__(self, model: Gemma3Model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(pixel_values)


def _export_program():
    torch.manual_seed(0)
    model = Gemma3Model(TINY).eval()
    with torch.no_grad():  # make the (1 + w) and norm biases non-trivial
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    wrapper = _ImageFeatures(model).eval()
    s = TINY.vision.image_size
    px = torch.randn(2, 3, s, s)
    dyn = {"pixel_values": {0: torch.export.Dim("images", min=1, max=64)}}
    return wrapper, px, dyn


def test_torch_export_dynamic_images():
    wrapper, px, dyn = _export_program()
    ep = torch.export.export(wrapper, (px,), dynamic_shapes=dyn)
    s = TINY.vision.image_size
    for n in (1, 3):
        x = torch.randn(n, 3, s, s)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), wrapper(x), atol=1e-5, rtol=1e-5)


def test_onnx_export_matches_eager(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    wrapper, px, dyn = _export_program()
    prog = torch.onnx.export(wrapper, (px,), dynamo=True, dynamic_shapes=dyn, opset_version=18,
                             input_names=["pixel_values"], output_names=["image_features"])
    proto = prog.model_proto
    proto.ir_version = min(proto.ir_version, 10)  # onnxruntime may not read the newest IR
    path = tmp_path / "vision.onnx"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    s = TINY.vision.image_size
    for n in (1, 3):
        x = torch.randn(n, 3, s, s)
        (got,) = sess.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            want = wrapper(x).numpy()
        assert got.shape == want.shape == (n, TINY.mm_tokens_per_image, TINY.text.hidden_size)
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-4, rtol=1e-4)
