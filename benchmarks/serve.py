"""Serving throughput on this machine: aggregate output tokens/s and p50/p99 time to first token at
1, 4 and 8 concurrent streams, through a real tritonserver (`g3export serve`'s path) and through
the scheduler alone (no server), over one build.

    python benchmarks/serve.py builds/270m --requests 8 --prompt-len 128 --new-tokens 64

Each setting sends the same `--requests` greedy requests (distinct prompts of --prompt-len ids),
`concurrency` at a time (a new one starts when one ends); concurrency 1 is the "one after another"
baseline. Output tokens/s = all streamed tokens / wall time of the setting. The model's stop ids
apply, so a request may end before --new-tokens; the figures count the tokens actually streamed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    hi = min(vocab, 200000)
    return [[2, *rng.integers(1000, hi, size=length - 1).tolist()] for _ in range(n)]


def measure(one, bodies, concurrency: int) -> dict:
    """one(body) -> (ttft_s, n_tokens); runs bodies `concurrency` at a time."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(one, bodies))
    wall = time.perf_counter() - t0
    ttft = np.array([r[0] for r in res])
    toks = sum(r[1] for r in res)
    return {"concurrency": concurrency, "tokens": toks, "wall_s": round(wall, 2),
            "tokens_per_s": round(toks / wall, 2),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
            "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3)}


def via_triton(build, ps, new_tokens, levels, max_batch):
    from g3export.serving.repo import write_repository
    from g3export.serving.server import TritonServer
    import importlib.util

    spec = importlib.util.spec_from_file_location("client", ROOT / "samples" / "client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    out = []
    with tempfile.TemporaryDirectory() as repo:
        write_repository(build, repo, max_batch=max_batch)
        with TritonServer(repo) as server:
            def one(p):
                t0, ttft, n = time.perf_counter(), None, 0
                for ev in client.generate_stream(server.url, {"input_ids": p,
                                                              "max_tokens": new_tokens}):
                    ttft = ttft or time.perf_counter() - t0
                    n += len(client.ids_of(ev))
                return ttft, n
            one(ps[0])  # warm-up
            for c in levels:
                out.append({"path": "triton", **measure(one, ps, c)})
    return out


def via_scheduler(build, ps, new_tokens, levels, max_batch):
    from g3export.runtimes.loader import open_build
    from g3export.runtimes.scheduler import Request, Scheduler

    sched = Scheduler(open_build(build, batch=max_batch)[0])
    sched.start()

    def one(p):
        t0, ttft, n = time.perf_counter(), None, 0
        for ev in sched.submit(Request(p, max_new_tokens=new_tokens)):
            if ev.token_id is not None:
                ttft = ttft or time.perf_counter() - t0
                n += 1
        return ttft, n
    one(ps[0])
    out = [{"path": "scheduler", **measure(one, ps, c)} for c in levels]
    sched.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--skip-scheduler", action="store_true")
    a = ap.parse_args()
    from g3export.export.manifest import load_build

    levels = [int(c) for c in a.concurrency.split(",")]
    vocab = load_build(a.build, check_hashes=False).config.text.vocab_size
    ps = prompts(a.requests, a.prompt_len, vocab)
    rows = via_triton(a.build, ps, a.new_tokens, levels, max(levels))
    if not a.skip_scheduler:
        rows += via_scheduler(a.build, ps, a.new_tokens, levels, max(levels))
    for r in rows:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
