"""Peak memory of a `--target trt-rtx` build, and of the TensorRT-RTX engine builder alone.

    flock /tmp/g3-bigjob.lock python benchmarks/trt_builder_memory.py --size 1b \
        [--repo /path/to/a/g3export/checkout] [--out /work/scratch/trt/b] [--keep] \
        [--components text] [--min-available-gib 4]

Two measurements, each in fresh processes of the checkout given by --repo (default: this one), so
two checkouts (before / after a change) are measured by the same script:

1. `g3export build --size S --weights random --target trt-rtx` (bf16, plugin attention, default
   max_context and prefill chunk): wall time, the peak RSS of the largest process of the build
   (ru_maxrss of the waited-for children: the build process or its engine-build child) and the
   peak of the build's whole process tree (VmRSS summed, sampled every 0.1 s).
2. The engine step alone: `g3export.export.trt.build_engine(text.onnx, ..., isolate=True)` on the
   build's own text.onnx with the manifest's profiles, i.e. the TensorRT-RTX builder parsing the
   file by path in a child process; its ru_maxrss is the builder's own peak (EngineInfo
   .peak_rss_mb). Both checkouts have this entry point.

Watchdog (for sizes that may not fit a shared machine): each measurement runs in its own process
session, and while it runs the machine's MemAvailable is read every 0.1 s; when it falls below
--min-available-gib (default 4), the whole process tree is killed (SIGKILL to the session) and
the row says "did not fit in N GiB" (N = MemAvailable at the start minus that reserve) with the
peak the tree had reached. Nothing else on the machine is touched.

Prints one JSON line: size, repo, wall_s, build_peak_mib, build_tree_peak_mib, builder_peak_mib,
engine_bytes, weight_bytes, the lowest MemAvailable seen during each measurement, or fit=false
with the note. The build directory is deleted unless
--keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from build_memory import tree_rss  # benchmarks/ is on sys.path when this script runs

_ENGINE_STEP = r"""
import json, sys
from pathlib import Path
from g3export.export.trt import Profile, build_engine
out = Path(sys.argv[1])
man = json.loads((out / "manifest.json").read_text())
sec = man["tensorrt"]
eng = sec["engines"]["text"]
profiles = [Profile(p["name"], {k: tuple(tuple(s) for s in v) for k, v in p["shapes"].items()})
            for p in eng["profiles"]]
plugins = (("g3export.export.kernels.trt_plugin:register_plugins",)
           if sec["attention"] == "plugin" else ())
try:
    import g3export.export.kernels.trt_plugin  # noqa: F401
except ImportError:  # checkouts before the plugin split
    plugins = ("g3export.export.trt_plugin:register_plugins",) if plugins else ()
info = build_engine(out / eng["onnx"], out / "rebuilt.engine", sec["flavour"], profiles=profiles,
                    dtype=sec["dtype"], compute_capabilities=sec["compute_capabilities"],
                    plugins=plugins, isolate=True)
print("RESULT", json.dumps({"builder_peak_mib": info.peak_rss_mb, "rebuilt_bytes": info.bytes}))
"""


def _children_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def _mem_available() -> int:
    """The machine's MemAvailable in bytes (/proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class DidNotFit(Exception):
    """The watchdog killed a measurement: MemAvailable fell below the reserve."""


def run_watched(cmd: list[str], env: dict, cwd: Path, reserve: int, interval: float = 0.1,
                capture: bool = False) -> tuple[str, int, int]:
    """Run `cmd` in its own session; return (its stdout if `capture`, the peak RSS of its process
    tree, the lowest MemAvailable seen while it ran; bytes). Raises DidNotFit (after killing the
    whole tree) when the machine's MemAvailable falls below `reserve` bytes, CalledProcessError
    when it fails."""
    start = lowest = _mem_available()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True,
                                stdout=out if capture else None)
        peak = 0
        try:
            while proc.poll() is None:
                peak = max(peak, tree_rss(proc.pid))
                lowest = min(lowest, _mem_available())
                if lowest < reserve:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise DidNotFit(
                        f"did not fit in {(start - reserve) / 2**30:.1f} GiB (MemAvailable "
                        f"{start / 2**30:.1f} GiB at the start; killed when it fell below "
                        f"{reserve / 2**30:.1f} GiB, the process tree at {peak / 2**30:.2f} GiB)")
                time.sleep(interval)
        except BaseException:
            if proc.poll() is None:  # interrupted: leave nothing running
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        out.seek(0)
        return out.read().decode(errors="replace"), peak, lowest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--out", type=Path, default=Path("/tmp/g3-trt-builder-memory"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--components", default=None,
                    help="passed to g3export build (e.g. text: the builder only sees the text "
                         "graph; a model's vision graph stays ONNX)")
    ap.add_argument("--min-available-gib", type=float, default=4.0,
                    help="kill the measurement when MemAvailable falls below this")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(a.repo.resolve())}
    reserve = int(a.min_available_gib * 2**30)
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"{a.size}-trt-rtx"
    shutil.rmtree(out, ignore_errors=True)
    row = {"size": a.size, "repo": str(a.repo), "components": a.components}
    try:
        t0 = time.perf_counter()
        _, tree, low = run_watched([sys.executable, "-c", "from g3export.cli import main; main()",
                               "build", "--size", a.size, "--weights", "random", "--target",
                               "trt-rtx", "--out", str(out),
                               *(["--components", a.components] if a.components else [])],
                              env, a.out, reserve)
        row.update(wall_s=round(time.perf_counter() - t0, 1),
                   build_peak_mib=round(_children_peak_mib()),
                   build_tree_peak_mib=round(tree / 2**20),
                   build_lowest_mem_available_mib=round(low / 2**20))
        man = json.loads((out / "manifest.json").read_text())
        row.update(engine_bytes=man["tensorrt"]["engines"]["text"]["bytes"],
                   manifest_engine_peak_mib=man["tensorrt"]["engines"]["text"]["peak_rss_mb"],
                   weight_bytes=man["files"]["text.onnx.data"]["size"])
        # cwd: `-c` puts the working directory first on sys.path, before PYTHONPATH
        stdout, tree, low = run_watched([sys.executable, "-c", _ENGINE_STEP, str(out)], env, a.out,
                                   reserve, capture=True)
        step = json.loads(stdout.split("RESULT", 1)[1])
        row.update(builder_peak_mib=step["builder_peak_mib"], builder_tree_peak_mib=round(
            tree / 2**20), builder_lowest_mem_available_mib=round(low / 2**20), fit=True)
    except DidNotFit as e:
        row.update(fit=False, note=str(e), largest_process_peak_mib=round(_children_peak_mib()))
    finally:
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
            for left in out.parent.glob(out.name + ".*"):  # a killed build's partial dir, lock
                shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink()
    print(json.dumps(row))


if __name__ == "__main__":
    main()
