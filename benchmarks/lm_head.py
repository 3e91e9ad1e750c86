"""The lm_head of a decode step on ONNX Runtime's CPU: the layouts of the tied embedding.

    python benchmarks/lm_head.py [--vocab 262144] [--hidden 640] [--rounds 60] [--threads 2] [--rows 1 8]

`--rows` rows (a batched decode step has one row per sequence) times a [vocab, hidden] fp32
weight (the 270M's: 671 MB), as g3export's graph could hold it:
* `gemm_transB`: E [vocab, hidden] as a 2-D initializer, `Gemm(x, E, transB=1)`: ORT pre-packs
  the 2-D constant at session start (MLAS packed GEMM). The batched branch of g3export's lm_head
  (g3export.export.onnx_lm_head) is this kernel on E^T's 2-D view.
* `matmul_3d`: E^T [1, hidden, vocab], `MatMul(x, E^T)` (g3export's one-row branch, see
  g3export.export.onnx_passes._tie_lm_head): ORT pre-packs only 2-D weights, so MLAS runs its
  unpacked kernel on it; fastest for one row, and it packs the weight on every call for more.
* `matmul_Ex`: E as the left operand, `Transpose(MatMul(E, x^T))` (not pre-packed either; the
  weight streams once for any row count).
The weights are external data (memory-mapped, as in a build directory). The sessions are timed
interleaved in one process with spinning off (a spinning pool of one session steals the cores of
the next one on a 2-CPU machine: with spinning on, this comparison measured 25% instead of ~6%).
Reports median and min ms per call, the weight bandwidth and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _session(kind: str, e: np.ndarray, folder: Path, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden = e.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, vocab])
    if kind == "gemm_transB":
        inits = [numpy_helper.from_array(e, "w"),
                 numpy_helper.from_array(np.array([1, hidden]), "s_in"),
                 numpy_helper.from_array(np.array([1, 1, vocab]), "s_out")]
        nodes = [helper.make_node("Reshape", ["x", "s_in"], ["x2"]),
                 helper.make_node("Gemm", ["x2", "w"], ["y2"], transB=1),
                 helper.make_node("Reshape", ["y2", "s_out"], ["y"])]
    else:
        inits = [numpy_helper.from_array(np.ascontiguousarray(e.T)[None], "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, kind, [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    path = folder / f"{kind}.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{kind}.data", size_threshold=1 << 20)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    e = (rng.standard_normal((args.vocab, args.hidden), dtype=np.float32) * 0.02)
    x = rng.standard_normal((1, 1, args.hidden), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {k: _session(k, e, Path(tmp), args.threads) for k in ("gemm_transB", "matmul_3d")}
        ref = (x[0] @ e.T)[None]
        for k, s in sessions.items():  # the two layouts compute the same logits
            got = s.run(None, {"x": x})[0]
            assert np.allclose(got, ref, rtol=1e-4, atol=1e-4), f"{k} differs: {np.abs(got - ref).max()}"
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[k].append(time.perf_counter() - t)
    nbytes = e.nbytes
    print(f"lm_head [{args.vocab}, {args.hidden}] fp32 ({nbytes / 1e6:.0f} MB), {args.threads} threads, "
          f"{args.rounds} interleaved rounds")
    med = {}
    for k, v in times.items():
        med[k] = statistics.median(v)
        print(f"  {k:12s} median {med[k] * 1e3:7.2f} ms  min {min(v) * 1e3:7.2f} ms  "
              f"{nbytes / min(v) / 1e9:5.1f} GB/s (min)")
    print(f"  matmul_3d / gemm_transB time: {med['matmul_3d'] / med['gemm_transB']:.3f} (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
