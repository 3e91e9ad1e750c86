"""Where a decode step's CPU time goes, without ONNX Runtime's profiler: a g3export build and
GenAI's graph in ONE process, taking turns one decode step at a time, sampled by Linux `perf`.

    python benchmarks/perf_steps.py --build-dir builds/270m-int4 \
        --genai-dir /work/bench_art/genai270m-int4 [--steps 300] [--threads 1] [--json out.json]

Why not ORT's profiler (benchmarks/prefill_profile.py): it adds its own cost per kernel, and not
the same cost for every kernel (it times each parallel section; GroupQueryAttention runs
many), so its per-op times cannot be compared across two graphs: on the AVX2 VM of
BENCHMARKS.md section 1.7, at 1 thread, GenAI's int4 step took 34.3 ms profiled and 25.1 ms
unprofiled, g3export's 33.4 and 27.8; the profiles said g3export's kernels were the faster.

Here both graphs run in the same onnxruntime library (GenAI's graph through the Python API,
bound as GenAI's generator binds it: prefill_profile.genai_stepper; at 1 thread it measured as
fast as GenAI's own generator), in one process, after one prefill of the benchmark's 512-token
prompt each, alternating decode steps (order flipping every step). `perf record -k
CLOCK_MONOTONIC` samples this process (at --freq Hz) while each step's start and end are
logged on the same clock, so every sample belongs to one runtime's step. Samples inside
onnxruntime's library are grouped into address ranges (a gap over 256 bytes starts a new
range; the library has no symbols); each range's time per step is reported for both runtimes:
a range only one of them executes is code only its graph reaches (a kernel only it runs), and
the same range at different time is the same code doing more or less work. Time outside
onnxruntime is grouped by library (Python, numpy, libc, onnxruntime_genai).

The ranges have no names; which kernel a range is can be told from the graphs (a range that
only one graph reaches and whose time scales with its op) or by disassembly (`objdump -d
--start-address=...` on the library): BENCHMARKS.md section 1.7 names the large ones.
Needs `perf` on PATH and perf_event_paranoid <= 2 (a process may sample itself).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ORT_LIB = "onnxruntime_pybind11_state"
PROMPT_LEN = 512


def _clock() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def run_steps(build, genai_dir: Path, steps: int, threads: int, spinning: bool):
    """Load both, prefill, warm up; return {name: step()} ready to alternate."""
    sys.path.insert(0, str(HERE))
    from prefill_profile import genai_stepper

    from g3export.runtimes.generate import check_logits
    from g3export.runtimes.ort_session import OrtSession

    ours = OrtSession.from_build(build, provider="cpu", threads=threads, spinning=spinning)
    hi = min(200_000, ours.config.text.vocab_size)
    ids = np.random.default_rng(0).integers(min(1000, hi // 2), hi, size=PROMPT_LEN).tolist()
    _, gstep = genai_stepper(genai_dir, threads, PROMPT_LEN + steps + 8, spinning=spinning)
    state = {"ours": [int(np.argmax(ours.forward(np.asarray([ids]), 0)[0])), PROMPT_LEN],
             "genai": [gstep(ids, PROMPT_LEN), PROMPT_LEN]}

    def step_ours():  # as compare_ort_genai's runner: forward, the finiteness check, argmax
        tok, pos = state["ours"]
        logits = ours.forward(np.asarray([[tok]], dtype=np.int64), pos)
        state["ours"] = [int(np.argmax(check_logits(logits, pos)[0])), pos + 1]

    def step_genai():
        tok, pos = state["genai"]
        state["genai"] = [gstep([tok], pos + 1), pos + 1]

    fns = {"g3export": step_ours, "genai-graph": step_genai}
    for _ in range(3):
        for f in fns.values():
            f()
    return fns


def ort_base(perf_data: str) -> tuple[int, int] | None:
    """(start, pgoff) of onnxruntime's executable mapping in the recorded process."""
    out = subprocess.run(["perf", "script", "-i", perf_data, "--show-mmap-events", "-F", "time"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "MMAP" in line and ORT_LIB in line and "r-xp" in line:
            m = re.search(r"\[(0x[0-9a-f]+)\((0x[0-9a-f]+)\) @ (0x[0-9a-f]+)", line)
            if m:
                return int(m.group(1), 16), int(m.group(3), 16)
    return None


def attribute(perf_data: str, log: list[tuple[str, float, float]]):
    """Samples -> {runtime: Counter(key)}; key: ("ort", file offset) or ("lib", name)."""
    base = ort_base(perf_data)
    out = subprocess.run(["perf", "script", "-i", perf_data, "-F", "time,ip,dso"],
                         capture_output=True, text=True).stdout
    starts = [a for _, a, _ in log]
    counts = {who: collections.Counter() for who, _, _ in log}
    for line in out.splitlines():
        p = line.split()
        if len(p) < 3:
            continue
        try:
            t, ip = float(p[0].rstrip(":")), int(p[1], 16)
        except ValueError:
            continue
        i = bisect.bisect_right(starts, t) - 1
        if i < 0 or t > log[i][2]:
            continue  # between steps
        dso = p[2].strip("()").split("/")[-1]
        if ORT_LIB in dso and base is not None:
            key = ("ort", ip - base[0] + base[1])
        else:
            key = ("lib", re.sub(r"(\.cpython.*|\.so.*)$", "", dso))
        counts[log[i][0]][key] += 1
    return counts


def ranges(counts, ms_per_sample):
    """Group onnxruntime offsets of all runtimes into address ranges; ms per step for each."""
    offs = sorted({k[1] for c in counts.values() for k in c if k[0] == "ort"})
    groups: list[list[int]] = []
    for o in offs:
        if groups and o - groups[-1][-1] <= 256:
            groups[-1].append(o)
        else:
            groups.append([o])
    rows = []
    for g in groups:
        keys = [("ort", o) for o in g]
        ms = {who: sum(c[k] for k in keys) * ms_per_sample[who] for who, c in counts.items()}
        rows.append({"range": f"{g[0]:#x}-{g[-1]:#x}", **{w: round(v, 3) for w, v in ms.items()}})
    libs = sorted({k[1] for c in counts.values() for k in c if k[0] == "lib"})
    for lib in libs:
        ms = {who: c[("lib", lib)] * ms_per_sample[who] for who, c in counts.items()}
        rows.append({"range": lib, **{w: round(v, 3) for w, v in ms.items()}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", required=True, help="a g3export ONNX build")
    ap.add_argument("--genai-dir", required=True, help="GenAI's model folder of the same model")
    ap.add_argument("--steps", type=int, default=300, help="decode steps per runtime")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--spin", choices=["on", "off"], default="off")
    ap.add_argument("--freq", type=int, default=2999, help="perf sampling frequency (Hz)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from bench_inputs import check_genai_dir, load_onnx_build  # beside this script

    build_dir, genai_dir = Path(args.build_dir), Path(args.genai_dir)
    build = load_onnx_build(ap, build_dir)
    check_genai_dir(ap, genai_dir)
    if args.steps < 8 or args.threads < 1 or args.freq < 100:
        ap.error("--steps must be >= 8, --threads >= 1, --freq >= 100")
    if shutil.which("perf") is None:
        ap.error("`perf` is not on PATH (linux-perf / linux-tools)")

    fns = run_steps(build, genai_dir, args.steps + 8, args.threads, args.spin == "on")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        rec = subprocess.Popen(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-F",
                                str(args.freq), "-p", str(os.getpid()), "-o", data],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(2.0)  # perf attaches
        if rec.poll() is not None:
            ap.exit(2, f"perf record failed: {rec.stderr.read().decode().strip()[:300]} "
                       f"(perf_event_paranoid is {Path('/proc/sys/kernel/perf_event_paranoid').read_text().strip()}; "
                       "it must be <= 2)\n")
        log = []
        names = list(fns)
        for j in range(args.steps):
            for who in (names if j % 2 == 0 else names[::-1]):
                a = _clock()
                fns[who]()
                log.append((who, a, _clock()))
        rec.send_signal(signal.SIGINT)
        rec.wait()
        counts = attribute(data, log)
    step_ms = {w: statistics.median((b - a) * 1e3 for who, a, b in log if who == w) for w in names}
    total_ms = {w: sum((b - a) * 1e3 for who, a, b in log if who == w) / args.steps for w in names}
    n = {w: sum(counts[w].values()) for w in names}
    per = {w: total_ms[w] / max(n[w], 1) for w in names}  # samples spread over the mean step
    rows = ranges(counts, per)
    rows.sort(key=lambda r: -(r[names[0]] + r[names[1]]))
    print(f"{args.threads} thread(s), {args.steps} steps each, load {os.getloadavg()[0]:.2f}; "
          f"step ms median: " + ", ".join(f"{w} {step_ms[w]:.2f}" for w in names) +
          "; samples: " + ", ".join(f"{w} {n[w]}" for w in names))
    print(f"{'address range / library':34s} {names[0]:>10s} {names[1]:>12s} {'difference':>11s}  (ms per step)")
    for r in rows[:args.top]:
        print(f"{r['range']:34s} {r[names[0]]:10.3f} {r[names[1]]:12.3f} "
              f"{r[names[0]] - r[names[1]]:+11.3f}")
    rest = rows[args.top:]
    tail = {w: sum(r[w] for r in rest) for w in names}
    print(f"{f'the other {len(rest)} ranges':34s} {tail[names[0]]:10.3f} {tail[names[1]]:12.3f} "
          f"{tail[names[0]] - tail[names[1]]:+11.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"threads": args.threads, "steps": args.steps, "spin": args.spin, "freq": args.freq,
             "build_dir": str(build_dir), "genai_dir": str(genai_dir),
             "step_ms_median": step_ms, "step_ms_mean": total_ms, "samples": n,
             "loadavg_end": os.getloadavg(), "ranges": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
