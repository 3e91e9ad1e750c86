"""`g3export build --target trt-rtx` end to end (issue 7): the CLI on a tiny random HF
Gemma3ForCausalLM checkpoint (both layer types, window 8) with `--attention plugin` and
`--attention native` builds a complete directory (ONNX kept, engine serialized by TensorRT-RTX's
CPU-only ahead-of-time build, manifest with the `tensorrt` section, hashes); the build's own ONNX
graphs, run by ONNX Runtime on CPU through the same generation loop (the native one with the
engine's chunk limits: prefill chunks aligned to the window; the plugin one with its plugin nodes
mapped to the reference op), give the PyTorch reference's greedy tokens past the window; the
engine runtime refuses a GPU-less machine with a clear message; an engine holds each weight once
(engine bytes <= 1.1x the weight bytes on an embedding-dominated config). The real 270M is a slow
test that prints build time, engine bytes and peak RSS, and checks the same 1.1x bound.

Everything that runs TensorRT skips, with the reason, when `tensorrt_rtx` is not importable
(`pip install 'g3export[trt-rtx]'`).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from g3export.export.trt import TensorRTMissing, require_tensorrt

try:
    require_tensorrt("trt-rtx")
    _WHY = ""
except TensorRTMissing as e:
    _WHY = f"TensorRT-RTX is not installed ({str(e).splitlines()[0]})"

pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "TensorRT-RTX missing")

MAX_CONTEXT = 48
WINDOW = 8


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from g3export.cli import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def builds(hf_tiny_causal, tmp_path_factory) -> dict[str, Path]:
    """plugin/native builds in bf16 (the TensorRT default) and in fp32 (for ONNX Runtime on CPU)."""
    _, ck = hf_tiny_causal
    root = tmp_path_factory.mktemp("trt_builds")
    out = {}
    for attention in ("plugin", "native"):
        for dtype in ("bf16", "fp32"):
            name = f"{attention}-{dtype}"
            proc = _cli("build", "--checkpoint", str(ck), "--target", "trt-rtx", "--attention",
                        attention, "--dtype", dtype, "--max-context", str(MAX_CONTEXT),
                        "--compute-capability", "8.6", "--compute-capability", "12.0",
                        "--out", str(root / name), cwd=root)
            assert proc.returncode == 0, proc.stderr[-3000:]
            out[name] = root / name
    return out


@pytest.mark.parametrize("attention", ["plugin", "native"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cli_build_is_complete(builds, attention, dtype):
    from g3export.export.manifest import load_build

    b = load_build(builds[f"{attention}-{dtype}"])  # sizes and sha256 of every file checked
    assert b.target == "trt-rtx" and b.dtype == dtype
    files = b.manifest.to_dict()["files"]
    assert {"text.onnx", "text.onnx.data", "text.engine", "manifest.json"} - {"manifest.json"} \
        <= set(files)
    t = b.manifest.to_dict()["tensorrt"]
    assert t["flavour"] == "trt-rtx" and t["library"] == "tensorrt_rtx"
    assert t["version"].startswith("1.7") and t["compute_capabilities"] == ["8.6", "12.0"]
    assert t["attention"] == attention and t["strongly_typed"] is True
    if attention == "plugin":
        assert t["plugin"] == {"name": "G3Attention", "namespace": "g3", "version": "1"}
        assert t["prefill_chunk"] == MAX_CONTEXT and t["chunk_align"] is None
    else:
        assert "plugin" not in t and t["opset"] == 24
        assert t["prefill_chunk"] == WINDOW and t["chunk_align"] == WINDOW
    e = t["engines"]["text"]
    assert e["file"] == "text.engine" and e["onnx"] == "text.onnx"
    assert e["bytes"] == files["text.engine"]["size"] > 0
    [profile] = e["profiles"]  # ONE profile: prefill and decode run in it (issue 12)
    assert profile["name"] == "text"
    assert profile["shapes"]["input_ids"] == [[1, 1], [1, 1], [1, t["prefill_chunk"]]]
    assert b.tensorrt.engines["text"].profile_for(1, t["prefill_chunk"]) == 0
    layers = e["layer_types"]
    if attention == "plugin":
        assert layers.get("PLUGIN_V3") == 6  # every attention layer is the plugin
    else:  # TensorRT's own attention and KV-cache-update layers
        assert layers.get("ATTENTION_INPUT") == 6 and layers.get("KV_CACHE_UPDATE") == 12
    assert e["build_seconds"] > 0 and e["peak_rss_mb"] > 0


def test_engine_runtime_refuses_without_gpu(builds):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from g3export.runtimes.loader import open_build
    from g3export.runtimes.trt_session import GpuRequired

    with pytest.raises(GpuRequired, match="needs an NVIDIA GPU.*--target onnx"):
        open_build(builds["native-bf16"])
    proc = _cli("run", str(builds["plugin-bf16"]), "--prompt-ids", "2,5,6", cwd=builds["plugin-bf16"].parent)
    assert proc.returncode != 0 and "needs an NVIDIA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_native_prefill_chunk_longer_than_window_refused(hf_tiny_causal, tmp_path):
    _, ck = hf_tiny_causal
    proc = _cli("build", "--checkpoint", str(ck), "--target", "trt-rtx", "--attention", "native",
                "--prefill-chunk", str(WINDOW + 1), "--max-context", str(MAX_CONTEXT),
                "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert proc.returncode != 0 and "sliding window" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob("b.partial-*"))
    proc = _cli("build", "--checkpoint", str(ck), "--target", "trt-rtx", "--timing-cache",
                str(tmp_path / "tc"), "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert proc.returncode != 0 and "timing-cache" in proc.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "tc").exists()


# ---------------------------------------------------------------------------------------------
# The build's own graphs on ONNX Runtime (CPU), through the generation loop


def _session_over(build_dir: Path, onnx_path: Path):
    """An OrtSession over `onnx_path` with the build's config and I/O, carrying the TensorRT
    engine's chunk limits (what TrtSession sets) so generate() chunks exactly as on the GPU."""
    from g3export.export.manifest import load_build
    from g3export.runtimes.ort_session import OrtSession

    b = load_build(build_dir)
    t = b.tensorrt
    sess = OrtSession(b.config, onnx_path, b.component("text"), b.max_context, b.dtype,
                      max_chunk=None)
    sess.prefill_chunk, sess.chunk_align = t.prefill_chunk, t.chunk_align
    return sess


def _chunks_seen(sess) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    orig = sess.forward

    def spy(ids, start, feats=None):
        seen.append((start, ids.shape[1]))
        return orig(ids, start, feats)

    sess.forward = spy
    return seen


@pytest.fixture(scope="module")
def reference(hf_tiny_causal):
    from g3export.modeling.weights import build_model
    from g3export.runtimes.reference import TorchSession

    _, ck = hf_tiny_causal
    return TorchSession(build_model(checkpoint=str(ck)), MAX_CONTEXT)


PROMPT = [2, *np.random.default_rng(3).integers(4, 512, 26).tolist()]  # 27 tokens: 3+ windows


def test_native_graph_on_ort_gives_reference_tokens(builds, reference):
    from g3export.runtimes.generate import generate

    d = builds["native-fp32"]
    sess = _session_over(d, d / "text.onnx")
    seen = _chunks_seen(sess)
    got = generate(sess, PROMPT, 16, stop_ids=[]).token_ids
    prefill = [c for c in seen if c[0] < len(PROMPT)]
    assert prefill == [(0, 8), (8, 8), (16, 8), (24, 3)]  # aligned to the window, no wrap
    assert len(PROMPT) + 16 > 2 * WINDOW and got == generate(reference, PROMPT, 16, stop_ids=[]).token_ids


def test_native_alignment_with_an_offset_start(builds, reference):
    """A chunk limit shorter than the window still never crosses a window boundary."""
    from g3export.runtimes.generate import generate

    d = builds["native-fp32"]
    sess = _session_over(d, d / "text.onnx")
    sess.prefill_chunk = 5
    seen = _chunks_seen(sess)
    got = generate(sess, PROMPT, 6, stop_ids=[]).token_ids
    assert [c for c in seen if c[0] < len(PROMPT)] == [(0, 5), (5, 3), (8, 5), (13, 3), (16, 5),
                                                      (21, 3), (24, 3)]
    assert got == generate(reference, PROMPT, 6, stop_ids=[]).token_ids


def test_plugin_graph_mapped_to_reference_gives_reference_tokens(builds, reference, tmp_path):
    import onnx_ir as ir

    from g3export.export import trt_plugin
    from g3export.export.onnx_export import save_with_external_data
    from g3export.runtimes.generate import generate

    d = builds["plugin-fp32"]
    m = ir.load(str(d / "text.onnx"))
    assert trt_plugin.plugin_to_reference(m) == 6
    save_with_external_data(m, tmp_path / "text.onnx", progress=False)
    sess = _session_over(d, tmp_path / "text.onnx")
    got = generate(sess, PROMPT, 16, stop_ids=[], chunk_size=11).token_ids
    assert got == generate(reference, PROMPT, 16, stop_ids=[]).token_ids


# ---------------------------------------------------------------------------------------------
# The real 270M (slow): build time, engine bytes, peak RSS (printed for BENCHMARKS.md)


def build_270m(tmp_path: Path, label: str, *args: str) -> dict:
    """`g3export build --size 270m --target trt-rtx *args` in a child; prints build time, engine
    bytes and peak RSS (for BENCHMARKS.md) and returns the manifest."""
    out = tmp_path / "270m"
    t0 = time.perf_counter()
    proc = _cli("build", "--size", "270m", "--target", "trt-rtx", *args, "--out", str(out),
                cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    man = json.loads((out / "manifest.json").read_text())
    e = man["tensorrt"]["engines"]["text"]
    print(f"\n270m trt-rtx {label} {man['dtype']}: build {seconds:.1f} s (engine step "
          f"{e['build_seconds']:.1f} s), engine {e['bytes']} bytes, text.onnx.data "
          f"{man['files']['text.onnx.data']['size']} bytes, peak RSS {peak_mb:.0f} MiB "
          f"(largest child so far)")
    return man


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["plugin", "native"])
def test_270m_builds_with_tensorrt_rtx(tmp_path, attention):
    man = build_270m(tmp_path, attention, "--attention", attention)
    e = man["tensorrt"]["engines"]["text"]
    assert e["bytes"] > 100 << 20
    weights = man["files"]["text.onnx.data"]["size"]
    # each weight once: one embedding copy (BENCHMARKS.md §4.1) and one optimization profile
    # (TensorRT-RTX keeps the per-layer weights once per profile; §4.2)
    assert e["bytes"] <= 1.1 * weights, f"engine {e['bytes'] / weights:.2f}x the weights"


# ---------------------------------------------------------------------------------------------
# Engines hold each weight once (issue 12): an embedding-dominated config


def test_engine_holds_each_weight_once(tmp_path):
    """The tiny preset with a 262144 x 512 bf16 embedding (268 MB of 270 MB of weights): the engine
    is at most 1.1x the weight bytes. With the ONNX Runtime embedding layout ([1, hidden, vocab],
    Gather(axis=2) + MatMul) TensorRT-RTX stored the embedding twice (2.4x on the 64-wide version
    of this config; BENCHMARKS.md §4). The other ~15 MB of an engine are kernels, whatever the
    model size (the tiny preset's engine), hence a config where the weights are ~18x that."""
    import dataclasses

    import torch

    from g3export.export.build import build
    from g3export.export.manifest import load_build
    from g3export.modeling.config import preset
    from g3export.modeling.weights import build_model

    tiny = preset("tiny")
    cfg = dataclasses.replace(tiny, name="tiny-wide-vocab",
                              text=dataclasses.replace(tiny.text, vocab_size=262144,
                                                       hidden_size=512))
    model = build_model(cfg, weights="random", dtype=torch.bfloat16)
    out = build(model, None, tmp_path / "b", target="trt-rtx", dtype="bf16", max_context=32,
                progress=False, trt_options={"attention": "native",
                                             "compute_capabilities": ["12.0"]})
    del model
    b = load_build(out)
    weights = b.manifest.to_dict()["files"]["text.onnx.data"]["size"]
    engine = b.manifest.to_dict()["tensorrt"]["engines"]["text"]["bytes"]
    assert weights > 262144 * 512 * 2
    assert engine <= 1.1 * weights, f"the engine holds {engine / weights:.2f}x the weights"


@pytest.mark.parametrize("attention", ["plugin", "native"])
def test_multimodal_build(tmp_path, attention):
    """A tiny Gemma3ForConditionalGeneration: the text component (taking image features) becomes a
    TensorRT-RTX engine with either translation; the vision component stays ONNX (run by ONNX
    Runtime)."""
    import torch
    import transformers

    from g3export.export.manifest import load_build
    from tests.multimodal import _hf_config

    torch.manual_seed(0)
    ck = tmp_path / "tiny-mm"
    transformers.Gemma3ForConditionalGeneration(_hf_config()).eval().save_pretrained(ck)
    proc = _cli("build", "--checkpoint", str(ck), "--target", "trt-rtx", "--attention", attention,
                "--max-context", "64", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = load_build(tmp_path / "b")
    assert set(b.components) == {"text", "vision"}
    assert b.tensorrt.onnx_only == ["vision"]
    text_inputs = {io.name for io in b.component("text").inputs}
    assert "image_features" in text_inputs and "text.engine" in b.manifest.files
