"""Reading a GGUF string array (a vocabulary, BPE merges) in one pass.

A string array is n x (u64 length, bytes). Walking it in Python costs ~0.4 us a string
(40 ms for SmolLM2's 49k tokens + 49k merges, 0.1 s for Qwen's 150k + 150k): most of
a warm start's file parsing. Here a jitted loop gathers the bytes of every string, with
a 0xFF byte between them, and Python decodes that once and splits it. 0xFF never
occurs in UTF-8, so the split gives back exactly n strings unless a string holds
invalid UTF-8 or the array is malformed: then :func:`read_strings` returns None and
the caller takes its careful path (which names what is wrong).
"""

from __future__ import annotations

import numba as nb
import numpy as np

_SEP = 0xFF


@nb.njit(cache=True, nogil=True)
def _walk(buf, pos, end, n, out):
    """Bytes of the n strings from buf[pos:end] into out (when it is given room), separated by
    0xFF; returns (position after the array, bytes written), or (-1, 0) if it runs off the end."""
    o = 0
    for i in range(n):
        if pos + 8 > end:
            return -1, 0
        ln = 0
        for b in range(8):
            ln |= np.int64(buf[pos + b]) << (8 * b)
        pos += 8
        if ln < 0 or ln > end - pos:
            return -1, 0
        if i > 0:
            if o < out.size:
                out[o] = _SEP
            o += 1
        if o + ln <= out.size:
            for j in range(ln):
                out[o + j] = buf[pos + j]
        o += ln
        pos += ln
    return pos, o


def read_strings(buf, pos: int, end: int, n: int):
    """(strings, position after the array) or None (malformed, or not plain UTF-8)."""
    data = np.frombuffer(buf, np.uint8)
    nxt, total = _walk(data, pos, end, n, np.empty(0, np.uint8))
    if nxt < 0:
        return None
    out = np.empty(total, np.uint8)
    _walk(data, pos, end, n, out)
    parts = out.tobytes().decode("utf-8", "surrogateescape").split("\udcff") if n else []
    if len(parts) != n:
        return None
    return parts, nxt
