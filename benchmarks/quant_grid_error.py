"""Relative RMS error of int4 block-32 grids on the real 270M's weights (issue 14): g3export's
symmetric grid (amax/7), ONNX Runtime's symmetric [-8, 7] grid (scale = the block's signed
largest-magnitude value / -8: what MatMulNBitsQuantizer, and so GenAI's builder, writes;
re-implemented here from that definition), g3export's searched [-8, 7] grid
(`quantize_rows_full`: symmetric int4 for ONNX Runtime), and g3export's asymmetric grid,
min/max and searched. Reads the Hugging Face folder `compare_ort_genai.py --prepare` writes.

    python benchmarks/quant_grid_error.py --hf-dir /work/bench_art/hf270m --layers 3,10 --embed-rows 20000
"""

from __future__ import annotations

import argparse
import glob

import numpy as np

from g3export.export import quantize as Q


def ort_symmetric(w: np.ndarray, block: int = 32) -> np.ndarray:
    n, k = w.shape
    wb = w.reshape(n, k // block, block)
    idx = np.abs(wb).argmax(axis=2)
    s = np.take_along_axis(wb, idx[:, :, None], axis=2)[:, :, 0] / -8
    q = np.clip(np.rint(wb / np.where(s != 0, s, 1)[:, :, None]), -8, 7)
    return (q * s[:, :, None]).reshape(n, k)


def asym(w: np.ndarray, search=Q.SEARCH) -> np.ndarray:
    u, s, z = Q.quantize_rows_asym(w, 4, 32, search)
    return Q.dequantize_rows(u, s, 32, z)


def grids(w: np.ndarray) -> dict[str, np.ndarray]:
    return {"symmetric (amax/7)": Q.dequantize_rows(*Q.quantize_rows(w, 4, 32), 32),
            "ORT symmetric [-8,7]": ort_symmetric(w),
            "symmetric [-8,7] searched": Q.dequantize_rows(*Q.quantize_rows_full(w, 4, 32), 32),
            "symmetric [-8,7] searched, 21 factors": Q.dequantize_rows(*Q.quantize_rows_full(
                w, 4, 32, tuple(1 - 0.01 * i for i in range(21))), 32),
            "asymmetric min/max": asym(w, (1.0,)),
            "asymmetric searched": asym(w)}


def main() -> None:
    from safetensors.numpy import load_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-dir", default="/work/bench_art/hf270m")
    ap.add_argument("--layers", default="3,10")
    ap.add_argument("--embed-rows", type=int, default=20000)
    args = ap.parse_args()
    t = {}
    for f in sorted(glob.glob(f"{args.hf_dir}/*.safetensors")):
        t.update(load_file(f))
    layers = [f"layers.{i}." for i in args.layers.split(",")]
    names = [k for k in t if any(x in k for x in layers) and "proj" in k]
    names.append(next(k for k in t if k.endswith("embed_tokens.weight")))
    for nm in names:
        w = t[nm].astype(np.float32)
        if nm.endswith("embed_tokens.weight"):
            w = w[:args.embed_rows]
        e = {k: float(np.sqrt(np.mean((v - w) ** 2) / np.mean(w ** 2))) for k, v in grids(w).items()}
        print(f"{nm:48s} " + "  ".join(f"{k} {v:.4f}" for k, v in e.items()), flush=True)


if __name__ == "__main__":
    main()
