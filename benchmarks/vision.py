"""Vision benchmark: images/s of the vision graph (ONNX Runtime, CPU by default) at a preset's size
with random weights, and time to first token with one image on a tiny multimodal build.

    python benchmarks/vision.py                        # 4b vision graph, batch 1 and 2, fp32
    python benchmarks/vision.py --size 4b --batches 1,2 --repeat 2 --build-dir /tmp/4b-vision

* images/s: a `components=('vision',)` build of the preset (text weights never allocated; reused
  when --build-dir already holds one), one OrtVision session; per batch size one untimed warm-up
  run, then --repeat timed runs; images/s = batch / median seconds.
* TTFT with one image: the tiny-vision preset (random weights, text + vision build), from the
  image file to the first generated token: preprocessing + vision graph + chunked prefill +
  sampling. A 4b text graph is ~15 GB in fp32 and is not built here; at 4b, TTFT is roughly the
  vision time per image above plus the text prefill of the prompt (~270 tokens).

Prints a table, then one JSON line (with the command, the machine load and the thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def vision_throughput(size: str, build_dir: Path, batches, repeat: int, provider: str):
    from g3export.export.manifest import load_build
    from g3export.runtimes.ort_session import OrtVision, physical_cores

    if not (build_dir / "manifest.json").is_file():
        from g3export.export.build import build
        from g3export.export.onnx_vision import vision_only_model

        t = time.perf_counter()
        build(vision_only_model(size), None, build_dir, max_context=4096, progress=False,
              components=("vision",), force=True)
        print(f"built {build_dir} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    b = load_build(build_dir, check_hashes=False)
    io = b.component("vision")
    t = time.perf_counter()
    vis = OrtVision(b.path(io.file), io, provider, max_batch=max(batches))
    start_s = time.perf_counter() - t
    s = b.config.vision.image_size
    rng = np.random.default_rng(0)
    rows = []
    for n in batches:
        px = rng.uniform(-1, 1, (n, 3, s, s)).astype(np.float32)
        vis(px)  # warm-up
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            out = vis(px)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rows.append({"batch": n, "seconds": round(med, 3), "images_per_s": round(n / med, 4),
                     "runs": [round(x, 3) for x in times], "output_shape": list(out.shape)})
    return {"size": size, "provider": provider, "session_start_s": round(start_s, 2),
            "threads": physical_cores(), "rows": rows}


def tiny_ttft(work: Path, repeat: int, provider: str):
    from PIL import Image

    from g3export.export.build import build
    from g3export.modeling.weights import build_model
    from g3export.runtimes.generate import generate
    from g3export.runtimes.images import prepare_images
    from g3export.runtimes.ort_session import OrtSession

    out = work / "tiny-vision-onnx"
    if not (out / "manifest.json").is_file():
        build(build_model("tiny-vision", weights="random"), None, out, max_context=256,
              progress=False, force=True)
    sess = OrtSession.from_build(out, provider=provider)
    cfg = sess.config
    img = work / "picture.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(img)
    ids = [2] + list(range(10, 30)) + [cfg.boi_token_id] + [cfg.image_token_id] * \
        cfg.mm_tokens_per_image + [cfg.eoi_token_id] + list(range(30, 50))
    times = []
    for i in range(repeat + 1):
        t = time.perf_counter()
        px, _ = prepare_images([img], cfg)
        feats = sess.image_features(px)
        generate(sess, ids, 1, stop_ids=[], image_features=feats)
        if i:  # the first run (session warm-up) is not counted
            times.append(time.perf_counter() - t)
    return {"build": "tiny-vision (random)", "prompt_tokens": len(ids),
            "ttft_s": round(statistics.median(times), 4), "runs": [round(x, 4) for x in times]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4b")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--build-dir", type=Path, default=None,
                    help="where the vision-only build is (or is written); default: a temp dir")
    ap.add_argument("--skip-ttft", action="store_true")
    a = ap.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",")]
    load_before = _loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bdir = a.build_dir or Path(tmp) / f"{a.size}-vision"
        vis = vision_throughput(a.size, bdir, batches, a.repeat, a.provider)
        ttft = None if a.skip_ttft else tiny_ttft(Path(tmp), max(3, a.repeat), a.provider)
    res = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "loadavg_before": load_before, "loadavg_after": _loadavg(), "nproc": os.cpu_count(),
           "vision": vis, "ttft_one_image": ttft}
    print(f"vision graph {a.size} fp32 ({a.provider}, {vis['threads']} threads, session start "
          f"{vis['session_start_s']} s)")
    print(f"{'batch':>6} {'s/run':>9} {'images/s':>9}")
    for r in vis["rows"]:
        print(f"{r['batch']:>6} {r['seconds']:>9.3f} {r['images_per_s']:>9.4f}")
    if ttft:
        print(f"TTFT with one image, {ttft['build']}, {ttft['prompt_tokens']} prompt tokens: "
              f"{ttft['ttft_s'] * 1000:.1f} ms")
    print(f"load: before {load_before} / after {res['loadavg_after']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
