"""The one generation loop: CLI, library (``Llama``) and server all drive this.

An :class:`Engine` owns an opened GGUF file, its tokenizer, model and KV cache,
and the tokens that cache holds (so a new prompt sharing a prefix with the last
one only evaluates the rest). :meth:`Engine.generate` yields one :class:`Step`
per generated token and ends with the finish reason; timings are kept the way
llama.cpp keeps them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np

from . import state
from .batcher import Batcher, common_prefix
from .gguf import GGUFFile
from .kernels.parallel import run_pass
from .kvcache import Batch, cache_type
from .options import GenOptions
from .sampler import Sampler
from .state import StateError  # noqa: F401  (re-exported: tinyinfer.engine.StateError)
from .threads import resolve_threads, set_threads  # noqa: F401  (set_threads re-exported)
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .models.interface import Model

_common_prefix = common_prefix     # the old private name (tools and tests)


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
    draft_n: int = 0               # speculative decoding: tokens proposed and checked (llama-server's names)
    draft_n_accepted: int = 0      # ... of which the target agreed with
    draft_ms: float = 0.0          # time spent proposing (a draft model's evaluations, n-gram lookups)

    def reset(self):
        self.prompt_ms = self.eval_ms = self.sample_ms = self.draft_ms = 0.0
        self.n_prompt = self.n_eval = self.n_sample = self.draft_n = self.draft_n_accepted = 0

    def report(self) -> str:
        """llama.cpp's llama_perf_*_print lines."""
        def rate(ms, n):
            return (ms / n if n else 0.0), (1000.0 * n / ms if ms > 0 else 0.0)
        s_per, s_rate = rate(self.sample_ms, self.n_sample)
        p_per, p_rate = rate(self.prompt_ms, self.n_prompt)
        e_per, e_rate = rate(self.eval_ms, self.n_eval)
        total = self.prompt_ms + self.eval_ms + self.sample_ms + self.draft_ms
        spec = []
        if self.draft_n:
            spec = [f"llama_perf_context_print:       draft time = {self.draft_ms:10.2f} ms / "
                    f"{self.draft_n:5d} drafted, {self.draft_n_accepted:5d} accepted "
                    f"(acceptance rate = {self.draft_n_accepted / self.draft_n:.3f})"]
        return "\n".join([
            f"llama_perf_sampler_print:    sampling time = {self.sample_ms:10.2f} ms / {self.n_sample:5d} runs   "
            f"({s_per:8.2f} ms per token, {s_rate:8.2f} tokens per second)",
            f"llama_perf_context_print:        load time = {self.load_ms:10.2f} ms",
            f"llama_perf_context_print:     compile time = {self.compile_ms:10.2f} ms (numba JIT, first run only)",
            f"llama_perf_context_print: prompt eval time = {self.prompt_ms:10.2f} ms / {self.n_prompt:5d} tokens "
            f"({p_per:8.2f} ms per token, {p_rate:8.2f} tokens per second)",
            f"llama_perf_context_print:        eval time = {self.eval_ms:10.2f} ms / {self.n_eval:5d} runs   "
            f"({e_per:8.2f} ms per token, {e_rate:8.2f} tokens per second)", *spec,
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


class Engine:
    """One sequence's view of a model and its KV cache.

    ``n_seq > 1`` makes a cache for that many sequences and a :class:`~tinyinfer.batcher.Batcher`;
    :meth:`fork` gives the other sequences an engine each (sharing the weights, the cache and the
    batcher), and their single-token evaluations, made from as many threads, are decoded together in
    one forward pass. ``type_k`` / ``type_v``: the cache's types (f16, q8_0, q4_0). ``defaults``: the
    generation options a :meth:`generate` call starts from (e.g. ``context_shift=True, n_keep=-1``:
    when a generation fills the context, drop the oldest half of what follows the first ``n_keep``
    tokens and go on). ``split > 1``: the model's layers over that many Ray actors
    (0: no weights, see :meth:`vocab_only`).
    ``verbose``: a line while numba compiles the kernels.
    """

    model: Optional["Model"]

    def __init__(self, model_path, n_ctx: int = 4096, n_batch: int = 512, n_threads: Optional[int] = None,
                 logits_all: bool = False, verbose: bool = False, split: int = 1,
                 type_k: str = "f16", type_v: str = "f16", n_seq: int = 1,
                 defaults: Optional[GenOptions] = None):
        t0 = time.perf_counter()
        if split < 0:
            raise ValueError(f"split must be >= 0, got {split}")
        if n_batch < 1:
            raise ValueError(f"n_batch must be >= 1, got {n_batch}")
        if n_seq < 1:
            raise ValueError(f"n_seq must be >= 1, got {n_seq}")
        self.path = str(model_path)
        self.gguf = GGUFFile(model_path)
        self.tokenizer = Tokenizer.from_gguf(self.gguf.metadata)
        self.logits_all = logits_all
        self.defaults = defaults if defaults is not None else GenOptions()
        self.n_threads = set_threads(n_threads)
        self.n_batch, self.n_seq = n_batch, n_seq
        self.cache_type_k, self.cache_type_v = cache_type(type_k), cache_type(type_v)
        self._fresh(Timings())
        self.model, self.cache, self.batcher = None, None, None
        self.n_ctx = n_ctx
        if split == 0:                  # no weights: the vocabulary and metadata only (Engine.vocab_only)
            self.timings.load_ms = (time.perf_counter() - t0) * 1000
            return
        from .progress import CompileNotice
        with CompileNotice(verbose):    # a line while numba compiles
            self.model = _load(self.gguf, split, n_threads)
            try:
                self._start(n_ctx, n_seq, t0)
            except BaseException:
                self.model.close()      # no process left behind (a split model's actors)
                raise

    @classmethod
    def vocab_only(cls, model_path, n_ctx: int = 4096) -> "Engine":
        """The file's tokenizer and metadata without its weights (llama-cpp-python's ``vocab_only``)."""
        return cls(model_path, n_ctx=n_ctx, split=0)

    def _start(self, n_ctx: int, n_seq: int, t0: float) -> None:
        if n_ctx <= 0:
            n_ctx = self.model.n_ctx_train
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        self.n_ctx = n_ctx
        self.cache = self._new_cache(n_seq)
        if n_seq > 1:
            self.batcher = Batcher(self)
        self.timings.load_ms = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        run_pass(self.n_threads, self._warmup)      # on the thread that will run the passes (kernels/parallel.py)
        self.timings.compile_ms = (time.perf_counter() - t1) * 1000

    def _new_cache(self, n_seq: int = 1):
        kw = {} if n_seq == 1 and (self.cache_type_k, self.cache_type_v) == ("f16", "f16") else \
            dict(n_seq=n_seq, type_k=self.cache_type_k, type_v=self.cache_type_v)
        return self.model.new_cache(self.n_ctx, self.n_batch, **kw)

    def _fresh(self, timings: "Timings") -> None:
        """The per-sequence state: no tokens, not busy, sequence 0."""
        self.timings = timings
        self.tokens: list = []          # token ids whose k/v are in the cache, in order
        self.scores = None              # logits rows for self.tokens when logits_all, else last row
        self.busy = False               # inside generate() (a server slot at work)
        self.gen: Optional[GenOptions] = None    # the running generation's options (server's /slots)
        self.seq = 0                    # this engine's sequence in the cache
        self._queue: list = []          # speculative guesses in the cache, not checked yet (see _generate)

    def fork(self, seq: Optional[int] = None) -> "Engine":
        """Another engine on the same file, tokenizer and weights: on sequence ``seq`` of the shared
        cache (batched with the others), or with a KV cache of its own when ``seq`` is None."""
        other = copy.copy(self)
        other._fresh(Timings(load_ms=self.timings.load_ms))
        if seq is not None:
            if not 0 <= seq < self.n_seq:
                raise ValueError(f"sequence {seq} is out of range: the cache holds {self.n_seq}")
            other.seq = seq
            if self.batcher is not None:
                self.batcher.engines.append(other)
        elif self.model is not None:
            other.batcher, other.n_seq = None, 1
            other.cache = self._new_cache()
        return other

    # -- evaluation ----------------------------------------------------------------
    def _warmup(self) -> None:
        """Compile (or load from numba's cache) every kernel the forward pass uses."""
        if getattr(self.model, "encoder_only", False):     # an embedding model (bert): no KV cache
            return self.model.warmup()
        ids = np.array([self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0] * 2, np.int64)
        self.model.forward(ids, Batch.run(0, 0, 2), self.cache)
        self.model.forward(ids[:1], Batch.run(0, 0, 1), self.cache)
        if self.n_seq > 1:     # a decode batch: one token of two sequences
            self.model.forward(ids, Batch.one_each([0, 1], [0, 0]), self.cache, n_out=2)

    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab if self.model is not None else self.tokenizer.n_vocab

    def reset(self) -> None:
        self.tokens = []
        self.scores = None

    def close(self) -> None:
        """Release the model's processes (a split model's Ray actors); the engine is unusable after."""
        if self.model is not None:
            self.model.close()

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
        return run_pass(self.n_threads, self.model.forward, chunk, Batch.run(self.seq, len(self.tokens), chunk.size),
                        self.cache, n_out=n_out, embeddings=embeddings)

    def embed(self, ids: Sequence[int], normalize: bool = True) -> np.ndarray:
        """The pooled embedding of ``ids`` (the file's pooling; mean for a decoder), L2-normalized
        (tinyinfer/embedding.py: the one embedding path)."""
        from .embedding import embed
        return embed(self, [ids], normalize_mode=2 if normalize else -1)[0]

    def hidden_states(self, ids: Sequence[int]) -> np.ndarray:
        """Final normalized hidden states (n, n_embd) of ``ids`` evaluated in a fresh context (a decoder's
        input to pooling)."""
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
        return np.concatenate(rows)

    def ingest_prompt(self, prompt_ids: Sequence[int], cache_prompt: Optional[bool] = None) -> np.ndarray:
        """Make the cache hold exactly ``prompt_ids`` (reusing a shared prefix unless ``cache_prompt`` is
        False); last logits."""
        reuse = _pick(cache_prompt, self.defaults.cache_prompt, True)
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ContextError("the prompt is empty (no tokens to evaluate)")
        if len(prompt_ids) > self.n_ctx:
            raise ContextError(f"the prompt has {len(prompt_ids)} tokens, more than the context of "
                               f"{self.n_ctx} (raise -c / n_ctx)")
        keep = common_prefix(self.tokens, prompt_ids)
        if self.batcher is not None and reuse:
            keep = self.batcher.reuse_prefix(self, prompt_ids, keep)
        keep = min(keep, len(prompt_ids) - 1)   # always evaluate at least the last token
        if self.logits_all or not reuse:
            keep = 0
        self.tokens = self.tokens[:keep]
        return self.eval(prompt_ids[keep:], prompt=True)

    # -- context shift ---------------------------------------------------------------------
    def shift_context(self, n_keep: int, n_discard: Optional[int] = None) -> int:
        """llama.cpp's context shift: drop n_discard tokens after the first n_keep (default: half of
        the rest), move the later ones down and re-apply RoPE to their keys. Returns n_discard."""
        n_past = len(self.tokens)
        n_keep = max(0, min(n_keep, n_past - 1))
        n_left = n_past - n_keep
        if n_discard is None:
            n_discard = n_left // 2
        n_discard = max(0, min(n_discard, n_left))
        if n_discard == 0:
            raise ContextError(f"context shift: nothing to discard (n_keep {n_keep} of {n_past} tokens)")
        self.model.cache_shift(self.cache, self.seq, n_keep, n_discard, n_past)
        self.tokens = self.tokens[:n_keep] + self.tokens[n_keep + n_discard:]
        return n_discard

    def _n_keep(self, prompt_ids, n_keep: Optional[int]) -> int:
        """Tokens a context shift keeps: n_keep (-1 = the whole prompt), BOS always (llama-cli's rule)."""
        k = _pick(n_keep, self.defaults.n_keep, 0)
        if k < 0 or k > len(prompt_ids):
            k = len(prompt_ids)
        bos = self.tokenizer.bos_id
        if prompt_ids and bos is not None and prompt_ids[0] == bos and k < len(prompt_ids):
            k += 1
        return min(k, self.n_ctx // 2)

    # -- saved state (the format: tinyinfer/state.py) ------------------------------------------
    def state_fingerprint(self) -> dict:
        return state.fingerprint(self)

    def save_state(self) -> bytes:
        """This sequence's tokens, KV cells and last logits as bytes (see :meth:`load_state`)."""
        return state.dump(self)

    def load_state(self, blob: bytes) -> None:
        """Restore what :meth:`save_state` saved; a corrupted blob or one made for another model, cache
        type or a larger context raises StateError (and leaves this engine's context empty)."""
        state.restore(self, blob)

    def save_state_file(self, path) -> None:
        state.save_file(self, path)

    def load_state_file(self, path) -> None:
        state.load_file(self, path)

    # -- generation ------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], options=None, **changes) -> Iterator[Step]:
        """Yield one Step per new token; the last one carries finish_reason.

        ``options``: a :class:`~tinyinfer.options.GenOptions` (or a SamplerParams), ``changes`` its
        fields by name (``max_tokens=..., stop=...``); unset engine-level ones (context_shift,
        n_keep, cache_prompt) come from the engine's ``defaults``.

        max_tokens < 0 means until the context is full. Stop strings end generation and are
        not part of the text; text that could be the start of a stop string is held back
        until it is known not to be one. ``logits_processor(tokens, logits) -> logits`` (as in
        llama-cpp-python; ``tokens`` = the ids in the context) may reshape the logits before
        each sampling step.

        ``grammar`` (a :class:`tinyinfer.grammar.Grammar`) constrains the output; when it is a
        JSON one and ``max_tokens`` is about to run out, the reply is closed (open strings,
        arrays and objects) in the tokens left, so that it still parses: that last step has
        ``truncated=True`` and finish_reason "length".

        ``context_shift``: when the context is full, drop the oldest tokens after ``n_keep`` (-1 = the
        whole prompt; BOS is always kept) and go on instead of stopping with "length"; then
        max_tokens < 0 means n_ctx new tokens at most. ``cache_prompt`` False: evaluate the whole
        prompt (no reuse of a cached prefix).
        """
        o = GenOptions.of(options, **changes)
        shift_on = _pick(o.context_shift, self.defaults.context_shift, False)
        prompt_ids = list(prompt_ids)
        d = self.defaults
        o = GenOptions.of(o, context_shift=shift_on, n_keep=self._n_keep(prompt_ids, o.n_keep),
                          cache_prompt=_pick(o.cache_prompt, d.cache_prompt, True),
                          max_tokens=self.n_ctx if shift_on and o.max_tokens < 0 else o.max_tokens,
                          draft_model=o.draft_model if o.draft_model is not None else d.draft_model,
                          draft_n_max=_pick(o.draft_n_max, d.draft_n_max, 3),
                          draft_n_min=_pick(o.draft_n_min, d.draft_n_min, 0),
                          draft_p_min=_pick(o.draft_p_min, d.draft_p_min, 0.0))
        self.gen = o
        self.timings.reset()
        self.busy = True
        if self.batcher is not None:
            self.batcher.enter()
        try:
            yield from self._generate(prompt_ids, o)
        finally:
            if self._queue:       # unchecked speculative guesses leave the context (their cells are overwritten later)
                del self.tokens[len(self.tokens) - len(self._queue):]
                self._queue = []
            self.busy = False
            if self.batcher is not None:
                self.batcher.leave()

    def _generate(self, prompt_ids, o: GenOptions):
        from .speculative import proposer_of
        max_tokens, grammar = o.max_tokens, o.grammar
        matcher = grammar.matcher(self.tokenizer, self.n_vocab) if grammar is not None else None
        closer = _JsonBudget(matcher) if matcher is not None and grammar.is_json and max_tokens > 0 else None
        proposer = proposer_of(o.draft_model)
        logits = self.ingest_prompt(prompt_ids, o.cache_prompt)
        sampler = Sampler(o.sampler, self.n_vocab, grammar=matcher)
        for t in prompt_ids:          # the penalties look at the prompt too, as in llama.cpp
            sampler.accept(int(t), accept_grammar=False)
        dec = self.tokenizer.stream_decoder()
        stop = [s for s in o.stop if s]
        held = ""          # text produced but not yet emitted (might start a stop string)
        n = 0
        forced: list = []  # tokens that close a JSON reply cut short by max_tokens
        truncated = False
        # speculative decoding (tinyinfer/speculative.py): the proposed tokens already in the cache and
        # not yet checked, each with the target's logits after it
        self._queue = queue = []
        while True:
            if max_tokens == 0:
                yield Step(-1, "", finish_reason="length")
                return
            ts = time.perf_counter()
            if o.logits_processor is not None:
                logits = o.logits_processor(self.tokens[:len(self.tokens) - len(queue)], logits)
            if forced:
                tok = forced.pop(0)
            else:
                tok = sampler.sample(logits)
                if closer is not None and not closer.fits(tok, max_tokens - n - 1):
                    forced = closer.close(max_tokens - n)
                    truncated = bool(forced)
                    tok = forced.pop(0) if forced else tok
            if closer is not None:
                closer.feed(tok)
            sampler.accept(tok)
            lp, top = (_logprobs(logits, tok, o.logprobs) if o.logprobs is not None else (0.0, None))
            self.timings.sample_ms += (time.perf_counter() - ts) * 1000
            self.timings.n_sample += 1
            n += 1
            next_logits = None       # tok was a proposed token, already evaluated: the logits after it
            if queue:
                guess, row = queue.pop(0)
                if guess == tok:
                    next_logits = row
                    self.timings.draft_n_accepted += 1
                else:                # roll back: the cache's cells past the agreeing prefix are dropped
                    del self.tokens[len(self.tokens) - len(queue) - 1:]
                    queue = self._queue = []
            n_ctx_used = len(self.tokens) - len(queue) - (next_logits is not None)
            if self.tokenizer.is_eog(tok) and not o.ignore_eos:
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
            if n == max_tokens or (n_ctx_used >= self.n_ctx and not o.context_shift) or \
                    (truncated and not forced):
                finish = "length"
                emit_to = len(held)
            yield Step(tok, held[:emit_to], lp, top, finish_reason=finish, truncated=truncated and finish is not None)
            held = held[emit_to:]
            if finish:
                return
            if next_logits is not None:
                logits = next_logits
                continue
            if len(self.tokens) >= self.n_ctx:
                self.shift_context(o.n_keep)
            logits, queue = self._advance(tok, proposer, o, max_tokens - n if max_tokens > 0 else None)
            self._queue = queue

    def _advance(self, tok: int, proposer, o: GenOptions, left: Optional[int]):
        """Evaluate ``tok``; with a proposer, also the tokens it guesses after it, in the same pass.
        Returns (the logits after tok, [(guess, the logits after it), ...])."""
        drafts: list = []
        if proposer is not None:
            t0 = time.perf_counter()
            room = self.n_ctx - len(self.tokens) - 1
            if left is not None:
                room = min(room, left - 1)      # no guess past the last token asked for
            if room > 0:
                drafts = proposer.propose(self.tokens + [tok], min(o.draft_n_max, room), o.draft_p_min)[:room]
            self.timings.draft_ms += (time.perf_counter() - t0) * 1000
            if len(drafts) < max(1, o.draft_n_min):
                drafts = []
        if not drafts:
            return self.eval([tok]), []
        self.eval([tok] + drafts, n_logits=len(drafts) + 1, prompt=False)
        rows = self.scores
        self.timings.draft_n += len(drafts)
        return rows[0], list(zip(drafts, rows[1:]))


def _pick(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def _load(gguf, split: int, n_threads: Optional[int]) -> "Model":
    """The model of an opened file: in this process, or its layers over ``split`` Ray actors."""
    if split > 1:
        from .models.split import SplitModel
        return SplitModel(gguf, split, n_threads=n_threads or 1)
    from .models import load_model
    return load_model(gguf)


class _JsonBudget:
    """Keeps a JSON reply closable within the tokens left (see Engine.generate), by its grammar.

    Near the end of the budget, before a sampled token is taken, it asks the grammar for an accepted
    end after that token within the tokens left (``GrammarMatcher.closing``). If there is none, the
    token is dropped and the grammar's own end from here is emitted instead: the reply parses, holds
    the schema's required members and never a key the schema forbids. Where the budget is too small
    for any document the schema accepts, the reply is still closed as JSON (``json_closer``) but
    never with an invented key or value: a token that would need one is dropped. The check starts
    ``HORIZON`` tokens plus the length of the last end found before the budget's end, so a schema
    whose shortest document is long is watched early enough."""

    HORIZON = 16
    RESERVE = 4

    def __init__(self, matcher):
        self.m = matcher
        self.tok = matcher.tokenizer
        self.text = b""
        first = matcher.closing(512)        # the shortest whole document: how early to start watching
        self.need = len(first) if first is not None else 0

    def _plain(self, text: bytes, left: int, invent: bool = False):
        """Tokens of the syntactic end of ``text`` if they fit in ``left``, else None."""
        from .grammar import json_closer
        tail = json_closer(text.decode("utf-8", "ignore"), invent=invent)
        if tail is None:
            return None
        ids = self.tok.encode(tail, add_bos=False, special=False) if tail else []
        return ids if len(ids) <= left else None

    def fits(self, tok: int, left: int) -> bool:
        if left > self.HORIZON + self.need or self.tok.is_eog(tok):
            return True
        from .grammar import json_closer
        text = self.text + self.tok.token_to_bytes(tok)
        ids = self.m.closing(left, after=tok)
        if ids is not None:
            self.need = len(ids)
            # a token that opens a member (a key, a comma) needs RESERVE tokens more than the grammar's end,
            # so the member is the model's and not a placeholder written by the end
            return json_closer(text.decode("utf-8", "ignore"), invent=False) is not None \
                or len(ids) + self.RESERVE <= left
        return self._plain(text, left) is not None

    def close(self, left: int) -> list:
        """The grammar's end from here in at most ``left`` tokens, else the syntactic one."""
        ids = self.m.closing(left)
        if ids is None:
            ids = self._plain(self.text, left)
        if ids is None:
            ids = self._plain(self.text, left, invent=True)
        return ids or []

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
