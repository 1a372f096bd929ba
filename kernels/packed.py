"""An encoder's small per-pass steps in one jitted loop each: attention over packed short sequences and
the layer norm.

A pass of a few short sentences (4 of ~10 tokens through all-MiniLM: 41 rows) spends most of its time
in the matmuls, but its attention (pad q / k / v per sequence, two batched matmuls, a masked softmax,
unpad: ~25 numpy calls a layer) and its 13 layer norms (~11 numpy calls each) are call overhead on
arrays of a few thousand floats: ~15% of the pass. Here each is one loop over the packed rows.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True, fastmath=True)
def attention(q, k, v, off, lens, n_head, n_kv, hd, scale, window, out):
    """softmax(q k^T * scale) v within each packed sequence (rows off[b] .. off[b] + lens[b]): q (n, n_head*hd),
    k / v (n, n_kv*hd), out (n, n_head*hd); a query head h reads kv head h // (n_head // n_kv); ``window`` > 0:
    key j is seen from i only when |i - j| <= window // 2 (llama.cpp's symmetric sliding window). C-contiguous
    float32 arrays (the dot products vectorize)."""
    group = n_head // n_kv
    T = 0
    for b in range(lens.size):
        T = max(T, lens[b])
    s = np.empty(T, np.float32)
    half = window // 2
    for b in range(lens.size):
        o, n = off[b], lens[b]
        for h in range(n_head):
            qc, kc = h * hd, (h // group) * hd
            for i in range(n):
                m = -np.inf
                for j in range(n):
                    if window > 0 and abs(i - j) > half:
                        s[j] = -np.inf
                        continue
                    acc = np.float32(0.0)
                    for d in range(hd):
                        acc += q[o + i, qc + d] * k[o + j, kc + d]
                    acc *= scale
                    s[j] = acc
                    if acc > m:
                        m = acc
                tot = np.float32(0.0)
                for j in range(n):
                    e = np.float32(math.exp(s[j] - m)) if s[j] > -np.inf else np.float32(0.0)
                    s[j] = e
                    tot += e
                inv = np.float32(1.0) / tot
                for d in range(hd):
                    out[o + i, qc + d] = 0.0
                for j in range(n):
                    p = s[j] * inv
                    if p != 0.0:
                        for d in range(hd):
                            out[o + i, qc + d] += p * v[o + j, kc + d]


@nb.njit(cache=True, nogil=True)
def layernorm(x, w, b, eps, out):
    """(x - mean) / sqrt(var + eps) * w + b over each row of x (float64 sums) into out."""
    n, e = x.shape
    for r in range(n):
        mu = 0.0
        for c in range(e):
            mu += x[r, c]
        mu /= e
        var = 0.0
        for c in range(e):
            d = x[r, c] - mu
            var += d * d
        var /= e
        inv = 1.0 / math.sqrt(var + eps)
        for c in range(e):
            out[r, c] = np.float32((x[r, c] - mu) * inv) * w[c] + b[c]
