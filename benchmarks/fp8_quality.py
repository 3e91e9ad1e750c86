"""What `--quant fp8` costs in quality, measured without a GPU: the real 270M's TensorRT text
graph (native attention, fp32 so that ONNX Runtime's CPU EP runs its float8 Q/DQ), exported with
and without fp8 exactly as `g3export build --target trt-rtx --attention native --dtype fp32
[--quant fp8]` writes it (no engine), run by ONNX Runtime one token per step on the shipped
public-domain text (`g3export eval`'s statistics: perplexity; KL, top-1 agreement and the
largest logit difference against the unquantized graph).

The calibration text is the default one, which is also the eval text here (the only text that
ships): a static per-tensor amax taken on the first 512 tokens; the eval runs over the first
`--tokens`. An engine's own numerics (TensorRT's FP8 GEMM, its accumulation) need a GPU.

    PYTHONPATH=$PWD flock /tmp/g3-bigjob.lock .venv/bin/python benchmarks/fp8_quality.py \
        --tokens 600 --json benchmarks/results/fp8_quality_270m.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--fp32-perplexity", action="store_true",
                    help="also the unquantized graph's own perplexity (a third pass)")
    a = ap.parse_args()

    from g3export.api import tokenizer_for
    from g3export.export.calibrate import calibrate
    from g3export.export.onnx_export import export_text
    from g3export.export.quantize import QuantScheme, default_text, read_calibration
    from g3export.export.trt import plan_engines
    from g3export.modeling.weights import open_weights
    from g3export.runtimes.evaluate import evaluate
    from g3export.runtimes.ort_session import OrtSession

    tok = tokenizer_for("270m", None, "checkpoint")
    ids = tok.encode(default_text().read_text(encoding="utf-8"))
    out, paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("fp32", "fp8"):
            model, src = open_weights("270m")
            plan = plan_engines(model.config, "trt-rtx", "fp32", a.max_context,
                                attention="native", compute_capabilities=["8.9"])
            quant, amax, t0 = None, None, time.perf_counter()
            if name == "fp8":
                cal = read_calibration(None)
                amax, record = calibrate(model, src, cal, tok, a.max_context)
                quant = QuantScheme("fp8", None, False, record)
                out["calibration"] = {**record, "seconds": round(time.perf_counter() - t0, 1)}
            io = export_text(model, Path(tmp) / name, a.max_context, "fp32", progress=False,
                             weights=src, quant=quant, activation_amax=amax,
                             **plan.export_options())
            paths[name] = (Path(tmp) / name / "text.onnx", io, model.config)
        sessions = {n: OrtSession(cfg, p, io, a.max_context, "fp32", threads=a.threads,
                                  max_chunk=None) for n, (p, io, cfg) in paths.items()}
        t0 = time.perf_counter()
        r = evaluate(sessions["fp8"], ids, sessions["fp32"], max_tokens=a.tokens, progress=True)
        out["fp8_vs_fp32"] = {**r.to_dict(), "seconds": round(time.perf_counter() - t0, 1)}
        if a.fp32_perplexity:
            out["fp32"] = evaluate(sessions["fp32"], ids, max_tokens=a.tokens).to_dict()
        out["data_bytes"] = {n: (p.parent / "text.onnx.data").stat().st_size
                             for n, (p, _, _) in paths.items()}
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
