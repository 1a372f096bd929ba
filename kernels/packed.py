"""An encoder's small per-pass steps in one jitted loop each: attention over packed short sequences, the
layer norm (with the residual and bias adds before it) and the feed-forward block's bias + GELU.

A pass of a few short sentences (4 of ~10 tokens through all-MiniLM: 41 rows) spends most of its time
in the matmuls, but its attention (pad q / k / v per sequence, two batched matmuls, a masked softmax,
unpad: ~25 numpy calls a layer) and its 13 layer norms (~11 numpy calls each) are call overhead on
arrays of a few thousand floats: ~15% of the pass. Here each is one loop over the packed rows. The
residual / bias adds and the GELU compute the same float32 operations in the same order as the numpy
expressions they replace (bit for bit the same floats; numpy's tanh between the two GELU loops).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

# fast-math without nnan / ninf: the masked scores of a window are -inf, and are tested for
_FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}


@nb.njit(cache=True, nogil=True, fastmath=_FAST)
def attention(q, k, v, cols, off, lens, heads, scale, window, out):
    """softmax(q k^T * scale) v within each packed sequence (rows off[b] .. off[b] + lens[b]), ``cols`` =
    (q0, k0, v0), ``heads`` = (n_head, n_kv, hd): q's columns q0 .. q0 + n_head*hd, k's and v's k0 / v0 ..
    + n_kv*hd (q, k, v may be one array: a fused qkv output), out (n, n_head*hd); a query head h reads kv head h // (n_head // n_kv); ``window`` > 0:
    key j is seen from i only when |i - j| <= window // 2 (llama.cpp's symmetric sliding window). C-contiguous
    float32 arrays. Each head's rows are taken as 1-d slices (the dot products and the weighted sum of v
    vectorize) and a query row's output is summed in a local vector, written once (3x faster than indexing
    the 2-d arrays element by element and adding into ``out``: 65 against 195 us for a layer of 4 sentences
    of ~11 tokens, 12 heads of 32)."""
    q0, k0, v0 = cols
    n_head, n_kv, hd = heads
    group = n_head // n_kv
    T = 0
    for b in range(lens.size):
        T = max(T, lens[b])
    s = np.empty(T, np.float32)
    acc = np.empty(hd, np.float32)
    half = window // 2
    for b in range(lens.size):
        o, n = off[b], lens[b]
        for h in range(n_head):
            qc, kc = q0 + h * hd, k0 + (h // group) * hd
            vc = v0 + (h // group) * hd
            for i in range(n):
                qi = q[o + i, qc:qc + hd]
                m = np.float32(-np.inf)
                for j in range(n):
                    if window > 0 and abs(i - j) > half:
                        s[j] = -np.inf
                        continue
                    kj = k[o + j, kc:kc + hd]
                    a = np.float32(0.0)
                    for d in range(hd):
                        a += qi[d] * kj[d]
                    a *= scale
                    s[j] = a
                    m = max(m, a)
                tot = np.float32(0.0)
                for j in range(n):
                    e = np.float32(math.exp(s[j] - m))     # (a masked key: exp(-inf) = 0)
                    s[j] = e
                    tot += e
                inv = np.float32(1.0) / tot
                for d in range(hd):
                    acc[d] = 0.0
                for j in range(n):
                    p = s[j] * inv
                    vj = v[o + j, vc:vc + hd]
                    for d in range(hd):
                        acc[d] += p * vj[d]
                oi = out[o + i, h * hd:(h + 1) * hd]
                for d in range(hd):
                    oi[d] = acc[d]


@nb.njit(cache=True, nogil=True)
def _layernorm_row(v, w, b, eps, o):
    """(v - mean) / sqrt(var + eps) * w + b of one row v (float64 sums) into o (which may be v)."""
    e = v.shape[0]
    mu = 0.0
    for c in range(e):
        mu += v[c]
    mu /= e
    var = 0.0
    for c in range(e):
        d = v[c] - mu
        var += d * d
    var /= e
    inv = 1.0 / math.sqrt(var + eps)
    for c in range(e):
        o[c] = np.float32((v[c] - mu) * inv) * w[c] + b[c]


@nb.njit(cache=True, nogil=True)
def layernorm(x, w, b, eps, out):
    """(x - mean) / sqrt(var + eps) * w + b over each row of x (float64 sums) into out."""
    for r in range(x.shape[0]):
        _layernorm_row(x[r], w, b, eps, out[r])


@nb.njit(cache=True, nogil=True)
def add_layernorm(x, h, hb, w, b, eps, out):
    """layernorm(x + (h + hb)) into out (rows of x and h, hb (e,) or empty: no bias): the residual add
    and the projection's bias of an encoder layer, the float32 sums of ``h += hb; x + h``, then
    :func:`layernorm`'s float64 statistics."""
    n, e = x.shape
    bias = hb.size > 0
    for r in range(n):
        if bias:
            for c in range(e):
                out[r, c] = x[r, c] + (h[r, c] + hb[c])
        else:
            for c in range(e):
                out[r, c] = x[r, c] + h[r, c]
        _layernorm_row(out[r], w, b, eps, out[r])


@nb.njit(cache=True, nogil=True)
def gelu_inner(x, hb, t):
    """The first half of ggml_gelu(x + hb) (hb (m,) or empty), in place: x += hb, and
    t = sqrt(2/pi) * (x * (1 + 0.044715 x^2)) in models/encoder.gelu's float32 order (then tanh(t), then
    :func:`gelu_outer`)."""
    n, m = x.shape
    bias = hb.size > 0
    a, one, k = np.float32(0.044715), np.float32(1.0), np.float32(math.sqrt(2.0 / math.pi))
    for r in range(n):
        for c in range(m):
            v = x[r, c]
            if bias:
                v = v + hb[c]
                x[r, c] = v
            u = v * v
            u = u * a
            u = u + one
            u = u * v
            t[r, c] = u * k


@nb.njit(cache=True, nogil=True)
def gelu_outer(x, t):
    """x = x * (1 + t) * 0.5 in place (t = tanh of :func:`gelu_inner`'s)."""
    n, m = x.shape
    one, half = np.float32(1.0), np.float32(0.5)
    for r in range(n):
        for c in range(m):
            x[r, c] = x[r, c] * (t[r, c] + one) * half
