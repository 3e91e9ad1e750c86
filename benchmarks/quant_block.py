"""Choose the default --quant-block: weight error and MatMulNBits speed per block size.

For each block size (32, 64, 128) and bits (4, 8), on the real Gemma 3 270M weights (the embedded
checkpoint): the relative RMS error ||W~ - W|| / ||W|| of the quantized decoder linears and of the
tied embedding (every 8th row); and the median time of one ONNX Runtime MatMulNBits (accuracy_level 4, the build's
setting) per decode-step shape of the 270M's ORT graph (qkv fused 640->1536, o 1024->640,
gate/up fused 640->4096, down 2048->640, lm_head 640->262144), one row (decode) and 512 rows
(a prefill chunk), in one process side by side.

    PYTHONPATH=$PWD flock /tmp/g3-bigjob.lock nice .venv/bin/python benchmarks/quant_block.py \
        --threads 2 --json /work/scratch/quant/quant_block.json
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np

from g3export.export import quantize as Q

SHAPES = {"qkv": (640, 1536), "o": (1024, 640), "gate_up": (640, 4096), "down": (2048, 640),
          "lm_head": (640, 262144)}


def weight_errors(bits: int, block: int, weights: dict[str, np.ndarray]) -> dict[str, float]:
    num = {"linear": 0.0, "embedding": 0.0}
    den = {"linear": 0.0, "embedding": 0.0}
    for name, w in weights.items():
        kind = "embedding" if "embed" in name else "linear"
        if kind == "embedding":
            w = w[::8]  # every 8th of the 262144 rows (32768): the same statistic, 1/8 the memory
        wq = Q.dequantize_rows(*Q.quantize_rows(w, bits, block), block)
        num[kind] += float(((wq - w) ** 2).sum())
        den[kind] += float((w.astype(np.float64) ** 2).sum())
    return {k: (num[k] / den[k]) ** 0.5 for k in num}


def time_matmul(k: int, n: int, bits: int, block: int, rows: int, threads: int,
                reps: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    b, s = Q.matmul_nbits(w, bits, block)
    node = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k,
                            N=n, bits=bits, block_size=block, accuracy_level=4)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                       [rows, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
                          [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20),
                                            helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from g3export.modeling.weights import build_model

    model = build_model("270m")
    pat = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$|embed_tokens\.weight$")
    weights = {n: p.detach().float().numpy() for n, p in model.named_parameters()
               if pat.search(n)}
    del model
    out = []
    for bits in (4, 8):
        for block in Q.BLOCKS:
            row = {"bits": bits, "block": block, "rel_rms_error": weight_errors(bits, block, weights)}
            for rows in (1, 512):
                ms = {name: 1e3 * time_matmul(k, n, bits, block, rows, a.threads,
                                              a.reps if rows == 1 else max(3, a.reps // 6))
                      for name, (k, n) in SHAPES.items()}
                row[f"ms_rows{rows}"] = ms
            print(json.dumps(row), flush=True)
            out.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
