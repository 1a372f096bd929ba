"""Speculative decoding: proposers of draft tokens, checked by the target model in one pass.

A *proposer* guesses the tokens that follow the context; the target model evaluates the last
sampled token plus the k guesses as one batch (one forward pass, ``n_out = k + 1`` logits rows:
every weight is read once for all of them), and the engine's loop (tinyinfer/engine.py) then
samples each row in turn with the run's own sampler, exactly as plain decoding would::

    tok = sample(logits)                      # the target's token for this position
    drafts = proposer.propose(tokens + [tok]) # d1..dk (may be empty: plain decoding)
    rows = target.eval([tok, d1, .., dk])     # rows[i]: the logits after d_i (rows[0]: after tok)
    for i, d in enumerate(drafts):
        t = sample(rows[i])                   # the whole sampler chain, grammar and penalties included
        if t != d: drop d..dk from the cache (roll back) and go on from t
        else: d is accepted, rows[i + 1] is the next position's logits, no evaluation needed

Each output token is drawn from the target's own (processed) distribution with the run's RNG in
the same order as without a proposer, so the output is the same token for token as plain decoding
(greedy, and also sampled with a seed): a wrong guess only costs the batch rows it took. Rolling
back is cutting the engine's token list: the cells past it are overwritten by the next evaluation
(a position's k/v depend only on the tokens before it).

Proposers (llama.cpp's ``--spec-type`` / ``-md``, llama-cpp-python's ``draft_model``):

* :class:`NgramSimple`: ``--spec-type ngram-simple``: the last ``size_n`` tokens looked up
  backwards in the context; the ``size_m`` tokens that followed the match are the guess.
* :class:`LlamaPromptLookupDecoding`: llama-cpp-python's prompt lookup (``max_ngram_size``,
  ``num_pred_tokens``), callable on the token ids as its ``LlamaDraftModel`` is.
* :class:`DraftModel`: a smaller model with the same vocabulary (``-md FILE``), greedy, up to
  ``--spec-draft-n-max`` tokens, stopping early below ``--spec-draft-p-min``; its own KV cache is
  rolled back the same way (its engine keeps the common prefix of what it holds and the context).
* any callable ``f(input_ids: np.ndarray) -> sequence of token ids`` (a ``LlamaDraftModel``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

#: --spec-type names this port implements
SPEC_TYPES = ("none", "ngram-simple", "draft-simple")


class SpecError(ValueError):
    """A proposer that cannot work with the target (another vocabulary, a bad setting)."""


class Proposer:
    """Guesses the tokens after ``history`` (the context and the token just sampled)."""

    name = "proposer"

    def propose(self, history: Sequence[int], n_max: int, p_min: float = 0.0) -> list:   # pragma: no cover - interface
        raise NotImplementedError

    def fork(self) -> "Proposer":
        """The proposer for another sequence (a server slot): the same object unless it has state."""
        return self

    def close(self) -> None:
        pass


class NgramSimple(Proposer):
    """llama.cpp's ngram-simple (common_ngram_simple_draft): the pattern is the last ``size_n`` tokens
    of the history; the latest earlier occurrence of it gives the (up to ``size_m``) tokens that
    followed it, proposed when there are at least ``size_n`` of them."""

    name = "ngram-simple"

    def __init__(self, size_n: int = 12, size_m: int = 48, min_hits: int = 1):
        for k, v, lo in (("size_n", size_n, 1), ("size_m", size_m, 1), ("min_hits", min_hits, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 1024:
                raise SpecError(f"ngram-simple {k} must be an integer in [{lo}, 1024], got {v!r}")
        self.size_n, self.size_m, self.min_hits = size_n, size_m, min_hits

    def propose(self, history: Sequence[int], n_max: int, p_min: float = 0.0) -> list:
        n, m = self.size_n, self.size_m
        h = np.asarray(history, np.int64)
        cur = h.size - 1                # llama.cpp's tokens: the history without the sampled token
        if cur <= n + m + 1:
            return []
        pat = h[-n:]
        # windows starting at 1..cur-n-1 (0 is "no match" in llama.cpp's loop), latest first
        win = np.lib.stride_tricks.sliding_window_view(h[:cur - 1], n)[1:]
        hit = np.flatnonzero((win == pat).all(axis=1))
        if hit.size == 0:
            return []
        j = int(hit[-1]) + 1
        copy = min(m, cur - (j + n))
        if copy < n:
            return []
        return [int(t) for t in h[j + n:j + n + copy]]


class LlamaPromptLookupDecoding(Proposer):
    """llama-cpp-python's prompt lookup decoding: for n-gram sizes ``max_ngram_size`` down to 1, the
    first earlier occurrence of the history's last n tokens gives the next (up to ``num_pred_tokens``)
    tokens. Callable as llama-cpp-python's ``LlamaDraftModel``: ``f(input_ids) -> np.ndarray``."""

    name = "prompt-lookup"

    def __init__(self, max_ngram_size: int = 2, num_pred_tokens: int = 10):
        if max_ngram_size < 1 or num_pred_tokens < 1:
            raise SpecError(f"max_ngram_size and num_pred_tokens must be >= 1, got {max_ngram_size}, "
                            f"{num_pred_tokens}")
        self.max_ngram_size, self.num_pred_tokens = int(max_ngram_size), int(num_pred_tokens)

    @staticmethod
    def find_candidate_pred_tokens(input_ids: np.ndarray, max_ngram_size: int, num_pred_tokens: int):
        ids = np.asarray(input_ids)
        n_in = ids.shape[0]
        for size in range(min(max_ngram_size, n_in - 1), 0, -1):
            win = np.lib.stride_tricks.sliding_window_view(ids, (size,))
            for idx in np.flatnonzero((win == ids[-size:]).all(axis=1)):
                start = idx + size
                end = min(start + num_pred_tokens, n_in)
                if start < end:
                    return ids[start:end]
        return np.array([], dtype=np.intc)

    def __call__(self, input_ids, /, **kwargs) -> np.ndarray:
        return self.find_candidate_pred_tokens(np.asarray(input_ids, np.intc), self.max_ngram_size,
                                               self.num_pred_tokens)

    def propose(self, history: Sequence[int], n_max: int, p_min: float = 0.0) -> list:
        return [int(t) for t in self(history)]


class CallableProposer(Proposer):
    """Any ``f(input_ids: np.ndarray) -> token ids`` (llama-cpp-python's LlamaDraftModel shape)."""

    name = "callable"

    def __init__(self, fn):
        self.fn = fn

    def propose(self, history: Sequence[int], n_max: int, p_min: float = 0.0) -> list:
        return [int(t) for t in np.asarray(self.fn(np.asarray(history, np.intc))).reshape(-1)]


class DraftModel(Proposer):
    """A smaller model of the same vocabulary proposing greedily (llama.cpp's ``-md``).

    ``engine``: its :class:`~tinyinfer.engine.Engine` (its own KV cache). Each call makes that cache
    hold the history (keeping the common prefix with what it held: the rejected guesses are cut off
    there), then takes the draft's most likely token up to ``n_max`` times, stopping when its
    probability is below ``p_min``."""

    name = "draft"

    def __init__(self, engine):
        self.engine = engine

    def propose(self, history: Sequence[int], n_max: int, p_min: float = 0.0) -> list:
        e = self.engine
        n_max = min(n_max, e.n_ctx - len(history))
        if n_max <= 0:
            return []
        logits = e.ingest_prompt(history)
        out = []
        while True:
            tok = int(np.argmax(logits))
            if p_min > 0.0:     # the top token's probability: 1 / sum(exp(l - l_max)), float32 exp (60 us, not 290)
                x = logits - logits[tok]
                np.exp(x, out=x)
                if 1.0 / float(x.sum(dtype=np.float64)) < p_min:
                    break
            out.append(tok)
            if len(out) >= n_max:
                break
            logits = e.eval([tok], prompt=False)
        return out

    def fork(self) -> "DraftModel":
        """Another draft on the same weights with a KV cache of its own (a server slot's)."""
        return DraftModel(self.engine.fork())

    def close(self) -> None:
        self.engine.close()


def check_vocab(target_tok, draft_tok, draft_path: str = "draft model") -> None:
    """SpecError unless the draft's vocabulary is the target's (same size, same token texts)."""
    if target_tok.n_vocab != draft_tok.n_vocab:
        raise SpecError(f"{draft_path}: the draft model's vocabulary has {draft_tok.n_vocab} tokens, the target's "
                        f"{target_tok.n_vocab}: speculative decoding needs the same vocabulary")
    for t in range(target_tok.n_vocab):
        if target_tok.token_to_bytes(t) != draft_tok.token_to_bytes(t):
            raise SpecError(f"{draft_path}: token {t} is {draft_tok.token_to_bytes(t)!r} in the draft model and "
                            f"{target_tok.token_to_bytes(t)!r} in the target: speculative decoding needs the same "
                            f"vocabulary")


def load_draft(target, path, n_ctx: Optional[int] = None, n_threads: Optional[int] = None,
               type_k: str = "f16", type_v: str = "f16", verbose: bool = False) -> DraftModel:
    """``-md PATH`` for ``target`` (an Engine): a DraftModel on its own engine and cache, after the
    vocabulary check (SpecError in one line otherwise). The draft's engine is of the target's class
    (no import of tinyinfer.engine here: it imports this module)."""
    from .tokenizer import Tokenizer
    from .gguf import GGUFFile
    tok = Tokenizer.from_gguf(GGUFFile(path).metadata)
    check_vocab(target.tokenizer, tok, str(path))
    e = type(target)(path, n_ctx=n_ctx or target.n_ctx, n_batch=target.n_batch, n_threads=n_threads,
               type_k=type_k, type_v=type_v, verbose=verbose)
    return DraftModel(e)


def proposer_of(obj) -> Optional[Proposer]:
    """A Proposer from what a face was given: None, a Proposer, a tinyinfer ``Llama`` (its engine as
    the draft), an Engine, or a callable (llama-cpp-python's LlamaDraftModel)."""
    if obj is None or isinstance(obj, Proposer):
        return obj
    eng = getattr(obj, "_engine", None)
    if eng is not None and hasattr(eng, "ingest_prompt"):
        return DraftModel(eng)
    if hasattr(obj, "ingest_prompt"):
        return DraftModel(obj)
    if callable(obj):
        return CallableProposer(obj)
    raise TypeError(f"draft_model must be a LlamaPromptLookupDecoding, a draft Llama or a callable, "
                    f"got {type(obj).__name__}")


def from_type(spec_type: Optional[str], size_n: int = 12, size_m: int = 48, min_hits: int = 1) -> Optional[Proposer]:
    """``--spec-type NAME`` for the draft-free kinds (ngram-simple); None for none."""
    if spec_type in (None, "", "none"):
        return None
    if spec_type == "ngram-simple":
        return NgramSimple(size_n, size_m, min_hits)
    raise SpecError(f"--spec-type {spec_type!r} is not supported; supported: {', '.join(SPEC_TYPES)} "
                    f"(draft-simple with -md FNAME)")
