"""The ONNX Runtime lm_head's If on the row count (g3export.export.onnx_lm_head): one stored copy
of the tied embedding, both branches compute the batch-1 logits, and a batch-1 session has the
batched branch folded away before ORT pre-packs it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from g3export.export.build import build
from g3export.export.onnx_lm_head import EMBED_T
from g3export.modeling.config import preset
from g3export.modeling.text import Gemma3Model
from g3export.runtimes.ort_session import OrtSession, inference_session, session_options

MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    torch.manual_seed(1)
    m = Gemma3Model(preset("tiny")).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.1)
    root = tmp_path_factory.mktemp("lm_head")
    tok = root / "tok.json"
    tok.write_text('{"model": "dummy"}')
    return build(m, tok, root / "tiny-onnx", max_context=MAX_CONTEXT, progress=False)


def _nodes(graph):
    """Every node of `graph` and its subgraphs."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)


def _external(t):
    return {e.key: e.value for e in t.external_data}


def test_the_two_lm_head_weights_are_one_range_of_the_data_file(build_dir):
    m = onnx.load(str(build_dir / "text.onnx"), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    three, two = inits[EMBED_T], inits[EMBED_T + ".2d"]
    assert list(three.dims) == [1, two.dims[0], two.dims[1]]
    assert _external(three) == _external(two)  # same file, offset and length
    assert len(_lm_head_ifs(m.graph)) == 1
    users = {n.input[1] for n in _nodes(m.graph) if n.op_type == "MatMul"}
    assert {EMBED_T, EMBED_T + ".2d"} <= users


def _lm_head_ifs(graph):
    """The If nodes with a branch whose MatMul reads a view of the tied embedding (the
    attention's first-chunk Ifs are others)."""
    return [n for n in _nodes(graph) if n.op_type == "If" and any(
        sub.op_type == "MatMul" and sub.input[1].startswith(EMBED_T)
        for a in n.attribute if a.type == onnx.AttributeProto.GRAPH for sub in _nodes(a.g))]


def test_batched_logits_equal_each_row_alone(build_dir):
    """A decode step of 3 rows at different positions runs the pre-packed branch; each row's
    logits must equal a batch-1 session's (the one-row branch) for the same history."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 200, n).tolist() for n in (5, 11, 2)]
    wide = OrtSession.from_build(build_dir, batch=3, threads=1)
    for row, p in enumerate(prompts):
        wide.forward_row(row, np.array([p]), 0)
    step = np.array([[7], [8], [9]])
    got = wide.forward(step, np.array([len(p) for p in prompts]))
    for row, p in enumerate(prompts):
        one = OrtSession.from_build(build_dir, batch=1, threads=1)
        one.forward(np.array([p]), 0)
        want = one.forward(step[row:row + 1], len(p))
        np.testing.assert_allclose(got[row], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, has_if", [(1, False), (3, True)])
def test_batch_one_sessions_fold_the_batched_branch_away(build_dir, tmp_path, batch, has_if):
    out = tmp_path / f"opt{batch}.onnx"
    inference_session(str(build_dir / "text.onnx"),
                      session_options(1, str(out), batch=batch), ["CPUExecutionProvider"])
    m = onnx.load(str(out), load_external_data=False)
    assert (len(_lm_head_ifs(m.graph)) == 1) is has_if
    names = {t.name for t in m.graph.initializer}
    assert (EMBED_T + ".2d" in names) is has_if
