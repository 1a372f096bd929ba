"""Slots: the engines, the worker threads that drive them, and the bounded queue in front.

An :class:`Engine` is not thread-safe, so each slot owns one engine and one worker
thread; a request is a :class:`Job` (a generator function run on the slot's engine)
that waits in a bounded FIFO until a slot is free. The worker pushes what the
generator yields to the request's asyncio queue (``loop.call_soon_threadsafe``), so
the event loop never blocks on the model. A job whose client went away is cancelled:
its worker stops at the next token and the slot takes the next job.

Beyond ``max_queue`` waiting jobs :meth:`SlotPool.submit` raises :class:`QueueFull`
(the server answers 503 with Retry-After); while draining (SIGTERM) it raises
:class:`ShuttingDown`, and jobs still waiting are told so, while running ones finish.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from typing import Any, Callable, Iterator, List, Optional

__all__ = ["SlotPool", "Job", "QueueFull", "ShuttingDown", "END"]

END = object()      # the job's generator is exhausted


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy ({retry_after} s until a slot is likely free); retry later")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    def __init__(self):
        super().__init__("the server is shutting down")


class Job:
    """One request's work: ``fn(engine, job)`` returns an iterator run in a worker thread."""

    _ids = iter(range(1 << 62))

    def __init__(self, fn: Callable[[Any, "Job"], Iterator[Any]], loop: asyncio.AbstractEventLoop):
        self.id = next(Job._ids)
        self.pool: Optional["SlotPool"] = None
        self.fn = fn
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.t_submit = time.perf_counter()
        self.t_start: Optional[float] = None
        self.t_end: Optional[float] = None
        self.slot: Optional[int] = None
        self.rejected = False            # told "shutting down" while waiting
        self.stats: Any = None           # set by fn, read after END

    def cancel(self) -> None:
        self.cancelled.set()
        if self.pool is not None:
            self.pool._forget(self)      # a waiting job gives its queue place back at once

    def _emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:   # the loop is closed: nobody is listening any more
            self.cancelled.set()

    async def next(self):
        """The next item: a yielded value, END, or an exception instance (raised by fn)."""
        return await self.events.get()


class SlotPool:
    def __init__(self, n_slots: int, max_queue: int, on_done: Optional[Callable[[Job, str], None]] = None):
        if n_slots < 1:
            raise ValueError(f"--parallel must be >= 1, got {n_slots}")
        if max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
        self.n_slots = n_slots
        self.max_queue = max_queue
        self.engines: List[Any] = []
        self._q: "queue.SimpleQueue[Optional[Job]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self.n_waiting = 0
        self.n_processing = 0
        self.draining = False
        self.on_done = on_done
        self._durations: List[float] = []       # recent job run times, for Retry-After
        self._waiting: set = set()               # jobs submitted, not yet taken by a worker
        self.current: List[Optional[Job]] = [None] * n_slots    # the job each slot runs

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, engines: List[Any]) -> None:
        """Give the pool its engines (one per slot) and start one worker thread per slot."""
        if len(engines) != self.n_slots:
            raise ValueError(f"{self.n_slots} slots need {self.n_slots} engines, got {len(engines)}")
        self.engines = list(engines)
        for i, eng in enumerate(self.engines):
            t = threading.Thread(target=self._worker, args=(i, eng), name=f"tinyinfer-slot-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def drain(self) -> None:
        """Stop taking jobs: new submits raise ShuttingDown, waiting jobs are told at once (they
        get ShuttingDown), running ones finish. Safe to call from a signal handler: the waiting
        jobs are told from a helper thread, never under a lock the interrupted code may hold."""
        self.draining = True
        threading.Thread(target=self._reject_waiting, name="tinyinfer-drain", daemon=True).start()

    def _reject_waiting(self) -> None:
        with self._lock:
            waiting = list(self._waiting)
        for job in waiting:
            job.rejected = True
            job.cancelled.set()
            job._emit(ShuttingDown())

    def stop(self, timeout: float = 5.0) -> None:
        self.draining = True
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout)

    # -- submitting ------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self.engines)

    def retry_after(self) -> int:
        with self._lock:
            recent = self._durations[-32:]
            waiting = self.n_waiting
        avg = sum(recent) / len(recent) if recent else 1.0
        return int(min(60, max(1, math.ceil(avg * (waiting + 1) / self.n_slots))))

    def submit(self, fn: Callable[[Any, Job], Iterator[Any]], loop: asyncio.AbstractEventLoop) -> Job:
        if self.draining:
            raise ShuttingDown()
        with self._lock:
            full = self.n_processing + self.n_waiting >= self.n_slots + self.max_queue
            if not full:
                self.n_waiting += 1
        if full:
            raise QueueFull(self.retry_after())
        job = Job(fn, loop)
        job.pool = self
        with self._lock:
            self._waiting.add(job)
        self._q.put(job)
        return job

    # -- the worker ------------------------------------------------------------------------
    def _worker(self, slot: int, engine) -> None:
        # (numba's thread count is per calling thread: the engine applies its own before each pass)
        while True:
            job = self._q.get()
            if job is None:
                return
            with self._lock:
                if job not in self._waiting:
                    continue                # cancelled while waiting: its place was given back then
                self.n_waiting -= 1
                self._waiting.discard(job)
                if not job.cancelled.is_set() and not self.draining:
                    self.n_processing += 1
                    run = True
                else:
                    run = False
            if not run:
                if job.rejected:
                    self._done(job, "rejected")          # told by drain()
                elif job.cancelled.is_set():
                    job._emit(END)
                    self._done(job, "cancelled")
                else:
                    job._emit(ShuttingDown())
                    self._done(job, "rejected")
                continue
            job.slot = slot
            self.current[slot] = job
            job.t_start = time.perf_counter()
            outcome = "ok"
            it = None
            try:
                it = job.fn(engine, job)
                while True:
                    if job.cancelled.is_set():
                        outcome = "cancelled"
                        break
                    item = next(it, END)
                    if item is END:
                        break
                    job._emit(item)
            except Exception as e:          # delivered to the request, which answers with it
                outcome = "error"
                job._emit(e)
            finally:
                if it is not None and hasattr(it, "close"):
                    try:
                        it.close()          # stops Engine.generate where it is
                    except Exception:
                        pass
                job.t_end = time.perf_counter()
                with self._lock:
                    self.current[slot] = None
                    self.n_processing -= 1
                    self._durations.append(job.t_end - job.t_start)
                    del self._durations[:-64]
            if outcome != "error":
                job._emit(END)
            self._done(job, outcome)

    def _forget(self, job: Job) -> None:
        """A job cancelled before a worker took it: out of the queue count now, not when a slot frees."""
        with self._lock:
            if job not in self._waiting:
                return
            self._waiting.discard(job)
            self.n_waiting -= 1
        job._emit(END)
        self._done(job, "rejected" if job.rejected else "cancelled")

    def _done(self, job: Job, outcome: str) -> None:
        if self.on_done is not None:
            try:
                self.on_done(job, outcome)
            except Exception:
                pass
