"""The continuous-batching scheduler (issue 13) over the ONNX Runtime session of a tiny build and over
the PyTorch reference session: each request's tokens equal `generate()` at batch 1 on the same
prompt, token for token, while requests join and leave at every step at different positions per
row (prompts past the sliding window W = 8, prefill chunked and interleaved with the decodes);
cancellation frees the slot; a full queue raises SchedulerBusy; seeded sampling equals batch-1
sampling with the same seed; the background thread serves concurrent clients."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from g3export.export.build import build
from g3export.runtimes.generate import GenerationError, generate
from g3export.runtimes.ort_session import OrtSession
from g3export.runtimes.reference import TorchSession
from g3export.runtimes.sampling import SamplingConfig
from g3export.runtimes.scheduler import Request, Scheduler, SchedulerBusy
from tests.runtimes.test_generate import model  # noqa: F401  (the shared tiny-model fixture)

MAX_CONTEXT = 64
CHUNK = 8        # prefill chunk: prompts past it are prefilled over several steps
W = 8            # the tiny preset's sliding window



@pytest.fixture(scope="module")
def build_dir(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("sched")
    tok = root / "tok.json"
    tok.write_text('{"model": "dummy"}')
    return build(model, tok, root / "tiny-onnx", max_context=MAX_CONTEXT, progress=False)


class Recording:
    """A session wrapper that records the start positions of every batched forward."""

    def __init__(self, session):
        self.inner = session
        self.starts: list[list[int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, ids, start_pos, image_features=None):
        self.starts.append(np.asarray(start_pos).tolist())
        return self.inner.forward(ids, start_pos, image_features)


def _sessions(kind, model, build_dir, batch):
    if kind == "ort":
        return (OrtSession.from_build(build_dir, batch=batch, threads=1),
                OrtSession.from_build(build_dir, batch=1, threads=1))
    return TorchSession(model, MAX_CONTEXT, batch), TorchSession(model, MAX_CONTEXT, 1)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [3, 21, 9, 1, 30, 14, 5, 17, 60][:n]  # several past W and past one chunk; 60 + new
    return [rng.integers(2, 500, size=k).tolist() for k in lengths]  # tokens hits max_context


@pytest.mark.parametrize("kind", ["ort", "reference"])
def test_staggered_requests_equal_batch1(kind, model, build_dir):
    batched, single = _sessions(kind, model, build_dir, batch=4)
    rec = Recording(batched)
    sched = Scheduler(rec, max_queue=16, prefill_chunk=CHUNK)
    prompts = _prompts(9)
    new_tokens = [12, 5, 9, 15, 7, 11, 3, 10, 8]
    streams = []
    # one request submitted at each of the first steps: joins happen while others decode
    for p, n in zip(prompts, new_tokens):
        streams.append(sched.submit(Request(p, max_new_tokens=n, stop_ids=[])))
        sched.step()
    while sched.step():
        pass
    for p, n, st in zip(prompts, new_tokens, streams):
        tokens, reason, err = st.result()
        want = generate(single, p, n, stop_ids=[], chunk_size=CHUNK)
        assert tokens == want.token_ids, (len(p), tokens, want.token_ids)
        assert reason == want.stop_reason and err is None
    assert reason == "max_context"  # the 60-token prompt ran into the context's end
    # rows really were at different positions, one past the window while another was below it
    assert any(len(set(s)) == 4 for s in rec.starts)
    assert any(max(s) > W and 0 < min(s) < 4 for s in rec.starts)
    assert sched.running == 0 and sched.queued == 0


def test_stop_ids_and_leaves_every_step(model):
    """Requests of 1..4 new tokens: one leaves at nearly every step and a queued one takes its slot."""
    batched, single = _sessions("reference", model, None, batch=2)
    sched = Scheduler(batched, prefill_chunk=CHUNK)
    prompts = _prompts(6, seed=1)
    streams = [sched.submit(Request(p, max_new_tokens=1 + i % 4)) for i, p in enumerate(prompts)]
    steps = 0
    while sched.step():
        steps += 1
    for i, (p, st) in enumerate(zip(prompts, streams)):
        tokens, reason, _ = st.result()
        want = generate(single, p, 1 + i % 4, chunk_size=CHUNK)  # the config's eos ids
        assert (tokens, reason) == (want.token_ids, want.stop_reason)


def test_seeded_sampling_equals_batch1(model):
    batched, single = _sessions("reference", model, None, batch=3)
    sched = Scheduler(batched, prefill_chunk=CHUNK)
    prompts = _prompts(4, seed=2)
    cfgs = [SamplingConfig(greedy=False, temperature=0.9, top_k=20, top_p=0.9, seed=s)
            for s in (1, 2, 3, 1)]
    streams = []
    for p, c in zip(prompts, cfgs):
        streams.append(sched.submit(Request(p, max_new_tokens=10, sampling=c, stop_ids=[])))
        sched.step()
    while sched.step():
        pass
    for p, c, st in zip(prompts, cfgs, streams):
        want = generate(single, p, 10, sampling=c, stop_ids=[], chunk_size=CHUNK)
        assert st.result()[0] == want.token_ids


def test_cancel_frees_the_slot(model):
    batched, single = _sessions("reference", model, None, batch=1)
    sched = Scheduler(batched, prefill_chunk=CHUNK)
    a = sched.submit(Request(_prompts(1)[0], max_new_tokens=50, stop_ids=[]))
    b_prompt = _prompts(3)[2]
    b = sched.submit(Request(b_prompt, max_new_tokens=6, stop_ids=[]))
    for _ in range(3):
        sched.step()
    assert sched.running == 1 and sched.queued == 1  # b waits for the only slot
    a.cancel()
    sched.step()                                      # a leaves, b joins in the same step
    assert sched.queued == 0
    tokens, reason, _ = a.result()
    assert reason == "cancelled" and 0 < len(tokens) < 50
    while sched.step():
        pass
    assert b.result()[0] == generate(single, b_prompt, 6, stop_ids=[], chunk_size=CHUNK).token_ids
    # a queued request cancelled before it ever ran ends too
    c = sched.submit(Request([5, 6], max_new_tokens=3))
    c.cancel()
    assert not sched.step()
    assert c.result() == ([], "cancelled", None)


def test_queue_bound_and_validation(model):
    sched = Scheduler(TorchSession(model, MAX_CONTEXT, 1), max_queue=2)
    sched.submit(Request([5, 6]))
    sched.submit(Request([5, 6]))
    with pytest.raises(SchedulerBusy, match="busy"):
        sched.submit(Request([5, 6]))
    with pytest.raises(GenerationError, match="empty"):
        sched.submit(Request([]))
    with pytest.raises(GenerationError, match="context"):
        sched.submit(Request([5] * MAX_CONTEXT))
    with pytest.raises(GenerationError, match="out of range"):
        sched.submit(Request([5, 100000]))
    with pytest.raises(GenerationError, match="max_new_tokens"):
        sched.submit(Request([5], max_new_tokens=0))
    sched.close()  # queued requests end "cancelled"


def test_background_thread_serves_concurrent_clients(model, build_dir):
    batched, single = _sessions("ort", model, build_dir, batch=4)
    prompts = _prompts(8, seed=3)
    results: dict[int, tuple] = {}
    with Scheduler(batched, prefill_chunk=CHUNK) as sched:
        sched.start()

        def client(i):
            results[i] = sched.submit(Request(prompts[i], max_new_tokens=6, stop_ids=[])).result()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        hanging = sched.submit(Request(prompts[0], max_new_tokens=10_000 // 1, stop_ids=[]))
    assert hanging.result()[1] in ("cancelled", "max_context")  # close() ended it
    for i, p in enumerate(prompts):
        want = generate(single, p, 6, stop_ids=[], chunk_size=CHUNK)
        assert results[i] == (want.token_ids, want.stop_reason, None)


def test_ort_forward_row_touches_only_its_row(build_dir):
    """forward_row binds row r's slice of each cache buffer by address: the other rows' bytes are
    unchanged, row r's changed, the buffers are the same arrays (no copy, no reallocation), and
    the logits equal the batched forward of the same chunk in that row."""
    sess = OrtSession.from_build(build_dir, batch=3, threads=1)
    rng = np.random.default_rng(4)
    sess.forward(rng.integers(2, 500, size=(3, 12)), np.array([0, 0, 0]))
    before = [a.copy() for a in sess.cache_arrays]
    ptrs = [a.__array_interface__["data"][0] for a in sess.cache_arrays]
    chunk = rng.integers(2, 500, size=(1, 5))
    got = sess.forward_row(1, chunk, 12)
    after = sess.cache_arrays
    assert [a.__array_interface__["data"][0] for a in after] == ptrs
    for b, a in zip(before, after):
        assert np.array_equal(b[[0, 2]], a[[0, 2]])
    assert any(not np.array_equal(b[1], a[1]) for b, a in zip(before, after))
    # the same chunk through the batched graph in row 1 (rows 0 and 2 restarted at 0: ignored)
    for b, a in zip(before, after):
        a[...] = b
    ids = np.zeros((3, 5), dtype=np.int64)
    ids[1] = chunk[0]
    want = sess.forward(ids, np.array([0, 12, 0]))[1:2]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
