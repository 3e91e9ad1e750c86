"""TensorRT-RTX builds engines from int4 and int8 weight-only graphs (opset-21 blocked
DequantizeLinear before each MatMul; issue 14), `g3export build --target trt-rtx --quant ...` on
the tiny preset with the native attention translation. Skips without tensorrt_rtx."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from g3export.cli import main
from tests.export.test_trt_build import _WHY  # why TensorRT-RTX builds skip here, if they do

pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "TensorRT-RTX missing")


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_trt_rtx_builds_quantized_engine(tmp_path, quant):
    out = tmp_path / quant
    r = CliRunner().invoke(main, ["build", "--size", "tiny", "--weights", "random", "--target",
                                  "trt-rtx", "--attention", "native", "--max-context", "48",
                                  "--compute-capability", "8.9", "--quant", quant, "--out",
                                  str(out)])
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["quantization"]["scheme"] == quant
    layers = man["tensorrt"]["engines"]["text"]["layer_types"]
    # every decoder linear (7 per layer x 6) and the tied embedding kept their DequantizeLinear:
    # nothing folded them back to float before TensorRT saw them
    assert layers["DEQUANTIZE"] == 43
    assert (out / "text.engine").stat().st_size > 0
