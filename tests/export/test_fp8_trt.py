"""TensorRT-RTX builds engines from `--quant fp8` graphs on a CPU-only machine (issue 14): the
tiny preset for compute capability 8.9 and 12.0 in one build, every decoder linear kept as an
FP8 Q/DQ pair through the parser (nothing folded back to float); the real 270M in a slow test
(build time, engine bytes, peak RSS printed for BENCHMARKS.md). A compute capability without
FP8 (8.6) is refused before any work. Skips without tensorrt_rtx."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from g3export.cli import main
from tests.export.test_trt_build import _WHY, build_270m  # _WHY: why TensorRT-RTX skips

pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "TensorRT-RTX missing")


@pytest.mark.parametrize("attention", ["native", "plugin"])
def test_trt_rtx_builds_fp8_engine_for_ada_and_blackwell(tmp_path, attention):
    out = tmp_path / "fp8"
    r = CliRunner().invoke(main, ["build", "--size", "tiny", "--weights", "random", "--target",
                                  "trt-rtx", "--attention", attention, "--max-context", "48",
                                  "--compute-capability", "8.9", "--compute-capability", "12.0",
                                  "--quant", "fp8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    q = man["quantization"]
    assert (q["scheme"], q["format"], q["embedding"]) == ("fp8", "float8_e4m3fn", False)
    assert q["calibration"]["name"] == "eval_text.txt" and q["calibration"]["tokens"] == 48
    e = man["tensorrt"]["engines"]["text"]
    assert man["tensorrt"]["compute_capabilities"] == ["8.9", "12.0"]
    layers = e["layer_types"]
    # 6 layers x (q/k/v input, o input, gate/up input, down input) activations quantized, and
    # 6 x 7 weights + those 24 activations dequantized
    assert layers["QUANTIZE"] == 24 and layers["DEQUANTIZE"] == 24 + 42
    assert (out / "text.engine").stat().st_size > 0
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert "quantization: fp8 format=float8_e4m3fn" in shown.output
    assert f"sha256 {q['calibration']['sha256'][:12]}, 48 tokens" in shown.output


@pytest.mark.slow
def test_270m_fp8_builds_with_tensorrt_rtx(tmp_path):
    man = build_270m(tmp_path, "native fp8", "--attention", "native", "--compute-capability",
                     "8.9", "--compute-capability", "12.0", "--quant", "fp8")
    cal = man["quantization"]["calibration"]
    print(f"calibration: {cal['tokens']} tokens ({cal['token_ids']})")
    n = man["model"]["text"]["num_hidden_layers"]
    layers = man["tensorrt"]["engines"]["text"]["layer_types"]
    assert layers["QUANTIZE"] == 4 * n and layers["DEQUANTIZE"] == 11 * n
    assert cal["token_ids"] == "tokenizer" and cal["tokens"] == 512
