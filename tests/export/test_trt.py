"""TensorRT groundwork (issue 7): the `native` and `plugin` translations of g3::attention, checked
numerically in ONNX Runtime against the reference op, and compiled by TensorRT-RTX's own ONNX
parser and builder (CPU-only ahead-of-time build: no GPU needed; engines cannot be run here).

Two graph sizes: a standalone two-layer attention graph (one sliding layer W=4, one full layer;
fast) and the tiny preset exported through g3export.export.onnx_export (both layer types, a
prompt past the window, greedy tokens against the PyTorch reference runtime).

Tests that need TensorRT-RTX skip with the reason when `tensorrt_rtx` is not importable
(`pip install 'g3export[trt-rtx]'`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

from g3export.export import onnx_native_attention as native
from g3export.export import trt as trt_mod
from g3export.export import trt_plugin
from g3export.export.kernels import trt_plugin as plugin_runtime
from g3export.export.trt import TensorRTMissing, require_tensorrt
from g3export.modeling.attention import attention_reference

try:
    TRT_RTX = require_tensorrt("trt-rtx")
    _WHY = ""
except TensorRTMissing as e:
    TRT_RTX = None
    _WHY = f"TensorRT-RTX is not installed ({str(e).splitlines()[0]})"

needs_rtx = pytest.mark.skipif(TRT_RTX is None, reason=_WHY or "TensorRT-RTX missing")

B, H, KV, D, W, S = 1, 4, 2, 16, 4, 16
SCALE = 0.25
NAMES_IN = ["q", "k", "v", "start_pos", "image_groups", "kc0", "vc0", "kc1", "vc1"]
NAMES_OUT = ["out", "kc0o", "vc0o", "kc1o", "vc1o"]


class TwoLayers(torch.nn.Module):
    """Layer 0: sliding (W=4, a 4-slot ring); layer 1: full (16 slots), fed layer 0's output."""

    def forward(self, q, k, v, start_pos, image_groups, kc0, vc0, kc1, vc1):
        o0, kc0n, vc0n = torch.ops.g3.attention(q, k, v, kc0, vc0, start_pos, image_groups, W, SCALE)
        o1, kc1n, vc1n = torch.ops.g3.attention(o0, k, v, kc1, vc1, start_pos, image_groups, 0, SCALE)
        return o1, kc0n, vc0n, kc1n, vc1n


def _reference_two(q, k, v, sp, g, caches):
    o0, a, b = attention_reference(q, k, v, caches[0], caches[1], sp, g, W, SCALE)
    o1, c, d = attention_reference(o0, k, v, caches[2], caches[3], sp, g, 0, SCALE)
    return o1, [a, b, c, d]


def _export_two(path: Path, table, opset: int, ir_version: int) -> Path:
    t = torch.export.Dim("T", min=1, max=16)
    args = (torch.randn(B, H, 3, D), torch.randn(B, KV, 3, D), torch.randn(B, KV, 3, D),
            torch.zeros(1, dtype=torch.int64), torch.full((B, 3), -1),
            torch.zeros(B, KV, W, D), torch.zeros(B, KV, W, D), torch.zeros(B, KV, S, D),
            torch.zeros(B, KV, S, D))
    ds = ({2: t}, {2: t}, {2: t}, None, {1: t}, None, None, None, None)
    import contextlib
    import io
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(TwoLayers(), args, dynamo=True, dynamic_shapes=ds,
                                 custom_translation_table=table, opset_version=opset,
                                 optimize=False, input_names=NAMES_IN, output_names=NAMES_OUT)
    m = prog.model
    m.ir_version = ir_version
    ir.save(m, path)
    return path


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("two")
    nat = _export_two(root / "native.onnx", native.TRANSLATION_TABLE, native.OPSET,
                      native.IR_VERSION)
    m = ir.load(nat)
    native.finalize(m)
    ir.save(m, nat)
    plug = _export_two(root / "plugin.onnx", trt_plugin.TRANSLATION_TABLE, 20, 10)
    mapped = ir.load(plug)
    assert trt_plugin.plugin_to_reference(mapped) == 2
    ir.save(mapped, root / "plugin_ref.onnx")
    return {"native": nat, "plugin": plug, "plugin_ref": root / "plugin_ref.onnx"}


def _ort(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # TensorScatter warns about copying when the buffers differ
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_two(path: Path, chunks: list[int], image_chunk: int | None = None) -> None:
    """Run the graph chunk by chunk, caches fed back, against the reference op."""
    sess = _ort(path)
    rng = torch.Generator().manual_seed(1)
    caches = [torch.zeros(B, KV, W, D), torch.zeros(B, KV, W, D), torch.zeros(B, KV, S, D),
              torch.zeros(B, KV, S, D)]
    ref = [c.clone() for c in caches]
    pos = 0
    for i, t in enumerate(chunks):
        q = torch.randn(B, H, t, D, generator=rng)
        k = torch.randn(B, KV, t, D, generator=rng)
        v = torch.randn(B, KV, t, D, generator=rng)
        g = torch.full((B, t), -1)
        if i == image_chunk:
            g[0, 1:min(t, 4)] = 3  # an image inside the chunk: bidirectional block
        sp = torch.tensor([pos])
        feeds = dict(zip(NAMES_IN, [x.numpy() for x in (q, k, v, sp, g, *caches)]))
        outs = sess.run(None, feeds)
        want, ref = _reference_two(q, k, v, sp, g, ref)
        caches = [torch.from_numpy(x) for x in outs[1:]]
        torch.testing.assert_close(torch.from_numpy(outs[0]), want, atol=1e-5, rtol=1e-5)
        for got, exp in zip(caches, ref):
            torch.testing.assert_close(got, exp, atol=0, rtol=0)
        pos += t
    assert pos > S  # the full layer filled up and the ring wrapped several times


# ---------------------------------------------------------------------------------------------
# Numerics on ONNX Runtime (no TensorRT needed)


def test_native_graph_is_standard_onnx(two):
    m = ir.load(two["native"])
    ops = native.count_ops(m)
    assert ops["Attention"] == 2 and ops["TensorScatter"] == 4
    assert set(m.opset_imports) == {""} and m.opset_imports[""] == native.OPSET
    for node in m.graph:
        if node.op_type == "Attention":
            assert len(node.outputs) == 1  # TensorRT-RTX refuses multi-output Attention
            a = {k: v.value for k, v in node.attributes.items()}  # the exporter fills defaults
            assert a.get("is_causal", 0) == 0 and a.get("softcap", 0.0) == 0.0
            assert len(node.inputs) == 4  # no past_key/past_value
        if node.op_type == "TensorScatter":
            assert node.attributes["mode"].value == "linear"


def test_native_ort_equals_reference(two):
    # chunks aligned to the 4-slot ring (TensorScatter linear must not wrap), an image in one
    chunks = [c for _, c in native.aligned_chunks(0, 11, 4, [W, S])] + [1] * 7
    assert chunks[:3] == [4, 4, 3]
    _run_two(two["native"], chunks, image_chunk=0)


def test_aligned_chunks_never_wrap():
    for start in range(0, 9):
        for n in range(1, 20):
            got = native.aligned_chunks(start, n, 3, [8, 32])
            assert sum(t for _, t in got) == n and got[0][0] == start
            for s, t in got:
                native.check_chunk(s, t, 8)
    with pytest.raises(ValueError, match="wraps"):
        native.check_chunk(6, 3, 8)


def test_plugin_graph_mapped_to_reference(two):
    m = ir.load(two["plugin"])
    nodes = trt_plugin.plugin_nodes(m)
    assert [n.attributes["layer_type"].value for n in nodes] == ["sliding", "full"]
    a = {k: v.value for k, v in nodes[0].attributes.items()}
    assert a == {"window": W, "scale": SCALE, "layer_type": "sliding", "num_heads": H,
                 "num_kv_heads": KV, "head_dim": D, "cache_slots": W,
                 "plugin_namespace": "g3", "plugin_version": "1"}
    # the ORT translation has no alignment limit: chunks longer than the ring, unaligned
    _run_two(two["plugin_ref"], [5, 3, 1, 6, 1, 1], image_chunk=0)


def test_plugin_compute_path_on_cpu():
    """The function enqueue runs (reference path here): in-place caches, out written."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, H, 3, D), torch.randn(1, KV, 3, D), torch.randn(1, KV, 3, D)
    kc, vc = torch.randn(1, KV, W, D), torch.randn(1, KV, W, D)
    sp, g = torch.tensor([5]), torch.full((1, 3), -1)
    want = attention_reference(q, k, v, kc, vc, sp, g, W, SCALE)
    out = torch.empty_like(q)
    assert plugin_runtime.run_attention(q, k, v, kc, vc, sp, g, out, W, SCALE) == "reference"
    for got, exp in zip((out, kc, vc), want):
        torch.testing.assert_close(got, exp)


def test_translations_registry():
    from g3export.export import translations

    assert translations.get("native").table is native.TRANSLATION_TABLE
    p = translations.get("plugin")
    assert p.table is trt_plugin.TRANSLATION_TABLE
    assert p.manifest() == {"attention": "plugin", "opset": 20,
                            "plugin": {"name": "G3Attention", "namespace": "g3", "version": "1"}}
    assert translations.get("ort").opset == 20 and translations.get("native").opset == 24
    with pytest.raises(ValueError, match="valid"):
        translations.get("gqa")


# ---------------------------------------------------------------------------------------------
# The missing-library message (TensorRT itself is not installable here)


def _has_real_tensorrt() -> bool:
    try:
        require_tensorrt("trt")
    except TensorRTMissing:
        return False
    return True


@pytest.mark.skipif(_has_real_tensorrt(), reason="TensorRT is installed")
def test_require_tensorrt_message():
    with pytest.raises(TensorRTMissing) as e:
        require_tensorrt("trt")
    msg = str(e.value)
    assert "pip install 'g3export[tensorrt]'" in msg and "--target onnx" in msg


@pytest.mark.skipif(_has_real_tensorrt(), reason="TensorRT is installed")
def test_cli_trt_without_tensorrt_creates_nothing(tmp_path):
    out = tmp_path / "b"
    proc = subprocess.run(
        [sys.executable, "-c", "from g3export.cli import main; main()", "build", "--size", "tiny",
         "--target", "trt", "--weights", "random", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "TensorRT" in proc.stderr and "--target onnx" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no build directory, no partial one


def test_soname_fix_private_dir(tmp_path):
    """Where the wheel's directory may not be written, the link goes to a private dir and the
    build runs in a child process with LD_LIBRARY_PATH (the loader reads it at start only)."""
    lib = tmp_path / "libs"
    lib.mkdir()
    (lib / "libtensorrt_rtx.so.1").write_bytes(b"")
    fix = trt_mod.ensure_rtx_soname(lib, tmp_path / "private", allow_in_place=False)
    assert fix.method == "env" and not fix.in_process
    assert (tmp_path / "private" / "libtensorrt_rtx.so").resolve() == (lib / "libtensorrt_rtx.so.1").resolve()
    assert not (lib / "libtensorrt_rtx.so").exists()
    fix2 = trt_mod.ensure_rtx_soname(lib, tmp_path / "private2")
    assert fix2.method == "symlink" and os.readlink(lib / "libtensorrt_rtx.so") == "libtensorrt_rtx.so.1"
    assert trt_mod.ensure_rtx_soname(lib, tmp_path / "p3").method == "present"


_REPO = str(Path(__file__).resolve().parents[2])


def test_runtime_side_imports_no_exporter():
    """What an engine runtime imports (the plugin class, the library loader, opening a TensorRT
    session module) loads neither onnx, onnxscript nor onnx_ir: checked in a fresh interpreter."""
    code = ("import sys\n"
            "import g3export.export.kernels.trt_plugin, g3export.export.trt.library\n"
            "import g3export.runtimes.trt_session\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('onnx', 'onnxscript', 'onnx_ir') or m == 'g3export.export.trt_plugin')\n"
            "print('LOADED', bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": _REPO})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout, proc.stdout


def test_compute_capabilities_one_table():
    """The CLI's --compute-capability choices are the builder's table (they had drifted: 7.5)."""
    from g3export.cli import build as build_cmd

    opt = next(p for p in build_cmd.params if p.name == "compute_capabilities")
    assert list(opt.type.choices) == list(trt_mod.RTX_COMPUTE_CAPABILITIES)
    assert "7.5" in opt.type.choices and "9.0" not in opt.type.choices
    with pytest.raises(trt_mod.EngineOptionError, match="not 9.0"):
        trt_mod.check_options("trt-rtx", ["9.0"])
    with pytest.raises(trt_mod.EngineOptionError, match="TensorRT-RTX option"):
        trt_mod.check_options("trt", ["8.6"])


# ---------------------------------------------------------------------------------------------
# TensorRT-RTX: parse every node, create the plugin from the registry, serialize engines


def _profiles(chunk: int = W, opt: int = 1) -> list[trt_mod.Profile]:
    """The one profile a text engine has (engine.text_profile): seq 1..chunk, opt 1 (decode). The
    native graph needs chunk <= W (a KV-cache update no longer than its cache, here the 4-slot
    ring): TensorRT-RTX refuses a profile whose OPT exceeds it, and only warns ("Profile kMAX
    values are not self-consistent") when only the max does; g3export's plan refuses such a chunk
    itself (options.py, test_trt_build::test_native_prefill_chunk_longer_than_window_refused)."""
    shapes = {n: ((1, h, 1, D), (1, h, opt, D), (1, h, chunk, D)) for n, h in (("q", H), ("k", KV), ("v", KV))}
    shapes["image_groups"] = ((1, 1), (1, opt), (1, chunk))
    return [trt_mod.Profile(trt_mod.TEXT_PROFILE, shapes)]


@needs_rtx
def test_soname_fix_in_a_fresh_process(tmp_path, two):
    """Parsing a plugin graph in a fresh process does not abort (libtensorrt_rtx.so): the link
    beside the wheel's library is removed first, and the fresh process must make it again."""
    fix = trt_mod.ensure_rtx_soname()
    link = Path(fix.lib_dir or "/nonexistent") / "libtensorrt_rtx.so"
    if fix.method in ("present", "symlink") and link.is_symlink() and os.access(link.parent, os.W_OK):
        link.unlink()
    code = ("import sys; sys.path.insert(0, {!r}); import test_trt as t;"
            "from g3export.export.trt import build_engine, ensure_rtx_soname;"
            "i = build_engine({!r}, {!r}, 'trt-rtx', profiles=t._profiles());"
            "print('OK', i.bytes, ensure_rtx_soname().method)").format(
                str(Path(__file__).parent), str(two["plugin"]), str(tmp_path / "e"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK" in proc.stdout
    if fix.method in ("present", "symlink"):
        assert link.exists()


@needs_rtx
def test_isolated_build_in_child_process(two, tmp_path):
    """The build path used when the soname fix needs LD_LIBRARY_PATH: a child process."""
    info = trt_mod.build_engine(two["plugin"], tmp_path / "c.engine", "trt-rtx",
                                profiles=_profiles(), isolate=True)
    assert info.layer_types == {"PLUGIN_V3": 2} and (tmp_path / "c.engine").stat().st_size == info.bytes
    with pytest.raises(trt_mod.EngineBuildError):  # errors come back as exceptions, no engine
        trt_mod.build_engine(two["native"], tmp_path / "d.engine", "trt-rtx",
                             profiles=_profiles(8, opt=8), isolate=True)
    assert not (tmp_path / "d.engine").exists()


@needs_rtx
def test_child_imports_this_package_not_a_decoy(two, tmp_path, monkeypatch):
    """The isolated build's child imports the g3export the parent runs, even with a `g3export/`
    directory in the working directory and on PYTHONPATH (python -m would have imported it)."""
    decoy = tmp_path / "cwd"
    (decoy / "g3export").mkdir(parents=True)
    (decoy / "g3export" / "__init__.py").write_text("raise SystemExit('decoy g3export imported')\n")
    monkeypatch.chdir(decoy)
    monkeypatch.setenv("PYTHONPATH", str(decoy))
    info = trt_mod.build_engine(two["plugin"], tmp_path / "e.engine", "trt-rtx",
                                profiles=_profiles(), isolate=True)
    assert info.layer_types == {"PLUGIN_V3": 2} and info.peak_rss_mb > 0


@needs_rtx
@pytest.mark.parametrize("flag", ["STRIP_PLAN", "REFIT_IDENTICAL"])
def test_weight_stripped_engines_need_a_gpu(two, flag):
    """Why the builds are not weight-stripped (README, TensorRT): TensorRT-RTX 1.7's CPU-only
    build fails with STRIP_PLAN / REFIT_IDENTICAL (its JIT compile asks CUDA). When a version
    builds one, this fails: then build stripped engines and refit them at load."""
    trt = TRT_RTX
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(two["native"]))
    config = builder.create_builder_config()
    config.set_flag(getattr(trt.BuilderFlag, flag))
    for prof in _profiles():
        p = builder.create_optimization_profile()
        for name, (mn, opt, mx) in prof.shapes.items():
            p.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(p)
    assert builder.build_serialized_network(network, config) is None


@needs_rtx
def test_native_builds_with_tensorrt_rtx(two, tmp_path):
    with pytest.raises(trt_mod.EngineBuildError):  # an opt chunk longer than the ring
        trt_mod.build_engine(two["native"], tmp_path / "n.engine", "trt-rtx",
                             profiles=_profiles(8, opt=8), dtype="fp32")
    assert not (tmp_path / "n.engine").exists()
    info = trt_mod.build_engine(two["native"], tmp_path / "n.engine", "trt-rtx",
                                profiles=_profiles(), dtype="fp32",
                                compute_capabilities=["8.6", "12.0"])
    assert info.bytes == (tmp_path / "n.engine").stat().st_size > 0
    lt = info.layer_types
    # compiled to TensorRT's own attention and KV-cache-update layers
    assert lt.get("ATTENTION_INPUT") == 2 and lt.get("KV_CACHE_UPDATE") == 4
    assert info.decomposable_attention == 2  # fp32 Attention builds only when decomposable
    assert info.version.startswith("1.7") and info.compute_capabilities == ["8.6", "12.0"]


@needs_rtx
def test_plugin_builds_with_tensorrt_rtx(two, tmp_path):
    plugin_runtime.register_plugins(TRT_RTX)
    plugin_cls, _ = plugin_runtime.plugin_classes(TRT_RTX)
    made: list[dict] = []
    orig = plugin_cls.__init__

    def spy(self, attrs, phase=None):
        made.append(dict(attrs))
        orig(self, attrs, phase)

    plugin_cls.__init__ = spy
    try:
        info = trt_mod.build_engine(two["plugin"], tmp_path / "p.engine", "trt-rtx",
                                    profiles=_profiles(), dtype="fp32")
    finally:
        plugin_cls.__init__ = orig
    assert info.layer_types == {"PLUGIN_V3": 2}
    assert info.bytes == (tmp_path / "p.engine").stat().st_size > 0
    # created from the registry with the node's attributes as plugin fields
    windows = sorted({m["window"] for m in made})
    assert windows == [0, W] and all(m["num_heads"] == H and m["cache_slots"] in (W, S) for m in made)


class Layers(torch.nn.Module):
    """Any stack of layers (window per layer, 0 = full), caches as one list input."""

    def __init__(self, windows: list[int]):
        super().__init__()
        self.windows = windows

    def forward(self, q, k, v, start_pos, image_groups, caches):
        x, outs = q, []
        for i, w in enumerate(self.windows):
            x, kc, vc = torch.ops.g3.attention(x, k, v, caches[2 * i], caches[2 * i + 1], start_pos,
                                               image_groups, w, SCALE)
            outs += [kc, vc]
        return (x, *outs)


@needs_rtx
@pytest.mark.parametrize("which,dtype", [("native", "bf16"), ("native", "fp16"), ("plugin", "bf16")])
def test_half_precision_builds(tmp_path, which, dtype):
    """Strongly typed bf16/fp16 engines, with two full layers (TensorRT-RTX 1.7 failed on the
    first version of the native mask there; see onnx_native_attention)."""
    import contextlib
    import io
    import warnings

    windows = [W, 0, 0]
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    t = torch.export.Dim("T", min=1, max=16)
    caches = [torch.zeros(B, KV, w or S, D, dtype=dt) for w in windows for _ in "kv"]
    args = (torch.randn(B, H, 3, D, dtype=dt), torch.randn(B, KV, 3, D, dtype=dt),
            torch.randn(B, KV, 3, D, dtype=dt), torch.zeros(1, dtype=torch.int64),
            torch.full((B, 3), -1), caches)
    ds = ({2: t}, {2: t}, {2: t}, None, {1: t}, [None] * len(caches))
    mod = native if which == "native" else trt_plugin
    opset, irv = (native.OPSET, native.IR_VERSION) if which == "native" else (20, 10)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            Layers(windows), args, dynamo=True, dynamic_shapes=ds, optimize=False,
            custom_translation_table=mod.TRANSLATION_TABLE, opset_version=opset,
            input_names=["q", "k", "v", "start_pos", "image_groups"] + [f"c{i}" for i in range(6)],
            output_names=["out"] + [f"co{i}" for i in range(6)])
    m = prog.model
    m.ir_version = irv
    trt_mod.prepare_for_tensorrt(m)
    ir.save(m, tmp_path / "m.onnx")
    info = trt_mod.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", "trt-rtx",
                                profiles=_profiles(), dtype=dtype)
    assert info.bytes > 0 and info.decomposable_attention == 0
    if which == "native":
        assert info.layer_types.get("ATTENTION_INPUT") == 3
    else:
        assert info.layer_types.get("PLUGIN_V3") == 3


@needs_rtx
def test_timing_cache_refused_for_rtx(two, tmp_path):
    with pytest.raises(ValueError, match="timing cache"):
        trt_mod.build_engine(two["native"], tmp_path / "x", "trt-rtx", timing_cache=tmp_path / "c")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# The tiny preset through the exporter


MAX_CONTEXT = 48


def _export_tiny(out: Path, which: str):
    from g3export.export import onnx_export as oe
    from g3export.modeling.config import preset
    from g3export.modeling.text import Gemma3Model

    torch.manual_seed(0)
    model = Gemma3Model(preset("tiny")).eval()
    from g3export.export import translations

    tr = translations.get(which)
    # what a TensorRT build writes (EnginePlan.export_options): the file is final as exported
    io = oe.export_text(model, out, MAX_CONTEXT, progress=False, translation_table=tr.table,
                        opset=tr.opset, tie_lm_head=False, graph_passes=trt_mod.tensorrt_passes(tr))
    torch.manual_seed(0)
    return io, Gemma3Model(preset("tiny")).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for which in ("native", "plugin"):
        io, model = _export_tiny(root / which, which)
        out[which] = root / which / "text.onnx"
    out["io"], out["model"] = io, model
    mapped = ir.load(out["plugin"])
    assert trt_plugin.plugin_to_reference(mapped) == 6
    from g3export.export.onnx_export import save_with_external_data
    save_with_external_data(mapped, root / "plugin_ref" / "text.onnx", progress=False)
    out["plugin_ref"] = root / "plugin_ref" / "text.onnx"
    return out


class _FileSession:
    """Minimal ORT loop over one text.onnx: caches fed back as numpy arrays."""

    def __init__(self, path: Path, io):
        self.sess = _ort(path)
        self.io = io
        self.caches = {t.name: np.zeros([1 if isinstance(d, str) else d for d in t.shape],
                                        np.float32)
                       for t in io.inputs if t.name.startswith("past_")}

    def forward(self, ids: np.ndarray, pos: int) -> np.ndarray:
        feeds = {"input_ids": ids.astype(np.int64), "start_pos": np.array([pos], np.int64),
                 **self.caches}
        outs = self.sess.run(None, feeds)
        names = [o.name for o in self.sess.get_outputs()]
        for n, o in zip(names, outs):
            if n.startswith("present_"):
                self.caches[n.replace("present_", "past_")] = o
        return outs[0][:, -1]


def _greedy(sess, prompt: np.ndarray, chunks: list[int], new: int):
    logits, pos = [], 0
    for c in chunks:
        logits.append(sess.forward(prompt[:, pos:pos + c], pos))
        pos += c
    toks = []
    for _ in range(new):
        t = int(logits[-1][0].argmax())
        toks.append(t)
        logits.append(sess.forward(np.array([[t]]), pos))
        pos += 1
    return logits, toks


def _tiny_check(tiny, which: str, chunks: list[int]):
    from g3export.runtimes.reference import TorchSession

    prompt = np.random.default_rng(7).integers(0, 512, (1, sum(chunks)))
    a, ta = _greedy(_FileSession(tiny[which], tiny["io"]), prompt, chunks, 12)
    b, tb = _greedy(TorchSession(tiny["model"], MAX_CONTEXT), prompt, chunks, 12)
    assert ta == tb
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < 1e-4


def test_tiny_native_tokens_equal_reference(tiny):
    window = 8  # the tiny preset's sliding window: 27 prompt tokens + 12 new run past it
    chunks = [t for _, t in native.aligned_chunks(0, 27, 8, [window, MAX_CONTEXT])]
    _tiny_check(tiny, "native", chunks)


def test_tiny_plugin_mapped_tokens_equal_reference(tiny):
    _tiny_check(tiny, "plugin_ref", [5, 11, 11])


@needs_rtx
@pytest.mark.parametrize("which", ["native", "plugin"])
def test_tiny_builds_with_tensorrt_rtx(tiny, which, tmp_path):
    profile = trt_mod.text_profile(tiny["io"], chunk=8, max_batch=2)
    info = trt_mod.build_engine(tiny[which], tmp_path / "text.engine", "trt-rtx",
                                profiles=[profile], dtype="fp32")
    assert info.profiles == [profile.to_dict()]
    assert info.bytes > 0
    if which == "native":
        assert info.layer_types.get("ATTENTION_INPUT") == 6
        assert info.layer_types.get("KV_CACHE_UPDATE") == 12
    else:
        assert info.layer_types.get("PLUGIN_V3") == 6
