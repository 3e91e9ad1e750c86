"""Continuous batching on CPU (issue 13): aggregate output tokens/s and time to first token of the
scheduler (g3export.runtimes.scheduler) at 1, 4 and 8 concurrent requests, against the same
requests run one after another through generate() at batch 1 (the CLI's path); and the prefill
choice behind the scheduler: B prompts prefilled one row at a time (`forward_row`) against one
batched `forward` of the same B x T tokens.

    python benchmarks/scheduler.py --build-dir /work/scratch/rows/270m \
        [--requests 8] [--prompt-len 128] [--new-tokens 128] [--concurrency 1 4 8] [--threads 2]

Every run is greedy with stop_ids=[] (all requests produce exactly --new-tokens). Prompts: random
ids from [1000, 200000), seed 0, one per request (the same in every mode). Concurrency c: c
clients, each submitting its next request when its previous one ends, over a session with c
rows (so c = 1 shows the scheduler's own cost against generate()). TTFT: from submit to the first
streamed token (one after another: from the request's own start). Aggregate tokens/s: all output
tokens over the wall time from the first submit to the last token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import numpy as np


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def sequential(build_dir, prompts, new_tokens, threads):
    from g3export.runtimes.generate import generate
    from g3export.runtimes.ort_session import OrtSession

    sess = OrtSession.from_build(build_dir, batch=1, threads=threads)
    generate(sess, prompts[0][:8], 2, stop_ids=[])  # warm-up
    ttft, n = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        r = generate(sess, p, new_tokens, stop_ids=[])
        ttft.append(r.time_to_first_token_s)
        n += len(r.token_ids)
    wall = time.perf_counter() - t0
    return {"mode": "one after another (generate, batch 1)", "concurrency": 1, "tokens": n,
            "wall_s": wall, "tok_s": n / wall, "ttft_p50_ms": 1e3 * percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99)}


def concurrent(build_dir, prompts, new_tokens, threads, c):
    from g3export.runtimes.ort_session import OrtSession
    from g3export.runtimes.scheduler import Request, Scheduler

    sess = OrtSession.from_build(build_dir, batch=c, threads=threads)
    sched = Scheduler(sess, max_queue=len(prompts))
    sched.start()
    sched.submit(Request(prompts[0][:8], max_new_tokens=2, stop_ids=[])).result()  # warm-up
    todo = list(prompts)
    lock = threading.Lock()
    streams = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                p = todo.pop(0)
            s = sched.submit(Request(p, max_new_tokens=new_tokens, stop_ids=[]))
            with lock:
                streams.append(s)
            tokens, reason, err = s.result()
            if err or len(tokens) != new_tokens:
                raise RuntimeError(f"request ended {reason} after {len(tokens)} tokens: {err}")

    t0 = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(c)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = max(s.finished_at for s in streams) - t0
    sched.close()
    ttft = [s.first_token_at - s.submitted_at for s in streams]
    n = len(prompts) * new_tokens
    return {"mode": f"scheduler, {c} concurrent", "concurrency": c, "tokens": n, "wall_s": wall,
            "tok_s": n / wall, "ttft_p50_ms": 1e3 * percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99), "steps": sched.steps}


def prefill_choice(build_dir, rows, t, threads, rounds=3):
    """ms for `rows` prompts of t tokens: forward_row one row at a time vs one batched forward."""
    from g3export.runtimes.ort_session import OrtSession

    sess = OrtSession.from_build(build_dir, batch=rows, threads=threads)
    ids = np.random.default_rng(1).integers(0, sess.config.text.vocab_size, size=(rows, t))
    per_row, batched = [], []
    sess.forward(ids[:, :8], 0)
    sess.forward_row(0, ids[:1, :8], 0)
    for _ in range(rounds):
        a = time.perf_counter()
        for r in range(rows):
            sess.forward_row(r, ids[r:r + 1], 0)
        b = time.perf_counter()
        sess.forward(ids, 0)
        c = time.perf_counter()
        per_row.append(b - a)
        batched.append(c - b)
    return {"rows": rows, "tokens_per_row": t, "forward_row_ms": 1e3 * statistics.median(per_row),
            "batched_ms": 1e3 * statistics.median(batched)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--skip-prefill-choice", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from g3export.export.manifest import load_build

    vocab = load_build(a.build_dir).config.text.vocab_size
    rng = np.random.default_rng(0)
    lo, hi = min(1000, vocab // 2), min(200000, vocab)
    prompts = [rng.integers(lo, hi, size=a.prompt_len).tolist() for _ in range(a.requests)]
    results = [sequential(a.build_dir, prompts, a.new_tokens, a.threads)]
    print(json.dumps(results[-1]), flush=True)
    for c in a.concurrency:
        results.append(concurrent(a.build_dir, prompts, a.new_tokens, a.threads, c))
        print(json.dumps(results[-1]), flush=True)
    base = results[0]["tok_s"]
    print("\n| mode | aggregate output tok/s | x one after another | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |")
    out = {"results": results, "args": vars(a), "load": os.getloadavg()}
    if not a.skip_prefill_choice:
        out["prefill_choice"] = [prefill_choice(a.build_dir, 4, a.prompt_len, a.threads)]
        print(json.dumps(out["prefill_choice"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
