"""Peak memory of a `--target trt-rtx` build, and of the TensorRT-RTX engine builder alone.

    flock /tmp/g3-bigjob.lock python benchmarks/trt_builder_memory.py --size 1b \
        [--repo /path/to/a/g3export/checkout] [--out /work/scratch/trt/b] [--keep]

Two measurements, each in fresh processes of the checkout given by --repo (default: this one), so
two checkouts (before / after a change) are measured by the same script:

1. `g3export build --size S --weights random --target trt-rtx` (bf16, plugin attention, default
   max_context and prefill chunk): wall time and the peak RSS of the largest process of the build
   (ru_maxrss of the waited-for children: the build process or its engine-build child).
2. The engine step alone: `g3export.export.trt.build_engine(text.onnx, ..., isolate=True)` on the
   build's own text.onnx with the manifest's profiles, i.e. the TensorRT-RTX builder parsing the
   file by path in a child process; its ru_maxrss is the builder's own peak (EngineInfo
   .peak_rss_mb). Both checkouts have this entry point.

Prints one JSON line: size, repo, wall_s, build_peak_mib, builder_peak_mib, engine_bytes,
weight_bytes. The build directory is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--out", type=Path, default=Path("/tmp/g3-trt-builder-memory"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(a.repo.resolve())}
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"{a.size}-trt-rtx"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from g3export.cli import main; main()", "build",
                    "--size", a.size, "--weights", "random", "--target", "trt-rtx", "--out",
                    str(out)], env=env, check=True, cwd=a.out)
    wall = time.perf_counter() - t0
    build_peak = _children_peak_mib()
    man = json.loads((out / "manifest.json").read_text())
    # cwd: `-c` puts the working directory first on sys.path, before PYTHONPATH
    proc = subprocess.run([sys.executable, "-c", _ENGINE_STEP, str(out)], env=env, check=True,
                          capture_output=True, text=True, cwd=a.out)
    step = json.loads(proc.stdout.split("RESULT", 1)[1])
    print(json.dumps({
        "size": a.size, "repo": str(a.repo), "wall_s": round(wall, 1),
        "build_peak_mib": round(build_peak), "builder_peak_mib": step["builder_peak_mib"],
        "engine_bytes": man["tensorrt"]["engines"]["text"]["bytes"],
        "manifest_engine_peak_mib": man["tensorrt"]["engines"]["text"]["peak_rss_mb"],
        "weight_bytes": man["files"]["text.onnx.data"]["size"]}))
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
