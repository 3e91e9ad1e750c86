"""Side-by-side CPU speed of g3export ONNX builds and ONNX Runtime GenAI on the same weights.

Issues 3 and 14's benchmark: the real Gemma 3 270M, g3export's builds (fp32, int8, int4: one
--build-dir each) and GenAI's fp32 and int4 builds, a 512-token prompt, 64 new tokens, greedy,
all timed in ONE process, interleaved (each round runs every runtime once, alternating the order)
so that a busy neighbour or thermal drift hits all alike. Reports median and best of each
figure, the ratios of each g3export build to GenAI's build of the same dtype (fp32 to fp32,
int4 to int4), the machine, and every build's decode as a fraction of its memory bound: copy
bandwidth measured here with numpy / the bytes that build reads per decode token (the
initializers of its graph that a step reads whole, counted from the graph: fp32 weights, or
int4/int8 codes + scales + zero points; plus the KV cache).

Setup, once (offline). onnxruntime-genai 0.18.0 (PyPI) requires onnxruntime>=1.31 and numpy,
both already in the venv, so it goes in beside them without touching torch or onnxruntime:

    pip install --no-deps onnxruntime-genai==0.18.0

    python benchmarks/compare_ort_genai.py --prepare \
        --hf-dir /work/bench_art/hf270m --genai-dir /work/bench_art/genai270m
    g3export build --size 270m --target onnx --out builds/270m-fp32   # and --quant int8|int4

--prepare (benchmarks/genai_prepare.py) (1) writes a Hugging Face folder from the embedded
GGUF with transformers (weights dequantized to fp32; the GGUF is Q4_K_M, so both runtimes run
the same dequantized fp32 values),
(2) runs GenAI's model builder on it for fp32 CPU with `prune_lm_head=true`, so that prefill
computes only the last position's logits, as g3export's graph does, into --genai-dir, and (3)
the same for int4 into --genai-int4-dir (`-p int4 -e cpu`, prune_lm_head=true, every
quantization option at the builder's default, read from onnxruntime_genai/models/builder.py
0.18: RTN through onnxruntime's MatMulNBitsQuantizer, block 32, accuracy_level 4, symmetric,
i.e. codes [-8, 7] with scale = the block's signed largest-magnitude value / -8, no zero points;
and, the model tying its embeddings (shared_embeddings defaults to tie_word_embeddings), the
lm_head int4 in MatMulNBits and the embedding lookup a GatherBlockQuantized on those same codes:
what g3export's int4 quantizes too). The same as
`python -m onnxruntime_genai.models.builder -i HF -o OUT -p fp32 -e cpu -c CACHE
--extra_options prune_lm_head=true hf_remote=false`, except for two shims this script applies:
transformers 5.x refuses save_pretrained on a GGUF-loaded model (a leftover "gguf" quantizer
marker; the tensors are plain fp32), and writes Gemma 3's RoPE as per-layer-type
rope_parameters, which GenAI 0.18's Gemma3 builder cannot read (KeyError 'rope_type'); the
builder is handed the transformers-4 form (rope_theta 1e6, rope_local_base_freq 1e4). Checked:
GenAI's greedy tokens equal transformers' on a 602-token prompt (past the 512 window).
(The builder's --help crashes in 0.18 on a '%' in its help text; read builder.py instead.)

Measure:

    python benchmarks/compare_ort_genai.py --build-dir builds/270m-fp32 \
        --build-dir builds/270m-int8 --build-dir builds/270m-int4 \
        --genai-dir /work/bench_art/genai270m --genai-int4-dir /work/bench_art/genai270m-int4 \
        [--rounds 5] [--threads 2] [--json out.json]

`--interleave steps` (interleave_steps) times the same builds at a finer grain: per round every
runtime prefills, then they take turns one decode step at a time, and each ratio is the median over
paired samples (the same step of two runtimes, a few ms apart) with its interquartile range.
Whole-generation rounds on a shared VM drift by more than the few % that separate a change from
its baseline; paired steps do not. Ratios there are GenAI time / ours (> 1: ours is faster), and,
for a second g3export build of a dtype, its time / the first build's (an A/B of two graphs).

--genai-graph adds GenAI's graphs once more, run by onnxruntime's Python API with I/O binding as
g3export's runtime runs its own graph (GenAIGraph) instead of by GenAI's C++ generator: its
ratio to GenAI is the harness alone (same graph), its ratio to a g3export build of its dtype the
graph alone (same harness). On the AVX2 VM at 2 threads, spinning off, the harness alone
measured 0.959 for int4 (BENCHMARKS.md section 1.7).

(--genai-int4-dir '' leaves GenAI int4 out, --genai-dir '' GenAI fp32. Runtimes are named g3export[<build folder name>],
ort-genai[fp32], ort-genai[int4].) Quality of the same builds: benchmarks/genai_quality.py.

Thread settings (the same for both): ORT intra-op threads = --threads (default: the CPUs this
process may use), inter-op threads 1, sequential execution, ORT's default spinning. g3export: via
OrtSession(threads=..., spinning=...); GenAI: via og.Config.overlay of the decoder's session_options
(intra_op_num_threads, inter_op_num_threads, and with --spin on|off the ORT config entry
session.intra_op.allow_spinning, which GenAI passes through). --spin off suits a machine shared
with other busy processes.
--skip-ours / --skip-genai time one side only.

Besides wall time, each round records the process's CPU time (time.process_time, all threads)
of prefill and decode; the ratios GenAI/ours of those are printed too. With --spin off they
measure the work each runtime does, which a busy machine disturbs much less than wall time (with
spinning on they count the spin as well).

GenAI's generator: append_tokens(prompt) runs prefill, the first generate_next_token() only picks
token 1, each later one runs a decode step; so TTFT = prefill + first pick, decode tok/s =
63 tokens / their time, exactly as g3export's generate() counts. max_length = 512 + 64 (GenAI's
windowed GQA refuses a cache shorter than the 512 window), min_length = the same so EOS cannot
end a run early; g3export runs with stop_ids=[]. The prompt: 512 ids drawn with seed 0 from
[1000, 200000) as `g3export bench` draws them; the same ids for both.

Notes on the weights. transformers keeps Gemma's embedding scale as sqrt(640) = 25.298 in fp32,
g3export uses the bf16-rounded 25.25 of the reference implementation, and GenAI's builder bakes
round(sqrt(640), 2) = 25.3: the three runtimes' logits differ slightly; irrelevant for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROMPT_LEN = 512
NEW_TOKENS = 64


# ------------------------------------------------------------------------------------------------
# machine and memory bound
# ------------------------------------------------------------------------------------------------
def machine() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = []
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model,
            "loadavg": " ".join(load), "python": platform.python_version()}


def copy_bandwidth_gbps(n_bytes: int = 1 << 30, reps: int = 5, threads: int = 1) -> float:
    """Memory bandwidth from a large numpy copy (np.copyto of n_bytes, split over `threads`
    Python threads; numpy releases the GIL for the copy): (read + write) bytes / best time, GB/s."""
    import threading

    src = np.ones(n_bytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    edges = np.linspace(0, src.size, threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        if threads == 1:
            np.copyto(dst, src)
        else:
            th = [threading.Thread(target=np.copyto, args=p) for p in parts]
            for x in th:
                x.start()
            for x in th:
                x.join()
        best = min(best, time.perf_counter() - t)
    del src, dst, parts
    return 2 * n_bytes / best / 1e9


# initializers a decode step does not read whole: RoPE tables (one row per step; GenAI's
# cos_cache/sin_cache, g3export's rope_*_table from onnx_passes._fuse_rotary), and the copy of
# the zero points that only the embedding lookup's GatherBlockQuantized reads (one row)
_NOT_READ_WHOLE = ("cos_cache", "sin_cache", "zero_points_gather", "rope_cos", "rope_sin")


def graph_weight_bytes(onnx_file: Path) -> int:
    """Bytes of every initializer of `onnx_file` that one decode step reads whole (all weights,
    codes, scales and zero points: each is read once per token; the tied table once, by the LM
    head), read from the graph without loading the data. Initializers that name the same bytes
    of the data file (the lm_head's 2-D view of the tied table, g3export.export.onnx_lm_head; a
    decode step reads one of them) count once."""
    import onnx
    from onnx import helper

    total, seen = 0, set()
    for t in onnx.load(str(onnx_file), load_external_data=False).graph.initializer:
        if any(k in t.name for k in _NOT_READ_WHOLE):
            continue
        ext = {e.key: e.value for e in t.external_data}
        if ext:
            where = (ext.get("location"), ext.get("offset"))
            if where in seen:
                continue
            seen.add(where)
        n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
        total += n * bits // 8 if bits else n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def decode_bytes_per_token(hf_dir: Path | None, text_config=None,
                           weights_file: Path | None = None) -> tuple[int, str]:
    """Bytes read per decode token: every weight once (the tied embedding is read whole by the
    LM head; the input embedding gathers one row, counted as part of it), in fp32 from the
    config's shapes, or with `weights_file` what that graph's initializers hold
    (`graph_weight_bytes`: the quantized builds); plus the KV cache read (fp32, small for the
    270M at 576 tokens)."""
    cfg = None
    if text_config is not None:  # the g3export build's own config
        import dataclasses

        cfg = dataclasses.asdict(text_config)
        cfg["layer_types"] = list(text_config.layer_types)
    elif hf_dir and (hf_dir / "config.json").exists():
        cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg is None:  # the real 270M's shape
        cfg = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"])
    v, h, f, L = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nq, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    per_layer = h * (nq + 2 * nkv) * hd + nq * hd * h + 3 * h * f + 4 * h + 2 * hd
    weights = v * h + L * per_layer + h
    ctx = PROMPT_LEN + NEW_TOKENS
    kv = 0
    types = cfg.get("layer_types") or []
    for i in range(L):
        t = types[i % len(types)] if types else "full_attention"
        n = min(ctx, cfg.get("sliding_window", ctx)) if t == "sliding_attention" else ctx
        kv += 2 * n * nkv * hd
    if weights_file is not None:
        wb = graph_weight_bytes(weights_file)
        return wb + 4 * kv, f"{wb / 1e6:.1f} MB of weights + KV of {ctx} positions {4 * kv / 1e6:.1f} MB"
    return 4 * (weights + kv), f"{weights / 1e6:.1f}M params + KV of {ctx} positions {4 * kv / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------------------
# the two runners: each .run() -> (ttft_s, decode_s, n_decode_tokens, tokens)
# ------------------------------------------------------------------------------------------------
def _spin_text(spin: str) -> str:
    return {"default": "ORT default (1)", "on": "1", "off": "0"}[spin]


class Ours:
    name = "g3export"

    def __init__(self, build_dir: Path, threads: int, spin: str = "default", name: str = "g3export"):
        from g3export.runtimes.ort_session import OrtSession

        self.name = name
        t = time.perf_counter()
        spinning = None if spin == "default" else spin == "on"
        self.session = OrtSession.from_build(build_dir, provider="cpu", threads=threads,
                                             spinning=spinning)
        self.load_s = time.perf_counter() - t
        self.vocab = self.session.config.text.vocab_size
        man = json.loads((build_dir / "manifest.json").read_text())
        q = man.get("quantization") or {}
        self.dtype = q.get("scheme") or man.get("dtype", "fp32")
        self.weights_file = build_dir / man["components"]["text"]["file"]
        self.settings = {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                         "execution_mode": "sequential", "allow_spinning": _spin_text(spin),
                         "graph_optimization_level": "ORT_ENABLE_ALL", "kv_bytes": self.session.kv_bytes}

    def run(self, ids):
        from g3export.runtimes.generate import generate

        marks = []  # process CPU time at the first token (on_token runs right after prefill)

        def first(_token):
            if not marks:
                marks.append(time.process_time())
        c0 = time.process_time()
        r = generate(self.session, ids, NEW_TOKENS, stop_ids=[], on_token=first)
        c2 = time.process_time()
        return (r.time_to_first_token_s, r.decode_s, len(r.token_ids) - 1, list(r.token_ids),
                marks[0] - c0, c2 - marks[0])

    # --interleave steps: prefill, then one decode step at a time (as generate() runs them)
    def start(self, ids):
        from g3export.runtimes.generate import generate

        r = generate(self.session, ids, 1, stop_ids=[])  # reset + prefill + pick token 1
        self.token, self.pos = r.token_ids[0], len(ids)
        return self.token

    def step(self):
        from g3export.runtimes.generate import check_logits

        logits = self.session.forward(np.asarray([[self.token]], dtype=np.int64), self.pos)
        self.token = int(np.argmax(check_logits(logits, self.pos)[0]))
        self.pos += 1
        return self.token


class GenAI:
    name = "ort-genai"

    def __init__(self, genai_dir: Path, threads: int, spin: str = "default",
                 dtype: str = "fp32"):
        import onnxruntime_genai as og

        self.og, self.dtype = og, dtype
        self.name = f"ort-genai[{dtype}]"
        t = time.perf_counter()
        config = og.Config(str(genai_dir))
        config.clear_providers()  # CPU
        so = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        if spin != "default":  # GenAI passes unknown string keys on as ORT session config entries
            so["session.intra_op.allow_spinning"] = "1" if spin == "on" else "0"
        config.overlay(json.dumps({"model": {"decoder": {"session_options": so}}}))
        self.model = og.Model(config)
        self.load_s = time.perf_counter() - t
        gc = json.loads((genai_dir / "genai_config.json").read_text())
        self.weights_file = genai_dir / gc["model"]["decoder"]["filename"]
        base = gc["model"]["decoder"].get("session_options", {})
        self.vocab = gc["model"]["vocab_size"]
        # GenAI's windowed GQA cache refuses a max_length below the window (512 for Gemma 3);
        # the benchmark's 512 + 64 is above it, shorter smoke runs get a larger cache
        self.min_max_length = gc["model"]["decoder"].get("sliding_window", {}).get("window_size", 0)
        self.settings = {**base, **so, "provider": "cpu", "og_version": og.__version__,
                         "allow_spinning": _spin_text(spin)}

    def _generator(self, ids):
        og = self.og
        total = len(ids) + NEW_TOKENS
        params = og.GeneratorParams(self.model)
        # greedy; min_length keeps EOS from ending the run early (random-text prompt)
        params.set_search_options(max_length=max(total, self.min_max_length), min_length=total,
                                  do_sample=False, batch_size=1)
        return og.Generator(self.model, params)

    def run(self, ids):
        gen = self._generator(ids)
        t0, c0 = time.perf_counter(), time.process_time()
        gen.append_tokens(np.asarray([ids], dtype=np.int32))  # prefill: logits of the prompt
        gen.generate_next_token()                              # picks token 1 (no model run)
        t1, c1 = time.perf_counter(), time.process_time()
        n = 1
        while n < NEW_TOKENS and not gen.is_done():
            gen.generate_next_token()                          # one decode step + pick
            n += 1
        t2, c2 = time.perf_counter(), time.process_time()
        seq = [int(t) for t in gen.get_sequence(0)[len(ids):]]
        del gen
        return t1 - t0, t2 - t1, n - 1, seq, c1 - c0, c2 - c1

    # --interleave steps
    def start(self, ids):
        self.gen = self._generator(ids)
        self.gen.append_tokens(np.asarray([ids], dtype=np.int32))
        self.gen.generate_next_token()
        return int(self.gen.get_next_tokens()[0])

    def step(self):
        self.gen.generate_next_token()
        return int(self.gen.get_next_tokens()[0])


class GenAIGraph:
    """GenAI's graph run by onnxruntime's Python API the way g3export's runtime runs its own
    (--genai-graph; prefill_profile.genai_stepper binds it as GenAI's generator does). Paired
    with GenAI's runtime (same graph, other harness) and with the first g3export build of its
    dtype (same harness, other graph), it splits a g3export/GenAI ratio into its two causes."""

    def __init__(self, genai_dir: Path, threads: int, spin: str = "default", dtype: str = "fp32"):
        from prefill_profile import genai_stepper  # beside this script

        self.name, self.dtype = f"ort-genai-graph[{dtype}]", dtype
        gc = json.loads((genai_dir / "genai_config.json").read_text())
        self.vocab = gc["model"]["vocab_size"]
        self.weights_file = genai_dir / gc["model"]["decoder"]["filename"]
        t = time.perf_counter()
        spinning = None if spin == "default" else spin == "on"
        _, self._step = genai_stepper(genai_dir, threads, PROMPT_LEN + NEW_TOKENS + 1, spinning=spinning)
        self.load_s = time.perf_counter() - t
        self.settings = {"intra_op_num_threads": threads, "allow_spinning": _spin_text(spin),
                         "harness": "onnxruntime Python API, IOBinding"}

    def start(self, ids):
        self.token, self.total = self._step(ids, len(ids)), len(ids)
        return self.token

    def step(self):
        self.total += 1
        self.token = self._step([self.token], self.total)
        return self.token

    def run(self, ids):
        c0, t0 = time.process_time(), time.perf_counter()
        seq = [self.start(ids)]
        t1, c1 = time.perf_counter(), time.process_time()
        while len(seq) < NEW_TOKENS:
            seq.append(self.step())
        t2, c2 = time.perf_counter(), time.process_time()
        return t1 - t0, t2 - t1, len(seq) - 1, seq, c1 - c0, c2 - c1


# ------------------------------------------------------------------------------------------------
def summarize(runs):
    ttft = [r[0] for r in runs]
    dec = [r[2] / r[1] for r in runs]
    pre = [PROMPT_LEN / r[0] for r in runs]
    return {
        "rounds": len(runs),
        "ttft_s_median": round(statistics.median(ttft), 4), "ttft_s_min": round(min(ttft), 4),
        "prefill_tok_s_median": round(statistics.median(pre), 1), "prefill_tok_s_max": round(max(pre), 1),
        "decode_tok_s_median": round(statistics.median(dec), 2), "decode_tok_s_max": round(max(dec), 2),
        "decode_ms_per_token_median": round(1000 / statistics.median(dec), 2),
        "decode_ms_per_token_min": round(1000 / max(dec), 2),
        "all_ttft_s": [round(x, 4) for x in ttft], "all_decode_tok_s": [round(x, 2) for x in dec],
        # process CPU seconds (all threads): the work done, less sensitive to a busy machine
        # than wall time when spinning is off (--spin off); with spinning it counts spin too
        "prefill_cpu_s_median": round(statistics.median(r[4] for r in runs), 4),
        "decode_cpu_ms_per_token_median": round(statistics.median(
            1000 * r[5] / r[2] for r in runs), 2),
    }


STEP_KEYS = ("prefill", "prefill_cpu", "step", "step_cpu")  # what --interleave steps times


def interleave_steps(runners, ids, rounds: int):
    """--interleave steps: per round, every runner prefills (order alternating between rounds),
    then the runners take turns one decode step at a time (the order alternating every step), so
    that consecutive steps of two runtimes are a few ms apart and a drift of the machine hits both
    alike. Each step's wall and process-CPU time is kept; the caller pairs them."""
    times = {r.name: {k: [] for k in STEP_KEYS} for r in runners}
    tokens = {r.name: [] for r in runners}
    for i in range(rounds):
        for r in (runners if i % 2 == 0 else runners[::-1]):
            t, c = time.perf_counter(), time.process_time()
            tok = r.start(ids)
            times[r.name]["prefill"].append(time.perf_counter() - t)
            times[r.name]["prefill_cpu"].append(time.process_time() - c)
            tokens[r.name] = [tok]
        for k in range(NEW_TOKENS - 1):
            for r in (runners if (i + k) % 2 == 0 else runners[::-1]):
                t, c = time.perf_counter(), time.process_time()
                tok = r.step()
                times[r.name]["step"].append(time.perf_counter() - t)
                times[r.name]["step_cpu"].append(time.process_time() - c)
                tokens[r.name].append(tok)
        print(f"round {i + 1}/{rounds}: " + ", ".join(
            f"{r.name} prefill {times[r.name]['prefill'][-1] * 1000:.1f} ms, step median "
            f"{statistics.median(times[r.name]['step'][-(NEW_TOKENS - 1):]) * 1000:.2f} ms"
            for r in runners), flush=True)
    return times, tokens


def paired(a: list[float], b: list[float]) -> dict:
    """b/a over paired samples (the same step or round of two runtimes): the median of the
    per-pair ratios, and its spread as the interquartile range of those ratios."""
    r = sorted(y / x for x, y in zip(a, b))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return {"median": round(q[1], 3), "q1": round(q[0], 3), "q3": round(q[2], 3), "pairs": len(r)}


def main(argv=None):
    global PROMPT_LEN, NEW_TOKENS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", action="append", default=None,
                    help="g3export ONNX build (fp32, cpu); default builds/270m. Repeat it to time "
                         "several builds side by side (e.g. before/after a graph change)")
    ap.add_argument("--genai-dir", default="/work/bench_art/genai270m",
                    help="GenAI's fp32 model folder ('' leaves it out of a run)")
    ap.add_argument("--genai-int4-dir", default="/work/bench_art/genai270m-int4",
                    help="GenAI's int4 build (--prepare writes it; '' skips it in a run)")
    ap.add_argument("--hf-dir", default="/work/bench_art/hf270m", help="HF folder written from the GGUF")
    ap.add_argument("--cache-dir", default=None, help="GenAI builder cache (default: beside --genai-dir)")
    ap.add_argument("--prepare", action="store_true", help="write --hf-dir and run GenAI's builder")
    ap.add_argument("--force", action="store_true", help="with --prepare: redo existing outputs")
    ap.add_argument("--prompt-len", type=int, default=PROMPT_LEN, help="(the benchmark: 512)")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="(the benchmark: 64)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per runtime (interleaved)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds per runtime first")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="ORT intra-op threads for both (default: CPUs available = %(default)s)")
    ap.add_argument("--spin", choices=["default", "on", "off"], default="default",
                    help="ORT intra-op thread spinning for both (off suits a machine shared with "
                         "other busy processes; default: ORT's, which spins)")
    ap.add_argument("--interleave", choices=["runs", "steps"], default="runs",
                    help="runs (the headline): each round times one whole generation per runtime; "
                         "steps: the runtimes take turns every decode step (interleave_steps), "
                         "and ratios are medians over paired steps: resolves a few %% on a noisy "
                         "machine")
    ap.add_argument("--genai-graph", action="store_true",
                    help="also run each GenAI graph through onnxruntime's Python API, as g3export "
                         "runs its own (GenAIGraph): same graph as GenAI, same harness as ours")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-genai", action="store_true")
    ap.add_argument("--bandwidth-bytes", type=int, default=1 << 30)
    ap.add_argument("--json", default=None, help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    PROMPT_LEN, NEW_TOKENS = args.prompt_len, args.new_tokens

    if args.prepare:
        from genai_prepare import prepare  # beside this script

        prepare(args)
        return 0

    build_dirs = [Path(d) for d in (args.build_dir or ["builds/270m"])]
    genai_dirs = [(Path(d), dtype) for d, dtype in ((args.genai_dir, "fp32"),
                                                    (args.genai_int4_dir, "int4")) if d]
    hf_dir = Path(args.hf_dir)
    if args.skip_ours and args.skip_genai:
        ap.error("nothing to time")
    for name, least in (("rounds", 1), ("warmup", 0), ("prompt_len", 1), ("new_tokens", 2)):
        if getattr(args, name) < least:
            ap.error(f"--{name.replace('_', '-')} must be at least {least}")
    from bench_inputs import check_genai_dir  # beside this script

    for d, _ in genai_dirs if not args.skip_genai else []:
        check_genai_dir(ap, d)
    for build_dir in build_dirs if not args.skip_ours else []:
        if not (build_dir / "manifest.json").exists():
            ap.error(f"{build_dir}: not a g3export build; "
                     f"g3export build --size 270m --target onnx --out {build_dir}")

    mach = machine()
    print(f"machine: {mach['nproc']} CPUs, {mach['cpu_model']}, load {mach['loadavg']}", flush=True)
    runners = []
    if not args.skip_ours:
        for build_dir in build_dirs:
            runners.append(Ours(build_dir, args.threads, args.spin, f"g3export[{build_dir.name}]"))
    if not args.skip_genai:
        for d, dtype in genai_dirs:
            runners.append(GenAI(d, args.threads, args.spin, dtype))
        if args.genai_graph:
            for d, dtype in genai_dirs:
                runners.append(GenAIGraph(d, args.threads, args.spin, dtype))
    if len({r.name for r in runners}) != len(runners):
        ap.error("two runners share a name (two --build-dir with the same folder name?)")
    for r in runners:
        print(f"loaded {r.name} ({r.dtype}) in {r.load_s:.2f}s; settings {r.settings}", flush=True)

    # the same ordinary-text prompt for all (as `g3export bench`: fixed seed, ids above the
    # control tokens and below the unused/image ranges)
    hi = min([200_000] + [r.vocab for r in runners])
    ids = np.random.default_rng(0).integers(min(1000, hi // 2), hi, size=PROMPT_LEN).tolist()

    for _ in range(args.warmup):
        for r in runners:
            r.run(ids)
    if args.interleave == "steps":
        return report_steps(args, runners, ids, mach)
    results = {r.name: [] for r in runners}
    tokens = {}
    for i in range(args.rounds):
        order = runners if i % 2 == 0 else runners[::-1]  # alternate who goes first
        for r in order:
            out = r.run(ids)
            results[r.name].append(out)
            tokens[r.name] = out[3]
            print(f"round {i + 1}/{args.rounds} {r.name:24s} ttft {out[0] * 1000:7.1f} ms  "
                  f"prefill {PROMPT_LEN / out[0]:6.1f} tok/s  decode {out[2] / out[1]:6.2f} tok/s  "
                  f"cpu s prefill {out[4]:.3f} decode {out[5]:.3f}",
                  flush=True)

    bw1 = copy_bandwidth_gbps(args.bandwidth_bytes)
    bwn = copy_bandwidth_gbps(args.bandwidth_bytes, threads=args.threads) if args.threads > 1 else bw1
    bw = max(bw1, bwn)
    ours = [r for r in runners if isinstance(r, Ours)]
    text_cfg = ours[0].session.config.text if ours else None
    nbytes, what = decode_bytes_per_token(hf_dir if hf_dir.exists() else None, text_cfg)
    summary = {name: summarize(rs) for name, rs in results.items()}
    # every runtime's decode against the bound of its own bytes per token
    bound = {}
    for r in runners:
        b, counted = decode_bytes_per_token(hf_dir if hf_dir.exists() else None, text_cfg,
                                            r.weights_file)
        tok_s = bw * 1e9 / b
        s_ = summary[r.name]
        bound[r.name] = {"dtype": r.dtype, "bytes_per_decode_token": b, "counted": counted,
                         "decode_tok_s_bound": round(tok_s, 1),
                         "decode_fraction_of_bound_median": round(s_["decode_tok_s_median"] / tok_s, 3),
                         "decode_fraction_of_bound_best": round(s_["decode_tok_s_max"] / tok_s, 3)}
    report = {
        "benchmark": "gemma3 270m cpu", "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
        "threads": args.threads, "spin": args.spin, "machine": {**mach, "loadavg_end": machine()["loadavg"]},
        "settings": {r.name: r.settings for r in runners},
        "load_s": {r.name: round(r.load_s, 2) for r in runners},
        "results": summary,
        "memory_bound": {"bytes_per_decode_token_fp32_params": nbytes, "counted": what,
                         "copy_bandwidth_GBps": round(bw, 1),
                         "copy_bandwidth_GBps_1_thread": round(bw1, 1),
                         f"copy_bandwidth_GBps_{args.threads}_threads": round(bwn, 1),
                         "decode_tok_s_bound_fp32_params": round(bw * 1e9 / nbytes, 1),
                         "per_runtime": bound},
        "ratios_ours_over_genai": {},
    }
    # each g3export build against GenAI's build of the same dtype (fp32 with fp32, int4 with int4)
    genai = {r.dtype: r.name for r in runners if isinstance(r, GenAI)}
    for r in [r for r in runners if not isinstance(r, GenAI)]:  # builds, then --genai-graph
        if r.dtype not in genai:
            continue
        o, g = summary[r.name], summary[genai[r.dtype]]
        a, b = tokens[r.name], tokens[genai[r.dtype]]
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        report["ratios_ours_over_genai"][r.name] = {
            "against": genai[r.dtype],
            "decode_tok_s_median": round(o["decode_tok_s_median"] / g["decode_tok_s_median"], 3),
            "decode_tok_s_best": round(o["decode_tok_s_max"] / g["decode_tok_s_max"], 3),
            "prefill_tok_s_median": round(o["prefill_tok_s_median"] / g["prefill_tok_s_median"], 3),
            "prefill_tok_s_best": round(o["prefill_tok_s_max"] / g["prefill_tok_s_max"], 3),
            "prefill_cpu_s_genai_over_ours": round(
                g["prefill_cpu_s_median"] / o["prefill_cpu_s_median"], 3),
            "decode_cpu_ms_genai_over_ours": round(
                g["decode_cpu_ms_per_token_median"] / o["decode_cpu_ms_per_token_median"], 3),
            "greedy_tokens_agree_first_n": same,
        }

    # table
    print()
    w = max(10, *(len(n) for n in summary))
    print(f"{'runtime':{w}s} {'TTFT ms med/min':>17s} {'prefill tok/s med/max':>23s} "
          f"{'decode tok/s med/max':>22s} {'ms/token med':>13s} {'MB/token':>9s} "
          f"{'bound tok/s':>11s} {'of bound med/best':>18s}")
    for name, s_ in summary.items():
        bd = bound[name]
        print(f"{name:{w}s} {s_['ttft_s_median'] * 1000:8.1f}/{s_['ttft_s_min'] * 1000:<8.1f} "
              f"{s_['prefill_tok_s_median']:11.1f}/{s_['prefill_tok_s_max']:<11.1f} "
              f"{s_['decode_tok_s_median']:10.2f}/{s_['decode_tok_s_max']:<11.2f} "
              f"{s_['decode_ms_per_token_median']:13.2f} {bd['bytes_per_decode_token'] / 1e6:9.1f} "
              f"{bd['decode_tok_s_bound']:11.1f} {bd['decode_fraction_of_bound_median']:8.2f}/"
              f"{bd['decode_fraction_of_bound_best']:<8.2f}")
    for who, rr in report["ratios_ours_over_genai"].items():
        print(f"{who}/{rr['against']}: decode {rr['decode_tok_s_median']:.3f} (median), "
              f"{rr['decode_tok_s_best']:.3f} (best); prefill {rr['prefill_tok_s_median']:.3f} "
              f"(median), {rr['prefill_tok_s_best']:.3f} (best); CPU-time ratio "
              f"{rr['against']}/ours prefill {rr['prefill_cpu_s_genai_over_ours']:.3f}, decode "
              f"{rr['decode_cpu_ms_genai_over_ours']:.3f}; greedy tokens agree for the "
              f"first {rr['greedy_tokens_agree_first_n']}")
    print(f"memory bound: copy bandwidth {bw:.1f} GB/s (best of numpy copy, read+write, "
          f"1 thread {bw1:.1f}, {args.threads} threads {bwn:.1f}); bound = bandwidth / "
          f"bytes read per decode token of each build (weights in the graph + KV)")
    print(f"load average at start {mach['loadavg']}, at end {report['machine']['loadavg_end']}")
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _paired_text(rr: dict) -> str:
    return "; ".join(f"{k} {rr[k]['median']:.3f} [{rr[k]['q1']:.3f}, {rr[k]['q3']:.3f}]"
                     for k in STEP_KEYS)


def report_steps(args, runners, ids, mach) -> int:
    """The --interleave steps report: per runtime the median prefill and decode-step times (wall
    and CPU), and for each g3export build against GenAI's build of the same dtype the paired
    ratios GenAI time / ours (> 1: ours is faster) over rounds (prefill) and steps (decode)."""
    times, tokens = interleave_steps(runners, ids, args.rounds)
    med = {n: {k: round(1000 * statistics.median(v), 3) for k, v in t.items()}
           for n, t in times.items()}
    report = {"benchmark": "gemma3 270m cpu, step-interleaved", "prompt_len": PROMPT_LEN,
              "new_tokens": NEW_TOKENS, "rounds": args.rounds, "threads": args.threads,
              "spin": args.spin, "machine": {**mach, "loadavg_end": machine()["loadavg"]},
              "settings": {r.name: r.settings for r in runners},
              "median_ms": med, "ratios_genai_time_over_ours": {}}
    genai = {r.dtype: r.name for r in runners if isinstance(r, GenAI)}
    print(f"\n{'runtime':32s} {'prefill ms':>11s} {'cpu':>8s} {'step ms':>9s} {'cpu':>8s}")
    for n, m in med.items():
        print(f"{n:32s} {m['prefill']:11.1f} {m['prefill_cpu']:8.1f} {m['step']:9.2f} "
              f"{m['step_cpu']:8.2f}")
    for r in runners:
        if isinstance(r, GenAI) or r.dtype not in genai:
            continue
        o, g = times[r.name], times[genai[r.dtype]]
        a, b = tokens[r.name], tokens[genai[r.dtype]]
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        rr = {"against": genai[r.dtype], "greedy_tokens_agree_first_n": same,
              **{k: paired(o[k], g[k]) for k in STEP_KEYS}}
        report["ratios_genai_time_over_ours"][r.name] = rr
        print(f"{r.name}/{rr['against']} (GenAI time / ours, > 1 = ours faster; median [IQR]): "
              f"{_paired_text(rr)}; greedy tokens agree for the first {same}")
    # and every further g3export build against the first one of its dtype (an A/B of graphs)
    first = {}
    for r in runners:
        if isinstance(r, GenAI):
            continue
        if r.dtype not in first:
            first[r.dtype] = r.name
            continue
        o, b = times[first[r.dtype]], times[r.name]
        rr = {"against": first[r.dtype], **{k: paired(o[k], b[k]) for k in STEP_KEYS}}
        report.setdefault("ratios_build_over_first_build", {})[r.name] = rr
        print(f"{r.name}/{rr['against']} (time of this build / the first, < 1 = this one faster; "
              f"median [IQR]): {_paired_text(rr)}")
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
