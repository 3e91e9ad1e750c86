"""Two (or more) g3export ONNX builds of one model, timed step by step in one process: A/B for a
graph change, robust to a busy machine.

    python benchmarks/ort_ab.py builds/270m builds/270m-new [--rounds 4] [--steps 48] [--threads 2]

Each round: a 512-token prefill in every build (the same ids, seed 0, as
benchmarks/compare_ort_genai.py draws them), then --steps decode steps, alternating builds
after EVERY step (A B B A A B ...), so a neighbour's burst hits all builds alike. Reported per
build: the median process CPU time (time.process_time: all threads) and wall time of a prefill
(the first round is a warm-up) and of a decode step. ORT spinning is off, so CPU time is the
work done and not the spin. Greedy tokens are checked to agree between the builds.
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
    args = ap.parse_args(argv)

    from g3export.runtimes.ort_session import OrtSession

    sessions = [OrtSession.from_build(d, provider="cpu", threads=args.threads, spinning=False)
                for d in args.build_dirs]
    ids = np.random.default_rng(0).integers(1000, 200_000, size=(1, args.prompt_len))
    res = {d: {"prefill_cpu": [], "prefill_wall": [], "step_cpu": [], "step_wall": []}
           for d in args.build_dirs}
    tokens = {d: [] for d in args.build_dirs}
    pairs = list(zip(args.build_dirs, sessions))
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    for rnd in range(args.rounds + 1):
        tok = {}
        for d, s in pairs:
            s.reset()
            c, t = time.process_time(), time.perf_counter()
            logits = s.forward(ids, 0)
            if rnd:
                res[d]["prefill_cpu"].append(time.process_time() - c)
                res[d]["prefill_wall"].append(time.perf_counter() - t)
            tok[d] = int(logits[0].argmax())
            tokens[d] = [tok[d]]
        for j in range(args.steps):
            for d, s in (pairs if j % 2 == 0 else pairs[::-1]):
                c, t = time.process_time(), time.perf_counter()
                logits = s.forward(np.array([[tok[d]]]), args.prompt_len + j)
                if rnd:
                    res[d]["step_cpu"].append(time.process_time() - c)
                    res[d]["step_wall"].append(time.perf_counter() - t)
                tok[d] = int(logits[0].argmax())
                tokens[d].append(tok[d])
    for d in args.build_dirs:
        r = {k: statistics.median(v) for k, v in res[d].items()}
        print(f"{d}: prefill cpu {r['prefill_cpu']:.3f} s wall {r['prefill_wall']:.3f} s; "
              f"decode step cpu {r['step_cpu'] * 1e3:.2f} ms wall {r['step_wall'] * 1e3:.2f} ms")
    first = args.build_dirs[0]
    for d in args.build_dirs[1:]:
        a, b = res[first], res[d]
        print(f"{d} / {first}: prefill cpu x{statistics.median(b['prefill_cpu']) / statistics.median(a['prefill_cpu']):.3f}, "
              f"decode step cpu x{statistics.median(b['step_cpu']) / statistics.median(a['step_cpu']):.3f}; "
              f"greedy tokens {'agree' if tokens[d] == tokens[first] else 'DIFFER'}")
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
