"""RowSlotsSession and the placeholder scheduler against generate() batch 1 (tiny ONNX build)."""

from __future__ import annotations

import numpy as np
import pytest

from g3export.runtimes.generate import GenerationError, generate
from g3export.runtimes.ort_session import OrtSession
from g3export.runtimes.row_slots import RowSlotsSession
from g3export.runtimes.scheduler import Request, Scheduler, SchedulerBusy


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from click.testing import CliRunner
    from g3export.cli import main

    out = tmp_path_factory.mktemp("b") / "tiny"
    r = CliRunner().invoke(main, ["build", "--size", "tiny", "--weights", "random", "--target",
                                  "onnx", "--max-context", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def prompts(n, vocab=512):
    rng = np.random.default_rng(0)
    return [[2, *rng.integers(3, vocab, size=3 + 5 * i).tolist()] for i in range(n)]


def test_rows_equal_batch1_generation(tiny_onnx):
    ref = OrtSession.from_build(tiny_onnx)
    session = RowSlotsSession.from_build(tiny_onnx, batch=3)
    sched = Scheduler(session, prefill_chunk=4)  # several chunks per prompt, interleaved
    ps = prompts(6)  # more requests than rows: some wait, join when a row frees
    want = [generate(ref, p, 12, chunk_size=4).token_ids for p in ps]
    streams = [sched.submit(Request(p, max_new_tokens=12, stop_ids=[])) for p in ps]
    while sched.step():
        pass
    for s, w in zip(streams, want):
        evs = list(s)
        assert [e.token_id for e in evs[:-1]] == w
        assert evs[-1].finish_reason == "max_new_tokens"


def test_cancel_busy_and_errors(tiny_onnx):
    session = RowSlotsSession.from_build(tiny_onnx, batch=1)
    sched = Scheduler(session, max_queue=1)
    a = sched.submit(Request([2, 5, 6], max_new_tokens=50, stop_ids=[]))
    sched.step()
    b = sched.submit(Request([2, 7], max_new_tokens=2, stop_ids=[]))
    with pytest.raises(SchedulerBusy, match="busy"):
        sched.submit(Request([2, 8], max_new_tokens=2))
    with pytest.raises(GenerationError, match="context"):
        sched.submit(Request([2] * 64, max_new_tokens=2))
    a.cancel()
    while sched.step():
        pass
    assert list(a)[-1].finish_reason == "cancelled"
    evs = list(b)
    assert len(evs) == 3 and evs[-1].finish_reason == "max_new_tokens"
