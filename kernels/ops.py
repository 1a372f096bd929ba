"""Numba kernels for the non-matmul parts of a transformer step.

RMSNorm, rotary embeddings (ggml's NORM and NEOX modes), causal grouped-query
attention over a KV cache, gated activations. All take float32 arrays of
shape (n_tokens, ...), work in place where the name says so, and are compiled
once (``cache=True``).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

_opts = dict(cache=True, fastmath=False, nogil=True)
# reductions (dot products over a head, sums of squares) only vectorize when LLVM may
# reassociate float adds; the order changes the last bits, not the result's meaning
_fast = dict(cache=True, fastmath={"reassoc", "contract", "nsz"}, nogil=True)


@nb.njit(**_opts)
def rmsnorm(x, w, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w, row by row (x: (n, d))."""
    n, d = x.shape
    for i in range(n):
        s = 0.0
        for j in range(d):
            s += x[i, j] * x[i, j]
        scale = np.float32(1.0 / math.sqrt(s / d + eps))
        for j in range(d):
            out[i, j] = x[i, j] * scale * w[j]
    return out


@nb.njit(**_opts)
def rmsnorm_heads(x, w, eps):
    """In place RMSNorm of each head vector: x (n, n_head, head_dim), w (head_dim,)."""
    n, nh, hd = x.shape
    for i in range(n):
        for h in range(nh):
            s = 0.0
            for j in range(hd):
                s += x[i, h, j] * x[i, h, j]
            scale = np.float32(1.0 / math.sqrt(s / hd + eps))
            for j in range(hd):
                x[i, h, j] = x[i, h, j] * scale * w[j]


@nb.njit(**_opts)
def rope_cache(positions, n_rot, freq_base, freq_scale):
    """cos/sin tables (n, n_rot/2) for the given positions, as ggml computes theta."""
    n = positions.shape[0]
    half = n_rot // 2
    cos = np.empty((n, half), np.float32)
    sin = np.empty((n, half), np.float32)
    theta_scale = freq_base ** (-2.0 / n_rot)
    for i in range(n):
        theta = float(positions[i]) * freq_scale
        for j in range(half):
            cos[i, j] = math.cos(theta)
            sin[i, j] = math.sin(theta)
            theta *= theta_scale
    return cos, sin


@nb.njit(**_opts)
def rope(x, cos, sin, neox):
    """Rotate x (n, n_head, head_dim) in place; only the first 2*cos.shape[1] dims rotate.

    neox=False: ggml's NORM mode, pairs (2j, 2j+1) (llama files).
    neox=True: pairs (j, j + n_rot/2) (gemma, qwen2, gpt-neox).
    """
    n, nh, hd = x.shape
    half = cos.shape[1]
    for i in range(n):
        for h in range(nh):
            for j in range(half):
                c = cos[i, j]
                s = sin[i, j]
                if neox:
                    a = x[i, h, j]
                    b = x[i, h, j + half]
                    x[i, h, j] = a * c - b * s
                    x[i, h, j + half] = a * s + b * c
                else:
                    a = x[i, h, 2 * j]
                    b = x[i, h, 2 * j + 1]
                    x[i, h, 2 * j] = a * c - b * s
                    x[i, h, 2 * j + 1] = a * s + b * c


@nb.njit(parallel=True, **_fast)
def attention(q, k_cache, v_cache, pos0, scale, window, softcap, out):
    """Causal GQA attention for n new tokens at positions pos0..pos0+n-1.

    q: (n, n_head, hd_k) f32; k_cache: (n_rows, n_kv, hd_k) f32; v_cache: (n_rows, n_kv, hd_v) f32;
    the new tokens' k/v are already stored, position p in row p % n_rows (a ring for
    sliding-window layers, the identity for full ones). window > 0 limits each query to the
    last `window` positions (sliding-window attention); out: (n, n_head, hd_v) f32.
    One task per (token, kv head) covers the query heads of its group.
    """
    n, nh, hdk = q.shape
    nkv = k_cache.shape[1]
    hdv = v_cache.shape[2]
    group = nh // nkv
    n_rows = k_cache.shape[0]
    for task in nb.prange(n * nkv):
        i = task // nkv
        kvh = task % nkv
        p = pos0 + i
        start = 0
        if window > 0 and p - window + 1 > 0:
            start = p - window + 1
        L = p + 1 - start
        sc = np.empty((group, L), np.float32)
        for g in range(group):
            h = kvh * group + g
            row = start % n_rows
            for t in range(L):
                s = np.float32(0.0)
                for j in range(hdk):
                    s += q[i, h, j] * k_cache[row, kvh, j]
                s *= scale
                if softcap > 0.0:
                    s = softcap * math.tanh(s / softcap)
                sc[g, t] = s
                row += 1
                if row == n_rows:
                    row = 0
            mx = sc[g, 0]
            for t in range(1, L):
                mx = max(mx, sc[g, t])
            tot = np.float32(0.0)
            for t in range(L):
                e = np.float32(math.exp(sc[g, t] - mx))
                sc[g, t] = e
                tot += e
            inv = np.float32(1.0) / tot
            for j in range(hdv):
                out[i, h, j] = 0.0
            row = start % n_rows
            for t in range(L):
                w = sc[g, t] * inv
                for j in range(hdv):
                    out[i, h, j] += w * v_cache[row, kvh, j]
                row += 1
                if row == n_rows:
                    row = 0
    return out


@nb.njit(**_opts)
def silu_mul(g, u):
    """g = silu(g) * u in place (SwiGLU)."""
    gf = g.reshape(-1)
    uf = u.reshape(-1)
    for i in range(gf.shape[0]):
        x = gf[i]
        gf[i] = x / (np.float32(1.0) + math.exp(-x)) * uf[i]
    return g


@nb.njit(**_opts)
def gelu_mul(g, u):
    """g = gelu_tanh(g) * u in place (GeGLU, as ggml's gelu)."""
    gf = g.reshape(-1)
    uf = u.reshape(-1)
    c = math.sqrt(2.0 / math.pi)
    for i in range(gf.shape[0]):
        x = gf[i]
        gf[i] = 0.5 * x * (1.0 + math.tanh(c * x * (1.0 + 0.044715 * x * x))) * uf[i]
    return g
