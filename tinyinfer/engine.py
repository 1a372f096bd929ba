"""The one generation loop: CLI, library (``Llama``) and server all drive this.

An :class:`Engine` owns an opened GGUF file, its tokenizer, model and KV cache,
and the tokens that cache holds (so a new prompt sharing a prefix with the last
one only evaluates the rest). :meth:`Engine.generate` yields one :class:`Step`
per generated token and ends with the finish reason; timings are kept the way
llama.cpp keeps them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from .gguf import GGUFFile
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


class Engine:
    def __init__(self, model_path, n_ctx: int = 4096, n_batch: int = 512, n_threads: Optional[int] = None,
                 vocab_only: bool = False, logits_all: bool = False, verbose: bool = False,
                 progress: Optional[bool] = None, split: int = 1):
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
        self.n_batch = n_batch
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
                self.model = load_model(self.gguf)
            if n_ctx <= 0:
                n_ctx = self.model.n_ctx_train
            if n_ctx < 1:
                raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
            self.n_ctx = n_ctx
            self.cache = self.model.new_cache(n_ctx, n_batch)
            self.timings.load_ms = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            self._warmup()
            self.timings.compile_ms = (time.perf_counter() - t1) * 1000

    def fork(self) -> "Engine":
        """Another engine on the same file, tokenizer and weights, with a KV cache of its own."""
        other = object.__new__(Engine)
        other.__dict__.update(self.__dict__)
        other.timings = Timings(load_ms=self.timings.load_ms)
        other.tokens, other.scores = [], None
        if self.model is not None:
            other.cache = self.model.new_cache(self.n_ctx, self.n_batch)
        return other

    # -- evaluation ----------------------------------------------------------------
    def _warmup(self) -> None:
        """Compile (or load from numba's cache) every kernel the forward pass uses."""
        ids = np.array([self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0] * 2, np.int64)
        self.model.forward(ids, 0, self.cache)
        self.model.forward(ids[:1], 0, self.cache)

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
            out = self.model.forward(chunk, len(self.tokens), self.cache, n_out=n_out)
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

    def embed(self, ids: Sequence[int], normalize: bool = True) -> np.ndarray:
        """Mean-pooled final hidden state of ``ids`` (evaluated in a fresh context), L2-normalized."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ContextError("nothing to embed: empty input")
        if ids.size > self.n_ctx:
            raise ContextError(f"the input has {ids.size} tokens, more than the context of {self.n_ctx}")
        self.reset()
        rows = []
        for s in range(0, ids.size, self.n_batch):
            chunk = ids[s:s + self.n_batch]
            rows.append(self.model.forward(chunk, s, self.cache, n_out=chunk.size, embeddings=True))
        self.reset()   # the cache now holds an embedding pass, not a prompt to reuse
        v = np.concatenate(rows).mean(axis=0)
        if normalize:
            v = v / max(float(np.linalg.norm(v)), 1e-12)
        return v.astype(np.float32)

    def ingest_prompt(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly ``prompt_ids`` (reusing a shared prefix); last logits."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ContextError("the prompt is empty (no tokens to evaluate)")
        if len(prompt_ids) > self.n_ctx:
            raise ContextError(f"the prompt has {len(prompt_ids)} tokens, more than the context of "
                               f"{self.n_ctx} (raise -c / n_ctx)")
        keep = 0
        for a, b in zip(self.tokens, prompt_ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt_ids) - 1)   # always evaluate at least the last token
        if self.logits_all:
            keep = 0
        self.tokens = self.tokens[:keep]
        return self.eval(prompt_ids[keep:], prompt=True)

    # -- generation ------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], params: Optional[SamplerParams] = None,
                 max_tokens: int = -1, stop: Sequence[str] = (), logprobs: Optional[int] = None,
                 ignore_eos: bool = False, logits_processor=None, grammar=None) -> Iterator[Step]:
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
        """
        params = params or SamplerParams()
        matcher = grammar.matcher(self.tokenizer, self.n_vocab) if grammar is not None else None
        closer = _JsonBudget(self.tokenizer) if grammar is not None and grammar.is_json and max_tokens > 0 \
            else None
        self.gen = {"params": params, "max_tokens": max_tokens, "stop": list(stop or [])}   # what /slots shows
        self.timings.reset()
        logits = self.ingest_prompt(prompt_ids)
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
            if n == max_tokens or len(self.tokens) >= self.n_ctx or (truncated and not forced):
                finish = "length"
                emit_to = len(held)
            yield Step(tok, held[:emit_to], lp, top, finish_reason=finish, truncated=truncated and finish is not None)
            held = held[emit_to:]
            if finish:
                return
            logits = self.eval([tok])


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
