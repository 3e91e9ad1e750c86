"""Export the vision component of Gemma 3 to ONNX (DESIGN §3.4): SigLIP encoder + multimodal
projector (g3export.modeling.vision) as one graph, `vision.onnx` + `vision.onnx.data`.

The vision component's I/O contract (`vision_io()` builds it; the manifest stores it):

    name            dtype          shape                           notes
    --------------  -------------  ------------------------------  -----------------------------
    pixel_values    float32        [images, 3, S, S]               preprocessed (runtimes.images):
                                                                   resized to S = image_size,
                                                                   (x / 255 - 0.5) / 0.5
    --------------  -------------  ------------------------------  -----------------------------
    image_features  model dtype    [images, mm_tokens, hidden]     mm_tokens = mm_tokens_per_image
                                                                   (256 for Gemma 3), hidden = text
                                                                   hidden size; rows go, in order,
                                                                   to the text graph's
                                                                   image_features input

`images` is dynamic (1 .. MAX_IMAGES). Pixel values are float32 whatever the model dtype (the
graph casts them), so the runtime's preprocessing is dtype-independent; the features come out in
the model dtype, the dtype of the text graph's image_features input.

Weights stream as in export_text (g3export.export.stream): the model may be on the meta device.
Only the vision tower's and the projector's weights are in this graph; `export_vision` refuses a
graph holding any other (text) initializer. The model is cast to `dtype` in its vision part only,
so a vision-only build never touches (or materialises) the text weights: `vision_only_model`
builds a model whose text part stays on the meta device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..modeling.config import ModelConfig
from ..modeling.text import Gemma3Model
from ..modeling.sources import WeightSource
from .onnx_export import (ONNX_DTYPE_NAMES, OPSET, TORCH_DTYPES, ComponentIO, TensorSpec,
                          _check_io, _device, _quiet, ir_version_for, weight_lookup)
from .onnx_passes import (_drop_unused_initializers, _fold_weight_transposes, _fuse_rms_norm,
                          _strip_metadata)
from .stream import attach_recipes, save_with_external_data

MAX_IMAGES = 256
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def vision_io(cfg: ModelConfig, dtype: str = "fp32", file: str = "vision.onnx") -> ComponentIO:
    """The vision component's contract (module docstring)."""
    if cfg.vision is None:
        raise ValueError(f"{cfg.name} has no vision encoder")
    s = cfg.vision.image_size
    return ComponentIO(
        "vision", file,
        (TensorSpec("pixel_values", "float32", ("images", cfg.vision.num_channels, s, s)),),
        (TensorSpec("image_features", ONNX_DTYPE_NAMES[dtype],
                    ("images", cfg.mm_tokens_per_image, cfg.text.hidden_size)),),
        {"opset": OPSET, "max_images": MAX_IMAGES})


class VisionComponent(nn.Module):
    """pixel_values -> image_features; parameters keep their names under `model.`."""

    def __init__(self, model: Gemma3Model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(pixel_values)


def export_vision(model: Gemma3Model, out_dir: str | Path, dtype: str = "fp32",
                  progress: bool = True, file: str = "vision.onnx",
                  weights: WeightSource | None = None,
                  hashes: dict[str, dict] | None = None) -> ComponentIO:
    """Export the vision component to `out_dir/file` (+ `file`.data). Returns its ComponentIO.
    The vision tower and projector are cast to `dtype` in place; the text part is not touched.
    model / weights / hashes: as export_text's (weights stream; the model may be on meta)."""
    cfg = model.config
    io = vision_io(cfg, dtype, file)
    tdt = TORCH_DTYPES[dtype]
    model.vision_tower.to(tdt).eval()
    model.multi_modal_projector.to(tdt).eval()
    s = cfg.vision.image_size
    px = torch.zeros(2, cfg.vision.num_channels, s, s, device=_device(model.vision_tower))
    dyn = {"pixel_values": {0: torch.export.Dim("images", min=1, max=MAX_IMAGES)}}
    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(
            VisionComponent(model).eval(), (px,), dynamo=True, dynamic_shapes=dyn,
            optimize=False, opset_version=OPSET, input_names=["pixel_values"],
            output_names=["image_features"], verbose=False)
    m = prog.model
    attach_recipes(m, weight_lookup(model, weights))
    _fold_weight_transposes(m)
    _fuse_rms_norm(m)
    _drop_unused_initializers(m)
    _strip_metadata(m)
    m.ir_version = ir_version_for(OPSET)
    _check_io(m, io)
    _check_only_vision_weights(m)
    digests = save_with_external_data(m, Path(out_dir) / file, progress=progress)
    if hashes is not None:
        hashes.update(digests)
    return io


def _check_only_vision_weights(m) -> None:
    big = [name for name, v in m.graph.initializers.items()
           if v.const_value is not None and v.const_value.size > 1
           and not name.removesuffix(".T").startswith(VISION_PREFIXES)
           and name.startswith("model.")]
    if big:
        raise RuntimeError(f"the vision graph holds non-vision weights: {big[:5]}")


def vision_only_model(config: ModelConfig | str, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Gemma3Model:
    """A Gemma3Model with seeded random vision tower + projector (the same values as
    build_model(weights='random') gives them) and its text part left on the meta device: enough
    for a `components=('vision',)` build of a large preset without allocating the text weights."""
    from ..modeling.config import preset
    from ..modeling.weights import random_weights

    from .build import BuildError

    cfg = preset(config) if isinstance(config, str) else config
    if cfg.vision is None:
        raise BuildError(f"model {cfg.name!r} has no vision encoder: build --components text")
    with torch.device("meta"):
        model = Gemma3Model(cfg)
    holder = nn.Module()  # same parameter names as in the whole model -> same seeds
    holder.vision_tower = model.vision_tower
    holder.multi_modal_projector = model.multi_modal_projector
    holder.to(dtype).to_empty(device="cpu")
    random_weights(holder, seed)
    return model.eval().requires_grad_(False)
