"""What every encoder (embedding) architecture shares: bidirectional attention over packed sequences,
no KV cache, the file's pooling type, and the model-level heads llama.cpp applies after pooling.

An encoder model has ``encoder_only = True`` and ``encode(seqs) -> [hidden (len_i, n_embd)]``; the
pooling, normalization and batching around it are tinyinfer/embedding.py's. Architectures: bert.py,
nomic_bert.py, gemma_embedding.py.
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels import blas, ops, quants
from ..kernels import packed as packed_kernels
from . import base
from .hparams import ModelError, Weights, meta

POOLING_TYPES = ("none", "mean", "cls", "last", "rank")     # llama_pooling_type 0..4
ENCODER_ARCHS = ("bert", "nomic-bert", "gemma-embedding")    # the architectures built on Encoder (no KV cache)


class Linear(base.Linear):
    """An encoder's weight matrix: a packed batch of at least ``blas.MIN_ROWS`` rows of a float weight
    (F32 / F16 / BF16) is multiplied through BLAS (kernels/blas.py), anything else through the kernels
    every decoder uses (kernels/matmul.py: the int8 GEMM of a quantized weight is the faster one)."""

    def __init__(self, *ts):
        super().__init__(*ts)
        self.blas = blas.preferred(self.w)

    def __call__(self, x: np.ndarray, out=None) -> np.ndarray:
        if self.blas and x.shape[0] >= blas.MIN_ROWS:
            return blas.gemm(self.w, x, out)
        return base.Linear.__call__(self, x, out)


def fused_linear(*ts):
    """:func:`.base.fused_linear` of encoder :class:`Linear` matrices."""
    return base.fused_linear(*ts, linear=Linear)


def layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: np.float32) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * w + b over the last axis, into a new array: one jitted loop
    (kernels/packed.py) for the float32 rows of a pass (13 calls a pass of all-MiniLM), else numpy."""
    if x.ndim == 2 and x.dtype == np.float32 and w.dtype == np.float32 and b.dtype == np.float32:
        out = np.empty(x.shape, np.float32)
        packed_kernels.layernorm(x, w, b, float(eps), out)
        return out
    n = np.float32(x.shape[1])
    mu = np.add.reduce(x, axis=1, keepdims=True)
    mu /= n
    d = x - mu
    var = np.add.reduce(d * d, axis=1, keepdims=True)
    var /= n
    var += eps
    np.sqrt(var, out=var)
    np.divide(np.float32(1.0), var, out=var)
    d *= var
    d *= w
    d += b
    return d


_GELU_C = np.float32(math.sqrt(2.0 / math.pi))


def gelu(x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """ggml_gelu(x + bias): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in place. Float32 rows: two
    jitted loops around numpy's tanh (kernels/packed.py: the same floats as the numpy expression below,
    in 3 passes instead of 10); else numpy."""
    if x.ndim == 2 and x.dtype == np.float32 and x.flags.c_contiguous and (bias is None or bias.dtype == np.float32):
        t = np.empty_like(x)
        packed_kernels.gelu_inner(x, _NO_BIAS if bias is None else bias, t)
        np.tanh(t, out=t)
        packed_kernels.gelu_outer(x, t)
        return x
    if bias is not None:
        x += bias
    t = x * x
    t *= np.float32(0.044715)
    t += np.float32(1.0)
    t *= x
    t *= _GELU_C
    np.tanh(t, out=t)
    t += np.float32(1.0)
    x *= t
    x *= np.float32(0.5)
    return x


def add_layernorm(x: np.ndarray, h: np.ndarray, bias: np.ndarray | None, w: np.ndarray, b: np.ndarray,
                  eps: np.float32) -> np.ndarray:
    """layernorm(x + (h + bias)): an encoder layer's residual add with its projection's bias (optional),
    into a new array; float32 rows in one jitted loop (kernels/packed.py, the same floats as
    ``h += bias; layernorm(x + h)``)."""
    if x.ndim == 2 and all(a.dtype == np.float32 for a in (x, h, w, b)) and (bias is None or bias.dtype == np.float32):
        out = np.empty(x.shape, np.float32)
        packed_kernels.add_layernorm(x, h, _NO_BIAS if bias is None else bias, w, b, float(eps), out)
        return out
    if bias is not None:
        h = h + bias
    return layernorm(x + h, w, b, eps)


_NO_BIAS = np.empty(0, np.float32)


class Packed:
    """Sequences packed row after row (how the matmuls see them) and their padded (B, T) layout (how the
    attention sees them): every sequence attends to all of its own tokens and to nothing else."""

    SCORES_MAX = 1 << 23          # attention scores held at once (32 MiB of float32)
    LOOP_MAX = 32                 # sequences up to this long take the jitted loop, longer ones padded BLAS

    def __init__(self, lens):
        self.lens = [int(n) for n in lens]
        self.B, self.T = len(self.lens), max(self.lens)
        self.off = np.concatenate([[0], np.cumsum(self.lens)[:-1]]).astype(np.int64)
        self.pos = np.concatenate([np.arange(n) for n in self.lens])          # restarts at 0 per sequence
        self.same_length = min(self.lens) == self.T
        self.off_lens = (self.off, np.array(self.lens, np.int64))
        self.valid = np.arange(self.T)[None, :] < np.array(self.lens)[:, None]
        self.key_mask = np.where(self.valid, np.float32(0), np.float32(-np.inf))[:, None, None, :]
        self._windows: dict = {}

    def split(self, x: np.ndarray) -> list:
        return [x[o:o + n] for o, n in zip(self.off, self.lens)]

    def _window_mask(self, window: int) -> np.ndarray:
        """llama.cpp's symmetric sliding window: key j is seen from i when |i - j| <= window // 2."""
        m = self._windows.get(window)
        if m is None:
            d = np.abs(np.arange(self.T)[:, None] - np.arange(self.T)[None, :])
            m = self._windows[window] = np.where(d > window // 2, np.float32(-np.inf), np.float32(0))
        return m

    def attention(self, q, k, v, n_head: int, n_kv: int, hd: int, scale, window: int = 0) -> np.ndarray:
        """softmax(q k^T * scale) v within each sequence: q (n, n_head*hd), k/v (n, n_kv*hd) packed rows
        -> (n, n_head*hd); grouped-query heads share their kv head."""
        if self.T <= self.LOOP_MAX:         # short sequences: one jitted loop, no padding (kernels/packed.py)
            out = np.empty((q.shape[0], n_head * hd), np.float32)
            packed_kernels.attention(*_columns(q, k, v), *self.off_lens, (n_head, n_kv, hd), np.float32(scale),
                                     int(window), out)
            return out
        ops.limit_blas_threads()            # BLAS on the engine's thread count (-t)
        B, T, seqs = self.B, self.T, list(zip(self.off, self.lens))

        def padded(a, h, keys=False):
            """(B, h, T, hd) zero-padded, BLAS-friendly; keys: (B, h, hd, T), transposed for q k^T."""
            p = np.zeros((B, h, hd, T) if keys else (B, h, T, hd), np.float32)
            a3 = a.reshape(-1, h, hd)
            for b, (o0, n) in enumerate(seqs):        # a slice copy per sequence (a boolean mask is ~20x slower)
                if keys:
                    p[b, :, :, :n] = a3[o0:o0 + n].transpose(1, 2, 0)
                else:
                    p[b, :, :n] = a3[o0:o0 + n].transpose(1, 0, 2)
            return p
        same = self.same_length
        if same:           # nothing to pad (one sequence, or all as long): strided views, BLAS takes them
            qp = q.reshape(B, T, n_head, hd).transpose(0, 2, 1, 3)
            kt = k.reshape(B, T, n_kv, hd).transpose(0, 2, 3, 1)
            vp = v.reshape(B, T, n_kv, hd).transpose(0, 2, 1, 3)
        else:
            qp, kt, vp = padded(q, n_head), padded(k, n_kv, True), padded(v, n_kv)
        if n_kv != n_head:
            kt, vp = np.repeat(kt, n_head // n_kv, axis=1), np.repeat(vp, n_head // n_kv, axis=1)
        o = np.empty((B, n_head, T, hd), np.float32)
        # query rows in blocks, so the scores of a long sequence stay small (B x heads x block x T floats)
        step = max(1, min(T, self.SCORES_MAX // max(1, B * n_head * T)))
        for q0 in range(0, T, step):
            q1 = min(T, q0 + step)
            s = np.matmul(qp[:, :, q0:q1], kt)
            s *= np.float32(scale)
            if not same:
                s += self.key_mask
            if window > 0:
                s += self._window_mask(window)[q0:q1]
            with np.errstate(invalid="ignore"):     # a padding row may see no key in a window: dropped below
                s -= s.max(axis=-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(axis=-1, keepdims=True)
            np.matmul(s, vp, out=o[:, :, q0:q1])
        if same:
            return np.ascontiguousarray(o.transpose(0, 2, 1, 3).reshape(B * T, n_head * hd))
        out = np.empty((q.shape[0], n_head * hd), np.float32)
        for b, (o0, n) in enumerate(seqs):            # back to packed rows (n, h * hd)
            out[o0:o0 + n].reshape(n, n_head, hd)[:] = o[b, :, :n].transpose(1, 0, 2)
        return out


def _columns(q, k, v) -> tuple:
    """(q, k, v, (their first columns)) for kernels/packed.attention: column slices of one C-contiguous float32
    array (a fused qkv output) as that array and their offsets, not copied; else contiguous copies."""
    base = q.base
    if (isinstance(base, np.ndarray) and k.base is base and v.base is base and base.dtype == np.float32
            and base.ndim == 2 and base.flags.c_contiguous and q.shape[0] == base.shape[0]
            and q.strides == k.strides == v.strides == base.strides):
        p0 = base.ctypes.data
        return base, base, base, tuple((a.ctypes.data - p0) // 4 for a in (q, k, v))
    c = np.ascontiguousarray
    return c(q, np.float32), c(k, np.float32), c(v, np.float32), (0, 0, 0)


class NoCache:
    """What an encoder has instead of a KV cache: nothing kept between passes (its context size only)."""

    def __init__(self, n_ctx: int, n_seq: int = 1):
        self.n_ctx, self.n_seq, self.first_layer = n_ctx, n_seq, 0


class Encoder:
    """The part of an encoder model that is not its layers: hyper-parameter checks, pooling type,
    the rank head (``cls`` + tanh, ``cls.output``) and the dense projections after pooling
    (``dense_2``, ``dense_3``, sentence-transformers' Dense modules)."""

    arch = ""
    encoder_only = True           # no generation, no KV cache: tinyinfer/embedding.py drives it
    cls = cls_out = dense_2 = dense_3 = None
    cls_b = cls_out_b = None
    n_cls_out = 0

    def read_common(self, g, layers) -> None:
        if layers is not None:
            raise ModelError(f"{g.path}: a {self.arch} model cannot be split by layers")
        a = self.arch
        self.path = g.path
        self.n_embd = int(meta(g, a, "embedding_length"))
        self.n_layer = int(meta(g, a, "block_count"))
        self.n_ff = int(meta(g, a, "feed_forward_length"))
        self.n_head = int(meta(g, a, "attention.head_count"))
        self.n_ctx_train = int(meta(g, a, "context_length"))
        if self.n_head <= 0 or self.n_embd <= 0 or self.n_layer <= 0 or self.n_ff <= 0:
            raise ModelError(f"{g.path}: {a}.embedding_length, attention.head_count, block_count and "
                             f"feed_forward_length must be positive")
        if bool(meta(g, a, "attention.causal", False)):
            raise ModelError(f"{g.path}: {a}.attention.causal is true: a causal {a} is not supported")
        pt = int(meta(g, a, "pooling_type", 0))
        if not 0 <= pt < len(POOLING_TYPES):
            raise ModelError(f"{g.path}: {a}.pooling_type {pt} is not one of 0..4 ({', '.join(POOLING_TYPES)})")
        self.pooling_type = POOLING_TYPES[pt]
        self.labels = list(g.metadata.get(f"{a}.classifier.output_labels") or [])

    def load_heads(self, w: Weights) -> None:
        """The optional tensors applied after pooling."""
        d = self.n_embd
        cls = w.optional("cls.weight", d, d)
        self.cls = None if cls is None else Linear(cls)
        self.cls_b = w.vector("cls.bias", d, required=False)
        out = w.optional("cls.output.weight", d, None)
        self.cls_out = None if out is None else Linear(out)
        self.n_cls_out = 0 if out is None else out.n_elements // d
        self.cls_out_b = w.vector("cls.output.bias", max(self.n_cls_out, 1), required=False)
        d2 = w.optional("dense_2.weight", d, None)
        self.dense_2 = None if d2 is None else Linear(d2)
        self.dense_2_b = w.vector("dense_2.bias", d2.n_elements // d, required=False) if d2 is not None else None
        d3 = w.optional("dense_3.weight", None, d)
        if d3 is not None and (d2 is None and d3.shape[0] != d or d2 is not None and d3.shape[0] != self.dense_2.rows):
            raise ModelError(f"{self.path}: dense_3.weight takes {d3.shape[0]} inputs, dense_2 gives "
                             f"{self.dense_2.rows if d2 is not None else d}")
        self.dense_3 = None if d3 is None else Linear(d3)

    def _rows(self, t, ids) -> np.ndarray:
        return quants.dequantize(t.data[np.asarray(ids, np.int64)], t.ggml_type, self.n_embd)

    def new_cache(self, n_ctx: int, n_batch: int = 512, n_seq: int = 1, **_kv_types) -> NoCache:
        """No KV cache: every pass starts afresh (the KV type options do not apply to an encoder)."""
        return NoCache(n_ctx, n_seq)

    def forward(self, ids, pos0, cache, n_out: int = 1, embeddings: bool = False):
        raise ModelError(f"{self.path}: {self.arch} is an embedding model: it does not generate text "
                         f"(use embeddings: /v1/embeddings, Llama(embedding=True).embed, tinyinfer embedding)")

    def warmup(self) -> None:
        self.dense_out(self.encode([np.array([0, 0], np.int64)])[0])

    def encode(self, seqs: list) -> list:  # pragma: no cover - per architecture
        raise NotImplementedError

    def check_lengths(self, seqs) -> list:
        lens = [int(len(s)) for s in seqs]
        for n in lens:
            if n == 0:
                raise ModelError("nothing to embed: an empty token sequence")
            if n > self.n_ctx_train:
                raise ModelError(f"a sequence of {n} tokens is longer than the model's {self.n_ctx_train} positions")
        return lens

    def token_ids(self, seqs) -> np.ndarray:
        ids = np.concatenate([np.asarray(s, np.int64).reshape(-1) for s in seqs])
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise ModelError(f"token id {bad} is out of range for a vocabulary of {self.n_vocab}")
        return ids

    @property
    def has_rank_head(self) -> bool:
        return self.cls is not None or self.cls_out is not None

    def rank(self, pooled: np.ndarray) -> np.ndarray:
        """The classification head on pooled rows (n, n_embd) -> (n, n_cls_out) (llama.cpp's rank pooling)."""
        if not self.has_rank_head:
            raise ModelError(f"{self.path}: the model has no classification head (cls / cls.output): it cannot rerank")
        cur = np.ascontiguousarray(pooled, np.float32)
        if self.cls is not None:
            cur = self.cls(cur)
            if self.cls_b is not None:
                cur += self.cls_b
            np.tanh(cur, out=cur)
        if self.cls_out is not None:
            cur = self.cls_out(np.ascontiguousarray(cur))
            if self.cls_out_b is not None:
                cur += self.cls_out_b
        return cur

    def dense_out(self, x: np.ndarray) -> np.ndarray:
        """dense_3(dense_2(x) + b): rows (n, n_embd) after pooling (identity without those tensors)."""
        if self.dense_2 is None and self.dense_3 is None:
            return x
        cur = np.ascontiguousarray(np.atleast_2d(x), np.float32)
        if self.dense_2 is not None:
            cur = self.dense_2(cur)
            if self.dense_2_b is not None:
                cur += self.dense_2_b
        if self.dense_3 is not None:
            cur = self.dense_3(np.ascontiguousarray(cur))
        return cur.reshape(*np.shape(x)[:-1], -1)
