"""Peak memory of a quantized TensorRT export (issue 14): `--quant fp8` or int4/int8 for
--target trt-rtx on a random-weight preset, the ONNX graph only (the engine step is TensorRT's
builder, a separate child whose memory is TensorRT's: BENCHMARKS.md §4.2).

In this process: open the preset on the meta device with its seeded random source, (fp8)
calibrate layer by layer on the default text's first --tokens tokens, then export the text graph
exactly as `g3export build --target trt-rtx --attention native --quant Q` writes it. Prints the
resident set before, the peak (VmHWM) of each phase (the high-water mark is reset between
phases through /proc/self/clear_refs) and the bytes written.

    PYTHONPATH=$PWD flock /tmp/g3-bigjob.lock .venv/bin/python benchmarks/trt_quant_memory.py \
        --size 12b --quant fp8 --tokens 64 --out /tmp/q12b \
        --json benchmarks/results/trt_fp8_12b_memory.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="12b")
    ap.add_argument("--quant", default="fp8", choices=["fp8", "int4", "int8"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from g3export.export.calibrate import calibrate
    from g3export.export.onnx_export import export_text
    from g3export.export.quantize import QuantScheme, read_calibration
    from g3export.export.trt import plan_engines
    from g3export.modeling.weights import open_weights

    model, src = open_weights(a.size, weights="random")
    plan = plan_engines(model.config, "trt-rtx", "bf16", a.max_context, attention="native",
                        compute_capabilities=["12.0"])
    row = {"size": a.size, "quant": a.quant, "rss_before": _status("VmRSS")}
    amax, quant = None, QuantScheme(a.quant, 32 if a.quant != "fp8" else None, a.quant != "fp8")
    if a.quant == "fp8":
        _reset_peak()
        t0 = time.perf_counter()
        amax, record = calibrate(model, src, read_calibration(None), None, a.max_context,
                                 max_tokens=a.tokens)
        row.update(calibration_s=round(time.perf_counter() - t0, 1),
                   calibration_peak=_status("VmHWM"), tokens=record["tokens"])
        quant = QuantScheme("fp8", None, False, record)
    _reset_peak()
    row["rss_before_export"] = _status("VmRSS")
    t0 = time.perf_counter()
    export_text(model, a.out, a.max_context, "bf16", progress=False, weights=src, quant=quant,
                activation_amax=amax, **plan.export_options())
    row.update(export_s=round(time.perf_counter() - t0, 1), export_peak=_status("VmHWM"),
               data_bytes=(a.out / "text.onnx.data").stat().st_size)
    shutil.rmtree(a.out)
    print(json.dumps(row, indent=1))
    if a.json:
        a.json.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
