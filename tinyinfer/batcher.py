"""Continuous batching for the engines of one shared KV cache (see :class:`Batcher`)."""

from __future__ import annotations

import os
import threading
import time
from typing import List

import numpy as np

from .kernels import ops
from .kernels.parallel import run_pass
from .kvcache import Batch


def common_prefix(a, b) -> int:
    """The number of leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# TINYINFER_STEP_TRACE=PATH: a timeline of the batcher, appended to PATH as it runs (one line per
# evaluation that arrives: "A time seq n_tokens"; per forward pass: "R start end n_requests n_tokens
# n_threads"; perf_counter seconds), which benchmarks/bench_serving.py --trace sums up per run
_TRACE = open(os.environ["TINYINFER_STEP_TRACE"], "a", buffering=1) if os.environ.get("TINYINFER_STEP_TRACE") else None


class _Request:
    __slots__ = ("engine", "ids", "pos0", "n_out", "embeddings", "result", "error", "done")

    def __init__(self, engine, ids, pos0, n_out, embeddings):
        self.engine, self.ids, self.pos0, self.n_out, self.embeddings = engine, ids, pos0, n_out, embeddings
        self.result = self.error = None
        self.done = False


class Batcher:
    """Continuous batching for the engines of one shared cache, each driven by its own thread.

    An engine inside :meth:`Engine.generate` is *active*. Its evaluations wait here; when every
    active engine is waiting, the last to arrive runs them all (no scheduler thread): the single
    tokens of all sequences as one forward pass (a :class:`Batch`, so each weight is read once per
    step for all of them), then each prompt chunk on its own. Engines join and leave between steps;
    sampling stays in each engine's thread.
    """

    def __init__(self, first):
        self.model, self.cache = first.model, first.cache
        self.n_threads = first.n_threads
        self.engines: List = [first]
        self.cv = threading.Condition()
        self.active = 0
        self.pending: List[_Request] = []
        self.running = False
        self.n_steps = 0             # forward passes run (tests, /metrics)
        self.max_batch = 0           # the most sequences decoded in one pass

    def enter(self) -> None:
        with self.cv:
            self.active += 1

    def leave(self) -> None:
        with self.cv:
            self.active -= 1
            self.cv.notify_all()

    def forward(self, engine, ids, pos0, n_out, embeddings=False):
        req = _Request(engine, np.asarray(ids, np.int64), pos0, n_out, embeddings)
        if _TRACE is not None:
            _TRACE.write(f"A {time.perf_counter():.6f} {engine.seq} {req.ids.size}\n")
        with self.cv:
            self.pending.append(req)
            while not req.done:
                # an evaluation outside generate() (an embedding) counts as active while it waits
                waiting = len(self.pending)
                if not self.running and self.pending and waiting >= self.active:
                    take, self.pending = self.pending, []
                    self.running = True
                    self.cv.release()
                    try:
                        t0 = time.perf_counter()
                        run_pass(self.n_threads, self._run, take)     # the process's one pass thread
                        if _TRACE is not None:
                            _TRACE.write(f"R {t0:.6f} {time.perf_counter():.6f} {len(take)} "
                                         f"{sum(r.ids.size for r in take)} {self.n_threads}\n")
                    finally:
                        self.cv.acquire()
                        self.running = False
                        self.cv.notify_all()
                else:
                    self.cv.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def _run(self, reqs: List[_Request]) -> None:
        # one pass for the single tokens of the decoding sequences and the prompt chunks that want one
        # logits row (a slot that has just taken a request): each weight is read once for all of them,
        # as llama-server mixes prompts into its decode batches. A chunk whose attention would take
        # the matrix-product path alone (ops.attention_uses_blas) keeps its own pass: its numbers must
        # not depend on the others (batch invariance); so do embeddings and several logits rows.
        mixed = [r for r in reqs if r.n_out == 1 and not r.embeddings
                 and (r.ids.size == 1 or not ops.attention_uses_blas(r.ids.size, r.pos0 + r.ids.size))]
        rest = [r for r in reqs if r not in mixed]
        if mixed:
            try:
                self._run_mixed(mixed)
            except Exception as e:
                for r in mixed:        # run them apart, so that only the one at fault is told
                    try:
                        if len(mixed) == 1:
                            raise e
                        self._run_mixed([r])
                    except Exception as e1:
                        r.error = e1
            for r in mixed:
                r.done = True
        for r in rest:
            try:
                r.result = self.model.forward(r.ids, Batch.run(r.engine.seq, r.pos0, r.ids.size), self.cache,
                                              n_out=r.n_out, embeddings=r.embeddings)
                self.n_steps += 1
            except Exception as e:
                r.error = e
            r.done = True

    def _run_mixed(self, reqs: List[_Request]) -> None:
        """One forward pass of ``reqs`` (one logits row each): the prompt chunks' tokens but their last
        first, then the last token of every request, whose logits rows the pass returns in order. The
        order of a pass's tokens changes nothing: every token's k/v is stored before any attends."""
        head = [r for r in reqs if r.ids.size > 1]
        pos, seq, ids = [], [], []
        for r in head:
            m = r.ids.size - 1
            pos.append(np.arange(r.pos0, r.pos0 + m, dtype=np.int64))
            seq.append(np.full(m, r.engine.seq, np.int64))
            ids.append(r.ids[:-1])
        pos.append(np.array([r.pos0 + r.ids.size - 1 for r in reqs], np.int64))
        seq.append(np.array([r.engine.seq for r in reqs], np.int64))
        ids.append(np.array([r.ids[-1] for r in reqs], np.int64))
        if head:
            b, ids = Batch(np.concatenate(pos), np.concatenate(seq)), np.concatenate(ids)
        else:
            b, ids = Batch(pos[-1], seq[-1]), ids[-1]
        out = self.model.forward(ids, b, self.cache, n_out=len(reqs))
        self.n_steps += 1
        self.max_batch = max(self.max_batch, len(reqs))
        for i, r in enumerate(reqs):
            r.result = out[i:i + 1]

    def reuse_prefix(self, engine, prompt_ids, keep: int) -> int:
        """llama-server's cache_prompt across slots: when a free sequence's cache holds a longer
        prefix of ``prompt_ids`` than ``engine``'s own (``keep`` tokens), copy those cells over."""
        best, src = keep, None
        for other in self.engines:
            if other is engine or other.busy:
                continue
            n = common_prefix(other.tokens, prompt_ids)
            if n > best:
                best, src = n, other
        if src is None:
            return keep
        with self.cv:                  # not while a forward pass writes the cache
            while self.running:
                self.cv.wait()
            if src.busy:
                return keep
            n = min(best, common_prefix(src.tokens, prompt_ids))
            self.model.cache_copy(self.cache, src.seq, engine.seq, n)
        engine.tokens = list(prompt_ids[:n])
        return n
