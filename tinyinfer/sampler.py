"""Token sampling: llama.cpp's sampler chain over a numpy logits vector.

The sampler knows nothing of models: it takes one float32 logits vector per
step and returns a token id.  The chain is llama.cpp's default one
(common/sampling.cpp + src/llama-sampling.cpp)::

    logits -> grammar -> logit-bias -> penalties -> top-k -> typical -> top-p -> min-p -> temp -> dist

* ``temperature <= 0``: greedy argmax after logit bias and penalties.
* ``mirostat = 1 | 2``: ``top-k .. dist`` is replaced by ``temp -> mirostat``.
* ``grammar`` (a :class:`tinyinfer.grammar.GrammarMatcher`, or anything with ``logit_mask()`` ->
  float32 array of 0 / -inf or None, and ``accept(token)``): tokens the grammar does not allow next get
  -inf before every other stage, as llama.cpp's grammar sampler does; ``accept`` advances it.

Each stage is also a plain function over a *candidate set* ``(ids, logits)``
so it can be used and tested on its own.  ``ids`` is an int array of token
ids, ``logits`` the matching float32 logits; ``ids=None`` means "the whole
vocabulary in order" (``ids == arange(len(logits))``), which lets the first
stages work on the raw logits vector without materialising 262k ids.
Filtering stages return explicit ids.  No stage mutates its inputs.

Speed (vocabulary of 262,144): top-k never sorts or partitions the whole
vocabulary.  It takes the maximum of each of ``4*k`` blocks; the k-th
largest block maximum is a lower bound of the k-th largest logit, so one
vectorised comparison leaves a few more than k survivors, which are then
sorted.  (``np.argpartition`` costs ~2.7 ms here on random logits and
~50 ms when most logits are tied, e.g. masked to -inf; this costs ~0.1 ms.)
Everything after top-k works on ``k`` candidates.  With top-k disabled,
top-p first tries the 256 most likely tokens (as llama.cpp does) before
falling back to a full sort.

Usage::

    sampler = Sampler(SamplerParams(temperature=0.7, seed=42), n_vocab)
    for tok in prompt_ids:
        sampler.accept(tok)           # llama-cli feeds the prompt to the penalties too
    tok = sampler.sample(logits)      # does not record tok ...
    sampler.accept(tok)               # ... the caller does, once it keeps it
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

__all__ = [
    "SamplerParams",
    "Sampler",
    "apply_logit_bias",
    "apply_penalties",
    "top_k",
    "typical_p",
    "top_p",
    "min_p",
    "temperature",
    "softmax",
    "greedy",
    "dist",
    "mirostat_v1",
    "mirostat_v2",
    "RANDOM_SEED",
]

#: ``seed`` values meaning "draw a fresh random seed" (llama.cpp: LLAMA_DEFAULT_SEED = 0xFFFFFFFF, CLI: -1).
RANDOM_SEED = -1
_LLAMA_DEFAULT_SEED = 0xFFFFFFFF

Ids = Optional[np.ndarray]
Candidates = Tuple[Ids, np.ndarray]


# --------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------

@dataclass
class SamplerParams:
    """Sampling parameters, with llama.cpp's defaults.

    ``temp`` is accepted as an alias of ``temperature`` (a property; the other
    spellings of each face are in tinyinfer/options.py).  ``seed``: ``None``, ``-1`` or ``0xFFFFFFFF`` draw a
    random seed (see :attr:`Sampler.seed` for the one drawn); any other
    non-negative int makes runs reproducible.  ``logit_bias`` maps token id
    to a value added to its logit; ``-inf`` bans the token.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: Optional[int] = None
    logit_bias: dict = field(default_factory=dict)
    min_keep: int = 1

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                     "presence_penalty", "frequency_penalty", "mirostat_tau", "mirostat_eta"):
            value = float(getattr(self, name))
            if math.isnan(value):
                raise ValueError(f"sampler parameter {name} is NaN")
            setattr(self, name, value)
        for name in ("top_k", "repeat_last_n", "mirostat", "min_keep"):
            value = getattr(self, name)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"sampler parameter {name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        if self.mirostat not in (0, 1, 2):
            raise ValueError(f"mirostat must be 0, 1 or 2, got {self.mirostat}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be >= -1 (-1 = whole context), got {self.repeat_last_n}")
        if self.min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {self.min_keep}")
        if self.seed is not None:
            seed = int(self.seed)
            if seed < 0 and seed != RANDOM_SEED:
                raise ValueError(f"seed must be a non-negative integer, None or -1 (random), got {self.seed}")
            self.seed = seed
        bias = self.logit_bias
        if bias is None:
            bias = {}
        elif not isinstance(bias, Mapping):  # e.g. [[id, value], ...] as llama-server accepts
            bias = dict(bias)
        clean = {}
        for tok, value in bias.items():
            tok_i = int(tok)
            if tok_i < 0:
                raise ValueError(f"logit_bias: token id {tok!r} is negative")
            value_f = float(value)
            if math.isnan(value_f) or value_f == math.inf:
                raise ValueError(f"logit_bias for token {tok_i} must be finite or -inf, got {value!r}")
            clean[tok_i] = value_f
        self.logit_bias = clean

    @property
    def temp(self) -> float:
        return self.temperature

    @temp.setter
    def temp(self, value: float) -> None:
        self.temperature = float(value)

    @property
    def random_seed(self) -> bool:
        return self.seed is None or self.seed in (RANDOM_SEED, _LLAMA_DEFAULT_SEED)

    def describe(self) -> str:
        """The parameters in llama.cpp's ``sampler params:`` layout."""
        return (
            f"\trepeat_last_n = {self.repeat_last_n}, repeat_penalty = {self.repeat_penalty:.3f}, "
            f"frequency_penalty = {self.frequency_penalty:.3f}, presence_penalty = {self.presence_penalty:.3f}\n"
            f"\ttop_k = {self.top_k}, top_p = {self.top_p:.3f}, min_p = {self.min_p:.3f}, "
            f"typical_p = {self.typical_p:.3f}, temp = {self.temperature:.3f}\n"
            f"\tmirostat = {self.mirostat}, mirostat_lr = {self.mirostat_eta:.3f}, "
            f"mirostat_ent = {self.mirostat_tau:.3f}"
        )


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _logits_1d(logits) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim != 1:
        raise ValueError(f"logits must be a 1-D vector, got shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return x


def _take(ids: Ids, logits: np.ndarray, sel: np.ndarray) -> Candidates:
    sel = np.asarray(sel, dtype=np.int64)
    return (sel if ids is None else ids[sel]), logits[sel]


def _locate(ids: Ids, n: int, tokens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Positions of ``tokens`` in the candidate set, and which were found."""
    tokens = np.asarray(tokens, dtype=np.int64)
    m = n if ids is None else ids.shape[0]
    inb = (tokens >= 0) & (tokens < m)
    pos = np.where(inb, tokens, 0)
    if ids is None or m == 0:
        return pos, inb
    found = inb & (ids[pos] == tokens)
    if found.all():
        return pos, found
    # candidate set is not the identity at these positions: look ids up by sorting
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    j = np.minimum(np.searchsorted(sorted_ids, tokens), m - 1)
    return order[j], sorted_ids[j] == tokens


def _top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest entries of ``x``, by descending value,
    ties broken by lower position.

    No sort of the whole vector and no ``np.partition`` over it (numpy's
    introselect degrades 10-50x on heavily tied data, e.g. a vocabulary
    mostly masked to -inf).  Instead: split the current candidates into
    ``4k`` blocks; the k-th largest block maximum ``b`` is a lower bound of
    the k-th largest entry (k distinct blocks reach it).  If fewer than k
    entries are strictly above ``b`` the answer is those plus the first ties
    at ``b``; otherwise the entries above ``b`` (at most ~1/4 of the
    candidates, usually a few more than k) become the new candidates.  The
    last few thousand candidates are sorted (stable argsort)."""
    n = x.shape[0]
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k >= n:
        return np.argsort(-x, kind="stable")
    cand = None                     # None: every position of x
    vals = x
    while True:
        m = vals.shape[0]
        n_blocks = 4 * k
        block = m // n_blocks
        if m <= max(4 * k, 2048) or block < 2:
            break
        used = n_blocks * block
        bmax = vals[:used].reshape(n_blocks, block).max(axis=1)
        if used < m:
            bmax = np.append(bmax, vals[used:].max())
        bound = np.sort(bmax)[bmax.shape[0] - k]
        above = np.flatnonzero(vals > bound)
        if above.shape[0] < k:
            ties = np.flatnonzero(vals == bound)[: k - above.shape[0]]
            sel = np.sort(np.concatenate((above, ties)))
            idx = sel if cand is None else cand[sel]
            return idx[np.argsort(-x[idx], kind="stable")]
        cand = above if cand is None else cand[above]
        vals = x[cand]
    # candidates are in increasing position, so a stable sort breaks ties by position
    order = np.argsort(-vals, kind="stable")[:k]
    return order if cand is None else cand[order]


def _sorted_desc(logits: np.ndarray) -> np.ndarray:
    """Order of the candidates by descending logit (stable)."""
    return np.argsort(-logits, kind="stable")


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to ``weights`` (need not be
    normalised), using exactly one uniform number; zero-weight entries are
    never drawn.  Long vectors are searched block-wise (one cumulative sum
    of block sums, then one within the chosen block)."""
    n = weights.shape[0]
    r = rng.random()
    if n > 8192:
        block = 512
        starts = np.arange(0, n, block)
        bsum = np.add.reduceat(weights, starts, dtype=np.float64)
        cb = np.cumsum(bsum)
        if not cb[-1] > 0:
            raise ValueError("no candidate has a positive probability (all logits -inf or NaN)")
        target = r * cb[-1]
        b = min(int(np.searchsorted(cb, target, side="right")), starts.shape[0] - 1)
        lo = int(starts[b])
        base = cb[b - 1] if b else 0.0
        local = base + np.cumsum(weights[lo:lo + block], dtype=np.float64)
        i = int(np.searchsorted(local, target, side="right"))
        if i < local.shape[0] and weights[lo + i] > 0:
            return lo + i
        # rounding put the target in a gap between the two sums: search exactly
    cum = np.cumsum(weights, dtype=np.float64)
    if not cum[-1] > 0:
        raise ValueError("no candidate has a positive probability (all logits -inf or NaN)")
    target = r * cum[-1]
    i = int(np.searchsorted(cum, target, side="right"))
    if i >= n or weights[i] <= 0:  # rounding at the very top end
        i = int(np.flatnonzero(weights > 0)[-1])
    return i


def _weights(x: np.ndarray) -> np.ndarray:
    """exp(logit - max logit): unnormalised probabilities."""
    mx = x.max()
    if not np.isfinite(mx):
        if mx > 0:    # logits past float32's range (a saturated penalty over a temperature < 1): the tokens
            return np.isposinf(x).astype(x.dtype)   # that overflowed are the only candidates, as equals
        raise ValueError(f"cannot turn logits into probabilities: largest logit is {mx}")
    w = np.subtract(x, mx)
    return np.exp(w, out=w)


def _make_rng(seed: Optional[int]) -> Tuple[np.random.Generator, int]:
    if seed is None or seed in (RANDOM_SEED, _LLAMA_DEFAULT_SEED):
        seed = int(np.random.SeedSequence().entropy % (1 << 32))
    return np.random.default_rng(seed), int(seed)


# --------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------

def apply_logit_bias(ids: Ids, logits, bias) -> Candidates:
    """Add ``bias[token]`` to the logit of each token present in the
    candidate set (``-inf`` bans it).  ``bias`` is a mapping id -> value or a
    pair of arrays ``(token_ids, values)``.  Returns a new logits array."""
    logits = _logits_1d(logits)
    if isinstance(bias, Mapping):
        if not bias:
            return ids, logits
        tokens = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
    else:
        tokens, values = np.asarray(bias[0], dtype=np.int64), np.asarray(bias[1], dtype=np.float32)
        if tokens.size == 0:
            return ids, logits
    pos, found = _locate(ids, logits.shape[0], tokens)
    out = logits.copy()
    np.add.at(out, pos[found], values[found])
    return ids, out


def apply_penalties(ids: Ids, logits, counts, repeat_penalty: float = 1.0,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> Candidates:
    """llama.cpp's repetition penalties.

    ``counts`` is a mapping token id -> occurrences in the penalty window, or
    the window itself (an iterable of token ids).  For each candidate seen
    ``c > 0`` times: a logit ``> 0`` is divided by ``repeat_penalty``, one
    ``<= 0`` multiplied by it; then ``c*frequency_penalty +
    presence_penalty`` is subtracted.  Returns a new logits array."""
    logits = _logits_1d(logits)
    if repeat_penalty == 1.0 and frequency_penalty == 0.0 and presence_penalty == 0.0:
        return ids, logits
    if isinstance(counts, Mapping):
        tokens = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        n_seen = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
    else:
        hist = np.fromiter((int(t) for t in counts), dtype=np.int64)
        tokens, n_seen = np.unique(hist, return_counts=True)
    keep = n_seen > 0
    tokens, n_seen = tokens[keep], n_seen[keep]
    if tokens.size == 0:
        return ids, logits
    pos, found = _locate(ids, logits.shape[0], tokens)
    pos, c = pos[found], n_seen[found].astype(np.float32)
    out = logits.copy()
    # in float64 from penalties held to float32's range, the result clipped back into it: a schema-valid
    # extreme (repeat_penalty 1e308, penalties of opposite infinite signs) never makes a NaN or +inf logit
    big = float(np.finfo(np.float32).max)
    rp, fp, pp = (min(max(float(x), -big), big) for x in (repeat_penalty, frequency_penalty, presence_penalty))
    v = out[pos].astype(np.float64)
    v = np.where(v <= 0, v * rp, v / rp) if rp != 0 else np.where(v <= 0, 0.0, np.inf)
    v -= c * fp + pp
    out[pos] = np.clip(v, -big, big)
    return ids, out


def top_k(ids: Ids, logits, k: int, min_keep: int = 1) -> Candidates:
    """Keep the ``max(k, min_keep)`` highest logits, sorted descending (ties:
    lower position first).  ``k <= 0`` disables (candidates unchanged)."""
    logits = _logits_1d(logits)
    if k <= 0:
        return ids, logits
    k = min(max(int(k), int(min_keep)), logits.shape[0])
    return _take(ids, logits, _top_indices(logits, k))


def typical_p(ids: Ids, logits, p: float, min_keep: int = 1) -> Candidates:
    """Locally typical sampling: order candidates by ``|-log p_i - H|`` and
    keep the shortest prefix whose probability mass exceeds ``p`` (at least
    ``min_keep``).  ``p >= 1`` is a no-op.  Result is in typicality order."""
    logits = _logits_1d(logits)
    n = logits.shape[0]
    if p >= 1.0 or n == 0:
        return ids, logits
    order = _sorted_desc(logits)
    probs = softmax(logits[order])
    with np.errstate(divide="ignore", invalid="ignore"):
        neg_log = -np.log(probs)
        entropy = float(np.sum(np.where(probs > 0, probs * neg_log, 0.0)))
        shifted = np.abs(neg_log - entropy)
    by_typ = np.argsort(shifted, kind="stable")
    cum = np.cumsum(probs[by_typ])
    ok = (cum > p) & (np.arange(n) >= int(min_keep) - 1)
    last = int(np.argmax(ok)) + 1 if ok.any() else n
    return _take(ids, logits, order[by_typ[:last]])


def top_p(ids: Ids, logits, p: float, min_keep: int = 1) -> Candidates:
    """Nucleus sampling: keep the most likely candidates until their
    cumulative probability reaches ``p`` (at least ``min_keep``), sorted
    descending.  ``p >= 1`` is a no-op."""
    logits = _logits_1d(logits)
    n = logits.shape[0]
    if p >= 1.0 or n == 0:
        return ids, logits
    min_keep = int(min_keep)
    mx = logits.max()
    norm = np.exp(logits - mx).sum(dtype=np.float64)
    if n > 1024 and min_keep <= 256:
        # like llama.cpp: try the 256 most likely first, sort everything only if needed
        order = _top_indices(logits, 256)
        cum = np.cumsum(np.exp(logits[order] - mx), dtype=np.float64) / norm
        ok = (cum >= p) & (np.arange(1, order.shape[0] + 1) >= min_keep)
        if ok.any():
            return _take(ids, logits, order[: int(np.argmax(ok)) + 1])
    order = _sorted_desc(logits)
    cum = np.cumsum(np.exp(logits[order] - mx), dtype=np.float64) / norm
    ok = (cum >= p) & (np.arange(1, n + 1) >= min_keep)
    last = int(np.argmax(ok)) + 1 if ok.any() else n
    return _take(ids, logits, order[:last])


def min_p(ids: Ids, logits, p: float, min_keep: int = 1) -> Candidates:
    """Keep candidates whose probability is at least ``p`` times the largest
    one (tested in logit space: ``logit >= max + log p``), in their current
    order; if fewer than ``min_keep`` pass, keep the ``min_keep`` most likely
    (sorted).  ``p <= 0`` is a no-op."""
    logits = _logits_1d(logits)
    n = logits.shape[0]
    if p <= 0.0 or n == 0:
        return ids, logits
    bound = logits.max() + np.float32(math.log(p))
    keep = np.flatnonzero(logits >= bound)
    if keep.shape[0] >= max(int(min_keep), 1):
        if keep.shape[0] == n:
            return ids, logits
        return _take(ids, logits, keep)
    return _take(ids, logits, _top_indices(logits, min(int(min_keep), n)))


def temperature(ids: Ids, logits, temp: float) -> Candidates:
    """Divide logits by ``temp``.  ``temp <= 0`` keeps only the most likely
    candidate (the first one on ties)."""
    logits = _logits_1d(logits)
    if temp <= 0.0:
        i = int(np.argmax(logits))
        return _take(ids, logits, np.array([i]))
    if temp == 1.0:
        return ids, logits
    return ids, logits / np.float32(temp)


def softmax(logits) -> np.ndarray:
    """Probabilities (float64) of the candidates, in their order."""
    e = _weights(_logits_1d(logits))
    return e / e.sum(dtype=np.float64)


def greedy(ids: Ids, logits) -> int:
    """Token with the highest logit (the first one on ties)."""
    logits = _logits_1d(logits)
    i = int(np.argmax(logits))
    return i if ids is None else int(ids[i])


def dist(ids: Ids, logits, rng: np.random.Generator) -> int:
    """Draw a token from softmax(logits) with ``rng`` (exactly one uniform
    number per call, also for a single candidate)."""
    logits = _logits_1d(logits)
    if logits.shape[0] == 0:
        raise ValueError("cannot sample from an empty candidate set")
    i = _draw(_weights(logits), rng)
    return i if ids is None else int(ids[i])


def mirostat_v1(ids: Ids, logits, rng: np.random.Generator, *, tau: float, eta: float,
                mu: float, n_vocab: int, m: int = 100) -> Tuple[int, float]:
    """Mirostat 1.0 (Basu et al. 2020) as llama.cpp does it.

    Estimates the Zipf exponent ``s_hat`` from the ``m`` most likely
    candidates, derives ``k`` from ``mu``, samples from the top ``k`` and
    updates ``mu -= eta * (surprise - tau)``, surprise being ``-log2`` of the
    chosen token's renormalised probability.  Returns ``(token, new_mu)``.
    Initial ``mu`` is ``2 * tau``."""
    logits = _logits_1d(logits)
    n = logits.shape[0]
    if n == 0:
        raise ValueError("cannot sample from an empty candidate set")
    top = logits[_top_indices(logits, min(int(m), n))].astype(np.float64)
    cnt = min(int(m) - 1, n - 1)
    k = 1.0
    if cnt > 0:
        i = np.arange(cnt, dtype=np.float64)
        t = np.log((i + 2.0) / (i + 1.0))
        with np.errstate(invalid="ignore"):
            b = top[:cnt] - top[1:cnt + 1]  # log(p_i / p_{i+1}) from the logits directly
        valid = np.isfinite(b)  # -inf logits among the top m carry no slope information
        if valid.any():
            s_hat = np.sum(t[valid] * b[valid]) / np.sum(t[valid] * t[valid])
            eps = s_hat - 1.0
            two_mu = np.power(np.float64(2.0), np.float64(mu))
            with np.errstate(all="ignore"):
                if abs(eps) < 1e-12:  # limit of eps / (1 - N^-eps) as eps -> 0
                    base = two_mu / np.log(np.float64(n_vocab))
                else:
                    base = eps * two_mu / (1.0 - np.power(np.float64(n_vocab), -eps))
                if s_hat > 0:
                    k = float(np.power(base, 1.0 / s_hat))
                else:  # flat distribution: base ** +inf
                    k = math.inf if base > 1 else 1.0
    if math.isnan(k):
        k = 1.0
    k_int = int(min(max(k, 1.0), float(n)))
    sel = _top_indices(logits, k_int)
    probs = softmax(logits[sel])
    j = _draw(probs, rng)
    surprise = -math.log2(probs[j])
    new_mu = float(mu - eta * (surprise - tau))
    tok = int(sel[j]) if ids is None else int(ids[sel[j]])
    return tok, new_mu


def mirostat_v2(ids: Ids, logits, rng: np.random.Generator, *, tau: float, eta: float,
                mu: float) -> Tuple[int, float]:
    """Mirostat 2.0: drop candidates whose surprise ``-log2 p`` exceeds
    ``mu`` (keeping at least the most likely), renormalise, sample, and
    update ``mu -= eta * (surprise - tau)`` with the chosen token's
    renormalised surprise.  Returns ``(token, new_mu)``."""
    logits = _logits_1d(logits)
    n = logits.shape[0]
    if n == 0:
        raise ValueError("cannot sample from an empty candidate set")
    w = _weights(logits)
    # -log2(p) <= mu  <=>  w >= Z * 2^-mu ; no log or division over the whole vocabulary
    bound = w.sum(dtype=np.float64) * np.power(np.float64(2.0), -np.float64(mu))
    keep = np.flatnonzero(w >= bound)
    if keep.shape[0] == 0:
        keep = np.array([int(np.argmax(logits))])
    keep = keep[np.argsort(-logits[keep], kind="stable")]
    q = softmax(logits[keep])
    j = _draw(q, rng)
    surprise = -math.log2(q[j])
    new_mu = float(mu - eta * (surprise - tau))
    tok = int(keep[j]) if ids is None else int(ids[keep[j]])
    return tok, new_mu


# --------------------------------------------------------------------------
# the chain
# --------------------------------------------------------------------------

class Sampler:
    """llama.cpp's default sampler chain with its state (penalty window,
    mirostat ``mu``, random generator).

    ``sample(logits)`` returns a token id and never mutates ``logits``; it
    does not record the token: call ``accept(token)`` for every token that
    becomes part of the context (prompt tokens included, as llama-cli does).
    ``n_ctx`` bounds the penalty window when ``repeat_last_n == -1``
    (unbounded if not given).  ``params`` is read at every ``sample`` except
    ``logit_bias``, ``repeat_last_n`` and ``seed``, fixed at construction
    (``seed`` again at ``reset``).
    """

    def __init__(self, params: Optional[SamplerParams] = None, n_vocab: int = 0,
                 n_ctx: Optional[int] = None, grammar=None) -> None:
        if params is None:
            params = SamplerParams()
        n_vocab = int(n_vocab)
        if n_vocab <= 0:
            raise ValueError(f"n_vocab must be positive, got {n_vocab}")
        self.params = params
        self.n_vocab = n_vocab
        self.grammar = grammar
        bad = [t for t in params.logit_bias if t >= n_vocab]
        if bad:
            raise ValueError(f"logit_bias names token ids outside the vocabulary of {n_vocab}: {bad[:8]}")
        if params.logit_bias:
            with np.errstate(over="ignore"):      # past float32's range: +-inf (see _penalised)
                self._bias = (np.fromiter(params.logit_bias.keys(), dtype=np.int64),
                              np.fromiter(params.logit_bias.values(), dtype=np.float32))
        else:
            self._bias = None
        last_n = params.repeat_last_n
        if last_n == -1:
            last_n = int(n_ctx) if n_ctx is not None else None
        self._window: Optional[int] = last_n          # None = unbounded, 0 = off
        self._history: deque = deque()
        self._counts: dict = {}
        self.reset()

    # state ---------------------------------------------------------------

    def reset(self) -> None:
        """Forget the penalty window, restore ``mu = 2*tau`` and reseed the
        generator (a random seed draws a new one)."""
        self._history.clear()
        self._counts.clear()
        self.mu = 2.0 * self.params.mirostat_tau
        self._rng, self.seed = _make_rng(self.params.seed)

    def accept(self, token_id: int, accept_grammar: bool = True) -> None:
        """Record a token in the penalty window (ring of the last
        ``repeat_last_n`` tokens) and, unless ``accept_grammar`` is False (prompt
        tokens, as llama.cpp's common_sampler_accept), advance the grammar."""
        tok = int(token_id)
        if not 0 <= tok < self.n_vocab:
            raise ValueError(f"token id {token_id} outside the vocabulary of {self.n_vocab}")
        if accept_grammar and self.grammar is not None:
            self.grammar.accept(tok)
        if self._window == 0:
            return
        if self._window is not None and len(self._history) >= self._window:
            old = self._history.popleft()
            left = self._counts[old] - 1
            if left:
                self._counts[old] = left
            else:
                del self._counts[old]
        self._history.append(tok)
        self._counts[tok] = self._counts.get(tok, 0) + 1

    @property
    def history(self) -> Tuple[int, ...]:
        """The penalty window, oldest first."""
        return tuple(self._history)

    def chain(self) -> list:
        """Names of the stages ``sample`` runs, in llama.cpp's spelling."""
        p = self.params
        names = ["grammar"] if self.grammar is not None else []
        if self._bias is not None:
            names.append("logit-bias")
        names.append("penalties")
        if p.temperature <= 0:
            return names + ["greedy"]
        if p.mirostat:
            return names + ["temp", "mirostat" if p.mirostat == 1 else "mirostat-v2"]
        return names + ["top-k", "typical", "top-p", "min-p", "temp", "dist"]

    # sampling ------------------------------------------------------------

    def _penalised(self, logits) -> np.ndarray:
        x = _logits_1d(logits)
        if x.shape[0] != self.n_vocab:
            raise ValueError(f"expected {self.n_vocab} logits, got {x.shape[0]}")
        p = self.params
        if self.grammar is not None:
            mask = self.grammar.logit_mask()
            if mask is not None:      # a fresh array: add the logits into it
                x = np.add(mask, x, out=mask)
        if self._bias is not None:
            _, x = apply_logit_bias(None, x, self._bias)
        if self._counts and self._window != 0:
            _, x = apply_penalties(None, x, self._counts, p.repeat_penalty,
                                   p.frequency_penalty, p.presence_penalty)
        mx = x.max()
        if not np.isfinite(mx):
            if np.isnan(mx):
                raise ValueError("logits contain NaN")
            if mx > 0:
                # a bias or penalty past float32's range (a finite 1e308 bias): its tokens overflowed to
                # +inf, infinitely favoured; they stay the only candidates, as equals
                return np.where(np.isposinf(x), np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
            raise ValueError("every token is banned (all logits are -inf)")
        return x

    def sample(self, logits) -> int:
        """Run the chain over one logits vector of length ``n_vocab``."""
        p = self.params
        x = self._penalised(logits)
        if p.temperature <= 0:
            return greedy(None, x)
        if p.mirostat:
            _, x = temperature(None, x, p.temperature)
            if p.mirostat == 1:
                tok, self.mu = mirostat_v1(None, x, self._rng, tau=p.mirostat_tau, eta=p.mirostat_eta,
                                           mu=self.mu, n_vocab=self.n_vocab)
            else:
                tok, self.mu = mirostat_v2(None, x, self._rng, tau=p.mirostat_tau, eta=p.mirostat_eta,
                                           mu=self.mu)
            return tok
        ids, x = top_k(None, x, p.top_k, p.min_keep)
        ids, x = typical_p(ids, x, p.typical_p, p.min_keep)
        ids, x = top_p(ids, x, p.top_p, p.min_keep)
        ids, x = min_p(ids, x, p.min_p, p.min_keep)
        ids, x = temperature(ids, x, p.temperature)
        return dist(ids, x, self._rng)

    def __repr__(self) -> str:
        return f"Sampler(n_vocab={self.n_vocab}, chain={' -> '.join(self.chain())}, seed={self.seed})"
