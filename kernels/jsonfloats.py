"""float32 vectors as JSON array text in one jitted pass (embedding responses).

An all-MiniLM vector is 384 floats; Python formats each one (``"%.9g" % x``: ~0.15-0.4 us a float,
60-160 us a vector on the 2-core test machine, json's repr twice that), which was the largest single
cost of a one-sentence ``/v1/embeddings`` request outside the forward. Here a numba loop writes the
digits of every float into one byte buffer (~2 us a vector).

Each number gets 9 significant digits, as ``%.9g``: enough for every float32 to read back exactly
(9 digits is the float32 round-trip count; the digits come from float64 arithmetic, so in a rare tie
the last digit may differ from C's correctly rounded one by one unit, 1e-8 relative at most, well
inside the half-ulp of 3e-8 that reading back to float32 forgives). The layout is ``%.9g``'s
(fixed notation for exponents -4..8, else ``d.ddde-05``), trailing zeros dropped, except that a whole
number keeps a ``.0`` (``1.0``, ``-0.0``, ``0.0``: a JSON reader takes ``1`` as an integer) as json does.
A vector with NaN or an infinity is not written (the caller refuses it as json does).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

_P10 = np.array([10.0 ** k for k in range(64)], np.float64)     # 10^k; inexact past 10^22 (1e-16 relative)


@nb.njit(cache=True, nogil=True)
def _scaled(x, e, p10):
    """round(x * 10^(8 - e)) as an integer (x > 0): the 9 significant digits of x at exponent e."""
    p = 8 - e
    if p >= 0:
        m = x * p10[p] if p < 64 else x * p10[63] * p10[p - 63]
    else:
        m = x / p10[-p] if -p < 64 else x / p10[63] / p10[-p - 63]
    return np.int64(np.rint(m))         # ties to even, as C


@nb.njit(cache=True, nogil=True)
def _write(a, out, p10):
    """The numbers of ``a`` (1-D float32), comma-separated, into ``out``; returns the number of bytes
    written, or -1 at a non-finite value."""
    digits = np.empty(9, np.uint8)
    o = 0
    for i in range(a.size):
        d = np.float64(a[i])
        if i > 0:
            out[o] = 44                 # ,
            o += 1
        if not math.isfinite(d):
            return -1
        if d < 0 or (d == 0 and math.copysign(1.0, d) < 0):
            out[o] = 45                 # -
            o += 1
            d = -d
        if d == 0:
            out[o] = 48
            out[o + 1] = 46
            out[o + 2] = 48             # 0.0
            o += 3
            continue
        e = np.int64(math.floor(math.log10(d)))
        m = _scaled(d, e, p10)
        if m >= 1000000000:             # log10 rounded up to the next decade, or 9.999999995 -> 10
            e += 1
            m = _scaled(d, e, p10)
        elif m < 100000000:
            e -= 1
            m = _scaled(d, e, p10)
            if m >= 1000000000:
                e += 1
                m = 100000000
        u = np.uint64(m)                # unsigned: division by 10 without Python's sign fix-ups
        for k in range(8, -1, -1):
            q = u // np.uint64(10)
            digits[k] = np.uint8(48 + (u - q * np.uint64(10)))
            u = q
        nd = 9
        while nd > 1 and digits[nd - 1] == 48:
            nd -= 1
        if -4 <= e < 9:                 # fixed notation (as %g: exponents -4..8)
            if e < 0:
                out[o] = 48
                out[o + 1] = 46         # 0.
                o += 2
                for k in range(-e - 1):
                    out[o] = 48
                    o += 1
                for k in range(nd):
                    out[o] = digits[k]
                    o += 1
            else:
                for k in range(e + 1):
                    out[o] = digits[k]
                    o += 1
                out[o] = 46             # .
                o += 1
                if nd > e + 1:
                    for k in range(e + 1, nd):
                        out[o] = digits[k]
                        o += 1
                else:
                    out[o] = 48         # a whole number: 1.0
                    o += 1
        else:                           # d.ddde+XX
            out[o] = digits[0]
            o += 1
            if nd > 1:
                out[o] = 46
                o += 1
                for k in range(1, nd):
                    out[o] = digits[k]
                    o += 1
            out[o] = 101                # e
            out[o + 1] = 45 if e < 0 else 43
            o += 2
            ae = -e if e < 0 else e
            if ae >= 10:
                out[o] = 48 + ae // 10
                out[o + 1] = 48 + ae % 10
            else:
                out[o] = 48
                out[o + 1] = 48 + ae
            o += 2
    return o


def floats_json_bytes(v) -> bytes:
    """A float32 vector (1-D) as JSON array text (bytes); ValueError for NaN / infinity, as json's
    ``allow_nan=False``."""
    a = np.ascontiguousarray(v, np.float32).reshape(-1)
    out = np.empty(a.size * 16 + 2, np.uint8)     # "-d.dddddddde-XX," is at most 16 bytes
    out[0] = 91                                   # [
    n = _write(a, out[1:], _P10) if a.size else 0
    if n < 0:
        raise ValueError("Out of range float values are not JSON compliant")
    out[n + 1] = 93                               # ]
    return out[:n + 2].tobytes()
