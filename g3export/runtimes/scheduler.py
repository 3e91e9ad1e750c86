"""Continuous batching over one session (DESIGN §3.8, issue 13; the interface is the serving
contract that the Triton model consumes).

    sched = Scheduler(session, max_queue=64, prefill_chunk=512)   # slots = session.batch
    sched.start()                                 # background thread running step() until close()
    stream = sched.submit(Request(prompt_ids=[2, ...], max_new_tokens=64))
    for ev in stream:                             # blocks until the next event
        ev.token_id, ev.finish_reason, ev.error   # finish_reason set on the final event only
    stream.cancel()                               # frees the slot at the next step
    sched.step() -> bool                          # one step by hand (tests); False when idle
    sched.close()                                 # stop; every open stream ends "cancelled"

The session's `batch` rows are sequence slots; each request holds one from its first prefill
chunk to its last token. A step is:
1. cancelled requests (running or queued) end with "cancelled" and free their slots;
2. queued requests take free slots (first come, first served);
3. ONE prefill chunk of one joining request runs with `forward_row` (its row only); joining
   requests are prefilled one after another in order of arrival (the oldest first: lower mean
   time to first token than alternating); the chunk that ends a prompt gives the first token;
4. ONE decode step runs all rows with `forward` (T = 1, each row at its own position) when any
   request is decoding; when exactly one is, it runs that row alone with `forward_row` (a
   one-row step reads the weights as a batch-1 session does: the ONNX Runtime lm_head's one-row
   kernel, g3export.export.onnx_lm_head, and no work for idle rows).
So a long prompt is prefilled one chunk per step while the running requests keep decoding, a
request joins and leaves between decode steps, and nothing waits for a batch to drain.

Rows that are not decoding still run in the decode step (the graph has a fixed batch); their
logits are ignored and their write must be harmless. A free row is given position 0 (its slot
is free). A row in the middle of its prefill is given its next prefill position p: the write
lands in slot p mod S, which on a full layer the next chunk overwrites and on a sliding ring held
position p - W, which no query at >= p can see (the window is j > i - W); the mask of the next
chunk treats the slot by position either way (g3export.modeling.attention), so the prefill is
exact. Why `forward_row` rather than one batched prefill with a length per row: BENCHMARKS.md.

Equality with batch 1: every request has its own Sampler (seeded from its SamplingConfig) called
once per token, as `generate()` does, and the same stop rules in the same order (stop id, then
max_new_tokens, then the context being full), so greedy output equals `generate()` batch 1 token
for token (tests/runtimes/test_scheduler.py), up to float differences between a batched and a
batch-1 matrix product.

No allocation per step for the decode inputs: the [B, 1] ids and [B] positions are two arrays
made once and refilled in place. The queue is bounded: `submit` raises SchedulerBusy beyond
`max_queue` waiting requests (requests in slots do not count).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..errors import UserError
from .generate import GenerationError, plan_prompt
from .sampling import Sampler, SamplingConfig
from .session import Session

FINISH_REASONS = ("stop_token", "max_new_tokens", "max_context", "cancelled", "error")


class SchedulerBusy(UserError, RuntimeError):
    """The request queue is full: retry later, or run more slots / a larger max_queue."""


class SchedulerClosed(UserError, RuntimeError):
    """submit() after close()."""


@dataclass
class Request:
    prompt_ids: Sequence[int]
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_ids: Sequence[int] | None = None        # None: the config's eos ids
    image_features: np.ndarray | None = None     # [N, mm_tokens, hidden] float32


@dataclass(frozen=True)
class Event:
    token_id: int | None                  # None on the final event
    finish_reason: str | None = None      # set on the final event only (FINISH_REASONS)
    error: str | None = None              # the message when finish_reason == "error"


class Stream:
    """The events of one request; iterate it (thread-safe, blocking). `cancel()` ends it."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self.finished = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self._events.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def result(self) -> tuple[list[int], str, str | None]:
        """Block until the end: (token ids, finish_reason, error)."""
        tokens = []
        for ev in self:
            if ev.token_id is not None:
                tokens.append(ev.token_id)
            if ev.finish_reason is not None:
                return tokens, ev.finish_reason, ev.error
        raise AssertionError("unreachable")

    # -- scheduler side ------------------------------------------------------------------------
    def _token(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._events.put(Event(token))

    def _finish(self, reason: str, error: str | None = None) -> None:
        if not self.finished:
            self.finished = True
            self.finished_at = time.perf_counter()
            self._events.put(Event(None, reason, error))


@dataclass
class _Slot:
    """A request in a row: prefilling (chunks left) or decoding (`token` waits at `pos`)."""
    stream: Stream
    ids: list[int]
    feats: np.ndarray | None
    chunks: collections.deque
    sampler: Sampler
    stop: frozenset
    max_new_tokens: int
    pos: int = 0              # next position to write (prefill: next chunk start; decode: token's)
    token: int | None = None  # decoding: the last sampled token, fed at `pos` by the next step
    n_out: int = 0
    feats_used: int = 0


class Scheduler:
    """Continuous batching over one session; see the module docstring."""

    def __init__(self, session: Session, max_queue: int = 64, prefill_chunk: int = 512):
        if max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_queue must be >= 0 and prefill_chunk >= 1")
        self.session = session
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.slots: list[_Slot | None] = [None] * session.batch
        self._queue: collections.deque[tuple[Stream, _Slot]] = collections.deque()
        self._joining: collections.deque[int] = collections.deque()  # rows prefilling, in order
        self._lock = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ids = np.zeros((session.batch, 1), dtype=np.int64)   # decode inputs, made once
        self._pos = np.zeros(session.batch, dtype=np.int64)
        self.steps = 0

    # -- client side ---------------------------------------------------------------------------
    def submit(self, request: Request) -> Stream:
        """Validate and enqueue; raises GenerationError (bad request), SchedulerBusy (queue full)."""
        cfg = self.session.config
        ids = [int(i) for i in request.prompt_ids]
        if request.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        feats, chunks = plan_prompt(self.session, ids, request.image_features, self.prefill_chunk)
        stop = cfg.text.eos_token_ids if request.stop_ids is None else request.stop_ids
        stream = Stream()
        slot = _Slot(stream, ids, feats, collections.deque(chunks), Sampler(request.sampling),
                     frozenset(int(s) for s in stop), int(request.max_new_tokens))
        with self._lock:
            if self._closed:
                raise SchedulerClosed("the scheduler is closed")
            if len(self._queue) >= self.max_queue:
                raise SchedulerBusy(f"busy: {self.session.batch} requests running and "
                                    f"{len(self._queue)} waiting (max_queue={self.max_queue}); "
                                    "retry later")
            self._queue.append((stream, slot))
            self._lock.notify_all()
        return stream

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def start(self) -> None:
        """Run step() on a background thread until close()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="g3-scheduler", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread (after its current step); every open stream ends with "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            while self._queue:
                self._queue.popleft()[0]._finish("cancelled")
        for row, s in enumerate(self.slots):
            if s is not None:
                self._free(row, "cancelled")

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
            try:
                busy = self.step()
            except Exception as e:  # a session failure: end every running request, keep serving
                for row, s in enumerate(self.slots):
                    if s is not None:
                        self._free(row, "error", f"{type(e).__name__}: {e}")
                busy = True
            if not busy:
                with self._lock:
                    if not self._closed and not self._queue and not self._has_cancel():
                        self._lock.wait(timeout=0.05)

    def _has_cancel(self) -> bool:
        return any(s is not None and s.stream.cancelled for s in self.slots)

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> bool:
        """One step (see the module docstring). Returns False when there was nothing to do."""
        self._admit()
        if not self._joining and not any(s is not None and s.token is not None
                                         for s in self.slots):
            return False
        self.steps += 1
        if self._joining:
            self._prefill_one(self._joining[0])
        if any(s is not None and s.token is not None for s in self.slots):
            self._decode()
        return True

    def _admit(self) -> None:
        for row, s in enumerate(self.slots):
            if s is not None and s.stream.cancelled:
                self._free(row, "cancelled")
        with self._lock:
            for item in [it for it in self._queue if it[0].cancelled]:
                self._queue.remove(item)
                item[0]._finish("cancelled")
            for row in range(len(self.slots)):
                if self.slots[row] is None and self._queue:
                    _, slot = self._queue.popleft()
                    self.slots[row] = slot
                    self._joining.append(row)

    def _free(self, row: int, reason: str, error: str | None = None) -> None:
        s = self.slots[row]
        self.slots[row] = None
        if row in self._joining:
            self._joining.remove(row)
        if s is not None:
            s.stream._finish(reason, error)

    def _prefill_one(self, row: int) -> None:
        s = self.slots[row]
        start, end = s.chunks.popleft()
        chunk = np.asarray([s.ids[start:end]], dtype=np.int64)
        f = None
        if s.feats is not None:
            m = int((chunk == self.session.config.image_token_id).sum())
            if m:
                f = s.feats[s.feats_used:s.feats_used + m]
                s.feats_used += m
        try:
            logits = self.session.forward_row(row, chunk, start, f)
        except Exception as e:
            self._free(row, "error", f"{type(e).__name__}: {e}")
            return
        s.pos = end
        if s.chunks:
            return
        self._joining.remove(row)
        self._emit(row, int(s.sampler(logits)[0]))

    def _decode(self) -> None:
        ids, pos = self._ids, self._pos
        decoding = [row for row, s in enumerate(self.slots)
                    if s is not None and s.token is not None]
        if len(decoding) == 1 and len(self.slots) > 1:  # one row: run it alone
            (row,) = decoding
            s = self.slots[row]
            ids[row, 0] = s.token
            logits = self.session.forward_row(row, ids[row:row + 1], s.pos)
            s.pos += 1
            self._emit(row, int(s.sampler(logits)[0]))
            return
        for row, s in enumerate(self.slots):
            if s is None:
                ids[row, 0], pos[row] = 0, 0             # a free row: its slot is free
            elif s.token is None:
                ids[row, 0], pos[row] = 0, s.pos         # mid-prefill: harmless, see docstring
            else:
                ids[row, 0], pos[row] = s.token, s.pos
        logits = self.session.forward(ids, pos)
        for row, s in enumerate(self.slots):
            if s is not None and s.token is not None:
                s.pos += 1
                self._emit(row, int(s.sampler(logits[row:row + 1])[0]))

    def _emit(self, row: int, token: int) -> None:
        """Stream the token, then apply generate()'s stop rules in its order."""
        s = self.slots[row]
        s.n_out += 1
        s.token = token
        s.stream._token(token)
        if token in s.stop:
            self._free(row, "stop_token")
        elif s.n_out >= s.max_new_tokens:
            self._free(row, "max_new_tokens")
        elif s.pos >= self.session.max_context:
            self._free(row, "max_context")


__all__ = ["Scheduler", "Request", "Event", "Stream", "SchedulerBusy", "SchedulerClosed",
           "FINISH_REASONS"]
