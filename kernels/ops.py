"""Numba kernels for the non-matmul parts of a transformer step.

RMSNorm, rotary embeddings (ggml's NORM and NEOX modes), causal grouped-query
attention over a KV cache, gated activations. All take float32 arrays of
shape (n_tokens, ...), work in place where the name says so, and are compiled
once (``cache=True``).
"""

from __future__ import annotations

import math
import threading
import types as _pytypes

import numba as nb
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from . import parallel as _par
from . import simd as _simd

_opts = dict(cache=True, fastmath=False, nogil=True)
# reductions (dot products over a head, sums of squares) only vectorize when LLVM may
# reassociate float adds; the order changes the last bits, not the result's meaning
_fast = dict(cache=True, fastmath={"reassoc", "contract", "nsz"}, nogil=True, error_model="numpy")  # no ZeroDivisionError branch: it blocks vectorization
# a row's attention and its q/k/v preparation (everything a decode step runs per row besides the
# matmuls and the norms): plain IEEE float operations in source order (no reassociation, no fused
# multiply-adds), so a row's floats cannot depend on how LLVM vectorizes the enclosing loop. With
# ``reassoc`` the reductions' order followed the vectorizer's choice of width and interleave, which
# it makes per compiled function (the serial and the parallel driver, the fused decode call) and per
# target: the drivers gave different floats. The dot products are explicit 16-lane vector code
# (:func:`_dot`), the softmax sums 16 lanes in a loop (:func:`_sum`), each in one fixed order.
_strict = dict(cache=True, fastmath=False, nogil=True, error_model="numpy")


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


@nb.njit(inline="always", **_fast)
def expf(x):
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
        of[i] = expf(xf[i])
    return out


# ------------------------------------------------------------------ the KV cache's types
@intrinsic
def _h2f(typingctx, x):
    """IEEE half-float bits (uint16) -> float32 (vcvtph2ps / fcvtl when vectorized)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f2h(typingctx, x):
    """float32 -> the bits of the nearest half float (ties to even), as uint16."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@nb.njit(**_fast)
def round_f16_array(x, out):
    """out = x rounded to half precision and back, through the f16 KV cache's own conversions (tests)."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for i in range(xf.shape[0]):
        of[i] = _h2f(_f2h(xf[i]))
    return out


@nb.njit(inline="always", **_fast)
def _fwht(x):
    """In place: x = H x / sqrt(n) for the n x n Walsh-Hadamard matrix H (n a power of 2). Orthonormal
    and symmetric, so it is its own inverse."""
    n = x.shape[0]
    h = 1
    while h < n:
        for i in range(0, n, 2 * h):
            for j in range(i, i + h):
                a = x[j]
                b = x[j + h]
                x[j] = a + b
                x[j + h] = a - b
        h *= 2
    sc = np.float32(1.0 / math.sqrt(n))
    for j in range(n):
        x[j] *= sc


@nb.njit(**_fast)
def fwht_rows(x):
    """The orthonormal Walsh-Hadamard transform of each last-axis vector of x (n, m, hd), in place."""
    for i in range(x.shape[0]):
        for h in range(x.shape[1]):
            _fwht(x[i, h])
    return x


@nb.njit(inline="always", **_fast)
def _rope_vec(x, cos, sin, neox):
    """Rotate one head vector x in place by the angles of cos/sin (n_rot/2,), NEOX or NORM pairs."""
    half = cos.shape[0]
    for j in range(half):
        c = cos[j]
        sn = sin[j]
        if neox:
            a = x[j]
            b = x[j + half]
            x[j] = a * c - b * sn
            x[j + half] = a * sn + b * c
        else:
            a = x[2 * j]
            b = x[2 * j + 1]
            x[2 * j] = a * c - b * sn
            x[2 * j + 1] = a * sn + b * c


@nb.njit(inline="always", **_fast)
def _kv_put(q, d, kind, s, row, h, x):
    """Store the head vector x (float32) in cell (s, row, head h): f16 (kind 0), or ggml's q8_0 (1) /
    q4_0 (2) reference quantization per block of 32 (scale rounded to f16, as ggml stores it)."""
    hd = x.shape[0]
    if kind == 0:
        dst = q[s, row, h]
        for j in range(hd):
            dst[j] = _f2h(x[j])
    elif kind == 1:
        for b in range(hd // 32):
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(x[b * 32 + j]))
            dd = amax / np.float32(127.0)
            idd = np.float32(1.0) / dd if dd != 0 else np.float32(0.0)
            d[s, row, h, b] = _f2h(dd)
            for j in range(32):
                v = x[b * 32 + j] * idd
                r = math.floor(abs(v) + np.float32(0.5))      # roundf: half away from zero
                q[s, row, h, b * 32 + j] = int(r if v >= 0 else -r)
    else:
        for b in range(hd // 32):
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(32):
                v = x[b * 32 + j]
                if amax < abs(v):
                    amax = abs(v)
                    mx = v
            dd = mx / np.float32(-8.0)
            idd = np.float32(1.0) / dd if dd != 0 else np.float32(0.0)
            d[s, row, h, b] = _f2h(dd)
            for j in range(16):
                x0 = int(x[b * 32 + j] * idd + np.float32(8.5))
                x1 = int(x[b * 32 + 16 + j] * idd + np.float32(8.5))
                q[s, row, h, b * 16 + j] = min(15, x0) | (min(15, x1) << 4)


@nb.njit(inline="always", **_fast)
def _kv_get(q, d, kind, s, row, h, out):
    """Cell (s, row, head h) as float32 into out."""
    hd = out.shape[0]
    if kind == 0:
        src = q[s, row, h]
        for j in range(hd):
            out[j] = _h2f(np.uint16(src[j]))
    elif kind == 1:
        for b in range(hd // 32):
            dd = _h2f(d[s, row, h, b])
            for j in range(32):
                out[b * 32 + j] = np.float32(q[s, row, h, b * 32 + j]) * dd
    else:
        for b in range(hd // 32):
            dd = _h2f(d[s, row, h, b])
            for j in range(16):
                byte = np.int32(q[s, row, h, b * 16 + j])
                out[b * 32 + j] = np.float32((byte & 15) - 8) * dd
                out[b * 32 + 16 + j] = np.float32((byte >> 4) - 8) * dd


@nb.njit(**_fast)
def kv_load_rows(q, d, kind, rot, out):
    """Cells of sequence 0 of a store slice q/d (1, n, n_kv, .) as float32 out (n, n_kv, hd) (rotated back
    when the store holds Hadamard-rotated vectors)."""
    for i in range(out.shape[0]):
        for h in range(out.shape[1]):
            _kv_get(q, d, kind, 0, i, h, out[i, h])
            if rot:
                _fwht(out[i, h])
    return out


@nb.njit(**_fast)
def kv_store_rows(q, d, kind, rot, x):
    """x (n, n_kv, hd) float32 into cells 0..n-1 of sequence 0 of q/d (rotated first when ``rot``) (tests)."""
    buf = np.empty(x.shape[2], np.float32)
    for i in range(x.shape[0]):
        for h in range(x.shape[1]):
            buf[:] = x[i, h]
            if rot:
                _fwht(buf)
            _kv_put(q, d, kind, 0, i, h, buf)


@nb.njit(**_fast)
def kv_shift(q, d, kind, rot, s, n_keep, n_discard, n_past, cos, sin, neox, rotate):
    """Context shift of one store: cells n_keep+n_discard..n_past-1 of sequence s move down by
    n_discard; with ``rotate`` (keys) each is rotated by the angles cos/sin (RoPE of -n_discard)
    on the way (dequantized, Hadamard-rotated back if ``rot``, RoPE'd, stored again)."""
    nkv = q.shape[2]
    hd = d.shape[3] * 32 if kind != 0 else q.shape[3]
    buf = np.empty(hd, np.float32)
    for i in range(n_keep + n_discard, n_past):
        for h in range(nkv):
            if not rotate:
                for j in range(q.shape[3]):
                    q[s, i - n_discard, h, j] = q[s, i, h, j]
                for j in range(d.shape[3]):
                    d[s, i - n_discard, h, j] = d[s, i, h, j]
                continue
            _kv_get(q, d, kind, s, i, h, buf)
            if rot:
                _fwht(buf)
            _rope_vec(buf, cos, sin, neox)
            if rot:
                _fwht(buf)
            _kv_put(q, d, kind, s, i - n_discard, h, buf)


# ------------------------------------------------------------------ attention
# The attention kernels take their fixed arguments as a few records, plain tuples that each kernel
# unpacks by name on entry (numba dispatches a plain tuple about as fast as its items; a namedtuple
# costs ~12 us more per call, 30 layers a token). Their layouts:
#   heads = (n_head, n_kv, hdk, hdv, q_norm, k_norm, eps)   a layer's heads, its q/k RMSNorm (size 0: none)
#   rope  = (cos, sin, neox)                                  this pass's RoPE tables, NEOX or NORM pairs
#   kv    = (q, d, kind, rot)                                 a KVStore's cells, scales, type, Hadamard rotation
#   attn  = (scale, window, softcap)                          a layer's attention constants


def heads_record(n_head, n_kv, hdk, hdv, q_norm, k_norm, eps) -> tuple:
    return (n_head, n_kv, hdk, hdv, q_norm, k_norm, np.float32(eps))


def attn_record(scale, window, softcap) -> tuple:
    return (np.float32(scale), int(window), np.float32(softcap))


@nb.njit(**_strict)
def qkv_store(qkv, heads, rope, k, v, pos, seq, q):
    """Split the fused projection qkv (n, n_head*hdk + n_kv*hdk + n_kv*hdv) into heads, apply the per-head
    RMSNorm (when q_norm.size > 0) and RoPE, write the rotated queries to q (n, n_head, hdk) and store
    k/v in the cache (in its type) at cell pos[i] % rows of sequence seq[i]. ``krot``: queries and
    keys are also Hadamard-rotated (a quantized K cache: outliers spread over the block, the dot
    products unchanged); ``vrot``: values too (the attention rotates its output back)."""
    n_head, n_kv, hdk, hdv, q_norm, k_norm, eps = heads
    cos, sin, neox = rope
    kq, kd, kkind, krot = k
    vq, vd, vkind, vrot = v
    n = qkv.shape[0]
    n_rows = kq.shape[1]
    has_norm = q_norm.shape[0] > 0
    ko = n_head * hdk
    vo = ko + n_kv * hdk
    kbuf = np.empty(hdk, np.float32)
    vbuf = np.empty(hdv, np.float32)
    for i in range(n):
        row = pos[i] % n_rows
        sq = seq[i]
        for h in range(n_head + n_kv):
            is_q = h < n_head
            src = h * hdk
            if is_q:
                dst = q[i, h]
            else:
                dst = kbuf
            for j in range(hdk):
                dst[j] = qkv[i, src + j]
            if has_norm:
                w = q_norm if is_q else k_norm
                s = _dot(dst, dst, False)
                sc = np.float32(1.0 / math.sqrt(s / hdk + eps))
                for j in range(hdk):
                    dst[j] = dst[j] * sc * w[j]
            _rope_vec(dst, cos[i], sin[i], neox)
            if krot:
                _fwht(dst)
            if not is_q:
                _kv_put(kq, kd, kkind, sq, row, h - n_head, kbuf)
        for h in range(n_kv):
            src = vo + h * hdv
            for j in range(hdv):
                vbuf[j] = qkv[i, src + j]
            if vrot:
                _fwht(vbuf)
            _kv_put(vq, vd, vkind, sq, row, h, vbuf)
    return q


@nb.njit(inline="always", **_strict)
def _dot(a, b, half):
    """sum(a[j] * b[j]) over a's length (a, b contiguous; ``half``: b holds f16 bits) in one fixed
    order: 16 lanes (kernels/simd.py: dot_lanes16_*), then the tail (length % 16) in order."""
    n = a.shape[0]
    n16 = n - n % 16
    ap = np.int64(a.ctypes.data)
    bp = np.int64(b.ctypes.data)
    if half:
        s = _simd.dot_lanes16_f16(ap, bp, n16)
        for j in range(n16, n):
            s += a[j] * _h2f(np.uint16(b[j]))
    else:
        s = _simd.dot_lanes16_f32(ap, bp, n16)
        for j in range(n16, n):
            s += a[j] * np.float32(b[j])
    return s


@nb.njit(inline="always", **_strict)
def _sum(x, n):
    """sum(x[:n]) (x contiguous) in a fixed order: 16 lanes (lane l sums t = l mod 16 in order), added as
    :func:`_dot`'s lanes are (lane l and l + 8, then l and l + 4, ...; simd.sum_lanes16_f32), then the
    tail in order."""
    n16 = n - n % 16
    s = np.float32(0.0)
    if n16 > 0:
        s = _simd.sum_lanes16_f32(np.int64(x.ctypes.data), n16)
    for t in range(n16, n):
        s += x[t]
    return s


@nb.njit(inline="always", **_strict)
def _max(x, n):
    """max(x[:n]) (n >= 1, x contiguous): 16 lanes (simd.max_lanes16_f32), then the tail; a max is
    exact, any order gives its value (one chain of compares was latency-bound, ~4 cycles a key)."""
    n16 = n - n % 16
    if n16 > 0:
        m = _simd.max_lanes16_f32(np.int64(x.ctypes.data), n16)
    else:
        m = x[0]
    for t in range(n16, n):
        m = max(m, x[t])
    return m


@nb.njit(inline="always", **_strict)
def _exp_shifted(row, L, softcap):
    """row[:L] (scores) -> exp(s - max) in place, with the softcap first when > 0; returns their sum
    (softmax = row / sum) in :func:`_sum`'s fixed order."""
    if softcap > 0.0:
        for t in range(L):
            row[t] = softcap * math.tanh(row[t] / softcap)
    mx = _max(row, L)
    for t in range(L):
        row[t] = expf(row[t] - mx)
    return _sum(row, L)


@intrinsic
def _keep_alive(typingctx, a):
    """A use of the array a (no code): numba frees a local array right after its last use by name, and
    the kernels below pass its raw address to the intrinsics (kernels/simd.py: attn_*), which read it
    later."""
    def codegen(context, builder, signature, args):
        return context.get_dummy_value()
    return types.none(a), codegen


# keys per call of simd.attn_scores_f16 / attn_pv_f16: the cells they read (that many rows of the task's
# kv heads) stay in L1 while they walk them once per query head (and block of elements)
_KV_TILE_BYTES = 16384


@nb.njit(inline="always", **_strict)
def _attention_task(q, k, v, pos, seq, attn, out, i, kv0, kv1):
    # the query heads of token i that share kv heads kv0..kv1-1. Over all kv heads (kv0 = 0, kv1 = n_kv)
    # the loops read each cache row whole, front to back: one sequential stream (a decode step at depth
    # is bound by that read); one kv head per task lets the parallel driver split a prompt finer.
    # f16 cells (the default) whose head size is a multiple of 16 go through the vector kernels
    # simd.attn_scores_f16 / attn_pv_f16 (a key row read once for the group's heads, the output held in
    # registers across the keys); other cells through the loops below. Both compute every float as
    # the loops do, in the same order (the dots as :func:`_dot`, ``acc += w * v`` key by key): the path
    # never changes a result.
    kq, kd, kkind, _ = k
    vq, vd, vkind, vrot = v
    scale, window, softcap = attn
    nh, hdk = q.shape[1], q.shape[2]
    nkv = kq.shape[2]
    hdv = out.shape[2]
    group = nh // nkv
    n_rows = kq.shape[1]
    h0 = kv0 * group
    nkl = kv1 - kv0
    nq = nkl * group
    p = pos[i]
    sq = seq[i]
    start = 0
    if window > 0 and p - window + 1 > 0:
        start = p - window + 1
    L = p + 1 - start
    sc = np.empty((nq, L), np.float32)
    row0 = start % n_rows
    if kkind == 0 and hdk % 16 == 0 and q.strides[2] == 4 and kq.strides[3] == 2:
        # key tiles that stay in L1 while each query head of the group walks them (ring rows: a tile
        # ends where the ring wraps)
        tile = max(1, _KV_TILE_BYTES // (nkl * hdk * 2 * _simd.SCORE_KEYS)) * _simd.SCORE_KEYS
        shape_k = (np.int64(nkl), np.int64(group), np.int64(hdk))
        t = 0
        row = row0
        while t < L:
            m = min(L - t, n_rows - row, tile)
            _simd.attn_scores_f16(q[i, h0].ctypes.data, q.strides[1], kq[sq, row, kv0].ctypes.data,
                                  kq.strides[1], kq.strides[2], sc.ctypes.data + 4 * t, L * 4, m, shape_k, scale)
            t += m
            row += m
            if row == n_rows:
                row = 0
    else:
        kbuf = np.empty(hdk, np.float32)
        row = row0
        for t in range(L):
            for kvh in range(kv0, kv1):
                hq = (kvh - kv0) * group
                if kkind == 0:
                    kr = kq[sq, row, kvh]
                    for g in range(group):
                        sc[hq + g, t] = _dot(q[i, h0 + hq + g], kr, True) * scale
                else:
                    _kv_get(kq, kd, kkind, sq, row, kvh, kbuf)
                    for g in range(group):
                        sc[hq + g, t] = _dot(q[i, h0 + hq + g], kbuf, False) * scale
            row += 1
            if row == n_rows:
                row = 0
    for g in range(nq):
        sg = sc[g]
        inv = np.float32(1.0) / _exp_shifted(sg, L, softcap)
        for t in range(L):
            sg[t] *= inv
    if vkind == 0 and hdv % 16 == 0 and out.strides[2] == 4 and vq.strides[3] == 2:
        for g in range(nq):
            og = out[i, h0 + g]
            for j in range(hdv):
                og[j] = 0.0
        tile = max(8, _KV_TILE_BYTES // (nkl * hdv * 2))
        shape_v = (np.int64(nkl), np.int64(group), np.int64(hdv))
        t = 0
        row = row0
        while t < L:
            m = min(L - t, n_rows - row, tile)
            _simd.attn_pv_f16(sc.ctypes.data + 4 * t, L * 4, vq[sq, row, kv0].ctypes.data, vq.strides[1],
                              vq.strides[2], out[i, h0].ctypes.data, out.strides[1], m, shape_v)
            t += m
            row += m
            if row == n_rows:
                row = 0
        if vrot:
            for g in range(nq):
                _fwht(out[i, h0 + g])
        _keep_alive(sc)
        return
    acc = np.zeros((nq, hdv), np.float32)
    vbuf = np.empty(hdv, np.float32)
    row = row0
    for t in range(L):
        for kvh in range(kv0, kv1):
            hq = (kvh - kv0) * group
            if vkind == 0:
                vr = vq[sq, row, kvh]
                for g in range(group):
                    w = sc[hq + g, t]
                    ag = acc[hq + g]
                    for j in range(hdv):
                        ag[j] += w * _h2f(np.uint16(vr[j]))
            else:
                _kv_get(vq, vd, vkind, sq, row, kvh, vbuf)
                for g in range(group):
                    w = sc[hq + g, t]
                    ag = acc[hq + g]
                    for j in range(hdv):
                        ag[j] += w * vbuf[j]
        row += 1
        if row == n_rows:
            row = 0
    for g in range(nq):
        if vrot:
            _fwht(acc[g])
        for j in range(hdv):
            out[i, h0 + g, j] = acc[g, j]


@nb.njit(**_strict)
def _attention_serial(q, k, v, pos, seq, attn, out):
    for i in range(q.shape[0]):
        _attention_task(q, k, v, pos, seq, attn, out, i, 0, k[0].shape[2])
    return out


@nb.njit(**_strict)
def decode_attention(qkv, heads, rope, k, v, pos, seq, q, attn, out):
    """:func:`qkv_store` then the serial :func:`attention` of its tokens, in one call: what a decode
    step (one token, which :func:`attention` runs serially) does per layer."""
    qkv_store(qkv, heads, rope, k, v, pos, seq, q)
    return _attention_serial(q, k, v, pos, seq, attn, out)


@nb.njit(parallel=True, **_strict)
def _attention_parallel(q, k, v, pos, seq, attn, out):
    nkv = k[0].shape[2]
    for task in nb.prange(q.shape[0] * nkv):
        kvh = task % nkv
        _attention_task(q, k, v, pos, seq, attn, out, task // nkv, kvh, kvh + 1)
    return out


@nb.njit(**_fast)
def _softmax_causal(S, group, p0, softcap, tot):
    """Rows of (scaled) scores S (n*group, L) in place -> exp(s - max), their sums into tot (the caller
    divides the product by them: one pass less over S). Row r is query head r % group of token
    r // group, at position p0 + r // group; it sees keys 0..p0 + r // group, the rest get 0."""
    for r in range(S.shape[0]):
        L = p0 + r // group + 1
        row = S[r]
        tot[r] = _exp_shifted(row, L, softcap)
        for t in range(L, row.shape[0]):
            row[t] = 0.0
    return S


# attention multiply-adds below which the serial driver runs (~2 us of work: about what launching a parallel
# region costs from the main thread). Issue 26, SmolLM2-135M decode step of 4 sequences at -t 2 (2-vCPU Xeon
# VM): the parallel driver beat the serial one from 4 x 16 keys up (attention 0.9 -> 0.7 ms a step at
# context 16, 2.6 -> 1.6 ms at 128), and the matmuls after it ran ~8% faster (the threads still awake)
_PARALLEL_MIN_WORK = 1 << 15
_BLAS_MIN_TOKENS = 32          # prompt chunks at least this long take the matrix-product path
_BLAS_MIN_KEYS = 512           # ... over at least this many keys (below, the loops are as fast)
# score block of at most this size (queries are taken in slices): it stays in L2 between the two products
# and the softmax, and a slice makes scores only for the keys its last query sees. TinyLlama's shape (32 heads,
# 4 kv heads, hd 64), 512 tokens at position 0, Xeon VM: 36 ms at 16 MiB, 27 at 1 MiB (1 thread), 20 -> 15 (2)
_BLAS_SCORES_BYTES = 1 << 20


def _cells_f32(store, sq, n, h):
    """Cells 0..n-1 of sequence sq, kv head h, as float32 (n, hd), as stored (no rotation undone)."""
    if store.kind == 0:
        return store.q[sq, :n, h].view(np.float16).astype(np.float32)
    out = np.empty((n, 1, store.hd), np.float32)
    return kv_load_rows(store.q[sq:sq + 1, :n, h:h + 1], store.d[sq:sq + 1, :n, h:h + 1], store.kind, False,
                        out)[:, 0]


_blas_threads = [0]


def limit_blas_threads(n: int | None = None) -> None:
    """numpy's BLAS (OpenBLAS) starts a thread per core; let it use ``n`` threads (default: the engine's
    thread count, ``-t``, as the numba kernels do). Set when it changes, through threadpoolctl."""
    n = nb.get_num_threads() if n is None else n
    if _blas_threads[0] != n:
        _blas_threads[0] = n
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(limits=n, user_api="blas")
        except Exception:        # pragma: no cover - no threadpoolctl / no BLAS found: its default
            pass


_pool_lock = threading.Lock()
_pool = [None, 0]        # a ThreadPoolExecutor and its size


def _tasks_pool(n: int):
    """A process-wide pool of at least ``n`` threads for :func:`_attention_gemm`'s tasks (grown, never shrunk)."""
    with _pool_lock:
        if _pool[1] < n:
            from concurrent.futures import ThreadPoolExecutor
            old = _pool[0]
            _pool[0], _pool[1] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tinyinfer-attn"), n
            if old is not None:
                old.shutdown(wait=False)
        return _pool[0]


def _query_parts(n: int, p0: int, parts: int) -> list:
    """Boundaries 0 = b0 < ... < b_parts = n of a prompt chunk's queries (positions p0..p0+n-1) into
    ranges of about equal attention work (query i sees p0 + i + 1 keys)."""
    if parts <= 1 or n < 2:
        return [0, n]
    w = np.cumsum(np.arange(p0 + 1, p0 + n + 1, dtype=np.float64))
    cuts = np.searchsorted(w, w[-1] * np.arange(1, parts) / parts) + 1
    return [0] + sorted({int(c) for c in cuts if 0 < c < n}) + [n]


def _attention_gemm(q, k, v, p0, sq, scale, softcap, out):
    """A prompt chunk of one sequence (positions p0.., full attention) as matrix products (numpy's
    BLAS): per kv head, scores = Q K^T, causal softmax, out = P V. The head's cells are converted to
    float32 once per task (n_ctx x hd floats), scores are made for as many queries as fit
    ``_BLAS_SCORES_BYTES``, and the products run at BLAS speed (the loops' dot products and axpys reach
    ~20 G MAC/s on one Zen 4 core, sgemm ~5x that).

    Threads: BLAS runs single-threaded, and with ``-t`` > 1 the tasks (a kv head, or a range of its
    queries of about equal work where the heads do not divide evenly among the threads) run on a pool
    of Python threads (BLAS and the jitted softmax release the GIL). OpenBLAS's own threads busy-wait
    after each call (up to 2^28 cycles, ~0.1 s) on the cores the next parallel matmul needs: a 1.1B
    Q4_K_M pp512 at ``-t 2`` on the 2-vCPU Xeon VM ran at 67-72 t/s with them, 138-163 with
    ``OPENBLAS_THREAD_TIMEOUT=4`` (benchmarks/RESULTS.md, issue 20, pp512)."""
    limit_blas_threads(1)
    n, nh, hd = q.shape
    nkv = k.q.shape[2]
    group = nh // nkv
    nt = _par.num_threads()
    parts = nt // math.gcd(nkv, nt) if nt > 1 else 1
    bounds = _query_parts(n, p0, parts)
    tasks = [(h, bounds[j], bounds[j + 1]) for h in range(nkv) for j in range(len(bounds) - 1)]

    def task(t):
        h, a, b = t
        L = p0 + b                                       # keys the task's last query sees
        step = max(1, min(b - a, _BLAS_SCORES_BYTES // (4 * group * L)))
        buf = np.empty(step * group * L, np.float32)     # the score blocks, one allocation
        tot = np.empty(step * group, np.float32)
        Kh, Vh = _cells_f32(k, sq, L, h), _cells_f32(v, sq, L, h)
        for i0 in range(a, b, step):
            i1 = min(b, i0 + step)
            r, c = (i1 - i0) * group, p0 + i1
            Qh = q[i0:i1, h * group:(h + 1) * group].reshape(r, hd) * np.float32(scale)
            S = np.matmul(Qh, Kh[:c].T, out=buf[:r * c].reshape(r, c))
            _softmax_causal(S, group, p0 + i0, np.float32(softcap), tot)
            O = S @ Vh[:c]
            O /= tot[:r, None]
            out[i0:i1, h * group:(h + 1) * group] = O.reshape(i1 - i0, group, -1)

    if nt > 1 and len(tasks) > 1:
        for _ in _tasks_pool(nt).map(task, tasks):
            pass
    else:
        for t in tasks:
            task(t)
    if v.rot:
        fwht_rows(out)
    return out


def attention_uses_blas(n: int, end: int) -> bool:
    """Whether a prompt chunk of ``n`` tokens of one sequence ending at position ``end`` - 1 may take
    :func:`attention`'s matrix-product path (:func:`_attention_gemm`), whose sums are ordered
    otherwise than the loops': such a chunk gives other numbers when it shares a pass with other
    sequences (tinyinfer/batcher.py keeps it apart)."""
    return n >= _BLAS_MIN_TOKENS and end >= _BLAS_MIN_KEYS


def attention(q, k, v, pos, seq, scale, window, softcap, out):
    """Causal GQA attention for n new tokens, token i at position pos[i] of sequence seq[i].

    q: (n, n_head, hd_k) f32; k, v: the layer's :class:`tinyinfer.kvcache.KVStore` (f16, q8_0 or
    q4_0 cells (n_seq, rows, n_kv, .)); the new tokens' k/v are already stored, position p in cell
    p % rows (a ring for sliding-window layers, the identity for full ones). window > 0 limits each
    query to the last `window` positions (sliding-window attention); out: (n, n_head, hd_v) f32.

    A prompt chunk of one sequence over a long context (full attention) runs as matrix products
    (:func:`_attention_gemm`). Otherwise one task per (token, kv head) covers the query heads of its
    group: each key/value cell is read once for all of them; f16 cells are converted inside the
    vectorized dot products and the p*v accumulation, quantized ones decoded a cell at a time.
    On one thread, for a single token, or below ``_PARALLEL_MIN_WORK`` multiply-adds (keys x query
    heads x (hd_k + hd_v), summed over the tokens), the serial driver runs (each token over all kv
    heads: the cache rows are read whole, in order); above, the parallel one (a task per token and kv
    head). A parallel region launched from the thread that ran the previous one costs ~2 us (from a
    thread with an OpenMP team of its own, tens; on an oversubscribed machine, where the second
    thread waits for a core, milliseconds). Both drivers (and :func:`decode_attention`) give a query head
    bit-identical results: the task compiles without fast-math flags and its sums run in one fixed
    order (:func:`_dot`, :func:`_sum`), so the choice never changes the numbers (batch invariance).
    """
    n = q.shape[0]
    if (n >= _BLAS_MIN_TOKENS and window <= 0 and _BLAS_MIN_KEYS <= pos[n - 1] + 1 <= k.q.shape[1]
            and (seq == seq[0]).all() and (np.diff(pos) == 1).all()):
        return _attention_gemm(q, k, v, int(pos[0]), int(seq[0]), scale, softcap, out)
    args = (q, k.arrays, v.arrays, pos, seq, attn_record(scale, window, softcap), out)
    if (n > 1 and (int(pos.sum()) + n) * q.shape[1] * (q.shape[2] + out.shape[2]) >= _PARALLEL_MIN_WORK
            and _par.num_threads() > 1):
        return _par.call(_attention_parallel, *args)
    return _attention_serial(*args)


# ------------------------------------------------------------------ residual + norm, gated activations
def _add_rmsnorm(x, h, w, eps, out):
    """x += h (in place), then out = rmsnorm(x) * w, row by row."""
    n, d = x.shape
    for i in prange(n):
        s = 0.0
        for j in range(d):
            v = x[i, j] + h[i, j]
            x[i, j] = v
            s += v * v
        scale = np.float32(1.0 / math.sqrt(s / d + eps))
        for j in range(d):
            out[i, j] = x[i, j] * scale * w[j]
    return out


def _add_normed_rmsnorm(x, h, wh, w, eps, out):
    """x += rmsnorm(h) * wh (in place), then out = rmsnorm(x) * w (Gemma's post-norms)."""
    n, d = x.shape
    for i in prange(n):
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


def _silu_mul_split(gu, out):
    """out = silu(gu[:, :f]) * gu[:, f:] for gu (n, 2f) from the fused gate/up projection."""
    n, f2 = gu.shape
    f = f2 // 2
    for i in prange(n):
        g = gu[i, :f]
        u = gu[i, f:]
        o = out[i]
        for j in range(f):
            x = g[j]
            o[j] = x / (np.float32(1.0) + expf(-x)) * u[j]
    return out


def _gelu_mul_split(gu, out):
    """out = gelu_tanh(gu[:, :f]) * gu[:, f:] (GeGLU on the fused gate/up projection)."""
    n, f2 = gu.shape
    f = f2 // 2
    c = math.sqrt(2.0 / math.pi)
    for i in prange(n):
        g = gu[i, :f]
        u = gu[i, f:]
        o = out[i]
        for j in range(f):
            x = g[j]
            y = np.float32(c) * x * (np.float32(1.0) + np.float32(0.044715) * x * x)
            th = np.float32(1.0) - np.float32(2.0) / (expf(np.float32(2.0) * y) + np.float32(1.0))  # tanh(y)
            o[j] = np.float32(0.5) * x * (np.float32(1.0) + th) * u[j]
    return out


def _builds(fn, opts):
    """A row-by-row kernel's serial build and its row-parallel one (``prange`` over the rows; a row's
    operations and their order are the same in both, so its floats are too: a prompt pass's rows get
    what a decode step's row gets). The parallel build is a copy with a name of its own (numba's cache
    keys a function by its name and code, not by its flags)."""
    par = _pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    par.__qualname__ = fn.__qualname__ + "__rows"
    return nb.njit(**opts)(fn), nb.njit(parallel=True, **opts)(par)


# the elementwise steps of a layer, serial (decode steps, short chunks) and across the threads for prompt
# chunks of at least ROWS_PARALLEL_MIN rows (models/base.py): on one thread they took ~4% of a 1.1B pp512
# at -t 2 (add_rmsnorm ~130 ms, silu_mul_split ~76 ms of a Q4_0 pass at 1 thread)
ROWS_PARALLEL_MIN = 64
add_rmsnorm, add_rmsnorm_rows = _builds(_add_rmsnorm, _opts)
add_normed_rmsnorm, add_normed_rmsnorm_rows = _builds(_add_normed_rmsnorm, _opts)
silu_mul_split, silu_mul_split_rows = _builds(_silu_mul_split, _fast)
gelu_mul_split, gelu_mul_split_rows = _builds(_gelu_mul_split, _fast)

