"""The embedding lookup on ONNX Runtime's CPU: the same ids looked up in one stored table of the
270M's shape, [1, hidden, vocab] (g3export.export.onnx_passes._tie_lm_head's layout, which the
lm_head reads as it is), by three ONNX forms that give the same [tokens, hidden] values:

    gather           Squeeze(Transpose(Gather(E^T, ids, axis=2), [0, 2, 3, 1]))  (_tie_lm_head's)
    gather_elements  Transpose(GatherElements(E^T, Expand(ids, [1, hidden, T]), axis=2))
                                                               (_lookup_by_gather_elements')
    flat_gather      Gather(E^T viewed flat, h * vocab + ids)  (one index per element)

    python benchmarks/embedding_lookup.py [--tokens 512] [--runs 30] [--threads 2] [--json F]

Each form reads `hidden` strided elements per token (a cache miss each): GenAI's graph reads rows
of a second, transposed copy instead, which g3export does not keep. Every form is checked
against numpy first. Before every timed run the script writes 256 MB of other memory, so the
table is not in the caches, as in a real prefill, where a layer's weights pass through them
between two lookups; the forms take turns run by run. Reported: median and min wall time per
lookup, in ms. The table is random (only its shape matters: vocab 262144, hidden 640, fp32,
671 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

HIDDEN, VOCAB = 640, 262144


def forms(tokens: int):
    from onnx import TensorProto as P
    from onnx import helper as h
    from onnx import numpy_helper as nh

    def c(name, values):
        return nh.from_array(np.asarray(values, dtype=np.int64), name)

    def model(nodes, inits, table=("E", [1, HIDDEN, VOCAB])):
        g = h.make_graph(nodes, "lookup", [h.make_tensor_value_info(*table[:1], P.FLOAT, table[1]),
                                           h.make_tensor_value_info("ids", P.INT64, [1, tokens])],
                         [h.make_tensor_value_info("y", P.FLOAT, None)], inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
        m.ir_version = 10
        return m

    # the table is an input here (flat_gather's a flat view of it), not an initializer: ORT
    # would constant-fold a Reshape of an initializer into a copy; all three read one buffer
    return {
        "gather": model([h.make_node("Gather", ["E", "ids"], ["g"], axis=2),
                         h.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 3, 1]),
                         h.make_node("Squeeze", ["t", "zero"], ["y"])], [c("zero", [0])]),
        "gather_elements": model([h.make_node("Reshape", ["ids", "flat"], ["i3"]),
                                  h.make_node("Expand", ["i3", "rows"], ["ix"]),
                                  h.make_node("GatherElements", ["E", "ix"], ["g"], axis=2),
                                  h.make_node("Transpose", ["g"], ["y"], perm=[0, 2, 1])],
                                 [c("flat", [1, 1, -1]), c("rows", [1, HIDDEN, 1])]),
        "flat_gather": model([h.make_node("Mul", ["h", "v"], ["base"]),    # [hidden, 1]
                              h.make_node("Add", ["base", "ids"], ["ix"]),  # [hidden, T]
                              h.make_node("Transpose", ["ix"], ["ixt"], perm=[1, 0]),
                              h.make_node("Gather", ["Ef", "ixt"], ["y"], axis=0)],
                             [c("h", np.arange(HIDDEN)[:, None]), c("v", [VOCAB])],
                             table=("Ef", [HIDDEN * VOCAB])),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    table = rng.standard_normal((1, HIDDEN, VOCAB), dtype=np.float32)
    ids = rng.integers(1000, 200000, (1, args.tokens)).astype(np.int64)
    want = table[0][:, ids[0]].T                       # [tokens, hidden]
    evict = np.ones(64 << 20, dtype=np.float32)
    result = {"tokens": args.tokens, "threads": args.threads, "runs": args.runs,
              "loadavg": os.getloadavg(), "ms": {}}
    sessions = {}
    for name, m in forms(args.tokens).items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feed = {"Ef" if name == "flat_gather" else "E":
                table.reshape(-1) if name == "flat_gather" else table, "ids": ids}
        got = s.run(None, feed)[0].reshape(args.tokens, HIDDEN)
        if not np.array_equal(got, want):
            raise SystemExit(f"{name}: wrong values")
        sessions[name] = (s, feed)
    times = {name: [] for name in sessions}
    for _ in range(args.runs):  # the forms take turns, so a busy moment hits all of them
        for name, (s, feed) in sessions.items():
            evict += 1.0
            t = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        result["ms"][name] = {"median": round(statistics.median(ts) * 1e3, 3),
                              "min": round(min(ts) * 1e3, 3)}
        print(f"{name:16s} median {result['ms'][name]['median']:7.3f} ms   "
              f"min {result['ms'][name]['min']:7.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
