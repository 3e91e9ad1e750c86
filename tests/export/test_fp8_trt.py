"""TensorRT-RTX builds engines from `--quant fp8` graphs on a CPU-only machine (issue 14): the
tiny preset for compute capability 8.9 and 12.0 in one build, every decoder linear kept as an
FP8 Q/DQ pair through the parser (nothing folded back to float); the real 270M in a slow test
(build time, engine bytes, peak RSS printed for BENCHMARKS.md). A compute capability without
FP8 (8.6) is refused before any work. Skips without tensorrt_rtx."""

from __future__ import annotations

import json
import resource
import time

import pytest
from click.testing import CliRunner

from g3export.cli import main
from tests.export.test_trt_build import _WHY, _cli  # why TensorRT-RTX builds skip here, if they do

pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "TensorRT-RTX missing")


def test_trt_rtx_builds_fp8_engine_for_ada_and_blackwell(tmp_path):
    out = tmp_path / "fp8"
    r = CliRunner().invoke(main, ["build", "--size", "tiny", "--weights", "random", "--target",
                                  "trt-rtx", "--attention", "native", "--max-context", "48",
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
    out = tmp_path / "270m-fp8"
    t0 = time.perf_counter()
    proc = _cli("build", "--size", "270m", "--target", "trt-rtx", "--attention", "native",
                "--compute-capability", "8.9", "--compute-capability", "12.0", "--quant", "fp8",
                "--out", str(out), cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    man = json.loads((out / "manifest.json").read_text())
    e = man["tensorrt"]["engines"]["text"]
    print(f"\n270m trt-rtx native fp8 ({man['dtype']} rest): build {seconds:.1f} s (engine step "
          f"{e['build_seconds']:.1f} s), engine {e['bytes']} bytes, text.onnx.data "
          f"{man['files']['text.onnx.data']['size']} bytes, peak RSS {peak_mb:.0f} MiB, "
          f"calibration {man['quantization']['calibration']['tokens']} tokens")
    n = man["model"]["text"]["num_hidden_layers"]
    assert e["layer_types"]["QUANTIZE"] == 4 * n and e["layer_types"]["DEQUANTIZE"] == 11 * n
    assert man["quantization"]["calibration"]["token_ids"] == "tokenizer"
