"""Embeddings and reranking: the one path the library, the server and the CLI tool share.

    vectors = embed(engine, [ids, ids, ...], pooling=None, normalize=2)
    scores  = rerank(engine, query, documents)

An encoder model (``model.encoder_only``: bert) runs all sequences of a micro-batch in one padded,
masked forward (up to ``engine.n_batch`` tokens per pass, as llama.cpp's ``--ubatch-size``); a decoder
(llama, qwen2, gemma3, ...) evaluates each sequence through its KV cache as before
(:meth:`~tinyinfer.engine.Engine.hidden_states`). Then, as llama.cpp:

* pooling (``<arch>.pooling_type`` of the file, or an override): ``none`` (every token's vector),
  ``mean``, ``cls`` (first token), ``last``, ``rank`` (the model's classification head on the first
  token: one score per class; on the last token of a causal model: Qwen3-Reranker's yes/no head);
* ``normalize`` (``--embd-normalize``): -1 none, 0 max-absolute scaled to int16 range, 1 taxicab,
  2 euclidean (the default), p > 2 p-norm.

A decoder file without a pooling type pools by mean and normalizes, as tinyinfer always did.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from .kernels.parallel import run_pass

POOLING_TYPES = ("none", "mean", "cls", "last", "rank")


class EmbeddingError(ValueError):
    """The request cannot be served by this model (no rank head, unknown pooling, empty input)."""


def pooling_name(p) -> Optional[str]:
    """A pooling name from a name, llama.cpp's number (0..4) or None / -1 / "unspecified" (the file's)."""
    if p is None or p == -1 or p == "unspecified":
        return None
    if isinstance(p, (int, np.integer)) and not isinstance(p, bool):
        if 0 <= int(p) < len(POOLING_TYPES):
            return POOLING_TYPES[int(p)]
    elif isinstance(p, str) and p.lower() in POOLING_TYPES:
        return p.lower()
    raise EmbeddingError(f"pooling {p!r} is not one of {', '.join(POOLING_TYPES)}")


def model_pooling(engine) -> str:
    """The pooling the loaded file asks for (``<arch>.pooling_type``); mean for a decoder without one."""
    p = getattr(engine.model, "pooling_type", None)
    if p is not None:
        return p
    v = engine.gguf.metadata.get(f"{engine.gguf.architecture}.pooling_type")
    if v is not None and 0 <= int(v) < len(POOLING_TYPES):
        return POOLING_TYPES[int(v)]
    return "mean"


def normalize(v: np.ndarray, mode: float = 2) -> np.ndarray:
    """llama.cpp's common_embd_normalize on the last axis."""
    v = np.asarray(v, np.float32)
    if mode < 0:
        return v
    a = np.abs(v.astype(np.float64))
    if mode == 0:
        s = a.max(axis=-1, keepdims=True) / 32760.0
    elif mode == 2:
        s = np.sqrt((a * a).sum(axis=-1, keepdims=True))
    else:
        s = (a ** mode).sum(axis=-1, keepdims=True) ** (1.0 / mode)
    with np.errstate(divide="ignore"):
        norm = np.where(s > 0, 1.0 / s, 0.0)
    return (v * norm).astype(np.float32)


def _pool(h: np.ndarray, pooling: str, causal: bool = False) -> np.ndarray:
    if pooling == "none":
        return h
    if pooling == "mean":
        return h.mean(axis=0)
    if pooling == "cls" or pooling == "rank" and not causal:
        return h[0]
    return h[-1]      # last; rank of a causal model (Qwen3-Reranker): only the last token saw everything


def embed(engine, seqs: Sequence[Sequence[int]], pooling=None, normalize_mode: float = 2,
          truncate: bool = False) -> list:
    """Pooled, normalized embeddings of token sequences: a (n_embd,) vector each ((len, n_embd) with
    pooling ``none``; (n_cls_out,) scores with ``rank``, not normalized unless asked)."""
    pooling = pooling_name(pooling) or model_pooling(engine)
    model = engine.model
    limit = engine.n_ctx
    encoder = getattr(model, "encoder_only", False)
    if encoder:
        limit = min(limit, model.n_ctx_train)
    seqs = [np.asarray(s, np.int64).reshape(-1) for s in seqs]
    for i, s in enumerate(seqs):
        if s.size == 0:
            raise EmbeddingError("nothing to embed: empty input" + (f" (input {i})" if len(seqs) > 1 else ""))
        if s.size > limit:
            if not truncate:
                raise EmbeddingError(f"input {i} has {s.size} tokens, more than the context of {limit}")
            seqs[i] = s[:limit]
    if pooling == "rank" and not getattr(model, "has_rank_head", False):
        raise EmbeddingError("this model has no classification head (rank pooling): it cannot rerank")
    if encoder:                       # the whole pass on the pass thread (kernels/parallel.py: run_pass)
        return run_pass(engine.n_threads, _encode, model, seqs, engine.n_batch, pooling, normalize_mode)
    hidden = [engine.hidden_states(s) for s in seqs]
    out = [_pool(h, pooling, causal=True) for h in hidden]
    if pooling == "rank":
        return run_pass(engine.n_threads, _ranked, model, out, normalize_mode)
    return [normalize(v, normalize_mode) for v in out]


def _ranked(model, pooled, normalize_mode) -> list:
    scores = model.rank(np.stack(pooled))
    return [normalize(r, normalize_mode) if normalize_mode >= 0 else r for r in scores]


def _encode(model, seqs, n_batch, pooling, normalize_mode) -> list:
    """An encoder's part of :func:`embed`: micro-batches of up to ``n_batch`` tokens of similar
    lengths (little padding), pooled, ranked or through sentence-transformers' Dense modules
    (dense_2 / dense_3)."""
    hidden = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].size)
    batch, n_tok = [], 0
    for i in order + [None]:
        if i is None or (batch and n_tok + seqs[i].size > max(n_batch, seqs[i].size)):
            for j, h in zip(batch, model.encode([seqs[j] for j in batch])):
                hidden[j] = h
            batch, n_tok = [], 0
        if i is not None:
            batch.append(i)
            n_tok += seqs[i].size
    out = [_pool(h, pooling, causal=False) for h in hidden]
    if pooling == "rank":
        return _ranked(model, out, normalize_mode)
    return [normalize(v, normalize_mode) for v in (model.dense_out(v) for v in out)]


class _Waiting:
    __slots__ = ("prepare", "key", "taken", "done", "seqs", "vecs", "error", "notify", "t_start")

    def __init__(self, prepare, key, notify=None):
        self.prepare, self.key, self.notify = prepare, key, notify
        self.taken, self.done = False, threading.Event()
        self.seqs = self.vecs = self.error = self.t_start = None


class Coalescer:
    """Embedding requests waiting for one model, evaluated together, as llama-server packs the sequences
    of concurrent requests into one pass (its slots): a request registers its inputs on arrival
    (:meth:`add`: ``prepare(engine)`` -> token sequences, run later on the model's thread) and its job
    calls :meth:`result`. The first job to run takes every registered request of the same ``key``
    (pooling, truncation), up to ``max_requests``, embeds all their sequences in one :func:`embed` (packed
    passes of ``engine.n_batch`` tokens) and hands each request its vectors; the later jobs find theirs
    done. A request whose inputs fail (``prepare`` raises) gets its own error; if the packed call fails,
    each request is evaluated alone, so an error stays with the request that caused it.

    Concurrent clients that each send one request at a time would otherwise settle into passes of half
    of them (the ones just answered are still sending their next request when the others' pass starts),
    and every pass reads all the weights (an F32 all-MiniLM: 42 MB a pass). So while the last ``recent``
    seconds saw more requests in flight than are waiting now, a pass waits up to ``window`` seconds for
    them; a lone client never waits.

    The server (tinyinfer/server/openai_api.run_embedding) queues one job per pass, not one per request:
    a request that finds no job of its key queued or running (:meth:`claim`) queues one, whose :meth:`serve`
    takes and evaluates every request waiting by then and any arriving while it runs (``max_requests`` at
    a time) until none is left; the
    others just wait, and each is told by its ``notify`` (called on the model's thread) when its vectors
    are there, all of a pass at once, instead of each request's job passing through the model's thread
    and handing its result back to the event loop in turn."""

    def __init__(self, max_requests: int = 64, window: float = 0.002, recent: float = 1.0):
        self.max_requests, self.window, self.recent = max_requests, window, recent
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._waiting: list = []
        self._in_flight = 0
        self._peak = (0, 0.0)            # (most requests in flight, when last seen)
        self._queued: set = set()        # keys with a serve() job queued that has not taken its requests yet
        self._need: dict = {}            # key -> requests a pass is waiting for (add() wakes it only then)

    def add(self, prepare: Callable, key=None, notify: Optional[Callable] = None) -> _Waiting:
        """Register a request: ``prepare(engine)`` -> its token sequences (run on the model's thread);
        ``notify()`` is called (on that thread) once its vectors or its error are set."""
        w = _Waiting(prepare, key, notify)
        with self._lock:
            self._waiting.append(w)
            self._in_flight += 1
            now = time.monotonic()
            if self._in_flight >= self._peak[0] or now - self._peak[1] > self.recent:
                self._peak = (self._in_flight, now)
            need = self._need.get(key)
            if need is None or sum(x.key == key for x in self._waiting) >= need:
                self._arrived.notify_all()       # (not the model's thread at each arrival: once all are there)
        return w

    def _done(self, x: _Waiting) -> None:
        with self._lock:
            self._in_flight -= 1
        x.done.set()
        if x.notify is not None:
            x.notify()

    def claim(self, key) -> bool:
        """True if the caller must queue a :meth:`serve` job for ``key`` (none is queued or running): the
        requests waiting when that job runs, and those arriving until it ends, are its."""
        with self._lock:
            if key in self._queued:
                return False
            self._queued.add(key)
            return True

    def release(self, key) -> None:
        """The job :meth:`claim` asked for could not be queued."""
        with self._lock:
            self._queued.discard(key)

    def fail_waiting(self, key, error: BaseException) -> None:
        """The job queued for ``key`` will not run (the queue was full, the server is shutting down): the
        requests waiting for it get ``error``."""
        with self._lock:
            self._queued.discard(key)
            failed = [x for x in self._waiting if x.key == key]
            self._waiting = [x for x in self._waiting if x.key != key]
            for x in failed:
                x.taken, x.error = True, error
        for x in failed:
            self._done(x)

    def _take(self, key, first: Optional[_Waiting] = None) -> list:
        """(holding the lock) The requests of ``key`` for one pass, ``first`` first: waits up to ``window``
        for as many as were recently in flight (see the class), takes up to ``max_requests``."""
        peak, seen = self._peak
        want = min(peak, self.max_requests) if time.monotonic() - seen <= self.recent else 1
        deadline = time.monotonic() + self.window
        while True:
            same = [x for x in self._waiting if x is not first and x.key == key]
            left = deadline - time.monotonic()
            if len(same) + (first is not None) >= want or left <= 0:
                break
            self._need[key] = want
            self._arrived.wait(left)
        self._need.pop(key, None)
        take = ([first] if first is not None else []) + same[:self.max_requests - (first is not None)]
        for x in take:
            x.taken = True
        self._waiting = [x for x in self._waiting if not x.taken]
        return take

    def serve(self, engine, key, embed_fn: Callable) -> list:
        """A pass job (see the class): evaluate every request of ``key`` waiting now or arriving during
        the pass's wait, ``max_requests`` at a time, until none is left; returns the requests served."""
        served = []
        while True:
            with self._lock:
                if not any(x.key == key for x in self._waiting):
                    self._queued.discard(key)
                    return served
                take = self._take(key)
                # (the key stays claimed while this job runs: requests arriving during a pass wait for its
                # next round here instead of queueing jobs that would find nothing left; under a steady load
                # of one-sentence clients those filled the queue to --max-queue and answered 503)
            self._run(engine, take, embed_fn)
            served += take

    def discard(self, w: _Waiting) -> None:
        """A request that will not run (its client left, the queue was full): forget it."""
        with self._lock:
            if w in self._waiting:
                self._waiting.remove(w)
                self._in_flight -= 1

    def result(self, engine, w: _Waiting, embed_fn: Callable) -> list:
        """``w``'s vectors: ``embed_fn(engine, seqs)`` over ``w`` and the requests waiting with it."""
        take = []
        with self._lock:
            if not w.taken:
                take = self._take(w.key, w)
        if take:
            self._run(engine, take, embed_fn)
        w.done.wait()
        if w.error is not None:
            raise w.error
        return w.vecs

    def _run(self, engine, take: list, embed_fn: Callable) -> None:
        try:
            ok, t0 = [], time.perf_counter()
            for x in take:
                x.t_start = t0
                try:
                    x.seqs = x.prepare(engine)
                    ok.append(x)
                except Exception as e:       # this request's own error (a bad token id, too long)
                    x.error = e
            if len(ok) > 1:
                try:
                    vecs = embed_fn(engine, [q for x in ok for q in x.seqs])
                except Exception:
                    vecs = None              # evaluated one by one below: the error goes to its request
                if vecs is not None:
                    i = 0
                    for x in ok:
                        x.vecs, i = vecs[i:i + len(x.seqs)], i + len(x.seqs)
                    ok = []
            for x in ok:
                try:
                    x.vecs = embed_fn(engine, x.seqs)
                except Exception as e:
                    x.error = e
        finally:
            for x in take:
                if x.vecs is None and x.error is None:
                    x.error = RuntimeError("embedding was not computed")
                self._done(x)


def rerank_prompt(tok, query: str, document: str, template: Optional[str] = None) -> list:
    """llama-server's rerank input: the file's ``rerank`` chat template with {query} and {document}
    filled in (Qwen3-Reranker; control tokens parsed, nothing added), else [BOS] query [EOS] [SEP]
    document [EOS] (each where the vocabulary adds it; EOS falls back to SEP)."""
    if template is not None:
        text = template.replace("{query}", query).replace("{document}", document)
        return tok.encode(text, add_bos=False, add_eos=False, special=True)
    q = tok.encode(query, add_bos=False, add_eos=False)
    d = tok.encode(document, add_bos=False, add_eos=False)
    eos = tok.eos_id if tok.eos_id is not None else tok.sep_id
    out = []
    if tok.add_bos:
        out.append(tok.bos_id)
    out += q
    if tok.add_eos and eos is not None:
        out.append(eos)
    if getattr(tok, "add_sep", False) and tok.sep_id is not None:
        out.append(tok.sep_id)
    out += d
    if tok.add_eos and eos is not None:
        out.append(eos)
    return out


def rerank(engine, query: str, documents: Sequence[str]) -> tuple:
    """Relevance scores of ``documents`` for ``query`` (the first output of the rank head, as
    llama-server) and the number of tokens evaluated."""
    if not getattr(engine.model, "has_rank_head", False):
        raise EmbeddingError("this model has no classification head (cls / cls.output tensors, rank pooling): "
                             "it cannot rerank")
    template = engine.gguf.metadata.get("tokenizer.chat_template.rerank")
    seqs = [rerank_prompt(engine.tokenizer, query, d, template) for d in documents]
    scores = embed(engine, seqs, pooling="rank", normalize_mode=-1, truncate=True)
    return [float(s[0]) for s in scores], sum(len(s) for s in seqs)


class EmbeddingMixin:
    """llama-cpp-python's ``Llama.embed`` / ``create_embedding`` on top of :func:`embed` (mixed into
    :class:`tinyinfer.api.Llama`, which sets ``_engine``, ``model_path``, ``embedding`` and ``pooling_type``)."""

    def embed(self, input, normalize: bool = False, truncate: bool = True, return_count: bool = False):
        """Embeddings of a string (one vector) or a list of strings (a list of vectors), as
        llama-cpp-python: not normalized unless ``normalize`` (then L2), ``truncate`` to the context,
        with pooling ``none`` a list of per-token vectors per input."""
        if not getattr(self, "embedding", False):
            raise RuntimeError("Llama model must be created with embedding=True to call this method")
        tok = self._engine.tokenizer
        inputs = [input] if isinstance(input, str) else list(input)
        seqs = [tok.encode(x, add_bos=tok.add_bos, special=False) for x in inputs]
        vecs = embed(self._engine, seqs, pooling=getattr(self, "pooling_type", None),
                     normalize_mode=2 if normalize else -1, truncate=truncate)
        data = [v.tolist() for v in vecs]
        out = data[0] if isinstance(input, str) else data
        if return_count:
            return out, sum(min(len(s), self._engine.n_ctx) for s in seqs)
        return out

    def create_embedding(self, input, model: Optional[str] = None) -> dict:
        """The OpenAI response shape (llama-cpp-python: vectors not normalized)."""
        inputs = [input] if isinstance(input, str) else list(input)
        data, n = self.embed(inputs, return_count=True)
        return {"object": "list", "data": [{"object": "embedding", "embedding": e, "index": i}
                                           for i, e in enumerate(data)],
                "model": model if model is not None else self.model_path,
                "usage": {"prompt_tokens": n, "total_tokens": n}}
