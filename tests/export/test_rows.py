"""Every batch row at its own position (issue 13): the attention op's translations (ONNX Runtime,
native TensorRT run on ONNX Runtime, the plugin graph with its nodes mapped to the reference) on a
two-layer graph (a sliding layer W=4 and a full layer) with B=3 rows whose start positions differ,
against the reference op run row by row at batch 1.

Scenarios: one row past the window while another is at position 3; a row restarted at 0 while the
others continue (no clearing: its old slots are masked by position); chunked prefill per row.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

from g3export.export import onnx_attention, onnx_native_attention as native, trt_plugin
from g3export.modeling.attention import attention_reference

B, H, KV, D, W, S = 3, 4, 2, 16, 4, 32
SCALE = 0.25
NAMES_IN = ["q", "k", "v", "start_pos", "image_groups", "kc0", "vc0", "kc1", "vc1"]
NAMES_OUT = ["out", "kc0o", "vc0o", "kc1o", "vc1o"]


class TwoLayers(torch.nn.Module):
    def forward(self, q, k, v, start_pos, image_groups, kc0, vc0, kc1, vc1):
        o0, a, b = torch.ops.g3.attention(q, k, v, kc0, vc0, start_pos, image_groups, W, SCALE)
        o1, c, d = torch.ops.g3.attention(o0, k, v, kc1, vc1, start_pos, image_groups, 0, SCALE)
        return o1, a, b, c, d


def _reference(q, k, v, sp, g, caches):
    o0, a, b = attention_reference(q, k, v, caches[0], caches[1], sp, g, W, SCALE)
    o1, c, d = attention_reference(o0, k, v, caches[2], caches[3], sp, g, 0, SCALE)
    return o1, [a, b, c, d]


def _export(path: Path, table, opset: int, ir_version: int) -> Path:
    t = torch.export.Dim("T", min=1, max=16)
    args = (torch.randn(B, H, 3, D), torch.randn(B, KV, 3, D), torch.randn(B, KV, 3, D),
            torch.zeros(B, dtype=torch.int64), torch.full((B, 3), -1),
            torch.zeros(B, KV, W, D), torch.zeros(B, KV, W, D), torch.zeros(B, KV, S, D),
            torch.zeros(B, KV, S, D))
    ds = ({2: t}, {2: t}, {2: t}, None, {1: t}, None, None, None, None)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_attention.reset_shared()
        prog = torch.onnx.export(TwoLayers(), args, dynamo=True, dynamic_shapes=ds,
                                 custom_translation_table=table, opset_version=opset,
                                 optimize=False, input_names=NAMES_IN, output_names=NAMES_OUT)
        onnx_attention.reset_shared()
    m = prog.model
    m.ir_version = ir_version
    if table is native.TRANSLATION_TABLE:
        native.finalize(m)
    if table is trt_plugin.TRANSLATION_TABLE:
        assert trt_plugin.plugin_to_reference(m) == 2
    ir.save(m, path)
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rows")
    return {"ort": _export(root / "ort.onnx", onnx_attention.TRANSLATION_TABLE, 20, 10),
            "native": _export(root / "native.onnx", native.TRANSLATION_TABLE, native.OPSET,
                              native.IR_VERSION),
            "plugin": _export(root / "plugin.onnx", trt_plugin.TRANSLATION_TABLE, 20, 10)}


def _ort(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_in_place(sess, inputs, caches):
    """One step of the ONNX Runtime graph the way g3export.runtimes.ort_session runs it: every
    cache bound as both its input and its output (one buffer, written in place: the translation's
    contract, onnx_attention). The torch tensors in `caches` share that memory and so hold the
    updated caches afterwards. Returns [out, *caches] as numpy arrays."""
    import onnxruntime as ort

    b = sess.io_binding()
    for name, x in zip(NAMES_IN, inputs):
        b.bind_cpu_input(name, x)
    b.bind_output(NAMES_OUT[0])
    for name_in, name_out, c in zip(NAMES_IN[5:], NAMES_OUT[1:], caches):
        ov = ort.OrtValue.ortvalue_from_numpy(c.numpy())  # no copy: c's own memory
        b.bind_ortvalue_input(name_in, ov)
        b.bind_ortvalue_output(name_out, ov)
    sess.run_with_iobinding(b)
    return [b.copy_outputs_to_cpu()[0], *(c.numpy() for c in caches)]


# (starts of the three rows before each step, chunk length): row 0 runs far past the window and
# the full layer's 16 first slots; row 1 starts late (at 3 while row 0 is past the window), row 2 is
# restarted at 0 in the middle (its cache still holds the old sequence).
def _plan(chunks: list[int]) -> list[tuple[list[int], int]]:
    pos = [0, 0, 0]
    steps = []
    for i, t in enumerate(chunks):
        if i == 2:
            pos[1] = 3         # row 1 joins at position 3 (positions 0..2 held garbage: masked)
        if i == len(chunks) // 2 + 1:
            pos[2] = 0         # row 2 restarts
        steps.append((list(pos), t))
        pos = [p + t for p in pos]
    return steps


PLANS = {"decode": [3, 4] + [1] * 14, "chunked": [3, 4, 2, 3, 1, 4, 1, 2, 1]}


@pytest.mark.parametrize("which", ["ort", "native", "plugin"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_rows_at_own_positions(graphs, which, plan):
    steps = _plan(PLANS[plan])
    if which == "native":  # TensorScatter(linear) must not wrap a ring: align chunks to W
        steps = [(st, t) for st, t in steps if all(p % W + t <= W for p in st)]
    assert max(max(st) for st, _ in steps) > W + 4      # a row well past the window
    sess = _ort(graphs[which])
    gen = torch.Generator().manual_seed(3)
    caches = [torch.randn(B, KV, W, D, generator=gen), torch.randn(B, KV, W, D, generator=gen),
              torch.randn(B, KV, S, D, generator=gen), torch.randn(B, KV, S, D, generator=gen)]
    ref = [c.clone() for c in caches]  # garbage in never-written slots: must stay masked
    for st, t in steps:
        q = torch.randn(B, H, t, D, generator=gen)
        k = torch.randn(B, KV, t, D, generator=gen)
        v = torch.randn(B, KV, t, D, generator=gen)
        g = torch.full((B, t), -1)
        sp = torch.tensor(st)
        if which != "native":  # the ORT translation (the plugin's too, mapped to it), run as
            # the runtime runs it: each cache bound as input and output
            outs = _run_in_place(sess, [x.numpy() for x in (q, k, v, sp, g)], caches)
        else:
            outs = sess.run(None, dict(zip(NAMES_IN, [x.numpy() for x in (q, k, v, sp, g, *caches)])))
            caches = [torch.from_numpy(x) for x in outs[1:]]
        for r in range(B):  # the reference, one row at a time at batch 1
            sl = slice(r, r + 1)
            want, new = _reference(q[sl], k[sl], v[sl], sp[sl], g[sl], [c[sl] for c in ref])
            for c, n in zip(ref, new):
                c[sl] = n
            torch.testing.assert_close(torch.from_numpy(outs[0][sl]), want, atol=1e-5, rtol=1e-5)
        for got, exp in zip(caches, ref):
            torch.testing.assert_close(got, exp, atol=0, rtol=0)


def test_reference_rows_equal_batch1_loop():
    """The batched reference op with per-row starts equals batch-1 calls row by row, bit for bit
    (positions 3, 37 (past W and a wrapped ring) and 0 (a restarted row), chunks of 1 and 5)."""
    gen = torch.Generator().manual_seed(0)
    starts = torch.tensor([3, 37, 0])
    for window, slots in ((W, W), (0, 64)):
        for t in (1, 5):
            q = torch.randn(B, H, t, D, generator=gen)
            k, v = torch.randn(B, KV, t, D, generator=gen), torch.randn(B, KV, t, D, generator=gen)
            kc = torch.randn(B, KV, slots, D, generator=gen)
            vc = torch.randn(B, KV, slots, D, generator=gen)
            g = torch.full((B, t), -1)
            g[1, 1:4] = 0  # an image in row 1 only
            got = attention_reference(q, k, v, kc, vc, starts, g, window, SCALE)
            for r in range(B):
                sl = slice(r, r + 1)
                want = attention_reference(q[sl], k[sl], v[sl], kc[sl], vc[sl], starts[sl], g[sl],
                                           window, SCALE)
                for a, b in zip(got, want):
                    assert torch.equal(a[sl], b)
