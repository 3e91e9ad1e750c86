"""The graphs' I/O contracts as data (DESIGN §3.4): what `text_io` / `vision_io` return is written
into the manifest by the exporters and checked against by the manifest's schema, so the contract
is stated once. The tables with every input and output, their shapes and meaning, are in the
docstrings of g3export/export/onnx_export.py (text) and onnx_vision.py (vision).

No torch, onnx or onnx_ir here: opening a build (export/manifest) imports this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ..dtypes import DTYPES
from ..modeling.cache import kv_layout
from ..modeling.config import ModelConfig
from . import manifest_schema as schema

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                          # numpy-style name: int64, float32, float16, bfloat16
    shape: tuple[int | str, ...]        # str = symbolic dim
    aliases: str | None = None          # output only: the input whose buffer it shares

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "aliases": self.aliases}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "tensor") -> "TensorSpec":
        return cls(**schema.tensor_spec(d, where))


@dataclass(frozen=True)
class ComponentIO:
    """One component's graph: its file and its inputs/outputs (names, dtypes, symbolic shapes,
    which output aliases which input)."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def present(self, past: str) -> str:
        """The output that aliases input `past` (its in-place update)."""
        return next(t.name for t in self.outputs if t.aliases == past)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "options": dict(self.options),
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "component") -> "ComponentIO":
        c = schema.component(d, where)
        return cls(c["name"], c["file"],
                   tuple(TensorSpec(**t) for t in c["inputs"]),
                   tuple(TensorSpec(**t) for t in c["outputs"]), c["options"])



OPSET = 20         # the ONNX Runtime graphs' default opset (a translation may use another)
MAX_IMAGES = 256   # the vision graph's largest image batch


def text_io(cfg: ModelConfig, max_context: int, dtype: str = "fp32", all_logits: bool = False,
            images: bool = False, batch: int | None = None, file: str = "text.onnx") -> ComponentIO:
    """The text component's contract (onnx_export's table). batch=None: symbolic."""
    t = cfg.text
    b: int | str = "batch" if batch is None else batch
    mdt = DTYPES[dtype].onnx_name
    layout = kv_layout(t, max_context, 1, dtype)
    inputs = [TensorSpec("input_ids", "int64", (b, "seq")), TensorSpec("start_pos", "int64", (b,))]
    if images:
        inputs.append(TensorSpec("image_features", mdt, ("image_tokens", t.hidden_size)))
    outputs = [TensorSpec("logits", "float32", (b, "seq" if all_logits else 1, t.vocab_size))]
    for lc in layout.layers:
        shape = (b, *lc.shape[1:])
        for past in (lc.k_name, lc.v_name):
            inputs.append(TensorSpec(past, mdt, shape))
            outputs.append(TensorSpec(past.replace("past_", "present_"), mdt, shape, aliases=past))
    return ComponentIO("text", file, tuple(inputs), tuple(outputs),
                       {"all_logits": all_logits, "images": images, "opset": OPSET})


def vision_io(cfg: ModelConfig, dtype: str = "fp32", file: str = "vision.onnx") -> ComponentIO:
    """The vision component's contract (onnx_vision's table)."""
    if cfg.vision is None:
        raise ValueError(f"{cfg.name} has no vision encoder")
    s = cfg.vision.image_size
    return ComponentIO(
        "vision", file,
        (TensorSpec("pixel_values", "float32", ("images", cfg.vision.num_channels, s, s)),),
        (TensorSpec("image_features", DTYPES[dtype].onnx_name,
                    ("images", cfg.mm_tokens_per_image, cfg.text.hidden_size)),),
        {"opset": OPSET, "max_images": MAX_IMAGES})
