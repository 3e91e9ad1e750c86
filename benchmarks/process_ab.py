"""Decode steps timed in fresh processes, one runtime per process: the per-session part of a
runtime's speed, which no number of paired steps inside one process averages out.

    python benchmarks/process_ab.py --build-dir builds/270m-int4 \
        --genai-dir /work/bench_art/genai270m-int4 [--build-dir B2 ...] [--processes 6] \
        [--steps 64] [--threads 2] [--spin off] [--json out.json]

Why. benchmarks/compare_ort_genai.py (--interleave steps) and benchmarks/ort_ab.py pair the
steps of several sessions in one process, which cancels what changes over time (a busy
neighbour, drift). What they cannot cancel is a difference that a session keeps for its whole
life: the same build loaded twice in one process ran ~1.4% apart (ort_ab's noise floor,
BENCHMARKS.md section 1.6), and fresh processes of one int4 build ranged over 17.0-22.7 ms per
step (section 1.7, this script). With one session per runtime, every paired run is one draw of
that.

Here each process loads ONE runtime (a g3export build through OrtSession, or a GenAI folder
through onnxruntime_genai's own generator: compare_ort_genai's two runners), prefills the
benchmark's 512-token prompt (seed 0), and times --steps decode steps (each step as the
runners take it: one forward or generate_next_token, then the greedy pick), reporting the
median wall and process-CPU ms per step. The runtimes take turns, --processes each, in an
order that rotates every round, so round i holds one process of each, close in time. The report
gives, per runtime, the median of its per-process medians and their range (the spread between
sessions), and for every g3export build against GenAI (or, without --genai-dir, against the
first build): the median over rounds of the per-round ratio of step times, with its range.
Ratios are other / g3export (> 1: the g3export build is faster) for GenAI, and build / first
build for builds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def child(kind: str, path: str, steps: int, threads: int, spin: str) -> dict:
    sys.path.insert(0, str(HERE))
    import compare_ort_genai as cog

    cog.NEW_TOKENS = steps + 1  # GenAI's generator is sized for the prompt + these tokens
    if kind == "ours":
        r = cog.Ours(Path(path), threads, spin, name=Path(path).name)
    else:
        r = cog.GenAI(Path(path), threads, spin, dtype="genai")
    hi = min(200_000, r.vocab)
    ids = np.random.default_rng(0).integers(min(1000, hi // 2), hi, size=cog.PROMPT_LEN).tolist()
    r.start(ids)
    for _ in range(3):  # warm: first steps allocate
        r.step()
    wall, cpu, toks = [], [], []
    for _ in range(steps - 3):
        t, c = time.perf_counter(), time.process_time()
        toks.append(r.step())
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"step_ms": statistics.median(wall) * 1e3, "step_cpu_ms": statistics.median(cpu) * 1e3,
            "tokens": toks[:8], "load_s": round(r.load_s, 2)}


def run_child(kind: str, path: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, path,
           "--steps", str(args.steps), "--threads", str(args.threads), "--spin", args.spin]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{kind} {path}: the measuring process failed:\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _range(xs):
    return [round(min(xs), 3), round(max(xs), 3)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", action="append", default=[], help="g3export ONNX build (repeat)")
    ap.add_argument("--genai-dir", default="", help="a GenAI model folder (its int4 or fp32 build)")
    ap.add_argument("--processes", type=int, default=6, help="processes per runtime")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin", choices=["default", "on", "off"], default="off")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.threads, args.spin)))
        return 0
    for name, least in (("processes", 1), ("steps", 8), ("threads", 1)):
        if getattr(args, name) < least:
            ap.error(f"--{name} must be at least {least}")
    from bench_inputs import check_genai_dir, load_onnx_build  # beside this script

    runtimes = []
    for d in args.build_dir:
        load_onnx_build(ap, d)  # checked here: each measuring process loads it again
        runtimes.append((f"g3export[{Path(d).name}]", "ours", d))
    if args.genai_dir:
        check_genai_dir(ap, args.genai_dir)
        runtimes.append((f"ort-genai[{Path(args.genai_dir).name}]", "genai", args.genai_dir))
    if len(runtimes) < 2:
        ap.error("give at least two runtimes (--build-dir twice, or --build-dir and --genai-dir)")
    if len({n for n, _, _ in runtimes}) != len(runtimes):
        ap.error("two runtimes share a folder name")

    per = {n: [] for n, _, _ in runtimes}
    for i in range(args.processes):
        k = i % len(runtimes)
        for name, kind, path in runtimes[k:] + runtimes[:k]:  # rotate who goes first
            res = run_child(kind, path, args)
            per[name].append(res)
            print(f"round {i + 1}/{args.processes} {name:32s} step {res['step_ms']:7.2f} ms  "
                  f"cpu {res['step_cpu_ms']:7.2f} ms  (load {res['load_s']} s)", flush=True)

    base = runtimes[-1][0] if args.genai_dir else runtimes[0][0]
    report = {"processes": args.processes, "steps": args.steps, "threads": args.threads,
              "spin": args.spin, "loadavg_end": os.getloadavg(), "runtimes": {}, "ratios": {}}
    for name, _, _ in runtimes:
        w = [r["step_ms"] for r in per[name]]
        c = [r["step_cpu_ms"] for r in per[name]]
        report["runtimes"][name] = {"step_ms_median": round(statistics.median(w), 3),
                                    "step_ms_range": _range(w),
                                    "step_cpu_ms_median": round(statistics.median(c), 3),
                                    "step_cpu_ms_range": _range(c),
                                    "per_process_step_ms": [round(x, 3) for x in w]}
        print(f"{name:32s} step ms median {statistics.median(w):7.2f} (processes {min(w):.2f}"
              f"..{max(w):.2f}); cpu {statistics.median(c):7.2f} ({min(c):.2f}..{max(c):.2f})")
    for name, kind, _ in runtimes:
        if name == base or kind != "ours":
            continue
        for what in ("step_ms", "step_cpu_ms"):
            a = [r[what] for r in per[name]]
            b = [r[what] for r in per[base]]
            rat = [y / x for x, y in zip(a, b)] if args.genai_dir else [x / y for x, y in zip(a, b)]
            report["ratios"].setdefault(name, {})[what] = {
                "against": base, "median": round(statistics.median(rat), 3), "range": _range(rat),
                "of_medians": round((statistics.median(b) / statistics.median(a)) if args.genai_dir
                                    else (statistics.median(a) / statistics.median(b)), 3)}
        r_ = report["ratios"][name]["step_ms"]
        what = f"{base} / {name}" if args.genai_dir else f"{name} / {base}"
        print(f"{what}: per-round ratio median {r_['median']} (range {r_['range'][0]}.."
              f"{r_['range'][1]}); ratio of medians {r_['of_medians']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
