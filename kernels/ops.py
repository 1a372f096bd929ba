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
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import parallel as _par

_opts = dict(cache=True, fastmath=False, nogil=True)
# reductions (dot products over a head, sums of squares) only vectorize when LLVM may
# reassociate float adds; the order changes the last bits, not the result's meaning
_fast = dict(cache=True, fastmath={"reassoc", "contract", "nsz"}, nogil=True, error_model="numpy")  # no ZeroDivisionError branch: it blocks vectorization


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
def _rope_cache(positions, n_rot, freq_base, freq_scale, freq_factors, attn_factor):
    n = positions.shape[0]
    half = n_rot // 2
    cos = np.empty((n, half), np.float32)
    sin = np.empty((n, half), np.float32)
    theta_scale = freq_base ** (-2.0 / n_rot)
    has_ff = freq_factors.shape[0] > 0
    for i in range(n):
        theta = float(positions[i])
        for j in range(half):
            t = theta * freq_scale
            if has_ff:
                t /= freq_factors[j]
            cos[i, j] = math.cos(t) * attn_factor
            sin[i, j] = math.sin(t) * attn_factor
            theta *= theta_scale
    return cos, sin


def rope_cache(positions, n_rot, freq_base, freq_scale, freq_factors=None, attn_factor=1.0):
    """cos/sin tables (n, n_rot/2) for the given positions, as ggml computes theta.

    freq_factors (n_rot/2,): per-frequency divisors of theta (Llama 3's ``rope_freqs``, phi3's
    short/long factors); attn_factor multiplies cos and sin (ggml's mscale without YaRN).
    """
    if freq_factors is None:
        freq_factors = np.zeros(0, np.float32)
    elif freq_factors.shape[0] not in (0, n_rot // 2):
        raise ValueError(f"rope: {freq_factors.shape[0]} frequency factors for {n_rot // 2} frequencies")
    return _rope_cache(np.asarray(positions, np.int64), n_rot, float(freq_base), float(freq_scale),
                       np.ascontiguousarray(freq_factors, np.float32), float(attn_factor))


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


# ------------------------------------------------------------------ helpers (inlined into kernels)
@intrinsic
def _pow2(typingctx, n):
    """2**n for a float32 holding an integer in [-126, 127]: the exponent bits built directly
    (fptosi, add, shl, bitcast), so loops calling it stay vectorizable."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        e = builder.fptosi(args[0], i32)
        e = builder.add(e, ir.Constant(i32, 127))
        e = builder.shl(e, ir.Constant(i32, 23))
        return builder.bitcast(e, ir.FloatType())

    return sig, codegen


@intrinsic
def _round_f16(typingctx, x):
    """Round a float32 to the nearest float16 (ties to even) and back, as llama.cpp's f16 KV cache stores it."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@nb.njit(inline="always", **_fast)
def _exp(x):
    """exp(x) for float32 x <= ~88 without a libm call (Cephes expf: range reduction by ln 2 and a
    degree-7 polynomial, ~1 ulp); x is clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands for smaller values)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.float32(math.floor(x * np.float32(1.44269504088896341) + np.float32(0.5)))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    y = np.float32(1.9875691500e-4)
    y = y * r + np.float32(1.3981999507e-3)
    y = y * r + np.float32(8.3334519073e-3)
    y = y * r + np.float32(4.1665795894e-2)
    y = y * r + np.float32(1.6666665459e-1)
    y = y * r + np.float32(5.0000001201e-1)
    y = y * r * r + r + np.float32(1.0)
    return y * _pow2(n)


@nb.njit(**_fast)
def exp_array(x, out):
    """out = exp(x) elementwise with the kernels' exp (tests and benchmarks)."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for i in range(xf.shape[0]):
        of[i] = _exp(xf[i])
    return out


@nb.njit(**_fast)
def round_f16_array(x, out):
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for i in range(xf.shape[0]):
        of[i] = _round_f16(xf[i])
    return out


# ------------------------------------------------------------------ attention
@nb.njit(**_fast)
def qkv_store(qkv, n_head, n_kv, hdk, hdv, q_norm, k_norm, eps, cos, sin, neox, k_cache, v_cache, pos0, q):
    """Split the fused projection qkv (n, n_head*hdk + n_kv*hdk + n_kv*hdv) into heads, apply the per-head
    RMSNorm (when q_norm.size > 0) and RoPE, write the rotated queries to q (n, n_head, hdk) and store
    k/v rounded to f16 in the cache rows (pos0 + i) % n_rows."""
    n = qkv.shape[0]
    n_rows = k_cache.shape[0]
    half = cos.shape[1]
    has_norm = q_norm.shape[0] > 0
    ko = n_head * hdk
    vo = ko + n_kv * hdk
    for i in range(n):
        row = (pos0 + i) % n_rows
        for h in range(n_head + n_kv):
            is_q = h < n_head
            src = h * hdk
            if is_q:
                dst = q[i, h]
            else:
                dst = k_cache[row, h - n_head]
            for j in range(hdk):
                dst[j] = qkv[i, src + j]
            if has_norm:
                w = q_norm if is_q else k_norm
                s = np.float32(0.0)
                for j in range(hdk):
                    s += dst[j] * dst[j]
                sc = np.float32(1.0 / math.sqrt(s / hdk + eps))
                for j in range(hdk):
                    dst[j] = dst[j] * sc * w[j]
            for j in range(half):
                c = cos[i, j]
                s_ = sin[i, j]
                if neox:
                    a = dst[j]
                    b = dst[j + half]
                    dst[j] = a * c - b * s_
                    dst[j + half] = a * s_ + b * c
                else:
                    a = dst[2 * j]
                    b = dst[2 * j + 1]
                    dst[2 * j] = a * c - b * s_
                    dst[2 * j + 1] = a * s_ + b * c
            if not is_q:
                for j in range(hdk):
                    dst[j] = _round_f16(dst[j])
        for h in range(n_kv):
            dv = v_cache[row, h]
            src = vo + h * hdv
            for j in range(hdv):
                dv[j] = _round_f16(qkv[i, src + j])
    return q


@nb.njit(inline="always", **_fast)
def _attention_task(q, k_cache, v_cache, pos0, scale, window, softcap, out, task):
    # the queries of token task // n_kv that share kv head task % n_kv
    nh, hdk = q.shape[1], q.shape[2]
    nkv = k_cache.shape[1]
    hdv = v_cache.shape[2]
    group = nh // nkv
    n_rows = k_cache.shape[0]
    i = task // nkv
    kvh = task % nkv
    h0 = kvh * group
    p = pos0 + i
    start = 0
    if window > 0 and p - window + 1 > 0:
        start = p - window + 1
    L = p + 1 - start
    sc = np.empty((group, L), np.float32)
    acc = np.zeros((group, hdv), np.float32)
    row0 = start % n_rows
    row = row0
    for t in range(L):
        kr = k_cache[row, kvh]
        for g in range(group):
            qr = q[i, h0 + g]
            s = np.float32(0.0)
            for j in range(hdk):
                s += qr[j] * kr[j]
            sc[g, t] = s * scale
        row += 1
        if row == n_rows:
            row = 0
    for g in range(group):
        sg = sc[g]
        if softcap > 0.0:
            for t in range(L):
                sg[t] = softcap * math.tanh(sg[t] / softcap)
        mx = sg[0]
        for t in range(1, L):
            mx = max(mx, sg[t])
        tot = np.float32(0.0)
        for t in range(L):
            e = _exp(sg[t] - mx)
            sg[t] = e
            tot += e
        inv = np.float32(1.0) / tot
        for t in range(L):
            sg[t] *= inv
    row = row0
    for t in range(L):
        vr = v_cache[row, kvh]
        for g in range(group):
            w = sc[g, t]
            ag = acc[g]
            for j in range(hdv):
                ag[j] += w * vr[j]
        row += 1
        if row == n_rows:
            row = 0
    for g in range(group):
        for j in range(hdv):
            out[i, h0 + g, j] = acc[g, j]


@nb.njit(**_fast)
def _attention_serial(q, k_cache, v_cache, pos0, scale, window, softcap, out):
    for task in range(q.shape[0] * k_cache.shape[1]):
        _attention_task(q, k_cache, v_cache, pos0, scale, window, softcap, out, task)
    return out


@nb.njit(parallel=True, **_fast)
def _attention_parallel(q, k_cache, v_cache, pos0, scale, window, softcap, out):
    for task in nb.prange(q.shape[0] * k_cache.shape[1]):
        _attention_task(q, k_cache, v_cache, pos0, scale, window, softcap, out, task)
    return out


def attention(q, k_cache, v_cache, pos0, scale, window, softcap, out):
    """Causal GQA attention for n new tokens at positions pos0..pos0+n-1.

    q: (n, n_head, hd_k) f32; k_cache: (n_rows, n_kv, hd_k) f32; v_cache: (n_rows, n_kv, hd_v) f32;
    the new tokens' k/v are already stored, position p in row p % n_rows (a ring for
    sliding-window layers, the identity for full ones). window > 0 limits each query to the
    last `window` positions (sliding-window attention); out: (n, n_head, hd_v) f32.
    One task per (token, kv head) covers the query heads of its group: each key/value row is
    read once for all of them; the head-dim dot products and the p*v accumulation vectorize,
    and so does the exp (no libm call).
    On one thread, or for a single token, the serial driver runs: launching a parallel region
    costs tens of microseconds, more than a decode step's attention over a short context.
    """
    if q.shape[0] > 1 and nb.get_num_threads() > 1:
        return _par.call(_attention_parallel, q, k_cache, v_cache, pos0, scale, window, softcap, out)
    return _attention_serial(q, k_cache, v_cache, pos0, scale, window, softcap, out)


# ------------------------------------------------------------------ residual + norm, gated activations
@nb.njit(**_opts)
def add_rmsnorm(x, h, w, eps, out):
    """x += h (in place), then out = rmsnorm(x) * w, row by row."""
    n, d = x.shape
    for i in range(n):
        s = 0.0
        for j in range(d):
            v = x[i, j] + h[i, j]
            x[i, j] = v
            s += v * v
        scale = np.float32(1.0 / math.sqrt(s / d + eps))
        for j in range(d):
            out[i, j] = x[i, j] * scale * w[j]
    return out


@nb.njit(**_opts)
def add_normed_rmsnorm(x, h, wh, w, eps, out):
    """x += rmsnorm(h) * wh (in place), then out = rmsnorm(x) * w (Gemma's post-norms)."""
    n, d = x.shape
    for i in range(n):
        s = 0.0
        for j in range(d):
            s += h[i, j] * h[i, j]
        sh = np.float32(1.0 / math.sqrt(s / d + eps))
        s = 0.0
        for j in range(d):
            v = x[i, j] + h[i, j] * sh * wh[j]
            x[i, j] = v
            s += v * v
        scale = np.float32(1.0 / math.sqrt(s / d + eps))
        for j in range(d):
            out[i, j] = x[i, j] * scale * w[j]
    return out


@nb.njit(**_fast)
def silu_mul_split(gu, out):
    """out = silu(gu[:, :f]) * gu[:, f:] for gu (n, 2f) from the fused gate/up projection."""
    n, f2 = gu.shape
    f = f2 // 2
    for i in range(n):
        g = gu[i, :f]
        u = gu[i, f:]
        o = out[i]
        for j in range(f):
            x = g[j]
            o[j] = x / (np.float32(1.0) + _exp(-x)) * u[j]
    return out


@nb.njit(**_fast)
def gelu_mul_split(gu, out):
    """out = gelu_tanh(gu[:, :f]) * gu[:, f:] (GeGLU on the fused gate/up projection)."""
    n, f2 = gu.shape
    f = f2 // 2
    c = math.sqrt(2.0 / math.pi)
    for i in range(n):
        g = gu[i, :f]
        u = gu[i, f:]
        o = out[i]
        for j in range(f):
            x = g[j]
            y = np.float32(c) * x * (np.float32(1.0) + np.float32(0.044715) * x * x)
            th = np.float32(1.0) - np.float32(2.0) / (_exp(np.float32(2.0) * y) + np.float32(1.0))  # tanh(y)
            o[j] = np.float32(0.5) * x * (np.float32(1.0) + th) * u[j]
    return out

