"""The one table of ggml tensor formats: block layout, dequantizers, quantizers.

This is ggml's ``type_traits`` idea: every ggml type tinyinfer understands is one
:class:`QuantType` entry in :data:`TYPES` (keyed by the ``gguf.GGMLQuantizationType``
id) holding its block size, bytes per block, numba-compiled converters and the
type llama.cpp quantizes the activations to for its dot products
(``vec_dot_type``, data only: the matmul kernels decide what to do with it).
Adding a format means adding one entry here.

Converters work on raw little-endian block bytes, one row per array row::

    dequantize_rows(src_u8[n, row_bytes], dst_f32[n, k])  # a whole tensor
    quantize_rows(src_f32[n, k], dst_u8[n, row_bytes])
    entry.dequantize_row(src_u8[row_bytes], dst_f32[k])   # one row, in place (methods)
    entry.quantize_row(src_f32[k], dst_u8[row_bytes])

The ``*_rows`` loops are ``@njit(cache=True, nogil=True)`` and callable from other numba
code; they hold the code (and are what :func:`dequantize` / :func:`quantize` compile, once
per type); the one-row methods pass a row as a one-row tensor (compiled only when used). The public :func:`dequantize` and :func:`quantize`
allocate the output, pass the input as a read-only view (mmap'd weights and fresh
arrays then share one compiled signature) and split large tensors over threads.

Exactness:

* dequantizers are bit-exact against ``gguf.quants.dequantize`` (and so against
  ggml's reference ``dequantize_row_*``): the same float32 operations in the same
  order, no fused multiply-add;
* Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 quantizers are byte-identical to ggml's
  ``quantize_row_*_ref`` (what llama-quantize runs without an importance matrix);
* Q2_K..Q6_K quantizers are ports of ggml's ``quantize_row_*_K_ref``
  (``make_qkx2_quants`` / ``make_qx_quants`` / ``make_q3_quants``) in float32,
  byte-identical to ggml-quants.c compiled without FMA contraction; a llama.cpp
  build that contracts to FMA (-march=native) differs from that in ~1% of blocks;
* F16 and BF16 use round-to-nearest-even like ggml's converters.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from ..ggml_types import QUANT_SIZES, GGMLType as GT
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from . import simd

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)

_JIT = dict(cache=True, nogil=True)


class UnsupportedTypeError(ValueError):
    """A ggml type that tinyinfer has no entry for."""


# ---------------------------------------------------------------------------------------
# scalar helpers: float32 <-> bits, fp16, nearest_int
# ---------------------------------------------------------------------------------------

@intrinsic
def _f32_bits(typingctx, x):
    """The IEEE bits of a float32, as a non-negative int64."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        def codegen(context, builder, sig, args):
            return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))
        return types.int64(x), codegen
    return None


@intrinsic
def _bits_f32(typingctx, x):
    """The float32 whose IEEE bits are the low 32 bits of integer ``x``."""
    if isinstance(x, types.Integer):
        def codegen(context, builder, sig, args):
            v = args[0]
            if x.bitwidth > 32:
                v = builder.trunc(v, ir.IntType(32))
            elif x.bitwidth < 32:
                v = builder.zext(v, ir.IntType(32))
            return builder.bitcast(v, ir.FloatType())
        return types.float32(x), codegen
    return None


@njit(**_JIT)
def _h2f(h):
    """fp16 bits (int) -> float32, exact (NaN payloads kept, like numpy)."""
    s = (h & 0x8000) << 16
    e = h & 0x7C00
    m = h & 0x03FF
    if e == 0x7C00:
        return _bits_f32(s | 0x7F800000 | (m << 13))
    if e == 0:
        if m == 0:
            return _bits_f32(s)
        v = np.float32(m) * np.float32(5.9604644775390625e-08)  # m * 2**-24, exact
        return -v if s else v
    return _bits_f32(s | ((e + 0x1C000) << 13) | (m << 13))


@njit(**_JIT)
def _f2h(f):
    """float32 -> fp16 bits, round to nearest even (as F16C and ggml's fallback)."""
    x = _f32_bits(f)
    sign = (x >> 16) & 0x8000
    x = x & 0x7FFFFFFF
    if x > 0x7F800000:                       # NaN: quiet, keep the top payload bits
        return sign | 0x7E00 | ((x >> 13) & 0x3FF)
    if x >= 0x477FF000:                      # >= 65520 rounds to infinity
        return sign | 0x7C00
    if x >= 0x38800000:                      # normal half
        return sign | ((x - 0x38000000 + 0xFFF + ((x >> 13) & 1)) >> 13)
    if x <= 0x33000000:                      # <= 2**-25 rounds to zero
        return sign
    e = x >> 23                              # subnormal half
    m = (x & 0x7FFFFF) | 0x800000
    sh = 126 - e
    q = m >> sh
    rem = m & ((1 << sh) - 1)
    half = 1 << (sh - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return sign | q


@njit(**_JIT)
def _f2bf(f):
    """float32 -> bf16 bits, as ggml_compute_fp32_to_bf16 (RNE, NaN forced quiet)."""
    u = _f32_bits(f)
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 64
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF


@njit(**_JIT)
def _nearest_int(f):
    """ggml's nearest_int: round half to even through the 1.5*2**23 trick (|f| < 2**22)."""
    v = np.float32(f) + np.float32(12582912.0)
    return (_f32_bits(v) & 0x007FFFFF) - 0x00400000


@njit(**_JIT)
def _roundf(f):
    """C roundf (half away from zero) of a float32, as int."""
    a = np.floor(abs(np.float64(f)) + 0.5)
    return np.int64(-a) if f < 0 else np.int64(a)


@njit(**_JIT)
def _rd16(b, o):
    return np.int64(b[o]) | (np.int64(b[o + 1]) << 8)


@njit(**_JIT)
def _rd32(b, o):
    return (np.int64(b[o]) | (np.int64(b[o + 1]) << 8)
            | (np.int64(b[o + 2]) << 16) | (np.int64(b[o + 3]) << 24))


@njit(**_JIT)
def _wr16(b, o, v):
    b[o] = v & 0xFF
    b[o + 1] = (v >> 8) & 0xFF


@njit(**_JIT)
def _i8(v):
    v = np.int64(v)
    return v - 256 if v >= 128 else v


# ---------------------------------------------------------------------------------------
# dequantizers (rows: S uint8[n, row_bytes] -> D float32[n, k])
# ---------------------------------------------------------------------------------------

@njit(**_JIT)
def _dq_rows_f32(S, D):
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0]):
            dst[i] = _bits_f32(_rd32(src, 4 * i))


@njit(**_JIT)
def _dq_rows_f16(S, D):
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0]):
            dst[i] = _h2f(_rd16(src, 2 * i))


@njit(**_JIT)
def _dq_rows_bf16(S, D):
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0]):
            dst[i] = _bits_f32(_rd16(src, 2 * i) << 16)


@njit(**_JIT)
def _dq_rows_q4_0(S, D):
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // 32):
            o = i * 18
            y = i * 32
            d = _h2f(_rd16(src, o))
            for j in range(16):
                b = np.int64(src[o + 2 + j])
                dst[y + j] = np.float32((b & 0x0F) - 8) * d
                dst[y + j + 16] = np.float32((b >> 4) - 8) * d


@njit(**_JIT)
def _dq_rows_q4_1(S, D):
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // 32):
            o = i * 20
            y = i * 32
            d = _h2f(_rd16(src, o))
            m = _h2f(_rd16(src, o + 2))
            for j in range(16):
                b = np.int64(src[o + 4 + j])
                dst[y + j] = np.float32(b & 0x0F) * d + m
                dst[y + j + 16] = np.float32(b >> 4) * d + m


@njit(**_JIT)
def _dq_rows_q5_0(S, D):
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // 32):
            o = i * 22
            y = i * 32
            d = _h2f(_rd16(src, o))
            qh = _rd32(src, o + 2)
            for j in range(16):
                b = np.int64(src[o + 6 + j])
                xh0 = ((qh >> j) << 4) & 0x10
                xh1 = (qh >> (j + 12)) & 0x10
                dst[y + j] = np.float32(((b & 0x0F) | xh0) - 16) * d
                dst[y + j + 16] = np.float32(((b >> 4) | xh1) - 16) * d


@njit(**_JIT)
def _dq_rows_q5_1(S, D):
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // 32):
            o = i * 24
            y = i * 32
            d = _h2f(_rd16(src, o))
            m = _h2f(_rd16(src, o + 2))
            qh = _rd32(src, o + 4)
            for j in range(16):
                b = np.int64(src[o + 8 + j])
                xh0 = ((qh >> j) << 4) & 0x10
                xh1 = (qh >> (j + 12)) & 0x10
                dst[y + j] = np.float32((b & 0x0F) | xh0) * d + m
                dst[y + j + 16] = np.float32((b >> 4) | xh1) * d + m


@njit(**_JIT)
def _dq_rows_q8_0(S, D):
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // 32):
            o = i * 34
            y = i * 32
            d = _h2f(_rd16(src, o))
            for j in range(32):
                dst[y + j] = np.float32(_i8(src[o + 2 + j])) * d


@njit(**_JIT)
def _dq_rows_q2_k(S, D):
    # block: scales[16] qs[64] d dmin  (84 bytes)
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // QK_K):
            o = i * 84
            y = i * QK_K
            d = _h2f(_rd16(src, o + 80))
            mn = _h2f(_rd16(src, o + 82))
            q = o + 16
            is_ = 0
            for n in range(2):
                shift = 0
                for j in range(4):
                    sc = np.int64(src[o + is_])
                    is_ += 1
                    dl = d * np.float32(sc & 0xF)
                    ml = mn * np.float32(sc >> 4)
                    for l in range(16):
                        dst[y + l] = dl * np.float32((np.int64(src[q + l]) >> shift) & 3) - ml
                    y += 16
                    sc = np.int64(src[o + is_])
                    is_ += 1
                    dl = d * np.float32(sc & 0xF)
                    ml = mn * np.float32(sc >> 4)
                    for l in range(16):
                        dst[y + l] = dl * np.float32((np.int64(src[q + l + 16]) >> shift) & 3) - ml
                    y += 16
                    shift += 2
                q += 32


@njit(**_JIT)
def _q3k_scale(src, s, j):
    """6-bit scale j (0..15) of a Q3_K block whose 12 scale bytes start at s, minus 32."""
    if j < 8:
        lo = np.int64(src[s + j]) & 0xF
    else:
        lo = np.int64(src[s + j - 8]) >> 4
    hi = (np.int64(src[s + 8 + (j & 3)]) >> (2 * (j >> 2))) & 3
    return (lo | (hi << 4)) - 32


@njit(**_JIT)
def _dq_rows_q3_k(S, D):
    # block: hmask[32] qs[64] scales[12] d  (110 bytes)
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // QK_K):
            o = i * 110
            y = i * QK_K
            d_all = _h2f(_rd16(src, o + 108))
            hm = o
            q = o + 32
            s = o + 96
            m = 1
            is_ = 0
            for n in range(2):
                shift = 0
                for j in range(4):
                    dl = d_all * np.float32(_q3k_scale(src, s, is_))
                    is_ += 1
                    for l in range(16):
                        v = (np.int64(src[q + l]) >> shift) & 3
                        if (np.int64(src[hm + l]) & m) == 0:
                            v -= 4
                        dst[y + l] = dl * np.float32(v)
                    y += 16
                    dl = d_all * np.float32(_q3k_scale(src, s, is_))
                    is_ += 1
                    for l in range(16):
                        v = (np.int64(src[q + l + 16]) >> shift) & 3
                        if (np.int64(src[hm + l + 16]) & m) == 0:
                            v -= 4
                        dst[y + l] = dl * np.float32(v)
                    y += 16
                    shift += 2
                    m <<= 1
                q += 32


@njit(**_JIT)
def _scale_min_k4(j, src, s):
    """get_scale_min_k4: 6-bit scale and min j (0..7) from the 12 bytes at s."""
    if j < 4:
        d = np.int64(src[s + j]) & 63
        m = np.int64(src[s + j + 4]) & 63
    else:
        d = (np.int64(src[s + j + 4]) & 0xF) | ((np.int64(src[s + j - 4]) >> 6) << 4)
        m = (np.int64(src[s + j + 4]) >> 4) | ((np.int64(src[s + j]) >> 6) << 4)
    return d, m


@njit(**_JIT)
def _dq_rows_q4_k(S, D):
    # block: d dmin scales[12] qs[128]  (144 bytes)
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // QK_K):
            o = i * 144
            y = i * QK_K
            d = _h2f(_rd16(src, o))
            mn = _h2f(_rd16(src, o + 2))
            q = o + 16
            is_ = 0
            for j in range(4):
                sc, m = _scale_min_k4(is_, src, o + 4)
                d1 = d * np.float32(sc)
                m1 = mn * np.float32(m)
                sc, m = _scale_min_k4(is_ + 1, src, o + 4)
                d2 = d * np.float32(sc)
                m2 = mn * np.float32(m)
                for l in range(32):
                    dst[y + l] = d1 * np.float32(np.int64(src[q + l]) & 0xF) - m1
                for l in range(32):
                    dst[y + 32 + l] = d2 * np.float32(np.int64(src[q + l]) >> 4) - m2
                y += 64
                q += 32
                is_ += 2


@njit(**_JIT)
def _dq_rows_q5_k(S, D):
    # block: d dmin scales[12] qh[32] qs[128]  (176 bytes)
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // QK_K):
            o = i * 176
            y = i * QK_K
            d = _h2f(_rd16(src, o))
            mn = _h2f(_rd16(src, o + 2))
            qh = o + 16
            ql = o + 48
            is_ = 0
            u1 = 1
            u2 = 2
            for j in range(4):
                sc, m = _scale_min_k4(is_, src, o + 4)
                d1 = d * np.float32(sc)
                m1 = mn * np.float32(m)
                sc, m = _scale_min_k4(is_ + 1, src, o + 4)
                d2 = d * np.float32(sc)
                m2 = mn * np.float32(m)
                for l in range(32):
                    v = (np.int64(src[ql + l]) & 0xF) + (16 if (np.int64(src[qh + l]) & u1) else 0)
                    dst[y + l] = d1 * np.float32(v) - m1
                for l in range(32):
                    v = (np.int64(src[ql + l]) >> 4) + (16 if (np.int64(src[qh + l]) & u2) else 0)
                    dst[y + 32 + l] = d2 * np.float32(v) - m2
                y += 64
                ql += 32
                is_ += 2
                u1 <<= 2
                u2 <<= 2


@njit(**_JIT)
def _dq_rows_q6_k(S, D):
    # block: ql[128] qh[64] scales[16] (int8) d  (210 bytes)
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // QK_K):
            o = i * 210
            y = i * QK_K
            d = _h2f(_rd16(src, o + 208))
            ql = o
            qh = o + 128
            sc = o + 192
            for n in range(2):
                for l in range(32):
                    is_ = l // 16
                    a = np.int64(src[ql + l])
                    b = np.int64(src[ql + l + 32])
                    h = np.int64(src[qh + l])
                    q1 = ((a & 0xF) | (((h >> 0) & 3) << 4)) - 32
                    q2 = ((b & 0xF) | (((h >> 2) & 3) << 4)) - 32
                    q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) - 32
                    q4 = ((b >> 4) | (((h >> 6) & 3) << 4)) - 32
                    dst[y + l] = d * np.float32(_i8(src[sc + is_])) * np.float32(q1)
                    dst[y + l + 32] = d * np.float32(_i8(src[sc + is_ + 2])) * np.float32(q2)
                    dst[y + l + 64] = d * np.float32(_i8(src[sc + is_ + 4])) * np.float32(q3)
                    dst[y + l + 96] = d * np.float32(_i8(src[sc + is_ + 6])) * np.float32(q4)
                y += 128
                ql += 64
                qh += 32
                sc += 8


KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


@njit(**_JIT)
def _iq4_nibbles(src, q, dst, y, dl, kv):
    """32 values of an IQ4 (sub-)block: low nibbles of src[q:q+16] are elements 0..15, high 16..31."""
    for j in range(16):
        b = np.int64(src[q + j])
        dst[y + j] = dl * np.float32(kv[b & 0xF])
        dst[y + j + 16] = dl * np.float32(kv[b >> 4])


@njit(**_JIT)
def _dq_rows_iq4_nl(S, D):
    # block: d qs[16]  (18 bytes); values from the non-linear table KVALUES_IQ4NL
    kv = KVALUES_IQ4NL
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // 32):
            o = i * 18
            _iq4_nibbles(src, o + 2, dst, i * 32, _h2f(_rd16(src, o)), kv)


@njit(**_JIT)
def _iq4xs_scale(src, o, j):
    """6-bit scale j (0..7) of an IQ4_XS block at o, minus 32."""
    lo = (np.int64(src[o + 4 + j // 2]) >> (4 * (j % 2))) & 0xF
    hi = (_rd16(src, o + 2) >> (2 * j)) & 3
    return (lo | (hi << 4)) - 32


@njit(**_JIT)
def _dq_rows_iq4_xs(S, D):
    # block: d scales_h(u16) scales_l[4] qs[128]  (136 bytes)
    kv = KVALUES_IQ4NL
    for r in range(S.shape[0]):
        src = S[r]
        dst = D[r]
        for i in range(dst.shape[0] // QK_K):
            o = i * 136
            d = _h2f(_rd16(src, o))
            for j in range(8):
                _iq4_nibbles(src, o + 8 + 16 * j, dst, i * QK_K + 32 * j, d * np.float32(_iq4xs_scale(src, o, j)), kv)


# ---------------------------------------------------------------------------------------
# quantizers (rows: S float32[n, k] -> D uint8[n, row_bytes])
# ---------------------------------------------------------------------------------------

@njit(**_JIT)
def _q_rows_f32(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        for i in range(x.shape[0]):
            u = _f32_bits(x[i])
            o = 4 * i
            dst[o] = u & 0xFF
            dst[o + 1] = (u >> 8) & 0xFF
            dst[o + 2] = (u >> 16) & 0xFF
            dst[o + 3] = (u >> 24) & 0xFF


@njit(**_JIT)
def _q_rows_f16(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        for i in range(x.shape[0]):
            _wr16(dst, 2 * i, _f2h(x[i]))


@njit(**_JIT)
def _q_rows_bf16(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        for i in range(x.shape[0]):
            _wr16(dst, 2 * i, _f2bf(x[i]))


@njit(**_JIT)
def _q_rows_q4_0(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        for i in range(x.shape[0] // 32):
            xo = i * 32
            o = i * 18
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(32):
                v = x[xo + j]
                if amax < abs(v):
                    amax = abs(v)
                    mx = v
            d = mx / np.float32(-8.0)
            id_ = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _wr16(dst, o, _f2h(d))
            for j in range(16):
                x0 = x[xo + j] * id_
                x1 = x[xo + 16 + j] * id_
                xi0 = min(15, np.int64(x0 + np.float32(8.5)))
                xi1 = min(15, np.int64(x1 + np.float32(8.5)))
                dst[o + 2 + j] = (xi0 | (xi1 << 4)) & 0xFF


@njit(**_JIT)
def _q_rows_q4_1(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        for i in range(x.shape[0] // 32):
            xo = i * 32
            o = i * 20
            mn = np.float32(3.4028234663852886e38)
            mx = np.float32(-3.4028234663852886e38)
            for j in range(32):
                v = x[xo + j]
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
            d = (mx - mn) / np.float32(15.0)
            id_ = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _wr16(dst, o, _f2h(d))
            _wr16(dst, o + 2, _f2h(mn))
            for j in range(16):
                x0 = (x[xo + j] - mn) * id_
                x1 = (x[xo + 16 + j] - mn) * id_
                xi0 = min(15, np.int64(x0 + np.float32(0.5)))
                xi1 = min(15, np.int64(x1 + np.float32(0.5)))
                dst[o + 4 + j] = (xi0 | (xi1 << 4)) & 0xFF


@njit(**_JIT)
def _q_rows_q5_0(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        for i in range(x.shape[0] // 32):
            xo = i * 32
            o = i * 22
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(32):
                v = x[xo + j]
                if amax < abs(v):
                    amax = abs(v)
                    mx = v
            d = mx / np.float32(-16.0)
            id_ = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _wr16(dst, o, _f2h(d))
            qh = 0
            for j in range(16):
                x0 = x[xo + j] * id_
                x1 = x[xo + 16 + j] * id_
                xi0 = min(31, np.int64(x0 + np.float32(16.5)))
                xi1 = min(31, np.int64(x1 + np.float32(16.5)))
                dst[o + 6 + j] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
                qh |= ((xi0 & 0x10) >> 4) << j
                qh |= ((xi1 & 0x10) >> 4) << (j + 16)
            for b in range(4):
                dst[o + 2 + b] = (qh >> (8 * b)) & 0xFF


@njit(**_JIT)
def _q_rows_q5_1(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        for i in range(x.shape[0] // 32):
            xo = i * 32
            o = i * 24
            mn = np.float32(3.4028234663852886e38)
            mx = np.float32(-3.4028234663852886e38)
            for j in range(32):
                v = x[xo + j]
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
            d = (mx - mn) / np.float32(31.0)
            id_ = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _wr16(dst, o, _f2h(d))
            _wr16(dst, o + 2, _f2h(mn))
            qh = 0
            for j in range(16):
                x0 = (x[xo + j] - mn) * id_
                x1 = (x[xo + 16 + j] - mn) * id_
                xi0 = np.int64(x0 + np.float32(0.5)) & 0xFF
                xi1 = np.int64(x1 + np.float32(0.5)) & 0xFF
                dst[o + 8 + j] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
                qh |= ((xi0 & 0x10) >> 4) << j
                qh |= ((xi1 & 0x10) >> 4) << (j + 16)
            for b in range(4):
                dst[o + 4 + b] = (qh >> (8 * b)) & 0xFF


@njit(**_JIT)
def _q_rows_q8_0(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        for i in range(x.shape[0] // 32):
            xo = i * 32
            o = i * 34
            amax = np.float32(0.0)
            for j in range(32):
                v = abs(x[xo + j])
                if v > amax:
                    amax = v
            d = amax / np.float32(127.0)
            id_ = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _wr16(dst, o, _f2h(d))
            for j in range(32):
                dst[o + 2 + j] = _roundf(x[xo + j] * id_) & 0xFF


# -- K-quant helpers (ports of ggml-quants.c) --------------------------------------------

@njit(**_JIT)
def _make_qkx2_quants(n, nmax, x, xo, weights, L, lo, Laux, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants over x[xo:xo+n]; writes L[lo:lo+n]; returns (scale, -min)."""
    fnmax = np.float32(nmax)
    mn = x[xo]
    mx = x[xo]
    sum_w = weights[0]
    sum_x = sum_w * x[xo]
    for i in range(1, n):
        v = x[xo + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        w = weights[i]
        sum_w += w
        sum_x += w * v
    if mn > 0:
        mn = np.float32(0.0)
    if mx == mn:
        for i in range(n):
            L[lo + i] = 0
        return np.float32(0.0), -mn
    iscale = fnmax / (mx - mn)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(n):
        l = _nearest_int(iscale * (x[xo + i] - mn))
        l = max(0, min(nmax, l))
        L[lo + i] = l
        diff = scale * np.float32(l) + mn - x[xo + i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(is_) + fnmax) / (mx - mn)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            l = _nearest_int(iscale * (x[xo + i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            fl = np.float32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[xo + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            error = np.float32(0.0)
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[xo + i]
                diff = abs(diff) if use_mad else diff * diff
                error += weights[i] * diff
            if error < best_error:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best_error = error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(**_JIT)
def _make_qx_quants_rmse1(n, nmax, x, xo, L, lo):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL); L gets l + nmax."""
    mx = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = abs(x[xo + i])
        if ax > amax:
            amax = ax
            mx = x[xo + i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return np.float32(0.0)
    iscale = np.float32(-nmax) / mx
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        v = x[xo + i]
        l = _nearest_int(iscale * v)
        l = max(-nmax, min(nmax - 1, l))
        L[lo + i] = l + nmax
        w = v * v
        fl = np.float32(l)
        sumlx += w * v * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else np.float32(0.0)
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(is_)) / mx
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            v = x[xo + i]
            l = _nearest_int(iscale * v)
            l = max(-nmax, min(nmax - 1, l))
            w = v * v
            fl = np.float32(l)
            sumlx += w * v * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = _nearest_int(iscale * x[xo + i])
                L[lo + i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**_JIT)
def _make_q3_quants(n, nmax, x, xo, L, lo):
    """make_q3_quants(n, nmax, x, L, do_rmse=true); L gets l + nmax."""
    mx = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = abs(x[xo + i])
        if ax > amax:
            amax = ax
            mx = x[xo + i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return np.float32(0.0)
    iscale = np.float32(-nmax) / mx
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        v = x[xo + i]
        l = _nearest_int(iscale * v)
        l = max(-nmax, min(nmax - 1, l))
        L[lo + i] = l
        w = v * v
        fl = np.float32(l)
        sumlx += w * v * fl
        suml2 += w * fl * fl
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            v = x[xo + i]
            w = v * v
            li = np.float32(L[lo + i])
            slx = sumlx - w * v * li
            if slx > 0:
                sl2 = suml2 - w * li * li
                new_l = _nearest_int(v * sl2 / slx)
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[lo + i]:
                    fn = np.float32(new_l)
                    slx += w * v * fn
                    sl2 += w * fn * fn
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[lo + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[lo + i] += nmax
    return sumlx / suml2


@njit(**_JIT)
def _q_rows_q2_k(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        L = np.zeros(QK_K, np.int64)
        Laux = np.zeros(16, np.int64)
        weights = np.zeros(16, np.float32)
        mins = np.zeros(QK_K // 16, np.float32)
        scales = np.zeros(QK_K // 16, np.float32)
        q4scale = np.float32(15.0)
        for i in range(x.shape[0] // QK_K):
            xo = i * QK_K
            o = i * 84
            max_scale = np.float32(0.0)
            max_min = np.float32(0.0)
            for j in range(QK_K // 16):
                for l in range(16):
                    weights[l] = abs(x[xo + 16 * j + l])
                s, m = _make_qkx2_quants(16, 3, x, xo + 16 * j, weights, L, 16 * j, Laux,
                                         np.float32(-0.5), np.float32(0.1), 15, True)
                scales[j] = s
                mins[j] = m
                if s > max_scale:
                    max_scale = s
                if m > max_min:
                    max_min = m
            if max_scale > 0:
                iscale = q4scale / max_scale
                for j in range(QK_K // 16):
                    dst[o + j] = _nearest_int(iscale * scales[j]) & 0xFF
                _wr16(dst, o + 80, _f2h(max_scale / q4scale))
            else:
                for j in range(QK_K // 16):
                    dst[o + j] = 0
                _wr16(dst, o + 80, _f2h(np.float32(0.0)))
            if max_min > 0:
                iscale = q4scale / max_min
                for j in range(QK_K // 16):
                    dst[o + j] = (np.int64(dst[o + j]) | (_nearest_int(iscale * mins[j]) << 4)) & 0xFF
                _wr16(dst, o + 82, _f2h(max_min / q4scale))
            else:
                _wr16(dst, o + 82, _f2h(np.float32(0.0)))
            dd = _h2f(_rd16(dst, o + 80))
            dmin = _h2f(_rd16(dst, o + 82))
            for j in range(QK_K // 16):
                sc = np.int64(dst[o + j])
                d = dd * np.float32(sc & 0xF)
                if d == 0:
                    continue
                dm = dmin * np.float32(sc >> 4)
                for ii in range(16):
                    l = _nearest_int((x[xo + 16 * j + ii] + dm) / d)
                    L[16 * j + ii] = max(0, min(3, l))
            for j in range(0, QK_K, 128):
                for l in range(32):
                    dst[o + 16 + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2)
                                                | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)) & 0xFF


@njit(**_JIT)
def _q_rows_q3_k(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        L = np.zeros(QK_K, np.int64)
        scales = np.zeros(QK_K // 16, np.float32)
        for i in range(x.shape[0] // QK_K):
            xo = i * QK_K
            o = i * 110
            max_scale = np.float32(0.0)
            amax = np.float32(0.0)
            for j in range(QK_K // 16):
                scales[j] = _make_q3_quants(16, 4, x, xo + 16 * j, L, 16 * j)
                scale = abs(scales[j])
                if scale > amax:
                    amax = scale
                    max_scale = scales[j]
            s = o + 96
            for j in range(12):
                dst[s + j] = 0
            if max_scale != 0:
                iscale = np.float32(-32.0) / max_scale
                for j in range(QK_K // 16):
                    l = _nearest_int(iscale * scales[j])
                    l = max(-32, min(31, l)) + 32
                    if j < 8:
                        dst[s + j] = l & 0xF
                    else:
                        dst[s + j - 8] = np.int64(dst[s + j - 8]) | ((l & 0xF) << 4)
                    l >>= 4
                    dst[s + (j % 4) + 8] = np.int64(dst[s + (j % 4) + 8]) | (l << (2 * (j // 4)))
                _wr16(dst, o + 108, _f2h(np.float32(1.0) / iscale))
            else:
                _wr16(dst, o + 108, _f2h(np.float32(0.0)))
            dd = _h2f(_rd16(dst, o + 108))
            for j in range(QK_K // 16):
                d = dd * np.float32(_q3k_scale(dst, s, j))
                if d == 0:
                    continue
                for ii in range(16):
                    l = _nearest_int(x[xo + 16 * j + ii] / d)
                    L[16 * j + ii] = max(-4, min(3, l)) + 4
            for j in range(32):
                dst[o + j] = 0
            m = 0
            hm = 1
            for j in range(QK_K):
                if L[j] > 3:
                    dst[o + m] = np.int64(dst[o + m]) | hm
                    L[j] -= 4
                m += 1
                if m == QK_K // 8:
                    m = 0
                    hm <<= 1
            for j in range(0, QK_K, 128):
                for l in range(32):
                    dst[o + 32 + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2)
                                                | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)) & 0xFF


@njit(**_JIT)
def _pack_scales_k4(dst, s, scales, mins, max_scale, max_min):
    """Q4_K/Q5_K: 6-bit scales and mins into the 12 bytes at s."""
    inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else np.float32(0.0)
    inv_min = np.float32(63.0) / max_min if max_min > 0 else np.float32(0.0)
    for j in range(12):
        dst[s + j] = 0
    for j in range(QK_K // 32):
        ls = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            dst[s + j] = ls
            dst[s + j + 4] = lm
        else:
            dst[s + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            dst[s + j - 4] = np.int64(dst[s + j - 4]) | ((ls >> 4) << 6)
            dst[s + j] = np.int64(dst[s + j]) | ((lm >> 4) << 6)


@njit(**_JIT)
def _kx_block_scales(x, xo, nmax, rmin, nstep, L, Laux, weights, scales, mins):
    """Per-32 sub-block (scale, min) search shared by Q4_K and Q5_K; returns maxima."""
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(QK_K // 32):
        sum_x2 = np.float32(0.0)
        for l in range(32):
            v = x[xo + 32 * j + l]
            sum_x2 += v * v
        av_x = np.float32(np.sqrt(sum_x2 / np.float32(32.0)))
        for l in range(32):
            weights[l] = av_x + abs(x[xo + 32 * j + l])
        s, m = _make_qkx2_quants(32, nmax, x, xo + 32 * j, weights, L, 32 * j, Laux,
                                 rmin, np.float32(0.1), nstep, False)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    return max_scale, max_min


@njit(**_JIT)
def _k4_super_block(x, xo, dst, o, nmax, rmin, nstep, L, Laux, weights, scales, mins):
    """Q4_K / Q5_K super-block head: choose the 8 scales and mins, write d, dmin and the
    packed 6-bit scales at dst[o:o+16], and the quants 0..nmax into L."""
    max_scale, max_min = _kx_block_scales(x, xo, nmax, rmin, nstep, L, Laux, weights, scales, mins)
    _pack_scales_k4(dst, o + 4, scales, mins, max_scale, max_min)
    _wr16(dst, o, _f2h(max_scale / np.float32(63.0)))
    _wr16(dst, o + 2, _f2h(max_min / np.float32(63.0)))
    dd = _h2f(_rd16(dst, o))
    dmin = _h2f(_rd16(dst, o + 2))
    for j in range(QK_K // 32):
        sc, m = _scale_min_k4(j, dst, o + 4)
        d = dd * np.float32(sc)
        if d == 0:
            continue
        dm = dmin * np.float32(m)
        for ii in range(32):
            l = _nearest_int((x[xo + 32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))


@njit(**_JIT)
def _q_rows_q4_k(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        L = np.zeros(QK_K, np.int64)
        Laux = np.zeros(32, np.int64)
        weights = np.zeros(32, np.float32)
        mins = np.zeros(QK_K // 32, np.float32)
        scales = np.zeros(QK_K // 32, np.float32)
        for i in range(x.shape[0] // QK_K):
            xo = i * QK_K
            o = i * 144
            _k4_super_block(x, xo, dst, o, 15, np.float32(-1.0), 20, L, Laux, weights, scales, mins)
            q = o + 16
            for j in range(0, QK_K, 64):
                for l in range(32):
                    dst[q + l] = (L[j + l] | (L[j + l + 32] << 4)) & 0xFF
                q += 32


@njit(**_JIT)
def _q_rows_q5_k(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        L = np.zeros(QK_K, np.int64)
        Laux = np.zeros(32, np.int64)
        weights = np.zeros(32, np.float32)
        mins = np.zeros(QK_K // 32, np.float32)
        scales = np.zeros(QK_K // 32, np.float32)
        for i in range(x.shape[0] // QK_K):
            xo = i * QK_K
            o = i * 176
            _k4_super_block(x, xo, dst, o, 31, np.float32(-0.5), 15, L, Laux, weights, scales, mins)
            qh = o + 16
            ql = o + 48
            for j in range(32):
                dst[qh + j] = 0
            m1 = 1
            m2 = 2
            for n in range(0, QK_K, 64):
                for j in range(32):
                    l1 = L[n + j]
                    if l1 > 15:
                        l1 -= 16
                        dst[qh + j] = np.int64(dst[qh + j]) | m1
                    l2 = L[n + j + 32]
                    if l2 > 15:
                        l2 -= 16
                        dst[qh + j] = np.int64(dst[qh + j]) | m2
                    dst[ql + j] = (l1 | (l2 << 4)) & 0xFF
                m1 <<= 2
                m2 <<= 2
                ql += 32


@njit(**_JIT)
def _q_rows_q6_k(S, D):
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        L = np.zeros(QK_K, np.int64)
        scales = np.zeros(QK_K // 16, np.float32)
        for i in range(x.shape[0] // QK_K):
            xo = i * QK_K
            o = i * 210
            max_scale = np.float32(0.0)
            max_abs_scale = np.float32(0.0)
            for ib in range(QK_K // 16):
                scale = _make_qx_quants_rmse1(16, 32, x, xo + 16 * ib, L, 16 * ib)
                scales[ib] = scale
                abs_scale = abs(scale)
                if abs_scale > max_abs_scale:
                    max_abs_scale = abs_scale
                    max_scale = scale
            if max_abs_scale < GROUP_MAX_EPS:
                for j in range(210):
                    dst[o + j] = 0
                continue
            iscale = np.float32(-128.0) / max_scale
            _wr16(dst, o + 208, _f2h(np.float32(1.0) / iscale))
            for ib in range(QK_K // 16):
                dst[o + 192 + ib] = min(127, _nearest_int(iscale * scales[ib])) & 0xFF
            dd = _h2f(_rd16(dst, o + 208))
            for j in range(QK_K // 16):
                d = dd * np.float32(_i8(dst[o + 192 + j]))
                if d == 0:
                    continue
                for ii in range(16):
                    l = _nearest_int(x[xo + 16 * j + ii] / d)
                    L[16 * j + ii] = max(-32, min(31, l)) + 32
            ql = o
            qh = o + 128
            for j in range(0, QK_K, 128):
                for l in range(32):
                    q1 = L[j + l] & 0xF
                    q2 = L[j + l + 32] & 0xF
                    q3 = L[j + l + 64] & 0xF
                    q4 = L[j + l + 96] & 0xF
                    dst[ql + l] = (q1 | (q3 << 4)) & 0xFF
                    dst[ql + l + 32] = (q2 | (q4 << 4)) & 0xFF
                    dst[qh + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2)
                                   | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6)) & 0xFF
                ql += 64
                qh += 32


# -- IQ4_NL / IQ4_XS (quantize_row_iq4_nl_impl without an importance matrix) -------------

@njit(**_JIT)
def _best_index_int8(kv, x):
    """Index of the table value nearest x (ggml's best_index_int8: bisection, ties go up).

    ``kv``: the 16 table values as float32 (exact), so every comparison is a float32 one."""
    if x <= kv[0]:
        return 0
    if x >= kv[15]:
        return 15
    ml = 0
    mu = 15
    while mu - ml > 1:
        mav = (ml + mu) >> 1
        if x < kv[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - kv[mu - 1] < kv[mu] - x else mu


@njit(**_JIT)
def _iq4_block_scale(x, xo, kv, L, lo, ntry):
    """Best scale of the 32 values x[xo:xo+32] on the non-linear grid (weights x*x); L[lo:] indices."""
    amax = np.float32(0.0)
    mx = np.float32(0.0)
    for j in range(32):
        ax = abs(x[xo + j])
        if ax > amax:
            amax = ax
            mx = x[xo + j]
    if amax < GROUP_MAX_EPS:
        for j in range(32):
            L[lo + j] = 0
        return np.float32(0.0)
    v0 = kv[0]
    d = -mx / v0 if ntry > 0 else mx / v0
    id_ = np.float32(1.0) / d
    sumqx = np.float32(0.0)
    sumq2 = np.float32(0.0)
    for j in range(32):
        v = x[xo + j]
        l = _best_index_int8(kv, id_ * v)
        L[lo + j] = l
        q = kv[l]
        w = v * v
        sumqx += w * q * v
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > 0 else np.float32(0.0)
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        id_ = (np.float32(itry) + kv[0]) / mx      # (itry + values[0]) in int, exact in float32
        sumqx = np.float32(0.0)
        sumq2 = np.float32(0.0)
        for j in range(32):
            v = x[xo + j]
            q = kv[_best_index_int8(kv, id_ * v)]
            w = v * v
            sumqx += w * q * v
            sumq2 += w * q * q
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(**_JIT)
def _pack_iq4(dst, q, L, lo):
    for j in range(16):
        dst[q + j] = (L[lo + j] | (L[lo + 16 + j] << 4)) & 0xFF


_KV_IQ4NL_F32 = KVALUES_IQ4NL.astype(np.float32)


@njit(**_JIT)
def _q_rows_iq4_nl(S, D):
    kv = _KV_IQ4NL_F32
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        L = np.zeros(32, np.int64)
        for i in range(x.shape[0] // 32):
            xo = i * 32
            o = i * 18
            d = _iq4_block_scale(x, xo, kv, L, 0, 7)
            _wr16(dst, o, _f2h(d))
            id_ = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            for j in range(32):
                L[j] = _best_index_int8(kv, id_ * x[xo + j])
            _pack_iq4(dst, o + 2, L, 0)


@njit(**_JIT)
def _q_rows_iq4_xs(S, D):
    kv = _KV_IQ4NL_F32
    for r in range(S.shape[0]):
        x = S[r]
        dst = D[r]
        L = np.zeros(QK_K, np.int64)
        scales = np.zeros(8, np.float32)
        for i in range(x.shape[0] // QK_K):
            xo = i * QK_K
            o = i * 136
            max_scale = np.float32(0.0)
            amax_scale = np.float32(0.0)
            for ib in range(8):
                d = _iq4_block_scale(x, xo + 32 * ib, kv, L, 32 * ib, 7)
                scales[ib] = d
                if abs(d) > amax_scale:
                    amax_scale = abs(d)
                    max_scale = d
            d = -max_scale / np.float32(32.0)
            _wr16(dst, o, _f2h(d))
            id_ = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            sh = 0
            for j in range(4):
                dst[o + 4 + j] = 0
            for ib in range(8):
                l = max(-32, min(31, _nearest_int(id_ * scales[ib])))
                dl = d * np.float32(l)
                idl = np.float32(1.0) / dl if dl != 0 else np.float32(0.0)
                for j in range(32):
                    L[32 * ib + j] = _best_index_int8(kv, idl * x[xo + 32 * ib + j])
                l += 32
                dst[o + 4 + ib // 2] = np.int64(dst[o + 4 + ib // 2]) | ((l & 0xF) << (4 * (ib % 2)))
                sh |= (l >> 4) << (2 * ib)
            _wr16(dst, o + 2, sh)
            for ib in range(8):
                _pack_iq4(dst, o + 8 + 16 * ib, L, 32 * ib)


# ---------------------------------------------------------------------------------------
# one-row entry point: the code lives in the whole-tensor loops above (compiled once per
# type); a row is a one-row tensor
# ---------------------------------------------------------------------------------------

@njit(nogil=True)
def _one_row(rows_fn, src, dst):
    rows_fn(src.reshape((1, src.shape[0])), dst.reshape((1, dst.shape[0])))


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantType:
    """One ggml tensor format: a row of ggml's ``type_traits`` and ``type_traits_cpu`` together."""

    name: str                 # ggml's name, upper case: "Q4_0"
    ggml_type: GT             # gguf.GGMLQuantizationType id
    block_size: int           # elements per block
    type_size: int            # bytes per block
    vec_dot_type: GT          # what llama.cpp quantizes activations to for dot products with it
    is_quantized: bool        # block-quantized (False for F32/F16/BF16)
    dequantize_rows: Callable  # (src uint8[n, row_bytes], dst float32[n, k]) -> None
    quantize_rows: Optional[Callable] = None  # (src float32[n, k], dst uint8[n, row_bytes]) -> None
    layout: dict = field(default_factory=dict)  # field name -> byte offset inside a block
    simd: object = None       # the kernels' block decoder (simd.WeightFormat / simd.KFormat); None: cannot run
    repacked: object = None   # optional row-interleaved layout for prompt processing (simd.Interleaved)

    def dequantize_row(self, src, dst) -> None:
        """One row in place: src uint8[row_bytes] -> dst float32[k]."""
        _one_row(self.dequantize_rows, src, dst)

    def quantize_row(self, src, dst) -> None:
        """One row in place: src float32[k] -> dst uint8[row_bytes]."""
        _one_row(self.quantize_rows, src, dst)

    @property
    def runnable(self) -> bool:
        """Whether the matmul kernels can use weights of this type."""
        return self.simd is not None

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    def row_bytes(self, k: int) -> int:
        if k % self.block_size:
            raise ValueError(f"row length {k} is not a multiple of the {self.name} block size {self.block_size}")
        return k // self.block_size * self.type_size

    def __repr__(self) -> str:
        return (f"QuantType({self.name}, id={int(self.ggml_type)}, block={self.block_size}, "
                f"bytes={self.type_size}, vec_dot={self.vec_dot_type.name})")


def _entry(t, vec_dot, layout, dqs, qs, decoder, *dargs, repacked=None, simd_block=None):
    """A table row (block shape from ggml's type table); the SIMD decoder gets the entry's name, block
    bytes and layout (and a table's values, ``dargs``, as does the repacked layout)."""
    block, size = QUANT_SIZES[t]
    dec = decoder(t.name, simd_block or size, layout, *dargs) if decoder else None
    return QuantType(t.name, t, block, size, vec_dot, block > 1, dqs, qs, layout, dec,
                     repacked(*dargs) if repacked else None)


# Block layouts (byte offsets of the fields of ggml's block_* structs) are written once,
# here; the SIMD decoders read them through ``layout``. Float formats: the kernels'
# "block" is 32 elements (simd_block bytes).
_F = simd
TYPES: dict = {e.ggml_type: e for e in (
    _entry(GT.F32, GT.F32, {}, _dq_rows_f32, _q_rows_f32, _F.F32W, simd_block=128),
    _entry(GT.F16, GT.F16, {}, _dq_rows_f16, _q_rows_f16, _F.F16W, simd_block=64),
    _entry(GT.BF16, GT.BF16, {}, _dq_rows_bf16, _q_rows_bf16, _F.BF16W,
           simd_block=64),
    _entry(GT.Q4_0, GT.Q8_0, dict(d=0, qs=2),
           _dq_rows_q4_0, _q_rows_q4_0, _F.Q4_0, repacked=_F.Q4_0x16),
    _entry(GT.Q4_1, GT.Q8_1, dict(d=0, m=2, qs=4),
           _dq_rows_q4_1, _q_rows_q4_1, _F.Q4_1, repacked=_F.Q4_1x16),
    _entry(GT.Q5_0, GT.Q8_0, dict(d=0, qh=2, qs=6),
           _dq_rows_q5_0, _q_rows_q5_0, _F.Q5_0, repacked=_F.Q5_0x16),
    _entry(GT.Q5_1, GT.Q8_1, dict(d=0, m=2, qh=4, qs=8),
           _dq_rows_q5_1, _q_rows_q5_1, _F.Q5_1, repacked=_F.Q5_1x16),
    _entry(GT.Q8_0, GT.Q8_0, dict(d=0, qs=2),
           _dq_rows_q8_0, _q_rows_q8_0, _F.Q8_0, repacked=_F.Q8_0x16),
    _entry(GT.Q2_K, GT.Q8_K, dict(scales=0, qs=16, d=80, dmin=82),
           _dq_rows_q2_k, _q_rows_q2_k, _F.Q2_K, repacked=_F.Q2_Kx16),
    _entry(GT.Q3_K, GT.Q8_K, dict(hmask=0, qs=32, scales=96, d=108),
           _dq_rows_q3_k, _q_rows_q3_k, _F.Q3_K, repacked=_F.Q3_Kx16),
    _entry(GT.Q4_K, GT.Q8_K, dict(d=0, dmin=2, scales=4, qs=16),
           _dq_rows_q4_k, _q_rows_q4_k, _F.Q4_K, repacked=_F.Q4_Kx16),
    _entry(GT.Q5_K, GT.Q8_K, dict(d=0, dmin=2, scales=4, qh=16, qs=48),
           _dq_rows_q5_k, _q_rows_q5_k, _F.Q5_K, repacked=_F.Q5_Kx16),
    _entry(GT.Q6_K, GT.Q8_K, dict(ql=0, qh=128, scales=192, d=208),
           _dq_rows_q6_k, _q_rows_q6_k, _F.Q6_K, repacked=_F.Q6_Kx16),
    _entry(GT.IQ4_NL, GT.Q8_0, dict(d=0, qs=2),
           _dq_rows_iq4_nl, _q_rows_iq4_nl, _F.IQ4_NL, KVALUES_IQ4NL,
           repacked=_F.IQ4_NLx16),
    _entry(GT.IQ4_XS, GT.Q8_K, dict(d=0, scales_h=2, scales_l=4, qs=8),
           _dq_rows_iq4_xs, _q_rows_iq4_xs, _F.IQ4_XS, KVALUES_IQ4NL, repacked=_F.IQ4_XSx16),
)}

_BY_NAME = {e.name: e for e in TYPES.values()}


def supported_names() -> list:
    return [e.name for e in TYPES.values()]


def runnable_names() -> list:
    return [e.name for e in TYPES.values() if e.runnable]


def type_info(t) -> QuantType:
    """The table entry for ggml type ``t`` (id, GGMLQuantizationType, or name like "Q4_0").

    Raises :class:`UnsupportedTypeError` naming the type for anything not in the table.
    """
    if isinstance(t, QuantType):
        return t
    if isinstance(t, str):
        e = _BY_NAME.get(t.upper())
        if e is None:
            raise UnsupportedTypeError(f"{t} is not supported; supported: {', '.join(supported_names())}")
        return e
    e = TYPES.get(t)
    if e is None:
        try:
            name = GT(int(t)).name
        except (ValueError, TypeError):
            name = f"ggml type {t!r}"
        raise UnsupportedTypeError(f"{name} is not supported; supported: {', '.join(supported_names())}")
    return e


def row_bytes(ggml_type, k: int) -> int:
    """Bytes of one row of ``k`` elements of ``ggml_type``."""
    return type_info(ggml_type).row_bytes(k)


# -- threading: the row loops release the GIL; big tensors are cut into row chunks --------

_POOL = None
_MIN_PARALLEL = 1 << 20  # elements


def n_threads() -> int:
    env = os.environ.get("TINYINFER_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _readonly(a):
    """A read-only view, so that mmap'd weights and fresh arrays share one compiled signature."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _run_rows(fn, src, dst, k, threads=None):
    src = _readonly(src)
    n = src.shape[0]
    nt = n_threads() if threads is None else max(1, int(threads))
    if nt == 1 or n < 2 or n * k < _MIN_PARALLEL:
        fn(src, dst)
        return
    global _POOL
    if _POOL is None or _POOL._max_workers != nt:
        _POOL = ThreadPoolExecutor(max_workers=nt, thread_name_prefix="tinyinfer-quants")
    chunks = min(n, nt * 4)
    bounds = [n * c // chunks for c in range(chunks + 1)]
    futs = [_POOL.submit(fn, src[a:b], dst[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    for f in futs:
        f.result()


def dequantize(raw, ggml_type, k: int, out=None, threads=None) -> np.ndarray:
    """Raw bytes of rows of ``ggml_type`` -> float32 (n_rows, k).

    ``raw`` is uint8 of shape (n_rows, row_bytes) (or anything that reshapes to it,
    e.g. the 1-D bytes of a tensor). ``threads``: worker threads for large tensors
    (default: ``$TINYINFER_THREADS`` or the CPUs this process may use).
    """
    e = type_info(ggml_type)
    rb = e.row_bytes(k)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    if raw.size % rb:
        raise ValueError(f"{raw.size} bytes are not a whole number of {e.name} rows of {k} elements ({rb} bytes)")
    raw = np.ascontiguousarray(raw.reshape(-1, rb))
    n = raw.shape[0]
    if out is None:
        out = np.empty((n, k), np.float32)
    elif out.shape != (n, k) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(n, k)}")
    _run_rows(e.dequantize_rows, raw, out, k, threads)
    return out


def quantize(x, ggml_type, out=None, threads=None) -> np.ndarray:
    """float32 rows (n_rows, k) -> raw bytes uint8 (n_rows, row_bytes) of ``ggml_type``."""
    e = type_info(ggml_type)
    if e.quantize_rows is None:
        raise UnsupportedTypeError(f"quantizing to {e.name} is not supported")
    x = np.asarray(x)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"quantize expects a 2-D array of rows, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, k = x.shape
    rb = e.row_bytes(k)
    if out is None:
        out = np.empty((n, rb), np.uint8)
    elif out.shape != (n, rb) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint8 array of shape {(n, rb)}")
    _run_rows(e.quantize_rows, x, out, k, threads)
    return out


__all__ = ["QK_K", "QuantType", "TYPES", "UnsupportedTypeError", "type_info", "row_bytes",
           "dequantize", "quantize", "supported_names", "n_threads"]
