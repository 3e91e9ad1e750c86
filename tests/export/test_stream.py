"""Weights stream through the export (DESIGN §3.6): a streamed build (model on the meta device,
weights from a source) writes the same bytes as a build of the materialised model; the export
does not hold the weights (peak RSS of a child build); bad tensors are refused as they stream;
an interrupted build leaves nothing that runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from g3export.export import stream
from g3export.export.build import build
from g3export.export.manifest import BuildError, load_build
from g3export.modeling import sources
from g3export.modeling.config import preset
from g3export.modeling.sources import CheckpointError, RandomSource
from g3export.modeling.weights import build_model, open_weights
from tests.multimodal import _hub_named_copy, models  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[2]
MAX_CONTEXT = 32


def _data(out: Path, file: str = "text.onnx.data") -> bytes:
    return (out / file).read_bytes()


@pytest.fixture(scope="module")
def reference_build(tmp_path_factory):
    """The tiny random model built from its materialised weights (the path before streaming)."""
    out = tmp_path_factory.mktemp("ref") / "b"
    build(build_model("tiny", weights="random", seed=3), None, out, max_context=MAX_CONTEXT,
          progress=False)
    return out


def test_random_source_equals_random_weights(monkeypatch):
    """RandomSource's blocks (any block size, chunk boundaries inside blocks) are random_weights'
    values: a streamed random build is the build of the materialised random model."""
    monkeypatch.setattr(sources, "NORMAL_CHUNK", 1000)  # many chunk joins inside a tensor
    model = build_model("tiny", weights="random", seed=5)
    meta, src = open_weights("tiny", weights="random", seed=5)
    assert isinstance(src, RandomSource)
    for name, p in model.named_parameters():
        for max_bytes in (4 * 64 * 3, 1 << 30):
            got = torch.cat([b.reshape(-1, *p.shape[1:]) if p.dim() > 1 else b
                             for _, b in src.blocks(name, max_bytes)])
            assert torch.equal(got, p), name


@pytest.mark.parametrize("block_bytes", [None, 4096])
def test_streamed_build_writes_the_same_bytes(reference_build, tmp_path, monkeypatch, block_bytes):
    """Meta model + RandomSource -> the same text.onnx.data as the materialised model's build;
    4096-byte blocks force the strided writes of the transposed embedding and fused weights."""
    if block_bytes is not None:
        monkeypatch.setattr(stream, "BLOCK_BYTES", block_bytes)
    model, src = open_weights("tiny", weights="random", seed=3)
    assert all(p.is_meta for p in model.parameters())
    out = build(model, None, tmp_path / "s", max_context=MAX_CONTEXT, progress=False, weights=src)
    assert all(p.is_meta for p in model.parameters())  # nothing was materialised
    assert _data(out) == _data(reference_build)
    assert (out / "text.onnx").read_bytes() == (reference_build / "text.onnx").read_bytes()
    b = load_build(out)  # the streamed hashes are the files' hashes
    assert b.manifest.to_dict()["files"] == json.loads(
        (reference_build / "manifest.json").read_text())["files"]


def test_streamed_hf_build_equals_materialised(hf_tiny_causal, tmp_path):
    """A sharded HF checkpoint streamed (header-checked, read per block) writes what the
    build of the loaded model writes."""
    _, ckpt = hf_tiny_causal
    a = build(build_model(checkpoint=ckpt), None, tmp_path / "a", max_context=MAX_CONTEXT,
              progress=False)
    model, src = open_weights(checkpoint=ckpt)
    b = build(model, None, tmp_path / "b", max_context=MAX_CONTEXT, progress=False, weights=src)
    assert _data(a) == _data(b)


def test_streamed_gguf_build_equals_materialised(hf_tiny_causal, tmp_path):
    """A GGUF (Q8_0 weights, llama.cpp's 1 + w norms) dequantized per block while streaming
    writes what the build of the loaded model writes."""
    from tests.modeling.test_weights import _write_gguf

    path = _write_gguf(tmp_path / "tiny.gguf", hf_tiny_causal[0])
    a = build(build_model(checkpoint=path), None, tmp_path / "a", max_context=MAX_CONTEXT,
              progress=False)
    model, src = open_weights(checkpoint=path)
    b = build(model, None, tmp_path / "b", max_context=MAX_CONTEXT, progress=False, weights=src)
    assert _data(a) == _data(b)


def test_streamed_multimodal_builds_equal_materialised(models, tmp_path):
    """Gemma3ForConditionalGeneration as transformers saved it and in Hub naming
    (`vision_tower.vision_model.*`): streamed text and vision weights equal the loaded model's."""
    _, _, ckpt, _ = models
    hub = _hub_named_copy(ckpt, tmp_path / "hub")
    ref = build(build_model(checkpoint=ckpt), None, tmp_path / "ref", max_context=MAX_CONTEXT,
                progress=False)
    for i, c in enumerate((ckpt, hub)):
        model, src = open_weights(checkpoint=c)
        out = build(model, None, tmp_path / f"s{i}", max_context=MAX_CONTEXT, progress=False,
                    weights=src)
        for f in ("text.onnx.data", "vision.onnx.data"):
            assert _data(out, f) == _data(ref, f), (c, f)


# --- bad tensors ---------------------------------------------------------------------------


def _corrupt_copy(ckpt: Path, dst: Path, how: str) -> tuple[Path, str]:
    """A copy of a sharded checkpoint with one weight replaced: int32 or holding a NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(ckpt, dst)
    idx = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.2.mlp.up_proj.weight"
    f = dst / idx[key]
    sd = load_file(f)
    if how == "int":
        sd[key] = torch.zeros(sd[key].shape, dtype=torch.int32)
    else:
        sd[key] = sd[key].clone()
        sd[key][3, 5] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    return f, key


@pytest.mark.parametrize("how,what", [("int", "int32, not a floating-point"), ("nan", "NaN")])
def test_bad_tensor_refused_while_streaming(hf_tiny_causal, tmp_path, how, what):
    f, key = _corrupt_copy(hf_tiny_causal[1], tmp_path / "ckpt", how)
    model, src = open_weights(checkpoint=tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=what) as e:
        build(model, None, tmp_path / "out", max_context=MAX_CONTEXT, progress=False, weights=src)
    assert key in str(e.value) and str(f) in str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=what):  # the eager loader checks the same way
        build_model(checkpoint=tmp_path / "ckpt")


# --- memory --------------------------------------------------------------------------------

_STATUS = r"""
import json, sys

def status(key):  # VmRSS now, VmHWM the peak of this process's own address space: not
    # ru_maxrss, which Linux carries over fork + execve from the (large) pytest parent
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
"""

_CHILD = _STATUS + r"""
from g3export.modeling.config import ModelConfig, _text
from g3export.modeling.weights import open_weights
from g3export.export.build import build

# 2 layers, a 262144 x 3072 embedding: ~1.7 GB of bf16 weights, most of it in one tensor
cfg = ModelConfig("mem", _text(2, 3072, 4096, 4, 1, 256, 16, 1.0, 4096))
model, src = open_weights(cfg, weights="random")
before = status("VmRSS")
out = build(model, None, sys.argv[1], dtype="bf16", max_context=64, progress=False, weights=src)
peak = status("VmHWM")
print(json.dumps({"before": before, "peak": peak}))
"""


def test_export_does_not_hold_the_weights(tmp_path):
    """A child builds ~1.7 GB of bf16 weights (mostly the [1, hidden, vocab] embedding, written
    strided); its peak resident set grows by well under the bytes it writes. The build before
    streaming held them ~1.8 times over."""
    out = tmp_path / "mem"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(out)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    weights = sum(p.stat().st_size for p in out.glob("*.data"))
    assert weights > 1.6e9
    growth = m["peak"] - m["before"]
    assert growth < 0.35 * weights, (growth / 1e6, weights / 1e6)


_QUANT_CHILD = _STATUS + r"""
from g3export.export.calibrate import LINEARS
from g3export.export.onnx_export import export_text
from g3export.export.quantize import QuantScheme
from g3export.export.trt import plan_engines
from g3export.modeling.config import ModelConfig, _text
from g3export.modeling.memory import param_count
from g3export.modeling.weights import open_weights

# 1 layer with a 65536-wide MLP (three 134M-element weights, stored [K, N]: written as strided
# column blocks) and a 32768 x 2048 embedding (the DQ path's rows layout): ~0.96 GB of bf16
cfg = ModelConfig("memq", _text(1, 2048, 65536, 8, 1, 256, 16, 1.0, 4096, vocab=32768))
model, src = open_weights(cfg, weights="random")
scheme = sys.argv[2]
plan = plan_engines(cfg, "trt-rtx", "bf16", 64, attention="native", compute_capabilities=["8.9"])
amax = {f"language_model.layers.0.{n}": 1.0 for n in LINEARS}  # calibration is not measured
before = status("VmRSS")
export_text(model, sys.argv[1], 64, "bf16", progress=False, weights=src,
            quant=QuantScheme(scheme, None if scheme == "fp8" else 32, scheme != "fp8"),
            activation_amax=amax, **plan.export_options())
print(json.dumps({"before": before, "peak": status("VmHWM"), "weights": 2 * param_count(cfg)}))
"""


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_tensorrt_quantized_export_does_not_hold_the_weights(tmp_path, scheme):
    """The TensorRT layouts of --quant int4/int8 (blocked DequantizeLinear on W^T [K, N]) and
    fp8 (E4M3 W^T [K, N], per-channel scales) quantize row block by row block as the weights
    stream: the child's peak grows by well under the model's bf16 bytes. Quantizing one whole
    134M-element MLP weight at once (the path before) takes ~1.5 GB of float32 temporaries."""
    out = tmp_path / scheme
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _QUANT_CHILD, str(out), scheme],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["weights"] > 0.9e9 and (out / "text.onnx.data").stat().st_size > 0.2e9
    growth = m["peak"] - m["before"]
    print(f"{scheme}: peak growth {growth / 1e6:.0f} MB for {m['weights'] / 1e6:.0f} MB of bf16 "
          "weights")
    # measured 306-308 MB (one 32 MB float32 block and its quantization temporaries, the
    # trace); the whole-tensor path before grew by 1719 MB (int4; BENCHMARKS.md §10.2)
    assert growth < 0.5 * m["weights"], (growth / 1e6, m["weights"] / 1e6)


# --- interruption --------------------------------------------------------------------------


def _kill_when(tmp_path: Path, out: Path, ready) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "g3export.cli", "build", "--size", "tiny", "--weights", "random",
         "--max-context", "32", "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the build finished before the kill point"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


@pytest.mark.parametrize("point", ["partial dir", "weights streaming", "graph written"])
def test_sigkill_during_a_streaming_build_leaves_nothing_that_runs(tmp_path, point):
    out = tmp_path / "tiny"

    def partial():
        return [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    def ready():
        ps = partial()
        if not ps:
            return False
        if point == "partial dir":
            return True
        if point == "weights streaming":
            return (ps[0] / "text.onnx.data").exists()
        return (ps[0] / "text.onnx").exists()

    _kill_when(tmp_path, out, ready)
    assert not out.exists()
    with pytest.raises(BuildError):
        load_build(out)
    for p in partial():
        with pytest.raises(BuildError, match="interrupted build"):
            load_build(p)
