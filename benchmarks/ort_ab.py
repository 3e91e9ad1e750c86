"""Two (or more) g3export ONNX builds of one model, timed step by step in one process: A/B for a
graph change, robust to a busy machine.

    python benchmarks/ort_ab.py builds/270m builds/270m-new [--rounds 4] [--steps 48] [--threads 2]

Each round: a 512-token prefill in every build (the same ids, seed 0, as
benchmarks/compare_ort_genai.py draws them), then --steps decode steps, alternating builds
after EVERY step (A B B A A B ...), so a neighbour's burst hits all builds alike. Reported per
build: the median process CPU time (time.process_time: all threads) and wall time of a prefill
(the first round is a warm-up) and of a decode step. ORT spinning is off, so CPU time is the
work done and not the spin. Greedy tokens are checked to agree between the builds.

Each build is loaded --loads times (default 2), in mirrored order (A B B A): where a session
was loaded biases it. Measured 2026-12-03 (270M int4, AVX2 EPYC, 2 threads): with one session
per build, the one loaded second decoded ~1.4% faster whichever build it was (x0.987 and then
x1.015 for the same pair of builds, order swapped), as large as the graph changes this script is
meant to judge. A build's figures are medians over all its sessions' samples, and the report
gives each build's second session against its first: the noise floor of the comparison.
Figures in BENCHMARKS.md taken before 2026-12-03 (sections 1.1-1.5) were one load per build,
i.e. `--loads 1`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build_dirs", nargs="+")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--loads", type=int, choices=(1, 2), default=2,
                    help="sessions per build, loaded in mirrored order (module docstring)")
    args = ap.parse_args(argv)
    for name in ("rounds", "steps", "threads", "prompt_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")

    from bench_inputs import load_onnx_build  # beside this script

    from g3export.runtimes.ort_session import OrtSession

    # each checked (and hashed) once; a bad one is a one-line error
    builds = {d: load_onnx_build(ap, d) for d in dict.fromkeys(args.build_dirs)}

    order = args.build_dirs + (args.build_dirs[::-1] if args.loads == 2 else [])  # A B, B A
    # keyed (build dir, which load of it: 1 or 2)
    pairs = [((d, order[:k].count(d) + 1), OrtSession.from_build(
        builds[d], provider="cpu", threads=args.threads, spinning=False))
        for k, d in enumerate(order)]
    ids = np.random.default_rng(0).integers(1000, 200_000, size=(1, args.prompt_len))
    keys = ("prefill_cpu", "prefill_wall", "step_cpu", "step_wall")
    per_session = {name: {k: [] for k in keys} for name, _ in pairs}
    tokens = {name: [] for name, _ in pairs}
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    for rnd in range(args.rounds + 1):
        tok = {}
        for d, s in pairs:
            s.reset()
            c, t = time.process_time(), time.perf_counter()
            logits = s.forward(ids, 0)
            if rnd:
                per_session[d]["prefill_cpu"].append(time.process_time() - c)
                per_session[d]["prefill_wall"].append(time.perf_counter() - t)
            tok[d] = int(logits[0].argmax())
            tokens[d] = [tok[d]]
        for j in range(args.steps):
            for d, s in (pairs if j % 2 == 0 else pairs[::-1]):
                c, t = time.process_time(), time.perf_counter()
                logits = s.forward(np.array([[tok[d]]]), args.prompt_len + j)
                if rnd:
                    per_session[d]["step_cpu"].append(time.process_time() - c)
                    per_session[d]["step_wall"].append(time.perf_counter() - t)
                tok[d] = int(logits[0].argmax())
                tokens[d].append(tok[d])
    res = {d: {k: [x for (dd, _), v in per_session.items() if dd == d for x in v[k]]
               for k in keys} for d in args.build_dirs}
    if args.loads == 2:
        for d in dict.fromkeys(args.build_dirs):
            a, b = per_session[d, 1], per_session[d, 2]
            print(f"{d}, its 2nd session / 1st (noise floor): prefill cpu "
                  f"x{statistics.median(b['prefill_cpu']) / statistics.median(a['prefill_cpu']):.3f}, "
                  f"decode step cpu x{statistics.median(b['step_cpu']) / statistics.median(a['step_cpu']):.3f}")
    for d in dict.fromkeys(args.build_dirs):
        r = {k: statistics.median(v) for k, v in res[d].items()}
        print(f"{d}: prefill cpu {r['prefill_cpu']:.3f} s wall {r['prefill_wall']:.3f} s; "
              f"decode step cpu {r['step_cpu'] * 1e3:.2f} ms wall {r['step_wall'] * 1e3:.2f} ms")
    first = args.build_dirs[0]
    for d in args.build_dirs[1:]:
        a, b = res[first], res[d]
        agree = all(t == tokens[first, 1] for (dd, _), t in tokens.items() if dd == d)
        print(f"{d} / {first}: prefill cpu x{statistics.median(b['prefill_cpu']) / statistics.median(a['prefill_cpu']):.3f}, "
              f"decode step cpu x{statistics.median(b['step_cpu']) / statistics.median(a['step_cpu']):.3f}; "
              f"greedy tokens {'agree' if agree else 'DIFFER'}")
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
