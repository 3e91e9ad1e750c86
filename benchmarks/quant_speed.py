"""Several builds side by side in one process (e.g. the 270M fp32 / int8 / int4): size on disk,
resident memory added by opening each session (VmRSS after - before: the weights ORT holds,
prepacked), and prefill / decode tokens/s, rounds interleaved (A, B, C, A, B, C, ...) so a busy
neighbour hits every build alike; medians over rounds. Greedy, random ordinary-text prompt ids.

    PYTHONPATH=$PWD flock /tmp/g3-bigjob.lock nice .venv/bin/python benchmarks/quant_speed.py \
        B/270m-fp32 B/270m-int8 B/270m-int4 --prompt-len 256 --new-tokens 64 --rounds 3 \
        --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import numpy as np

from g3export.runtimes.generate import generate
from g3export.runtimes.ort_session import OrtSession


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sessions, rows = {}, {}
    for b in a.builds:
        before = rss()
        sessions[b] = OrtSession.from_build(b, threads=a.threads)
        rows[b] = {"build": b, "disk_bytes": sum(p.stat().st_size for p in Path(b).iterdir()),
                   "session_rss_bytes": rss() - before, "prefill": [], "decode": []}
    ids = np.random.default_rng(0).integers(1000, 200_000, a.prompt_len).tolist()
    for _ in range(a.rounds):
        for b, s in sessions.items():
            s.reset()
            r = generate(s, ids, a.new_tokens, stop_ids=[])
            rows[b]["prefill"].append(r.prefill_tokens_per_s)
            rows[b]["decode"].append(r.decode_tokens_per_s)
    out = []
    for b, r in rows.items():
        r["prefill_tok_s"] = round(statistics.median(r.pop("prefill")), 1)
        r["decode_tok_s"] = round(statistics.median(r.pop("decode")), 2)
        out.append(r)
        print(json.dumps(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": a.threads, "cpus": os.cpu_count(),
                                            "prompt_len": a.prompt_len,
                                            "new_tokens": a.new_tokens, "rounds": a.rounds,
                                            "results": out}, indent=1))


if __name__ == "__main__":
    main()
