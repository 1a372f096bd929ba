"""The one generation loop: CLI, library (``Llama``) and server all drive this.

An :class:`Engine` owns an opened GGUF file, its tokenizer, model and KV cache,
and the tokens that cache holds (so a new prompt sharing a prefix with the last
one only evaluates the rest). :meth:`Engine.generate` yields one :class:`Step`
per generated token and ends with the finish reason; timings are kept the way
llama.cpp keeps them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import numpy as np

from .gguf import GGUFFile
from .kvcache import Batch, cache_type
from .sampler import Sampler, SamplerParams
from .tokenizer import Tokenizer


class ContextError(ValueError):
    """A prompt does not fit the context, or is empty."""


@dataclass
class Timings:
    load_ms: float = 0.0
    compile_ms: float = 0.0
    prompt_ms: float = 0.0
    n_prompt: int = 0
    eval_ms: float = 0.0
    n_eval: int = 0
    sample_ms: float = 0.0
    n_sample: int = 0

    def reset(self):
        self.prompt_ms = self.eval_ms = self.sample_ms = 0.0
        self.n_prompt = self.n_eval = self.n_sample = 0

    def report(self) -> str:
        """llama.cpp's llama_perf_*_print lines."""
        def rate(ms, n):
            return (ms / n if n else 0.0), (1000.0 * n / ms if ms > 0 else 0.0)
        s_per, s_rate = rate(self.sample_ms, self.n_sample)
        p_per, p_rate = rate(self.prompt_ms, self.n_prompt)
        e_per, e_rate = rate(self.eval_ms, self.n_eval)
        total = self.prompt_ms + self.eval_ms + self.sample_ms
        return "\n".join([
            f"llama_perf_sampler_print:    sampling time = {self.sample_ms:10.2f} ms / {self.n_sample:5d} runs   "
            f"({s_per:8.2f} ms per token, {s_rate:8.2f} tokens per second)",
            f"llama_perf_context_print:        load time = {self.load_ms:10.2f} ms",
            f"llama_perf_context_print:     compile time = {self.compile_ms:10.2f} ms (numba JIT, first run only)",
            f"llama_perf_context_print: prompt eval time = {self.prompt_ms:10.2f} ms / {self.n_prompt:5d} tokens "
            f"({p_per:8.2f} ms per token, {p_rate:8.2f} tokens per second)",
            f"llama_perf_context_print:        eval time = {self.eval_ms:10.2f} ms / {self.n_eval:5d} runs   "
            f"({e_per:8.2f} ms per token, {e_rate:8.2f} tokens per second)",
            f"llama_perf_context_print:       total time = {total:10.2f} ms / {self.n_prompt + self.n_eval:5d} tokens",
        ])


@dataclass
class Step:
    token: int
    text: str                      # the new text this token completes (may be "" mid-character)
    logprob: float = 0.0
    top_logprobs: Optional[dict] = None
    finish_reason: Optional[str] = None   # set on the last step: "stop" or "length"
    truncated: bool = False        # last step of a JSON reply closed early to fit max_tokens


def set_threads(n_threads: Optional[int]) -> int:
    import numba
    if n_threads and n_threads > 0:
        n = n_threads
    else:                          # the performance cores (big.LITTLE aware), as llama.cpp's default
        from .sysinfo import performance_cores
        n = performance_cores()
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


class StateError(ValueError):
    """A saved state (``--prompt-cache`` file, ``load_state``) that is corrupted or made for another model."""


class Engine:
    """One sequence's view of a model and its KV cache.

    ``n_seq > 1`` makes a cache for that many sequences and a :class:`Batcher`; :meth:`fork` gives
    the other sequences an engine each (sharing the weights, the cache and the batcher), and their
    single-token evaluations, made from as many threads, are decoded together in one forward pass.
    ``type_k`` / ``type_v``: the cache's types (f16, q8_0, q4_0). ``context_shift``: when a generation
    fills the context, drop the oldest half of what follows the first ``n_keep`` tokens and go on.
    """

    def __init__(self, model_path, n_ctx: int = 4096, n_batch: int = 512, n_threads: Optional[int] = None,
                 vocab_only: bool = False, logits_all: bool = False, verbose: bool = False,
                 progress: Optional[bool] = None, split: int = 1, type_k: str = "f16", type_v: str = "f16",
                 n_seq: int = 1, context_shift: bool = False, n_keep: int = 0, kernel_config=None):
        t0 = time.perf_counter()
        self.path = str(model_path)
        self.gguf = GGUFFile(model_path)
        self.tokenizer = Tokenizer.from_gguf(self.gguf.metadata)
        self.verbose = verbose
        self.logits_all = logits_all
        self.timings = Timings()
        self.model = None
        self.cache = None
        self.tokens: list = []          # token ids whose k/v are in the cache, in order
        self.scores = None              # logits rows for self.tokens when logits_all, else last row
        self.n_threads = set_threads(n_threads)
        if n_batch < 1:
            raise ValueError(f"n_batch must be >= 1, got {n_batch}")
        if n_seq < 1:
            raise ValueError(f"n_seq must be >= 1, got {n_seq}")
        self.n_batch = n_batch
        self.cache_type_k, self.cache_type_v = cache_type(type_k), cache_type(type_v)
        self.seq = 0                    # this engine's sequence in the cache
        self.batcher: Optional[Batcher] = None
        self.busy = False               # inside generate() (a server slot at work)
        self.context_shift = context_shift
        self.n_keep = n_keep
        self.gen = None
        if vocab_only:
            self.n_ctx = n_ctx
            self.timings.load_ms = (time.perf_counter() - t0) * 1000
            return
        from .models import load_model
        from .progress import CompileNotice
        with CompileNotice(verbose if progress is None else progress):    # a line while numba compiles
            if split > 1:
                # the model's layers over ``split`` Ray actors (tinyinfer/distributed/split.py)
                from .distributed.split import SplitModel
                self.model = SplitModel(self.gguf, split, n_threads=n_threads or 1)
            else:
                from .kernels.matmul import using_config
                with using_config(kernel_config):     # the matmul kernels' knobs for every weight
                    self.model = load_model(self.gguf)
            if n_ctx <= 0:
                n_ctx = self.model.n_ctx_train
            if n_ctx < 1:
                raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
            self.n_ctx = n_ctx
            kw = {}
            if n_seq > 1 or (self.cache_type_k, self.cache_type_v) != ("f16", "f16"):
                if split > 1:
                    raise ValueError("--split runs f16 KV caches of one sequence: no -ctk/-ctv or --parallel with it")
                kw = dict(n_seq=n_seq, type_k=self.cache_type_k, type_v=self.cache_type_v)
            self.cache = self.model.new_cache(n_ctx, n_batch, **kw)
            if n_seq > 1:
                self.batcher = Batcher(self)
            self.timings.load_ms = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            self._warmup()
            self.timings.compile_ms = (time.perf_counter() - t1) * 1000

    def fork(self, seq: Optional[int] = None) -> "Engine":
        """Another engine on the same file, tokenizer and weights: on sequence ``seq`` of the shared
        cache (batched with the others), or with a KV cache of its own when ``seq`` is None."""
        other = object.__new__(Engine)
        other.__dict__.update(self.__dict__)
        other.timings = Timings(load_ms=self.timings.load_ms)
        other.tokens, other.scores, other.busy, other.gen = [], None, False, None
        if seq is not None:
            if not 0 <= seq < self.cache.n_seq:
                raise ValueError(f"sequence {seq} is out of range: the cache holds {self.cache.n_seq}")
            other.seq = seq
            if self.batcher is not None:
                self.batcher.engines.append(other)
        elif self.model is not None:
            other.seq, other.batcher = 0, None
            kw = {} if (self.cache_type_k, self.cache_type_v) == ("f16", "f16") else \
                dict(type_k=self.cache_type_k, type_v=self.cache_type_v)
            other.cache = self.model.new_cache(self.n_ctx, self.n_batch, **kw)
        return other

    # -- evaluation ----------------------------------------------------------------
    def _warmup(self) -> None:
        """Compile (or load from numba's cache) every kernel the forward pass uses."""
        ids = np.array([self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0] * 2, np.int64)
        self.model.forward(ids, Batch.run(0, 0, 2), self.cache)
        self.model.forward(ids[:1], Batch.run(0, 0, 1), self.cache)
        if getattr(self.cache, "n_seq", 1) > 1:     # a decode batch: one token of two sequences
            self.model.forward(ids, Batch.one_each([0, 1], [0, 0]), self.cache, n_out=2)

    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab if self.model is not None else self.tokenizer.n_vocab

    def reset(self) -> None:
        self.tokens = []
        self.scores = None

    def eval(self, ids: Sequence[int], logits_all: Optional[bool] = None, n_logits: Optional[int] = None,
             prompt: Optional[bool] = None) -> np.ndarray:
        """Append ``ids`` to the context; return the logits of the last one (n_vocab,).

        ``self.scores`` keeps the logits of every token when ``logits_all``, of the last
        ``n_logits`` tokens when that is given, else of the last one.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ContextError("nothing to evaluate: empty token list")
        if len(self.tokens) + ids.size > self.n_ctx:
            raise ContextError(f"{len(self.tokens) + ids.size} tokens do not fit the context of {self.n_ctx}")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ContextError(f"token id out of range [0, {self.n_vocab})")
        want_all = self.logits_all if logits_all is None else logits_all
        if want_all:
            n_logits = ids.size
        n_logits = max(1, min(n_logits or 1, ids.size))
        rows = []
        t0 = time.perf_counter()
        for s in range(0, ids.size, self.n_batch):
            chunk = ids[s:s + self.n_batch]
            n_out = max(1, min(chunk.size, n_logits - (ids.size - s - chunk.size)))
            out = self._forward(chunk, n_out)
            self.tokens.extend(int(t) for t in chunk)
            rows.append(out)
        dt = (time.perf_counter() - t0) * 1000
        if prompt is None:
            prompt = ids.size > 1
        if not prompt:
            self.timings.eval_ms += dt
            self.timings.n_eval += 1
        else:
            self.timings.prompt_ms += dt
            self.timings.n_prompt += int(ids.size)
        self.scores = np.concatenate(rows, axis=0)[-n_logits:] if len(rows) > 1 else rows[0]
        return self.scores[-1]

    def _forward(self, chunk: np.ndarray, n_out: int, embeddings: bool = False) -> np.ndarray:
        """Evaluate chunk at the positions after self.tokens; through the batcher when there is one."""
        if self.batcher is not None:
            return self.batcher.forward(self, chunk, len(self.tokens), n_out, embeddings)
        return self.model.forward(chunk, Batch.run(self.seq, len(self.tokens), chunk.size), self.cache,
                                  n_out=n_out, embeddings=embeddings)

    def embed(self, ids: Sequence[int], normalize: bool = True) -> np.ndarray:
        """Mean-pooled final hidden state of ``ids`` (evaluated in a fresh context), L2-normalized."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ContextError("nothing to embed: empty input")
        if ids.size > self.n_ctx:
            raise ContextError(f"the input has {ids.size} tokens, more than the context of {self.n_ctx}")
        self.reset()
        rows = []
        try:
            for s in range(0, ids.size, self.n_batch):
                chunk = ids[s:s + self.n_batch]
                rows.append(self._forward(chunk, chunk.size, embeddings=True))
                self.tokens.extend(int(t) for t in chunk)
        finally:
            self.reset()   # the cache now holds an embedding pass, not a prompt to reuse
        v = np.concatenate(rows).mean(axis=0)
        if normalize:
            v = v / max(float(np.linalg.norm(v)), 1e-12)
        return v.astype(np.float32)

    def ingest_prompt(self, prompt_ids: Sequence[int], cache_prompt: Optional[bool] = None) -> np.ndarray:
        """Make the cache hold exactly ``prompt_ids`` (reusing a shared prefix unless ``cache_prompt`` is
        False); last logits."""
        reuse = self.cache_prompt if cache_prompt is None else cache_prompt
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ContextError("the prompt is empty (no tokens to evaluate)")
        if len(prompt_ids) > self.n_ctx:
            raise ContextError(f"the prompt has {len(prompt_ids)} tokens, more than the context of "
                               f"{self.n_ctx} (raise -c / n_ctx)")
        keep = _common_prefix(self.tokens, prompt_ids)
        if self.batcher is not None and reuse:
            keep = self.batcher.reuse_prefix(self, prompt_ids, keep)
        keep = min(keep, len(prompt_ids) - 1)   # always evaluate at least the last token
        if self.logits_all or not reuse:
            keep = 0
        self.tokens = self.tokens[:keep]
        return self.eval(prompt_ids[keep:], prompt=True)

    cache_prompt = True     # reuse the longest cached prefix (this sequence's, or a free one's)

    # -- context shift ---------------------------------------------------------------------
    def shift_context(self, n_keep: int, n_discard: Optional[int] = None) -> int:
        """llama.cpp's context shift: drop n_discard tokens after the first n_keep (default: half of
        the rest), move the later ones down and re-apply RoPE to their keys. Returns n_discard."""
        from .kvcache import shift
        n_past = len(self.tokens)
        n_keep = max(0, min(n_keep, n_past - 1))
        n_left = n_past - n_keep
        if n_discard is None:
            n_discard = n_left // 2
        n_discard = max(0, min(n_discard, n_left))
        if n_discard == 0:
            raise ContextError(f"context shift: nothing to discard (n_keep {n_keep} of {n_past} tokens)")
        shift(self.model, self.cache, self.seq, n_keep, n_discard, n_past)
        self.tokens = self.tokens[:n_keep] + self.tokens[n_keep + n_discard:]
        return n_discard

    def _n_keep(self, prompt_ids, n_keep: Optional[int]) -> int:
        """Tokens a context shift keeps: n_keep (-1 = the whole prompt), BOS always (llama-cli's rule)."""
        k = self.n_keep if n_keep is None else n_keep
        if k < 0 or k > len(prompt_ids):
            k = len(prompt_ids)
        bos = self.tokenizer.bos_id
        if prompt_ids and bos is not None and prompt_ids[0] == bos and k < len(prompt_ids):
            k += 1
        return min(k, self.n_ctx // 2)

    # -- saved state -----------------------------------------------------------------------
    def state_fingerprint(self) -> dict:
        m = self.model
        return {"arch": self.gguf.architecture, "n_vocab": int(self.n_vocab), "n_layer": len(self.cache.k),
                "file_size": os.path.getsize(self.path), "name": str(self.gguf.metadata.get("general.name", "")),
                "type_k": self.cache_type_k, "type_v": self.cache_type_v,
                "cells": [[list(st.q.shape[2:]), str(st.q.dtype)] for st in self.cache.k[:1] + self.cache.v[:1]],
                "n_embd": int(getattr(m, "n_embd", 0))}

    def save_state(self) -> bytes:
        """This sequence's tokens, KV cells and last logits as bytes (see :meth:`load_state`)."""
        n = len(self.tokens)
        if self.cache.ring and n > min(st.rows for st in self.cache.k):
            raise StateError("saving the state of a sliding-window cache longer than its ring is not supported")
        parts = []
        for st in self.cache.k + self.cache.v:
            parts.append(np.ascontiguousarray(st.q[self.seq, :n]).tobytes())
            parts.append(np.ascontiguousarray(st.d[self.seq, :n]).tobytes())
        logits = np.zeros(0, np.float32) if self.scores is None else np.asarray(self.scores[-1], np.float32)
        parts.append(logits.tobytes())
        payload = b"".join(parts)
        head = {"version": 1, "model": self.state_fingerprint(), "tokens": [int(t) for t in self.tokens],
                "n_logits": int(logits.size), "sha256": hashlib.sha256(payload).hexdigest()}
        hb = json.dumps(head).encode()
        return STATE_MAGIC + len(hb).to_bytes(4, "little") + hb + payload

    def load_state(self, blob: bytes) -> None:
        """Restore what :meth:`save_state` saved; a corrupted blob or one made for another model, cache
        type or a larger context raises StateError (and leaves this engine's context empty)."""
        self.reset()
        if not isinstance(blob, (bytes, bytearray, memoryview)) or bytes(blob[:len(STATE_MAGIC)]) != STATE_MAGIC:
            raise StateError("not a tinyinfer state (bad magic)")
        blob = bytes(blob)
        try:
            n_head = int.from_bytes(blob[len(STATE_MAGIC):len(STATE_MAGIC) + 4], "little")
            head = json.loads(blob[len(STATE_MAGIC) + 4:len(STATE_MAGIC) + 4 + n_head])
            payload = blob[len(STATE_MAGIC) + 4 + n_head:]
            tokens = [int(t) for t in head["tokens"]]
            n_logits = int(head["n_logits"])
            want = head["sha256"]
            version = head["version"]
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"corrupted state header ({type(e).__name__}: {e})") from None
        if version != 1:
            raise StateError(f"state version {version} is not supported (this build reads version 1)")
        if hashlib.sha256(payload).hexdigest() != want:
            raise StateError("corrupted state: checksum mismatch (truncated or modified)")
        mine = self.state_fingerprint()
        theirs = head.get("model") if isinstance(head.get("model"), dict) else {}
        if theirs != mine:
            diff = [k for k in mine if theirs.get(k) != mine[k]]
            was = ", ".join(f"{k}={theirs.get(k)!r}" for k in diff)
            now = ", ".join(f"{k}={mine[k]!r}" for k in diff)
            raise StateError(f"the state was saved with another model or cache ({was}; this one has {now})")
        n = len(tokens)
        if n > self.n_ctx:
            raise StateError(f"the state holds {n} tokens, more than this context of {self.n_ctx}")
        if n_logits not in (0, self.n_vocab):
            raise StateError(f"corrupted state: {n_logits} logits for a vocabulary of {self.n_vocab}")
        off = 0
        views = []
        for st in self.cache.k + self.cache.v:
            for arr in (st.q, st.d):
                shape = (n,) + arr.shape[2:]
                size = int(np.prod(shape)) * arr.dtype.itemsize
                views.append((arr, np.frombuffer(payload, arr.dtype, int(np.prod(shape)), off).reshape(shape)))
                off += size
        if off + 4 * n_logits != len(payload):
            raise StateError(f"corrupted state: {len(payload)} bytes of data, expected {off + 4 * n_logits}")
        for arr, v in views:
            arr[self.seq, :n] = v
        self.tokens = tokens
        if n_logits:
            self.scores = np.frombuffer(payload, np.float32, n_logits, off).copy()[None, :]

    def save_state_file(self, path) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self.save_state())
        os.replace(tmp, path)

    def load_state_file(self, path) -> None:
        with open(path, "rb") as f:
            blob = f.read()
        try:
            self.load_state(blob)
        except StateError as e:
            raise StateError(f"{path}: {e}") from None

    # -- generation ------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], params: Optional[SamplerParams] = None,
                 max_tokens: int = -1, stop: Sequence[str] = (), logprobs: Optional[int] = None,
                 ignore_eos: bool = False, logits_processor=None, grammar=None,
                 context_shift: Optional[bool] = None, n_keep: Optional[int] = None,
                 cache_prompt: Optional[bool] = None) -> Iterator[Step]:
        """Yield one Step per new token; the last one carries finish_reason.

        max_tokens < 0 means until the context is full. Stop strings end generation and are
        not part of the text; text that could be the start of a stop string is held back
        until it is known not to be one. ``logits_processor(tokens, logits) -> logits`` (as in
        llama-cpp-python; ``tokens`` = the ids in the context) may reshape the logits before
        each sampling step.

        ``grammar`` (a :class:`tinyinfer.grammar.Grammar`) constrains the output; when it is a
        JSON one and ``max_tokens`` is about to run out, the reply is closed (open strings,
        arrays and objects) in the tokens left, so that it still parses: that last step has
        ``truncated=True`` and finish_reason "length".

        ``context_shift`` (default: the engine's setting): when the context is full, drop the
        oldest tokens after ``n_keep`` (-1 = the whole prompt; BOS is always kept) and go on instead
        of stopping with "length"; then max_tokens < 0 means n_ctx new tokens at most.
        ``cache_prompt`` False: evaluate the whole prompt (no reuse of a cached prefix).
        """
        params = params or SamplerParams()
        shift_on = self.context_shift if context_shift is None else context_shift
        if shift_on and max_tokens < 0:
            max_tokens = self.n_ctx      # a bound where the context's end no longer is one
        prompt_ids = list(prompt_ids)
        keep = self._n_keep(prompt_ids, n_keep)
        matcher = grammar.matcher(self.tokenizer, self.n_vocab) if grammar is not None else None
        closer = _JsonBudget(self.tokenizer) if grammar is not None and grammar.is_json and max_tokens > 0 \
            else None
        self.gen = {"params": params, "max_tokens": max_tokens, "stop": list(stop or []), "n_keep": keep}
        self.timings.reset()
        self.busy = True
        if self.batcher is not None:
            self.batcher.enter()
        try:
            yield from self._generate(prompt_ids, params, max_tokens, stop, logprobs, ignore_eos, logits_processor,
                                      matcher, closer, shift_on, keep, cache_prompt)
        finally:
            self.busy = False
            if self.batcher is not None:
                self.batcher.leave()

    def _generate(self, prompt_ids, params, max_tokens, stop, logprobs, ignore_eos, logits_processor, matcher,
                  closer, shift_on, keep, cache_prompt):
        logits = self.ingest_prompt(prompt_ids, cache_prompt)
        sampler = Sampler(params, self.n_vocab, grammar=matcher)
        for t in prompt_ids:          # the penalties look at the prompt too, as in llama.cpp
            sampler.accept(int(t), accept_grammar=False)
        dec = self.tokenizer.stream_decoder()
        stop = [s for s in (stop or []) if s]
        held = ""          # text produced but not yet emitted (might start a stop string)
        n = 0
        forced: list = []  # tokens that close a JSON reply cut short by max_tokens
        truncated = False
        while True:
            if max_tokens == 0:
                yield Step(-1, "", finish_reason="length")
                return
            ts = time.perf_counter()
            if logits_processor is not None:
                logits = logits_processor(self.tokens, logits)
            if forced:
                tok = forced.pop(0)
            else:
                tok = sampler.sample(logits)
                if closer is not None and not closer.fits(tok, max_tokens - n - 1):
                    forced = closer.close()
                    truncated = bool(forced)
                    tok = forced.pop(0) if forced else tok
            if closer is not None:
                closer.feed(tok)
            sampler.accept(tok)
            lp, top = (_logprobs(logits, tok, logprobs) if logprobs is not None else (0.0, None))
            self.timings.sample_ms += (time.perf_counter() - ts) * 1000
            self.timings.n_sample += 1
            n += 1
            if self.tokenizer.is_eog(tok) and not ignore_eos:
                yield Step(tok, held, lp, top, finish_reason="stop")
                return
            held += dec.feed(tok)
            finish = None
            if stop:
                cut = _find_stop(held, stop)
                if cut is not None:
                    yield Step(tok, held[:cut], lp, top, finish_reason="stop")
                    return
                emit_to = _safe_prefix(held, stop)
            else:
                emit_to = len(held)
            if n == max_tokens or (len(self.tokens) >= self.n_ctx and not shift_on) or (truncated and not forced):
                finish = "length"
                emit_to = len(held)
            yield Step(tok, held[:emit_to], lp, top, finish_reason=finish, truncated=truncated and finish is not None)
            held = held[emit_to:]
            if finish:
                return
            if len(self.tokens) >= self.n_ctx:
                self.shift_context(keep)
            logits = self.eval([tok])


STATE_MAGIC = b"TINYINFER-STATE\n"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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

    def __init__(self, first: "Engine"):
        self.model, self.cache = first.model, first.cache
        self.engines: List[Engine] = [first]
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
                        self._run(take)
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
        single = [r for r in reqs if r.ids.size == 1 and r.n_out == 1 and not r.embeddings]
        rest = [r for r in reqs if r not in single]
        try:
            if single:
                b = Batch.one_each([r.engine.seq for r in single], [r.pos0 for r in single])
                ids = np.concatenate([r.ids for r in single])
                out = self.model.forward(ids, b, self.cache, n_out=len(single))
                self.n_steps += 1
                self.max_batch = max(self.max_batch, len(single))
                for i, r in enumerate(single):
                    r.result = out[i:i + 1]
        except Exception as e:          # every request of the failed pass is told
            for r in single:
                r.error = e
        for r in single:
            r.done = True
        for r in rest:
            try:
                r.result = self.model.forward(r.ids, Batch.run(r.engine.seq, r.pos0, r.ids.size), self.cache,
                                              n_out=r.n_out, embeddings=r.embeddings)
                self.n_steps += 1
            except Exception as e:
                r.error = e
            r.done = True

    def reuse_prefix(self, engine, prompt_ids, keep: int) -> int:
        """llama-server's cache_prompt across slots: when a free sequence's cache holds a longer
        prefix of ``prompt_ids`` than ``engine``'s own (``keep`` tokens), copy those cells over."""
        best, src = keep, None
        for other in self.engines:
            if other is engine or other.busy:
                continue
            n = _common_prefix(other.tokens, prompt_ids)
            if n > best:
                best, src = n, other
        if src is None:
            return keep
        with self.cv:                  # not while a forward pass writes the cache
            while self.running:
                self.cv.wait()
            if src.busy:
                return keep
            n = min(best, _common_prefix(src.tokens, prompt_ids))
            self.cache.copy_seq(src.seq, engine.seq, n)
        engine.tokens = list(prompt_ids[:n])
        return n


class _JsonBudget:
    """Keeps a JSON reply closable within the tokens left (see Engine.generate).

    After each sampled token it asks: could the text still be closed (``json_closer``) in the
    tokens left after this one? If not, the token is dropped and the closing text's tokens are
    emitted instead. Only checked near the end of the budget (the closing text is short)."""

    HORIZON = 24

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.text = b""
        self._ids: dict = {}       # closing text -> its tokens (the same few tails recur)

    def _cost(self, text: bytes):
        from .grammar import json_closer
        tail = json_closer(text.decode("utf-8", "ignore"))
        if tail is None:
            return None, []
        ids = self._ids.get(tail)
        if ids is None:
            ids = self._ids[tail] = self.tok.encode(tail, add_bos=False, special=False) if tail else []
        return len(ids), ids

    def fits(self, tok: int, left: int) -> bool:
        if left > self.HORIZON or self.tok.is_eog(tok):
            return True
        cost, _ = self._cost(self.text + self.tok.token_to_bytes(tok))
        return cost is None or cost <= left

    def close(self) -> list:
        _, ids = self._cost(self.text)
        return list(ids)

    def feed(self, tok: int) -> None:
        self.text += self.tok.token_to_bytes(tok)


def _find_stop(text: str, stops) -> Optional[int]:
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _safe_prefix(text: str, stops) -> int:
    """Length of the prefix of text that cannot be the start of any stop string."""
    keep = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    return keep


def _logprobs(logits: np.ndarray, tok: int, top_n: int):
    x = logits.astype(np.float64)
    x = x - x.max()
    lse = np.log(np.exp(x).sum())
    lp = x - lse
    top = None
    if top_n and top_n > 0:
        idx = np.argpartition(-lp, min(top_n, lp.size - 1))[:top_n]
        idx = idx[np.argsort(-lp[idx])]
        top = {int(i): float(lp[i]) for i in idx}
    return float(lp[tok]), top
