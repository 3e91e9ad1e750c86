"""Where a decode step's time goes, by ONNX Runtime op type and node, at a given batch.

    python benchmarks/decode_profile.py BUILD_DIR [--batch 8] [--prompt-len 32] [--steps 6]
        [--threads 2]

Fills every row with a random prompt (`forward_row`, one row at a time, as the scheduler does),
then runs `--steps` decode steps of all rows with ORT's profiler on (`OrtSession(profile=...)`),
and prints the per-step milliseconds of the last four steps by op type and the slowest nodes
(a node inside an If is counted in the If and again under its own name).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build_dir")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.steps < 5:
        ap.error("--steps must be at least 5 (the last four are reported)")

    from g3export.runtimes.ort_session import OrtSession

    with tempfile.TemporaryDirectory() as tmp:
        s = OrtSession.from_build(args.build_dir, batch=args.batch, threads=args.threads,
                                  profile=os.path.join(tmp, "decode"))
        rng = np.random.default_rng(0)
        for row in range(args.batch):
            s.forward_row(row, rng.integers(1000, 200000, (1, args.prompt_len)), 0)
        for i in range(args.steps):
            s.forward(rng.integers(1000, 200000, (args.batch, 1)),
                      np.full(args.batch, args.prompt_len + i))
        with open(s.sess.end_profiling()) as f:
            events = json.load(f)
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-4:]
    by_op: collections.Counter = collections.Counter()
    by_node: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and \
                e["ts"] >= last[0]["ts"]:
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / len(last)
            by_node[e["name"].removesuffix("_kernel_time")] += e["dur"] / 1e3 / len(last)
    step = sum(e["dur"] for e in last) / 1e3 / len(last)
    print(f"batch {args.batch}: {step:.1f} ms per decode step (mean of the last {len(last)})")
    print("by op type (ms per step):")
    for k, v in by_op.most_common(12):
        print(f"  {k:36s} {v:8.1f}")
    print("slowest nodes (ms per step):")
    for k, v in by_node.most_common(8):
        print(f"  {k[:60]:60s} {v:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
