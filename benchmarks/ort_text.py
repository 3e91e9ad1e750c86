"""Time the ONNX Runtime text session on a real-size preset with random weights (fp32, CPU).

    python benchmarks/ort_text.py --size 270m --max-context 4096 --prompt-len 512 --new-tokens 64
    python benchmarks/ort_text.py --size 270m --context-sweep 1024,32768   # decode vs max_context

Reports: export (build) seconds, session start seconds (with and without ORT's optimized-model
cache file), prefill tokens/s for one prompt chunk, decode tokens/s, and the decode memory bound
measured in the same run (`gemv_GB_s_now`: an ORT MatMul streaming a 671 MB fp32 weight; the
bound is that bandwidth over the weight bytes read per token, 1.07 GB for 270M; on an idle machine
~53 GB/s, i.e. ~50 tokens/s). Set G3_ORT_SPIN=0 when other processes share the cores. With --context-sweep it builds one graph per max_context and compares
decode speed at the same (short) used context: if the runtime copied whole caches per step, the
large max_context would be markedly slower. --profile DIR writes an ORT profile of decode steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_random(size: str, max_context: int, out: Path) -> float:
    from g3export.export.build import build
    from g3export.modeling.config import preset
    from g3export.modeling.text import Gemma3Model

    torch.manual_seed(0)
    model = Gemma3Model(preset(size)).eval()
    t = time.perf_counter()
    build(model, None, out, max_context=max_context, force=True, progress=False)
    return time.perf_counter() - t


def time_session(out: Path, prompt_len: int, new_tokens: int, threads: int | None = None,
                 profile: str | None = None, opt_cache: Path | None = None) -> dict:
    from g3export.runtimes.ort_session import OrtSession

    t = time.perf_counter()
    sess = OrtSession.from_build(out, threads=threads, max_chunk=None,
                                 optimized_model_cache=opt_cache, profile=profile)
    start_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    vocab = sess.config.text.vocab_size
    ids = rng.integers(0, vocab, (1, prompt_len), dtype=np.int64)
    sess.forward(ids[:, :8], 0)  # warm up
    sess.reset()
    t = time.perf_counter()
    logits = sess.forward(ids, 0)
    prefill_s = time.perf_counter() - t
    pos = prompt_len
    tok = int(logits[0].argmax())
    step_times = []
    for _ in range(new_tokens):
        t = time.perf_counter()
        logits = sess.forward(np.array([[tok]], dtype=np.int64), pos)
        step_times.append(time.perf_counter() - t)
        tok = int(logits[0].argmax())
        pos += 1
    if profile:
        sess.sess.end_profiling()
    decode_s = sum(step_times)
    return {"session_start_s": round(start_s, 3), "prefill_tokens": prompt_len,
            "prefill_s": round(prefill_s, 3), "prefill_tok_s": round(prompt_len / prefill_s, 1),
            "decode_tokens": new_tokens, "decode_tok_s": round(new_tokens / decode_s, 2),
            "decode_ms_median": round(1000 * float(np.median(step_times)), 2),
            "kv_bytes": sess.kv_bytes}


def gemv_bandwidth(rows: int = 262144, cols: int = 640, threads: int | None = None) -> float:
    """GB/s of one ORT MatMul [1, cols] x [cols, rows] fp32 (the 270M lm_head's size), measured
    now: the memory bound this machine gives at this moment (other processes included)."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from g3export.runtimes.ort_session import session_options

    w = np.random.default_rng(0).standard_normal((cols, rows), dtype=np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, [1, cols])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [1, rows])], [nh.from_array(w, "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 20)])
    m.ir_version = 10
    s = ort.InferenceSession(m.SerializeToString(), session_options(threads),
                             providers=["CPUExecutionProvider"])
    x = np.ones((1, cols), np.float32)
    for _ in range(3):
        s.run(None, {"x": x})
    t = time.perf_counter()
    for _ in range(20):
        s.run(None, {"x": x})
    return w.nbytes / ((time.perf_counter() - t) / 20) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="270m")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--context-sweep", default=None)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--keep", default=None, help="build dir to reuse/keep")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="g3bench-"))
    results: dict = {"size": a.size, "cpu_count": os.cpu_count()}
    try:
        contexts = [int(c) for c in a.context_sweep.split(",")] if a.context_sweep else [a.max_context]
        for mc in contexts:
            out = Path(a.keep) if a.keep and len(contexts) == 1 else tmp / f"b{mc}"
            r: dict = {"max_context": mc}
            if not (out / "manifest.json").exists():
                r["build_s"] = round(build_random(a.size, mc, out), 1)
            opt = tmp / f"opt{mc}.onnx"
            r.update(time_session(out, a.prompt_len, a.new_tokens, a.threads, a.profile))
            gbs = gemv_bandwidth(threads=a.threads)
            wbytes = sum(meta["size"] for n, meta in json.loads(
                (out / "manifest.json").read_text())["files"].items() if n.endswith(".data"))
            r["weight_bytes"] = wbytes
            r["gemv_GB_s_now"] = round(gbs, 1)
            r["decode_bound_tok_s_now"] = round(gbs * 1e9 / wbytes, 1)
            r["decode_GB_s"] = round(r["decode_tok_s"] * wbytes / 1e9, 1)
            # session start with ORT's optimized-model cache: first call writes it, second loads it
            from g3export.runtimes.ort_session import OrtSession
            t = time.perf_counter()
            OrtSession.from_build(out, optimized_model_cache=opt)
            r["session_start_writing_opt_cache_s"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            OrtSession.from_build(out, optimized_model_cache=opt)
            r["session_start_from_opt_cache_s"] = round(time.perf_counter() - t, 3)
            results[str(mc)] = r
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
