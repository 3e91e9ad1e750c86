"""PLACEHOLDER (branch `triton`): a minimal scheduler with the interface of SERVING_CONTRACT.md,
written only so the Triton server can be tested before helper "rows" lands the real one. At merge
the lead REPLACES this file with "rows"'s g3export/runtimes/scheduler.py (same names and
semantics); nothing else in the tree depends on its internals.

    sched = Scheduler(session, max_queue=64, prefill_chunk=512)   # slots = session.batch
    sched.start()
    stream = sched.submit(Request(prompt_ids, max_new_tokens, sampling, stop_ids, image_features))
    for ev in stream: ev.token_id, ev.finish_reason, ev.error
    stream.cancel(); sched.close()

What it does: one step = one prefill chunk of the oldest joining request (chunked like
generate(): same chunk boundaries, so the same numbers), then one decode token for every running
row, each through session.forward_row (exact; not batched). Requests beyond the slots wait in a
bounded queue; beyond it submit() raises SchedulerBusy.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .generate import GenerationError, check_prompt, prefill_chunks
from .sampling import Sampler, SamplingConfig
from ..errors import UserError


class SchedulerBusy(UserError, RuntimeError):
    """The request queue is full; try again later."""


@dataclass
class Request:
    prompt_ids: Sequence[int]
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_ids: Sequence[int] | None = None
    image_features: np.ndarray | None = None


@dataclass(frozen=True)
class Event:
    token_id: int | None
    finish_reason: str | None = None
    error: str | None = None


class Stream:
    def __init__(self):
        self._q: queue.Queue[Event] = queue.Queue()
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, ev: Event) -> None:
        if not self.done:
            self.done = ev.finish_reason is not None
            self._q.put(ev)

    def __iter__(self):
        while True:
            ev = self._q.get()
            yield ev
            if ev.finish_reason is not None:
                return


_SEQ = itertools.count()


class _Active:
    def __init__(self, req: Request, stream: Stream, ids: list[int], feats, chunks, stop):
        self.req, self.stream, self.ids, self.feats, self.chunks = req, stream, ids, feats, chunks
        self.stop = stop
        self.sampler = Sampler(req.sampling)
        self.next_chunk, self.used_feats, self.pos, self.out = 0, 0, 0, []
        self.seq = next(_SEQ)


class Scheduler:
    def __init__(self, session, max_queue: int = 64, prefill_chunk: int = 512):
        self.session, self.max_queue, self.prefill_chunk = session, max_queue, prefill_chunk
        self.slots: list[_Active | None] = [None] * session.batch
        self.waiting: deque[_Active] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, req: Request) -> Stream:
        cfg = self.session.config
        ids = [int(i) for i in req.prompt_ids]
        check_prompt(ids, self.session)
        if req.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        n_img = sum(1 for i in ids if i == cfg.image_token_id) if cfg.has_vision else 0
        feats = None
        if req.image_features is not None:
            feats = np.asarray(req.image_features, np.float32).reshape(-1, cfg.text.hidden_size)
            if feats.shape[0] != n_img:
                raise GenerationError(f"{feats.shape[0] // cfg.mm_tokens_per_image} image(s) given "
                                      f"but the prompt holds {n_img} image tokens")
        elif n_img:
            raise GenerationError(f"the prompt holds {n_img} image tokens but no image was given")
        limit = self.session.prefill_chunk
        size = min(self.prefill_chunk, limit or self.prefill_chunk)
        chunks = prefill_chunks(ids, size, cfg.image_token_id, self.session.chunk_align)
        stop = set(cfg.text.eos_token_ids if req.stop_ids is None else req.stop_ids)
        stream = Stream()
        with self._lock:
            if self._closed:
                raise SchedulerBusy("the scheduler is closed")
            if len(self.waiting) >= self.max_queue:
                raise SchedulerBusy(f"busy: {len(self.waiting)} requests are waiting for "
                                    f"{len(self.slots)} slots; try again later")
            self.waiting.append(_Active(req, stream, ids, feats, chunks, stop))
        self._wake.set()
        return stream

    def _finish(self, row: int, reason: str, error: str | None = None) -> None:
        a = self.slots[row]
        self.slots[row] = None
        a.stream._put(Event(None, reason, error))

    def _emit(self, row: int, token: int) -> None:
        a = self.slots[row]
        a.out.append(token)
        a.stream._put(Event(token))
        if token in a.stop:
            self._finish(row, "stop_token")
        elif len(a.out) >= a.req.max_new_tokens:
            self._finish(row, "max_new_tokens")
        elif a.pos >= self.session.max_context:
            self._finish(row, "max_context")

    def step(self) -> bool:
        s = self.session
        with self._lock:
            for r, a in enumerate(self.slots):
                if a is not None and a.stream.cancelled:
                    self._finish(r, "cancelled")
            for r in range(len(self.slots)):
                while self.slots[r] is None and self.waiting:
                    a = self.waiting.popleft()
                    if a.stream.cancelled:
                        a.stream._put(Event(None, "cancelled"))
                    else:
                        self.slots[r] = a
        busy = [r for r, a in enumerate(self.slots) if a is not None]
        if not busy:
            return False
        try:
            prefilling = [r for r in busy if self.slots[r].next_chunk < len(self.slots[r].chunks)]
            if prefilling:  # one chunk of the row that joined first
                r = min(prefilling, key=lambda r: self.slots[r].seq)
                a = self.slots[r]
                st, en = a.chunks[a.next_chunk]
                chunk = np.asarray([a.ids[st:en]], dtype=np.int64)
                f = None
                if a.feats is not None:
                    m = int((chunk == s.config.image_token_id).sum())
                    if m:
                        f, a.used_feats = a.feats[a.used_feats:a.used_feats + m], a.used_feats + m
                logits = s.forward_row(r, chunk, st, f)
                a.next_chunk += 1
                if a.next_chunk == len(a.chunks):
                    a.pos = len(a.ids)
                    self._emit(r, int(a.sampler(logits)[0]))
            for r in busy:
                a = self.slots[r]
                if a is None or a.next_chunk < len(a.chunks):
                    continue
                logits = s.forward_row(r, np.asarray([[a.out[-1]]], dtype=np.int64), a.pos)
                a.pos += 1
                self._emit(r, int(a.sampler(logits)[0]))
        except Exception as e:  # a failing session ends every running request, not the thread
            for r, a in enumerate(self.slots):
                if a is not None:
                    self._finish(r, "error", f"{type(e).__name__}: {e}")
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="g3export-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            if not self.step():
                self._wake.wait(0.05)
                self._wake.clear()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            for r, a in enumerate(self.slots):
                if a is not None:
                    self._finish(r, "cancelled")
            while self.waiting:
                self.waiting.popleft().stream._put(Event(None, "cancelled"))
