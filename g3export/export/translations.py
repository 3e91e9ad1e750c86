"""The translations of `torch.ops.g3.attention`, by name (`--attention`), as data the exporter
plugs in (DESIGN §3.2):

    name     module                                   opset  IR   for targets
    -------  ---------------------------------------  -----  ---  ----------------------------
    ort      g3export.export.onnx_attention           20     10   onnx (ONNX Runtime)
    native   g3export.export.onnx_native_attention    24     11   trt, trt-rtx (ORT runs it too)
    plugin   g3export.export.trt_plugin               20     10   trt, trt-rtx (default for trt)
             (the IPluginV3 itself: g3export.export.kernels.trt_plugin)

`Translation.table` goes to `torch.onnx.export(custom_translation_table=...)` with
`opset_version=translation.opset`; after export the model's `ir_version` is set to
`translation.ir_version`; for a TensorRT target `translation.finalize(model)` and constant
folding then run before the file is written (g3export.export.trt.graph.tensorrt_passes). The manifest records `name` and, for the plugin,
`plugin` = {"name", "namespace", "version"}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def _noop(model: Any) -> int:
    return 0


@dataclass(frozen=True)
class Translation:
    name: str
    table: dict[Any, Callable[..., Any]]
    opset: int
    ir_version: int
    finalize: Callable[[Any], int] = _noop
    plugin: dict[str, str] | None = None
    targets: tuple[str, ...] = field(default_factory=tuple)

    def manifest(self) -> dict[str, Any]:
        d: dict[str, Any] = {"attention": self.name, "opset": self.opset}
        if self.plugin:
            d["plugin"] = dict(self.plugin)
        return d


def get(name: str) -> Translation:
    """The translation called `name` (ort | native | plugin)."""
    if name == "ort":
        from . import onnx_attention as m0
        from .onnx_export import IR_VERSION, OPSET

        return Translation("ort", m0.TRANSLATION_TABLE, OPSET, IR_VERSION, targets=("onnx",))
    if name == "native":
        from . import onnx_native_attention as m1

        return Translation("native", m1.TRANSLATION_TABLE, m1.OPSET, m1.IR_VERSION, m1.finalize,
                           targets=("trt", "trt-rtx", "onnx"))
    if name == "plugin":
        from . import trt_plugin as m2
        from .onnx_export import IR_VERSION, OPSET

        return Translation("plugin", m2.TRANSLATION_TABLE, OPSET, IR_VERSION,
                           plugin={"name": m2.PLUGIN_NAME, "namespace": m2.PLUGIN_NAMESPACE,
                                   "version": m2.PLUGIN_VERSION},
                           targets=("trt", "trt-rtx"))
    raise ValueError(f"unknown attention translation {name!r}; valid: ort, native, plugin")


NAMES = ("ort", "native", "plugin")
