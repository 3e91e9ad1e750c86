"""Where a 512-token prefill spends its time: ONNX Runtime's profiler on a g3export build and on
ONNX Runtime GenAI's graph of the same model, per op type and per kind of node.

    python benchmarks/prefill_profile.py --build-dir builds/270m [--build-dir B2] \
        [--genai-dir /work/bench_art/genai270m] [--runs 3] [--threads 2] [--decode 16]

Each session is timed on its own (not interleaved), with ORT's profiler on (session option
enable_profiling): a warm-up run, then --runs timed prefills of the same 512 ids (seed 0, as
benchmarks/compare_ort_genai.py draws them). For every run the profiler's node events
(`cat == "Node"`, the `*_kernel_time` entries) are summed per op type; the table gives the
median over runs in ms per prefill, the kernel count and the wall time of the run. --decode N
also profiles N decode steps after each prefill (per-step figures).

GenAI's graph (model.onnx of the model builder's output) is run directly with onnxruntime, not
through onnxruntime_genai, with its own I/O as GenAI's generator binds it: input_ids /
attention_mask int64, past and present bound to one buffer per layer (its genai_config sets
past_present_share_buffer), of 512 + max(decode, 1) slots on full layers and of the window on
sliding ones (its GQA has sliding_window_cache=1 and refuses a smaller buffer). The session options are the same as g3export's (ORT_ENABLE_ALL,
sequential, --threads intra-op threads).

ONNX Runtime profiles the nodes inside an `If`'s branch as well as the `If` itself (whose time
includes them): the tables list both, the kernel total leaves the `If`s out.

Profiler overhead: a few us per kernel; a 512-token prefill runs ~600-900 kernels, so it adds
a few ms to runs of ~700-1000 ms. Per-op figures, not the absolute wall time, are the point.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

PROMPT_LEN = 512


def node_events(path: str):
    """The profile's node kernel events, in order: (name, op_type [input shapes], dur_us)."""
    ev = json.load(open(path))
    out = []
    for e in ev:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            shapes = [list(x.values())[0] for x in e["args"].get("input_type_shape", [])]
            what = e["args"].get("op_name", "?") + " " + "x".join(
                str(list(x)).replace(" ", "") for x in shapes)
            out.append((e["name"][: -len("_kernel_time")], what, int(e["dur"])))
    return out


def split_runs(events, n_runs):
    """Split the flat event list into runs; runs are recognised by the first node's name."""
    if not events:
        return []
    first = events[0][0]
    runs, cur = [], []
    for e in events:
        if e[0] == first and cur:
            runs.append(cur)
            cur = []
        cur.append(e)
    runs.append(cur)
    return runs[-n_runs:] if n_runs else runs


def per_shape(runs):
    """op type + input shapes -> [mean ms per run, kernels per run], largest first (means, so
    that rows add up to the mean total)."""
    acc = defaultdict(list)
    for r in runs:
        one = defaultdict(lambda: [0, 0])
        for _, what, d in r:
            one[what][0] += d
            one[what][1] += 1
        for what in {w for x in runs for _, w, _ in x}:
            acc[what].append(one[what] if what in one else [0, 0])
    rows = {w: [round(statistics.mean(x[0] for x in v) / 1000, 2), v[0][1]] for w, v in acc.items()}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1][0]))


def summarize(runs, wall):
    per_op = defaultdict(list)
    for r in runs:
        acc = defaultdict(int)
        for _, op, d in r:
            acc[op.split(" ")[0]] += d
        for op in {o.split(" ")[0] for x in runs for _, o, _ in x}:
            per_op[op].append(acc.get(op, 0))
    # an If's time includes the kernels of the branch it ran, which are listed too: not summed
    total = [sum(d for _, w, d in r if not w.startswith("If ")) for r in runs]
    return {
        "wall_ms_median": round(statistics.median(wall) * 1000, 1),
        "kernel_ms_median": round(statistics.median(total) / 1000, 1),
        "kernel_ms_mean": round(statistics.mean(total) / 1000, 1),
        "kernels_per_run": len(runs[0]) if runs else 0,
        "per_op_ms": {op: round(statistics.median(v) / 1000, 2)
                      for op, v in sorted(per_op.items(), key=lambda kv: -statistics.median(kv[1]))},
        "per_op_count": {op: sum(1 for _, o, _ in runs[0] if o.split(" ")[0] == op)
                         for op in per_op},
        "per_shape_ms": per_shape(runs),
        "per_node_ms": {n: round(d / 1000, 3) for n, _, d in sorted(runs[0], key=lambda x: -x[2])[:60]},
    }


def profile_ours(build_dir: Path, ids, runs: int, threads: int, decode: int, tmp: str):
    from g3export.runtimes.ort_session import OrtSession

    prefix = os.path.join(tmp, "ours_" + build_dir.name)
    s = OrtSession.from_build(build_dir, provider="cpu", threads=threads, profile=prefix)
    x = np.asarray([ids], dtype=np.int64)
    wall, dwall = [], []
    for i in range(runs + 1):
        s.reset()
        t = time.perf_counter()
        logits = s.forward(x, 0)
        if i:
            wall.append(time.perf_counter() - t)
        tok = int(np.argmax(logits[0]))
        for j in range(decode):
            t = time.perf_counter()
            logits = s.forward(np.asarray([[tok]], dtype=np.int64), len(ids) + j)
            if i:
                dwall.append(time.perf_counter() - t)
            tok = int(np.argmax(logits[0]))
    path = s.sess.end_profiling()
    return path, wall, dwall


def genai_stepper(genai_dir: Path, threads: int, max_length: int, profile: str | None = None,
                  spinning: bool | None = None):
    """GenAI's graph in an onnxruntime session, bound as GenAI's generator binds it (module
    docstring): returns (session, step), step(token_ids, total) -> the greedy next token."""
    import onnxruntime as ort

    from g3export.runtimes.ort_session import session_options

    so = session_options(threads, None, profile, spinning)
    gc = json.loads((genai_dir / "genai_config.json").read_text())
    dec = gc["model"]["decoder"]
    sess = ort.InferenceSession(str(genai_dir / dec["filename"]), so, providers=["CPUExecutionProvider"])
    n_layers = dec["num_hidden_layers"]
    kv, hd = dec["num_key_value_heads"], dec["head_size"]

    sliding = set(dec.get("sliding_window", {}).get("layers", []))
    window = dec.get("sliding_window", {}).get("window_size", 0)
    # GenAI's CPU cache: past and present share one buffer (past_present_share_buffer), of
    # max_length slots, the window on sliding layers (its GQA refuses less than the window)
    caches = []
    for i in range(n_layers):
        cap = max(window, 1) if i in sliding else max_length
        for _ in "kv":
            caches.append(ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv, cap, hd), np.float32)))
    b = sess.io_binding()
    for i in range(n_layers):
        for j, w in enumerate(("key", "value")):
            b.bind_ortvalue_input(f"past_key_values.{i}.{w}", caches[2 * i + j])
            b.bind_ortvalue_output(f"present.{i}.{w}", caches[2 * i + j])

    def step(tok_ids, total):
        b.bind_cpu_input("input_ids", np.asarray([tok_ids], dtype=np.int64))
        b.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        b.bind_output("logits")
        sess.run_with_iobinding(b)
        logits = b.get_outputs()[0].numpy()
        return int(np.argmax(logits[0, -1]))

    return sess, step


def profile_genai(genai_dir: Path, ids, runs: int, threads: int, decode: int, tmp: str):
    sess, step = genai_stepper(genai_dir, threads, len(ids) + max(decode, 1),
                               os.path.join(tmp, "genai"))
    wall, dwall = [], []
    for i in range(runs + 1):
        t = time.perf_counter()
        tok = step(ids, len(ids))
        if i:
            wall.append(time.perf_counter() - t)
        for j in range(decode):
            t = time.perf_counter()
            tok = step([tok], len(ids) + j + 1)
            if i:
                dwall.append(time.perf_counter() - t)
    return sess.end_profiling(), wall, dwall


def report(name, path, wall, dwall, runs, decode):
    ev = node_events(path)
    per_run = 1 + decode
    chunks = split_runs(ev, 0)
    # chunk list alternates prefill, decode x N per run; the first run (warm-up) is dropped
    pre = [c for k, c in enumerate(chunks) if k % per_run == 0][1:]
    dec = [c for k, c in enumerate(chunks) if k % per_run != 0][decode:]
    out = {"prefill": summarize(pre, wall)}
    if decode:
        out["decode_step"] = summarize(dec, dwall)
    print(f"\n== {name}: prefill of {PROMPT_LEN} tokens, wall {out['prefill']['wall_ms_median']} ms "
          f"(median of {runs}), kernels {out['prefill']['kernel_ms_median']} ms in "
          f"{out['prefill']['kernels_per_run']} kernels")
    for op, ms in out["prefill"]["per_op_ms"].items():
        if ms >= 0.5:
            print(f"   {op:40s} {ms:8.2f} ms  x{out['prefill']['per_op_count'][op]}")
    print("   by op and input shapes:")
    for what, (ms, n) in list(out["prefill"]["per_shape_ms"].items())[:25]:
        print(f"   {ms:8.2f} ms  x{n:3d}  {what}")
    if decode:
        d = out["decode_step"]
        print(f"   decode step: wall {d['wall_ms_median']} ms, kernels {d['kernel_ms_median']} ms in "
              f"{d['kernels_per_run']} kernels; top ops: " + ", ".join(
                  f"{op} {ms}" for op, ms in list(d["per_op_ms"].items())[:8]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", action="append", default=[])
    ap.add_argument("--genai-dir", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=0, help="also profile N decode steps per run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ids = np.random.default_rng(0).integers(1000, 200_000, size=PROMPT_LEN).tolist()
    load = open("/proc/loadavg").read().split()[:3]
    print(f"load average {' '.join(load)}; {args.threads} threads")
    result = {"loadavg": " ".join(load), "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.build_dir:
            p, w, dw = profile_ours(Path(b), ids, args.runs, args.threads, args.decode, tmp)
            result[f"g3export[{b}]"] = report(f"g3export {b}", p, w, dw, args.runs, args.decode)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        if args.genai_dir:
            p, w, dw = profile_genai(Path(args.genai_dir), ids, args.runs, args.threads,
                                     args.decode, tmp)
            result["ort-genai"] = report("GenAI graph", p, w, dw, args.runs, args.decode)
    result["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
