"""Peak memory and wall time of `g3export build` (issue 12: the export must not hold the weights).

Runs each build as a child process and samples the resident set of its whole process tree
(/proc/<pid>/status VmRSS of the child and every descendant, summed) every 0.2 s; reports the
peak, the wall time and the bytes of the .data files written, then deletes the build.

    python benchmarks/build_memory.py --out /scratch/dir                # 270m 1b 4b 12b + real 270M
    python benchmarks/build_memory.py --out DIR --sizes 27b --no-real   # 27b needs ~60 GB of disk
    python benchmarks/build_memory.py --out DIR --json results.json

Rows: `g3export build --size S --weights random --dtype bf16 --target onnx` per size, and the
real 270M (`--size 270m --target onnx`, fp32, the embedded GGUF). Run under the shared lock on
machines where others work (`flock /tmp/g3-bigjob.lock python benchmarks/build_memory.py ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (0 for processes that are gone)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measure(args: list[str], out: Path, interval: float = 0.2) -> dict:
    log = out.parent / (out.name + ".log")  # a file, not a pipe: progress bars fill a pipe
    t0 = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "g3export.cli", "build", *args, "--out",
                                 str(out)], stdout=subprocess.DEVNULL, stderr=err)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(interval)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build {' '.join(args)} failed:\n{log.read_text(errors='replace')[-3000:]}")
    log.unlink()
    data = sum(p.stat().st_size for p in out.glob("*.data"))
    shutil.rmtree(out)
    return {"args": " ".join(args), "peak_rss_bytes": peak, "wall_s": round(wall, 1),
            "data_bytes": data}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="scratch directory for the builds")
    ap.add_argument("--sizes", default="270m,1b,4b,12b")
    ap.add_argument("--no-real", action="store_true", help="skip the real 270M build")
    ap.add_argument("--max-context", default="4096")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    runs = [["--size", s, "--weights", "random", "--dtype", "bf16", "--target", "onnx"]
            for s in a.sizes.split(",") if s]
    if not a.no_real:
        runs.append(["--size", "270m", "--target", "onnx"])
    rows = []
    for r in runs:
        row = measure([*r, "--max-context", a.max_context], a.out / "build")
        rows.append(row)
        print(f"{row['args']:<70} peak {row['peak_rss_bytes'] / 2**30:6.2f} GiB  "
              f"wall {row['wall_s']:7.1f} s  weights {row['data_bytes'] / 1e9:6.2f} GB",
              flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
