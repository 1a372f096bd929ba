"""aarch64 (Raspberry Pi 4 / Pi 5) repacked layouts and kernels: 4 weight rows interleaved.

``prepare`` (matmul.py) repacks a matrix of any quantized type of the registry (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS: :data:`LAYOUTS`) whose row count is a multiple of 4 into groups of 4 rows (:class:`Layout4`), as ggml's ``q4_0_4x4`` /
``q8_0_4x4`` / ``q4_K_8x4`` layouts do: per block, the 4 rows' scales side by side, then
the quants in 4-byte chunks, chunk i of rows 0..3 in one 16-byte vector. One vector of
quants against the 4 activation bytes of chunk i broadcast to all lanes gives lane r = row
r's partial dot product, so a block's result for 4 rows is one <4 x i32> vector whose
conversion, scale product and fused multiply-add are shared by the 4 rows (one row at a
time pays them per row, half of the A76 loop).

Two flavours of the same layouts, picked when the kernels are built (:data:`DOTPROD`):

* **dot product** (``+dotprod``: Cortex-A76 / Pi 5, A55, Neoverse): ``sdot`` by lane,
  ``llvm.aarch64.neon.sdot`` on the quants and the activation vector, whose lane
  broadcast LLVM folds into ``sdot v.4s, v.16b, v.4b[i]`` (generic IR gives ``dup`` +
  ``sdot``).
* **no dot product** (Cortex-A72 / Pi 4): int16 products (``smull``/``smull2``) summed in
  int16 with ``smlal``/``smlal2`` as far as the value ranges allow, then pairwise widened
  (``saddlp``/``sadalp``) and folded to one lane per row (``addp``). Generic IR only, so
  this flavour also runs on x86 (tests/test_arm.py checks it there).

Nibble storage: Q4_0 quants are stored XOR 0x88, so ``v << 4`` and ``v & 0xF0`` are the
signed low / high quants times 16 (one logic op each, no -8; the 16 goes into the
fixed-point convert, ``scvtf #4``), and ``v >> 4`` (arithmetic) the signed high quant.
Q4_1 / Q5_0 / Q5_1 keep unsigned quants (``and`` / ``ushr``; Q5: the fifth bits regrouped per
block so that a shift + ``and`` moves a chunk's to bit 4): Q5_0's -16 is 16 x the activations' block
sum, Q4_1 / Q5_1 add m x block_q8_1.s per block. Q4_K keeps unsigned nibbles (``and`` / ``ushr``): no
-8 and no correction. Its 6-bit scales
and mins are regrouped at repack time (the same 12 B per row and super-block, two logic ops per
32 values to unpack): the scales of a sub-block's 4 rows side by side, widened in vector
registers (``tbl`` on the A76) for one ``mla`` per sub-block; the mins in the order of an
``sdot`` by lane, so that the mins x Q8_K sums term is four dot products with the sums' int8
high and low parts (the driver splits each sum s = 64 hi + lo). Q2_K the same way with its 4-bit
mins and the sums per 16 (:func:`bsums16_hilo`); its 2-bit quants taken in place (x 1, 4, 16: one ``and``
each), the sums brought to one scale before the conversion. Q3_K and Q6_K are re-encoded at repack time
as two's complement fields (q - 4, q - 32) at the top of a byte, with the spare low bits holding the
rest (:func:`_q3_abc`, :func:`_q6_pack6`): one ``shl`` / ``and`` per 16 quants for most, no bias and no
activation sums. IQ4_XS: IQ4_NL's table lookups with 6-bit scales per 32. The same bytes as the original
rows for every type. Q8_0 GEMV loops take two blocks per iteration (:data:`UNROLL`); GEMM calls take 8
or 10 activation rows for some types (:data:`GEMM_NC`).

Measure with ``benchmarks/arm_mca.py`` (llvm-mca cycles per block, next to llama.cpp's).
The jitted driver that walks the groups is matmul.py's ``_make_arm``; this module imports only simd
and quants (no matmul: no import circle).
"""

from __future__ import annotations

import functools
import hashlib
from functools import lru_cache
from pathlib import Path

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import simd
from .quants import KVALUES_IQ4NL
from .simd import F16, F32, I8, I16, I32, P8, Emitter, _intrinsic_call, c32, c64, counted_loop, vec

_HASH = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:8]
ROWS = 4           # weight rows per group
_DOTPROD_CPUS = ("cortex-a55", "cortex-a65", "cortex-a75", "cortex-a76", "cortex-a77", "cortex-a78", "cortex-a710",
                 "cortex-x", "neoverse", "apple", "ampere", "a64fx", "thunderx3", "carmel", "tsv110")


def _detect_dotprod() -> bool:
    """Whether the CPU numba compiles for has the dot product instructions (numba's own
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES settings, as numba.config holds them, else the host)."""
    feats = nb.config.CPU_FEATURES or ""
    if "+dotprod" in feats:
        return True
    if "-dotprod" in feats:
        return False
    name = nb.config.CPU_NAME or ""
    if name and name not in ("host", "generic"):
        return name.startswith(_DOTPROD_CPUS)
    try:
        import llvmlite.binding as llvm
        return bool(llvm.get_host_cpu_features().get("dotprod", False))
    except Exception:  # pragma: no cover
        return False


AARCH64 = simd.TARGET_ARCH == "aarch64"
DOTPROD = AARCH64 and _detect_dotprod()
# the default of matmul.KernelConfig.arm: repack at prepare() on aarch64 (a config with arm=True
# runs the no-dotprod flavour, generic IR, on other hosts too: that is how tests run it on x86)
ENABLED = AARCH64
NC = 4             # activation rows per GEMM tile (GEMM_NC: 8 for some types)
SDOT_CHAINS = 1    # independent sdot chains per block sum (2: more movi/add, slower in llvm-mca)


# ------------------------------------------------------------------ layouts (numpy)
class Layout4:
    """A 4-row interleaved layout: ``repack`` (rows, row_bytes) -> (rows/4, nb, group_block_bytes)."""

    name = ""
    act = "q8_0"          # activations: q8_0 (blocks of 32) or q8_K (256)
    qk = 32               # elements per block
    block_bytes = 0       # bytes of one source block
    group_bytes = 0       # bytes of one block of 4 rows
    sums = ""             # the activation sums the kernels read: "" (int32 per 32, or unused), "hilo32"
                          # (bsums_hilo: Q4_K / Q5_K), "hilo16" (bsums16_hilo: Q2_K)

    def repack(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def unpack(self, p: np.ndarray) -> np.ndarray:
        """The inverse of repack (for tests)."""
        raise NotImplementedError


@nb.njit(cache=True, nogil=True)
def _interleave(src, extra, segs, out):
    """Build 4-row groups: src (ng, 4, nb, S) per-row block bytes, out (ng, nb, G). Segments, in
    order, each row (kind, lo, hi): 0 = the 2-byte field at lo of rows 0..3 side by side; 1 = bytes
    lo:hi of each row in 4-byte chunks, chunk i of rows 0..3 together; 2 = extra[g, b, lo:hi] as is."""
    ng, _, nb, _ = src.shape
    for g in range(ng):
        for b in range(nb):
            o = 0
            for s in range(segs.shape[0]):
                kind, lo, hi = segs[s, 0], segs[s, 1], segs[s, 2]
                if kind == 0:
                    for r in range(4):
                        out[g, b, o + 2 * r] = src[g, r, b, lo]
                        out[g, b, o + 2 * r + 1] = src[g, r, b, lo + 1]
                    o += 8
                elif kind == 1:
                    for i in range((hi - lo) // 4):
                        for r in range(4):
                            for t in range(4):
                                out[g, b, o + 16 * i + 4 * r + t] = src[g, r, b, lo + 4 * i + t]
                    o += 4 * (hi - lo)
                else:
                    for t in range(hi - lo):
                        out[g, b, o + t] = extra[g, b, lo + t]
                    o += hi - lo


_NO_EXTRA = np.zeros((1, 1, 1), np.uint8)
_NO_EXTRA.flags.writeable = False


def _build(src: np.ndarray, segs, group_bytes: int, extra: np.ndarray = _NO_EXTRA) -> np.ndarray:
    """Run _interleave with read-only inputs (one compiled signature for mapped and computed data)."""
    src = np.ascontiguousarray(src)
    if src.flags.writeable:
        src = src.view()
        src.flags.writeable = False
    if extra.flags.writeable:
        extra = np.ascontiguousarray(extra).view()
        extra.flags.writeable = False
    out = np.empty((src.shape[0], src.shape[2], group_bytes), np.uint8)
    _interleave(src, extra, np.array(segs, np.int64), out)
    return out


def _unchunks(p: np.ndarray, m: int) -> np.ndarray:
    """Inverse of a kind-1 segment of m bytes per row: (ng, nb, 4m) -> (ng, 4, nb, m) (tests)."""
    ng, nb, _ = p.shape
    return p.reshape(ng, nb, m // 4, 4, 4).transpose(0, 3, 1, 2, 4).reshape(ng, 4, nb, m)


def _rows(w: np.ndarray, bb: int) -> np.ndarray:
    return w.reshape(w.shape[0] // 4, 4, w.shape[1] // bb, bb)


class Q4_0x4(Layout4):
    """Per block: d[4] (fp16), then 4 chunks of 16 B: chunk i = rows 0..3's qs[4i..4i+3] ^ 0x88."""

    name, block_bytes, group_bytes = "Q4_0", 18, 72

    def repack(self, w):
        src = _rows(w, 18) ^ np.array([0, 0] + [0x88] * 16, np.uint8)
        return _build(src, [(0, 0, 2), (1, 2, 18)], 72)

    def unpack(self, p):
        ng, nb, _ = p.shape
        d = p[..., :8].reshape(ng, nb, 4, 2).transpose(0, 2, 1, 3)
        qs = _unchunks(p[..., 8:], 16) ^ np.uint8(0x88)
        return np.concatenate([d, qs], axis=3).reshape(ng * 4, nb * 18)


class Q8_0x4(Layout4):
    """Per block: d[4] (fp16), then 8 chunks of 16 B: chunk i = rows 0..3's qs[4i..4i+3]."""

    name, block_bytes, group_bytes = "Q8_0", 34, 136

    def repack(self, w):
        return _build(_rows(w, 34), [(0, 0, 2), (1, 2, 34)], 136)

    def unpack(self, p):
        ng, nb, _ = p.shape
        d = p[..., :8].reshape(ng, nb, 4, 2).transpose(0, 2, 1, 3)
        return np.concatenate([d, _unchunks(p[..., 8:], 32)], axis=3).reshape(ng * 4, nb * 34)


class IQ4_NLx4(Q4_0x4):
    """As Q4_0x4, nibbles stored as they are (table indices: low = and 0x0F, high = ushr 4, then tbl)."""

    name = "IQ4_NL"

    def repack(self, w):
        return _build(_rows(w, 18), [(0, 0, 2), (1, 2, 18)], 72)

    def unpack(self, p):
        ng, nb, _ = p.shape
        d = p[..., :8].reshape(ng, nb, 4, 2).transpose(0, 2, 1, 3)
        return np.concatenate([d, _unchunks(p[..., 8:], 16)], axis=3).reshape(ng * 4, nb * 18)


class Q4_1x4(Layout4):
    """Per block: d[4], m[4] (fp16), then 4 chunks of 16 B: chunk i = rows 0..3's qs[4i..4i+3] (unsigned
    nibbles as stored: low = and 0x0F, high = ushr 4). Q8_1 activations: the kernels add m * s_x."""

    name, act, block_bytes, group_bytes = "Q4_1", "q8_1", 20, 80

    def repack(self, w):
        return _build(_rows(w, 20), [(0, 0, 2), (0, 2, 4), (1, 4, 20)], 80)

    def unpack(self, p):
        ng, nb, _ = p.shape

        def rows2(a):
            return a.reshape(ng, nb, 4, 2).transpose(0, 2, 1, 3)
        return np.concatenate([rows2(p[..., 0:8]), rows2(p[..., 8:16]), _unchunks(p[..., 16:], 16)],
                              axis=3).reshape(ng * 4, nb * 20)


def _q5_hbits(qh: np.ndarray) -> np.ndarray:
    """qh (ng, 4, nb, 4) bytes of block_q5_0 / q5_1 -> (ng, nb, 16): byte 4r + t, bit 2i = row r's fifth
    bit of element 4i + t (the low nibble of qs chunk i), bit 2i + 1 that of element 16 + 4i + t."""
    h = qh.copy().view("<u4")[..., 0]                                     # (ng, 4, nb)
    t = np.arange(4)[:, None]
    i = np.arange(4)[None, :]
    lo = (h[..., None, None] >> (4 * i + t)) & 1                          # (ng, 4, nb, t, i)
    hi = (h[..., None, None] >> (16 + 4 * i + t)) & 1
    v = ((lo << (2 * i)) | (hi << (2 * i + 1))).sum(-1).astype(np.uint8)  # (ng, 4, nb, t)
    return v.transpose(0, 2, 1, 3).reshape(v.shape[0], v.shape[2], 16)


def _q5_unhbits(p: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_q5_hbits`: (ng, nb, 16) -> (ng, 4, nb, 4) qh bytes."""
    ng, nb, _ = p.shape
    v = p.reshape(ng, nb, 4, 4).transpose(0, 2, 1, 3).astype(np.uint32)   # (ng, 4, nb, t)
    h = np.zeros((ng, 4, nb), np.uint32)
    for i in range(4):
        for t in range(4):
            h |= ((v[..., t] >> (2 * i)) & 1) << (4 * i + t)
            h |= ((v[..., t] >> (2 * i + 1)) & 1) << (16 + 4 * i + t)
    return h.astype("<u4")[..., None].view(np.uint8)


class Q5_0x4(Layout4):
    """Per block: d[4] (fp16), the 4 rows' fifth bits in 16 B (:func:`_q5_hbits`: one shift + and per
    chunk moves them to bit 4), then qs as in Q4_1x4 (unsigned nibbles). The kernels take unsigned
    5-bit quants and subtract 16 * sum(q_x) per block (the activations' block sums)."""

    name, block_bytes, group_bytes, hoff = "Q5_0", 22, 88, 2

    def repack(self, w):
        b = _rows(w, self.block_bytes)
        o = self.hoff
        segs = [(0, 2 * j, 2 * j + 2) for j in range(o // 2)] + [(2, 0, 16), (1, o + 4, o + 20)]
        return _build(b, segs, self.group_bytes, _q5_hbits(b[..., o:o + 4]))

    def unpack(self, p):
        ng, nb, _ = p.shape
        o = self.hoff
        dm = [p[..., 8 * j:8 * j + 8].reshape(ng, nb, 4, 2).transpose(0, 2, 1, 3) for j in range(o // 2)]
        qh = _q5_unhbits(p[..., 4 * o:4 * o + 16])
        return np.concatenate(dm + [qh, _unchunks(p[..., 4 * o + 16:], 16)], axis=3).reshape(ng * 4, nb * (o + 20))


class Q5_1x4(Q5_0x4):
    """As Q5_0x4 with m[4] (fp16) after d[4]: no -16; Q8_1 activations, the kernels add m * s_x."""

    name, act, block_bytes, group_bytes, hoff = "Q5_1", "q8_1", 24, 96, 4


def _k4_unpack_scales(sc: np.ndarray):
    """get_scale_min_k4 over (..., 12) bytes -> (scales (..., 8), mins (..., 8)) uint8."""
    sc = sc.astype(np.uint8)
    s = np.empty(sc.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(s)
    s[..., :4] = sc[..., 0:4] & 63
    m[..., :4] = sc[..., 4:8] & 63
    s[..., 4:] = (sc[..., 8:12] & 0xF) | ((sc[..., 0:4] >> 6) << 4)
    m[..., 4:] = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return s, m


def _k4_pack_scales(s: np.ndarray, m: np.ndarray) -> np.ndarray:
    out = np.empty(s.shape[:-1] + (12,), np.uint8)
    out[..., 0:4] = (s[..., :4] & 63) | ((s[..., 4:] >> 4) << 6)
    out[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    out[..., 8:12] = (s[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)
    return out


def _per_sub(v: np.ndarray) -> np.ndarray:
    """(ng, 4, nb, m) -> (ng, nb, m, 4): value j of rows 0..3 side by side."""
    return v.transpose(0, 2, 3, 1).reshape(v.shape[0], v.shape[2], -1)


def _per_row4(v: np.ndarray) -> np.ndarray:
    """(ng, 4, nb, m) -> (ng, nb, 4m): m/4 16-byte vectors (sub-blocks 0-3, 4-7, ...), each the 4 rows' 4
    values side by side (row r at bytes 4r..4r+3): the weight operand of an sdot by lane."""
    ng, _, nb, m = v.shape
    return v.reshape(ng, 4, nb, m // 4, 4).transpose(0, 2, 3, 1, 4).reshape(ng, nb, 4 * m)


def _from_row4(v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_per_row4`: (ng, nb, 4m) -> (ng, 4, nb, m)."""
    ng, nb, m4 = v.shape
    return v.reshape(ng, nb, m4 // 16, 4, 4).transpose(0, 3, 1, 2, 4).reshape(ng, 4, nb, m4 // 4)


def _k4_scales(b: np.ndarray) -> np.ndarray:
    """The 48 packed bytes of Q4_Kx4 / Q5_Kx4 per group and super-block from rows ``b`` (ng, 4, nb, .)."""
    s, m = _k4_unpack_scales(b[..., 4:16])
    return _pack_6bit(np.concatenate([_per_sub(s), _per_row4(m)], axis=2))


def _pack_6bit(v: np.ndarray) -> np.ndarray:
    """(..., 64) values < 64 -> (..., 48) bytes: 32 B of low nibbles (value t and t + 32 in a byte),
    then 16 B of high 2-bit pairs (values t, t + 16, t + 32, t + 48 at bits 0, 2, 4, 6)."""
    lo = (v[..., :32] & 0xF) | ((v[..., 32:] & 0xF) << 4)
    h = v >> 4
    hi = h[..., 0:16] | (h[..., 16:32] << 2) | (h[..., 32:48] << 4) | (h[..., 48:64] << 6)
    return np.concatenate([lo, hi], axis=-1).astype(np.uint8)


def _unpack_6bit(p: np.ndarray) -> np.ndarray:
    lo, hi = p[..., :32], p[..., 32:48]
    v = np.concatenate([lo & 0xF, lo >> 4], axis=-1)
    h = np.concatenate([(hi >> (2 * t)) & 3 for t in range(4)], axis=-1)
    return v | (h << 4)


class Q4_Kx4(Layout4):
    """Per super-block: d[4], dmin[4] (fp16); the 4 rows' 8 scales and 8 mins (6 bits each, value
    t < 32 = scale of sub-block t // 4, row t % 4; value 32 + t = min in :func:`_per_row4`'s order) in 48 B
    (:func:`_pack_6bit`: two logic ops per 32 values to unpack); qs: 4 x 8 chunks of 16 B: chunk
    (c, i) = rows 0..3's qs[32c + 4i .. +3] (low nibbles: sub-block 2c, high: 2c + 1, as in
    block_q4_K). 576 B = 4 x 144: the bytes of the original rows."""

    name, act, qk, block_bytes, group_bytes, sums = "Q4_K", "q8_K", 256, 144, 8 + 8 + 48 + 512, "hilo32"

    def repack(self, w):
        b = _rows(w, 144)
        return _build(b, [(0, 0, 2), (0, 2, 4), (2, 0, 48), (1, 16, 144)], self.group_bytes, _k4_scales(b))

    def unpack(self, p):
        ng, nb, _ = p.shape

        def rows2(a):
            return a.reshape(ng, nb, 4, 2).transpose(0, 2, 1, 3)
        v = _unpack_6bit(p[..., 16:64])

        def rows8(a):
            return a.reshape(ng, nb, 8, 4).transpose(0, 3, 1, 2)
        sc = _k4_pack_scales(rows8(v[..., :32]), _from_row4(v[..., 32:]))
        return np.concatenate([rows2(p[..., 0:8]), rows2(p[..., 8:16]), sc, _unchunks(p[..., 64:], 128)],
                              axis=3).reshape(ng * 4, nb * 144)


class Q5_Kx4(Q4_Kx4):
    """Q4_Kx4 with the fifth bits: after the scales, qh: 8 chunks of 16 B, chunk i = rows 0..3's
    qh[4i .. 4i+3] (bit j of qh[l]: element 32j + l), then qs as in Q4_Kx4. 704 B = 4 x 176."""

    name, block_bytes, group_bytes = "Q5_K", 176, 8 + 8 + 48 + 128 + 512

    def repack(self, w):
        b = _rows(w, 176)
        return _build(b, [(0, 0, 2), (0, 2, 4), (2, 0, 48), (1, 16, 48), (1, 48, 176)], self.group_bytes,
                      _k4_scales(b))

    def unpack(self, p):
        ng, nb, _ = p.shape
        q4 = np.concatenate([p[..., :64], p[..., 192:]], axis=2)
        r = Q4_Kx4.unpack(self, q4).reshape(ng * 4, nb, 144)
        qh = _unchunks(p[..., 64:192], 32).reshape(ng * 4, nb, 32)
        return np.concatenate([r[..., :16], qh, r[..., 16:]], axis=2).reshape(ng * 4, nb * 176)


def _q6_values(b: np.ndarray) -> np.ndarray:
    """(..., 210) block_q6_K bytes -> (..., 256) unsigned 6-bit quants (value + 32)."""
    ql, qh = b[..., :128], b[..., 128:192]
    q = np.empty(b.shape[:-1] + (256,), np.uint8)
    for h in range(2):
        l0, l1, hh = ql[..., 64 * h:64 * h + 32], ql[..., 64 * h + 32:64 * h + 64], qh[..., 32 * h:32 * h + 32]
        o = 128 * h
        q[..., o:o + 32] = (l0 & 0xF) | ((hh & 3) << 4)
        q[..., o + 32:o + 64] = (l1 & 0xF) | (((hh >> 2) & 3) << 4)
        q[..., o + 64:o + 96] = (l0 >> 4) | (((hh >> 4) & 3) << 4)
        q[..., o + 96:o + 128] = (l1 >> 4) | (((hh >> 6) & 3) << 4)
    return q


def _q6_pack(q: np.ndarray) -> tuple:
    """Inverse of _q6_values: (..., 256) -> (ql (..., 128), qh (..., 64))."""
    ql = np.empty(q.shape[:-1] + (128,), np.uint8)
    qh = np.empty(q.shape[:-1] + (64,), np.uint8)
    for h in range(2):
        o = 128 * h
        a, b_, c, d = (q[..., o + 32 * t:o + 32 * t + 32] for t in range(4))
        ql[..., 64 * h:64 * h + 32] = (a & 0xF) | ((c & 0xF) << 4)
        ql[..., 64 * h + 32:64 * h + 64] = (b_ & 0xF) | ((d & 0xF) << 4)
        qh[..., 32 * h:32 * h + 32] = (a >> 4) | ((b_ >> 4) << 2) | ((c >> 4) << 4) | ((d >> 4) << 6)
    return ql, qh


class Q6_Kx4(Layout4):
    """Per super-block: d[4] (fp16), scales[16][4] (int8, group major), then the quants re-encoded
    (:func:`_q6_pack6`): 192 B per row in 48 chunks of 16 B, chunk 8j + i byte 4r + t = row r's byte
    32j + 4i + t (j < 6): element 32j + 4i + t - 32 as a 6-bit two's complement field at bits 2-7
    (``and`` 0xFC: 4 x the signed quant, one op; no dot product: ``sshr`` #2), and in bits 0-1 a third
    of element 192 + 32 (j // 3) + 4i + t (its bits 5-4, 3-2, 1-0 for j % 3 = 0, 1, 2: two shifts and
    ``sri`` inserts put them together). 840 B = 4 x 210."""

    name, act, qk, block_bytes, group_bytes = "Q6_K", "q8_K", 256, 210, 8 + 64 + 768

    def repack(self, w):
        b = _rows(w, 210)
        src = np.concatenate([_q6_pack6(_q6_values(b)), b[..., 208:210]], axis=-1)
        return _build(src, [(0, 192, 194), (2, 0, 64), (1, 0, 192)], self.group_bytes,
                      _per_sub(b[..., 192:208]))

    def unpack(self, p):
        ng, nb, _ = p.shape
        sc = p[..., 8:72].reshape(ng, nb, 16, 4).transpose(0, 3, 1, 2)
        oql, oqh = _q6_pack(_q6_unpack6(_unchunks(p[..., 72:], 192)))
        return np.concatenate([oql, oqh, sc, _rows2(p[..., 0:8])], axis=3).reshape(ng * 4, nb * 210)


def _q6_pack6(q: np.ndarray) -> np.ndarray:
    """(..., 256) unsigned 6-bit quants -> (..., 192) bytes of :class:`Q6_Kx4`."""
    f = (q ^ 32).astype(np.uint8)                       # q - 32 as 6-bit two's complement
    out = (f[..., :192] << 2).astype(np.uint8)
    for j in range(6):
        sp = f[..., 192 + 32 * (j // 3):224 + 32 * (j // 3)]
        out[..., 32 * j:32 * j + 32] |= (sp >> (4 - 2 * (j % 3))) & 3
    return out


def _q6_unpack6(v: np.ndarray) -> np.ndarray:
    q = np.empty(v.shape[:-1] + (256,), np.uint8)
    q[..., :192] = v >> 2
    for h in range(2):
        lo = [v[..., 32 * j:32 * j + 32] & 3 for j in range(3 * h, 3 * h + 3)]
        q[..., 192 + 32 * h:224 + 32 * h] = (lo[0] << 4) | (lo[1] << 2) | lo[2]
    return q ^ 32


def _nib_pack(v: np.ndarray) -> np.ndarray:
    """(..., 2m) values < 16 -> (..., m) bytes: byte t = value t | value t + m << 4."""
    m = v.shape[-1] // 2
    return ((v[..., :m] & 0xF) | ((v[..., m:] & 0xF) << 4)).astype(np.uint8)


def _nib_unpack(p: np.ndarray) -> np.ndarray:
    return np.concatenate([p & 0xF, p >> 4], axis=-1)


def _sub_rows(v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_per_sub`: (ng, nb, 4m) -> (ng, 4, nb, m)."""
    ng, nb, m4 = v.shape
    return v.reshape(ng, nb, m4 // 4, 4).transpose(0, 3, 1, 2)


def _rows2(p: np.ndarray) -> np.ndarray:
    """(ng, nb, 8) fp16 fields of rows 0..3 side by side -> (ng, 4, nb, 2) bytes."""
    ng, nb, _ = p.shape
    return p.reshape(ng, nb, 4, 2).transpose(0, 2, 1, 3)


class Q2_Kx4(Layout4):
    """Per super-block: d[4], dmin[4] (fp16); the 4 rows' 16 4-bit scales in :func:`_per_sub`'s order
    (value 4j + r = row r's scale of sub-block j) and their 16 4-bit mins in :func:`_per_row4`'s order (the
    weight operand of an sdot by lane with the activations' sums per 16), each 64 values in 32 B
    (:func:`_nib_pack`); qs: 2 x 8 chunks of 16 B, chunk (h, i) = rows 0..3's qs[32h + 4i .. +3] (bits 2j,
    2j + 1: sub-block 8h + 2j (i < 4) or 8h + 2j + 1, as in block_q2_K). The kernels take the quants as
    ``and`` 3 / 0x0C / 0x30 and ``ushr`` 6 (x 1, 4, 16, 1: no shift; the sums are brought to x 16 before
    the float conversion, ``scvtf #4``). 336 B = 4 x 84. Activations: sums per 16 as int8 s >> 6, s & 63
    (:func:`bsums16_hilo`)."""

    name, act, qk, block_bytes, group_bytes, sums = "Q2_K", "q8_K", 256, 84, 16 + 32 + 32 + 256, "hilo16"

    def repack(self, w):
        b = _rows(w, 84)
        sc = b[..., 0:16]
        extra = np.concatenate([_nib_pack(_per_sub(sc & 0xF)), _nib_pack(_per_row4(sc >> 4))], axis=-1)
        return _build(b, [(0, 80, 82), (0, 82, 84), (2, 0, 64), (1, 16, 80)], self.group_bytes, extra)

    def unpack(self, p):
        ng, nb, _ = p.shape
        sc = _sub_rows(_nib_unpack(p[..., 16:48]))
        mn = _from_row4(_nib_unpack(p[..., 48:80]))
        return np.concatenate([sc | (mn << 4), _unchunks(p[..., 80:], 64), _rows2(p[..., 0:8]), _rows2(p[..., 8:16])],
                              axis=3).reshape(ng * 4, nb * 84)


def _q3_scales(s: np.ndarray) -> np.ndarray:
    """(..., 12) block_q3_K.scales -> (..., 16) 6-bit scales as stored (scale + 32)."""
    j = np.arange(16)
    return ((s[..., j % 8] >> (4 * (j // 8))) & 0xF) | (((s[..., 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)


def _q3_pack_scales(v: np.ndarray) -> np.ndarray:
    out = np.zeros(v.shape[:-1] + (12,), np.uint8)
    for j in range(16):
        out[..., j % 8] |= ((v[..., j] & 0xF) << (4 * (j // 8))).astype(np.uint8)
        out[..., 8 + j % 4] |= ((v[..., j] >> 4) << (2 * (j // 4))).astype(np.uint8)
    return out


def _q3_abc(b: np.ndarray) -> np.ndarray:
    """(..., 110) block_q3_K bytes -> (..., 96): the 256 quants as 3-bit two's complement fields (q - 4,
    i.e. the 3-bit value q2 + 4 h with its high bit flipped) in three 32-byte arrays A, B, C. Element
    (n, j, l) (= 128n + 32j + l, 2-bit part at bits 2j of qs[32n + l], high bit = hmask[l] bit 4n + j)
    is s(n, j); byte l of A = s(0,0) | (s(1,2) & 3) << 3 | s(0,1) << 5, of B = s(0,2) | (s(1,3) & 3) << 3 |
    s(0,3) << 5, of C = s(1,0) | (s(1,2) >> 2) << 3 | (s(1,3) >> 2) << 4 | s(1,1) << 5: six fields are one
    ``shl`` #5 or ``and`` 0xE0 from 32 x their signed value, two are two shifts, two ands and an or."""
    hm, qs = b[..., 0:32].astype(np.uint8), b[..., 32:96].astype(np.uint8)
    s = {}
    for n in range(2):
        for j in range(4):
            u = ((qs[..., 32 * n:32 * n + 32] >> (2 * j)) & 3) | (((hm >> (4 * n + j)) & 1) << 2)
            s[n, j] = u ^ 4
    a = s[0, 0] | ((s[1, 2] & 3) << 3) | (s[0, 1] << 5)
    b_ = s[0, 2] | ((s[1, 3] & 3) << 3) | (s[0, 3] << 5)
    c = s[1, 0] | ((s[1, 2] >> 2) << 3) | ((s[1, 3] >> 2) << 4) | (s[1, 1] << 5)
    return np.concatenate([a, b_, c], axis=-1).astype(np.uint8)


def _q3_unabc(v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_q3_abc`: (..., 96) -> (..., 96) hmask + qs bytes."""
    a, b_, c = v[..., 0:32], v[..., 32:64], v[..., 64:96]
    s = {(0, 0): a & 7, (0, 1): a >> 5, (0, 2): b_ & 7, (0, 3): b_ >> 5, (1, 0): c & 7, (1, 1): c >> 5,
         (1, 2): ((a >> 3) & 3) | (((c >> 3) & 1) << 2), (1, 3): ((b_ >> 3) & 3) | (((c >> 4) & 1) << 2)}
    hm = np.zeros(a.shape, np.uint8)
    qs = np.zeros(a.shape[:-1] + (64,), np.uint8)
    for (n, j), sv in s.items():
        u = sv ^ 4
        qs[..., 32 * n:32 * n + 32] |= ((u & 3) << (2 * j)).astype(np.uint8)
        hm |= ((u >> 2) << (4 * n + j)).astype(np.uint8)
    return np.concatenate([hm, qs], axis=-1)


class Q3_Kx4(Layout4):
    """Per super-block: d[4] (fp16); the 4 rows' 16 6-bit scales (as stored, + 32) in :func:`_per_sub`'s
    order, 48 B (:func:`_pack_6bit`); the quants re-encoded as signed 3-bit fields (:func:`_q3_abc`), 96 B
    per row in 24 chunks of 16 B (chunk i = rows 0..3's bytes 4i .. 4i + 3; chunks 0-7 A, 8-15 B, 16-23
    C). The kernels take 32 x the quants (``shl`` #5 / ``and`` 0xE0: no -4, no sums of the activations)
    and convert with ``scvtf #5``. 440 B = 4 x 110."""

    name, act, qk, block_bytes, group_bytes = "Q3_K", "q8_K", 256, 110, 8 + 48 + 384

    def repack(self, w):
        b = _rows(w, 110)
        src = np.concatenate([_q3_abc(b), b[..., 108:110]], axis=-1)
        return _build(src, [(0, 96, 98), (2, 0, 48), (1, 0, 96)], self.group_bytes,
                      _pack_6bit(_per_sub(_q3_scales(b[..., 96:108]))))

    def unpack(self, p):
        ng, nb, _ = p.shape
        sc = _q3_pack_scales(_sub_rows(_unpack_6bit(p[..., 8:56])))
        return np.concatenate([_q3_unabc(_unchunks(p[..., 56:], 96)), sc, _rows2(p[..., 0:8])],
                              axis=3).reshape(ng * 4, nb * 110)


def _iq4xs_scales(b: np.ndarray) -> np.ndarray:
    """(..., 136) block_iq4_xs bytes -> (..., 8) 6-bit scales as stored (scale + 32)."""
    sh = b[..., 2].astype(np.uint16) | (b[..., 3].astype(np.uint16) << 8)
    ib = np.arange(8)
    lo = (b[..., 4 + ib // 2] >> (4 * (ib % 2))) & 0xF
    return (lo | (((sh[..., None] >> (2 * ib)) & 3) << 4)).astype(np.uint8)


def _pack_6bit32(v: np.ndarray) -> np.ndarray:
    """(..., 32) values < 64 -> (..., 24) bytes: 16 B of low nibbles (value t and t + 16 in a byte), then
    8 B of high 2-bit fields (values t, t + 8, t + 16, t + 24 at bits 0, 2, 4, 6)."""
    h = v >> 4
    hi = h[..., 0:8] | (h[..., 8:16] << 2) | (h[..., 16:24] << 4) | (h[..., 24:32] << 6)
    return np.concatenate([_nib_pack(v), hi], axis=-1).astype(np.uint8)


def _unpack_6bit32(p: np.ndarray) -> np.ndarray:
    hi = p[..., 16:24]
    h = np.concatenate([(hi >> (2 * t)) & 3 for t in range(4)], axis=-1)
    return _nib_unpack(p[..., :16]) | (h << 4)


class IQ4_XSx4(Layout4):
    """Per super-block: d[4] (fp16); the 4 rows' 8 6-bit scales (as stored, + 32) in :func:`_per_sub`'s
    order, 24 B (:func:`_pack_6bit32`); qs: 32 chunks of 16 B, chunk i = rows 0..3's qs[4i .. 4i + 3]
    (sub-block i // 4; low nibbles its elements 0-15, high 16-31), table indices as in IQ4_NLx4.
    544 B = 4 x 136."""

    name, act, qk, block_bytes, group_bytes = "IQ4_XS", "q8_K", 256, 136, 8 + 24 + 512

    def repack(self, w):
        b = _rows(w, 136)
        src = np.concatenate([b[..., 8:136], b[..., 0:2]], axis=-1)
        return _build(src, [(0, 128, 130), (2, 0, 24), (1, 0, 128)], self.group_bytes,
                      _pack_6bit32(_per_sub(_iq4xs_scales(b))))

    def unpack(self, p):
        ng, nb, _ = p.shape
        v = _sub_rows(_unpack_6bit32(p[..., 8:32])).astype(np.uint16)   # (ng, 4, nb, 8)
        ib = np.arange(8)
        sh = ((v >> 4) << (2 * ib)).sum(-1).astype("<u2")
        sl = (v[..., 0::2] & 0xF) | ((v[..., 1::2] & 0xF) << 4)
        sh8 = sh[..., None].view(np.uint8)
        return np.concatenate([_rows2(p[..., 0:8]), sh8, sl.astype(np.uint8), _unchunks(p[..., 32:], 128)],
                              axis=3).reshape(ng * 4, nb * 136)


LAYOUTS = {c.name: c() for c in (Q4_0x4, Q4_1x4, Q5_0x4, Q5_1x4, Q8_0x4, IQ4_NLx4, Q2_Kx4, Q3_Kx4, Q4_Kx4,
                                    Q5_Kx4, Q6_Kx4, IQ4_XSx4)}


def layout(type_name: str):
    """The aarch64 layout of a type, or None."""
    return LAYOUTS.get(type_name)


# ------------------------------------------------------------------ IR helpers
V16 = vec(I8, 16)
V4I = vec(I32, 4)


def _lane_bcast(e: Emitter, xv, i):
    """<16 x i8> with the 4 bytes of 32-bit lane i of xv in every lane (dup v.4s, x.s[i])."""
    w = e.b.bitcast(xv, V4I)
    return e.b.bitcast(e.shuffle(w, None, [i] * 4), V16)


def _sdot(e: Emitter, acc, a, bv):
    return _intrinsic_call(e.b, "llvm.aarch64.neon.sdot.v4i32.v16i8", V4I, [acc, a, bv])


def _pairsum(e: Emitter, v):
    """<8 x i16> -> <4 x i32> sums of adjacent pairs (saddlp)."""
    if simd.TARGET_ARCH == "aarch64":
        return _intrinsic_call(e.b, "llvm.aarch64.neon.saddlp.v4i32.v8i16", V4I, [v])
    t = vec(I32, 4)
    return e.b.add(e.b.sext(e.shuffle(v, None, [0, 2, 4, 6]), t), e.b.sext(e.shuffle(v, None, [1, 3, 5, 7]), t))


def _addp(e: Emitter, a, b_):
    """[a0+a1, a2+a3, b0+b1, b2+b3] (addp)."""
    if simd.TARGET_ARCH == "aarch64":
        return _intrinsic_call(e.b, "llvm.aarch64.neon.addp.v4i32", V4I, [a, b_])
    return e.b.add(e.shuffle(a, b_, [0, 2, 4, 6]), e.shuffle(a, b_, [1, 3, 5, 7]))


def dot4(e: Emitter, pieces, dotprod: bool, terms: int = 8):
    """sum over pieces (w <16 x i8>, x <16 x i8>, lane) of row r's 4-byte dot with x's lane: <4 x i32>.

    ``dotprod``: sdot by lane, two chains. Otherwise int16 products (smull / smull2) summed in int16
    ``terms`` at a time (the caller's bound: terms * max|w*x| < 2^15), then pairwise widened.
    """
    b = e.b
    if dotprod:
        acc = [ir.Constant(V4I, None)] * SDOT_CHAINS
        for t, (w, x, i) in enumerate(pieces):
            acc[t % SDOT_CHAINS] = _sdot(e, acc[t % SDOT_CHAINS], w, _lane_bcast(e, x, i))
        return functools.reduce(b.add, acc)
    v8 = vec(I16, 8)
    s = [None, None]
    a = [None, None]
    n = 0

    def flush():
        for h in range(2):
            p = _pairsum(e, a[h])
            s[h] = p if s[h] is None else b.add(s[h], p)
            a[h] = None

    for w, x, i in pieces:
        xb = _lane_bcast(e, x, i)
        for h in range(2):
            lo = list(range(8 * h, 8 * h + 8))
            p = b.mul(b.sext(e.shuffle(w, None, lo), v8), b.sext(e.shuffle(xb, None, lo), v8))
            a[h] = p if a[h] is None else b.add(a[h], p)
        n += 1
        if n == terms:
            flush()
            n = 0
    if n:
        flush()
    return _addp(e, s[0], s[1])


def _widen4(e: Emitter, v, signed: bool):
    """<n x i8> -> n/4 <4 x i32> vectors of its lanes 4j..4j+3, widened through i16 (ushll / ushll2,
    no shuffles): the per-row scales of a sub-block as one vector."""
    b = e.b
    ext = b.sext if signed else b.zext
    out = []
    for o in range(0, v.type.count, 8):
        h = ext(e.shuffle(v, None, range(o, o + 8)), vec(I16, 8))
        out += [ext(e.shuffle(h, None, range(t, t + 4)), V4I) for t in (0, 4)]
    return out


def _widen4_u(e: Emitter, v, dotprod: bool):
    """:func:`_widen4` of unsigned bytes; on dot-product cores (A76) one ``tbl`` per <4 x i32> (indices
    out of range give the zero bytes) instead of a ushll / ushll2 tree: 1 vector op per output, not 1.5
    (llvm-mca: Q4_K GEMV 26.3 -> 25.3 cycles). The A72's tbl is slower (Q4_K 45.9 -> 50.4): ushll there."""
    if simd.TARGET_ARCH != "aarch64" or not dotprod:
        return _widen4(e, v, False)
    out = []
    for o in range(0, v.type.count, 16):
        half = e.shuffle(v, None, range(o, o + 16))
        for q in range(4):
            idx = ir.Constant(V16, [4 * q + r // 4 if r % 4 == 0 else 255 for r in range(16)])
            t = _intrinsic_call(e.b, "llvm.aarch64.neon.tbl1.v16i8", V16, [half, idx])
            out.append(e.b.bitcast(t, V4I))
    return out


def _scales6(e: Emitter, lo, hi):
    """The 6-bit fields of a repacked group's scale bytes (Q4_K / Q5_K: scales and mins; Q3_K: its 16
    scales in two halves): lo <32 x i8> holds the low 4 bits of both halves (low and high nibbles), hi
    <16 x i8> bits 4-5, two per byte. Returns the two <32 x i8> halves."""
    b = e.b

    def hi2(sh):   # bits 2t, 2t + 1 of hi at bits 4, 5
        v = b.shl(hi, _cv(I8, 16, sh)) if sh > 0 else b.lshr(hi, _cv(I8, 16, -sh)) if sh else hi
        return b.and_(v, _cv(I8, 16, 0x30))
    return (b.or_(b.and_(lo, _cv(I8, 32, 0x0F)), e.concat(hi2(4), hi2(2))),
            b.or_(b.lshr(lo, _cv(I8, 32, 4)), e.concat(hi2(0), hi2(-2))))


def _sri(e: Emitter, d, n, s: int):
    """<16 x i8>: n >> s (logical) with the top s bits of d kept (``sri`` on aarch64)."""
    if simd.TARGET_ARCH == "aarch64":
        return _intrinsic_call(e.b, "llvm.aarch64.neon.vsri.v16i8", V16, [d, n, c32(s)])
    keep = _cv(I8, 16, (0xFF << (8 - s)) & 0xFF)
    return e.b.or_(e.b.and_(d, keep), e.b.lshr(n, _cv(I8, 16, s)))


def _to_float(e: Emitter, s, fbits: int = 0):
    """<4 x i32> -> <4 x float> s / 2^fbits (exact): a fixed-point ``scvtf #fbits`` on aarch64."""
    if fbits and simd.TARGET_ARCH == "aarch64":
        return _intrinsic_call(e.b, "llvm.aarch64.neon.vcvtfxs2fp.v4f32.v4i32", vec(F32, 4), [s, c32(fbits)])
    f = e.b.sitofp(s, vec(F32, 4))
    return e.b.fmul(f, _cv(F32, 4, 1.0 / (1 << fbits))) if fbits else f


def _f16x4(e: Emitter, bp, off):
    return e.b.fpext(e.load(bp, c64(off), vec(F16, 4)), vec(F32, 4))


def _cv(t, n, v):
    return ir.Constant(vec(t, n), [v] * n)


# ------------------------------------------------------------------ kernels
# GEMV blocks per loop iteration, (type, dotprod) -> 2 where llvm-mca finds it faster (Q8_0: A76
# 2.14 -> 1.94, A72 5.94 -> 5.34 cycles per block); Q4_K and the re-encoded Q6_K are slower unrolled
UNROLL = {("Q8_0", True): 2, ("Q8_0", False): 2}
# GEMM activation rows per kernel call, (type, dotprod) -> 8 where llvm-mca finds it cheaper than NC = 4
# (the weights' decoding shared by twice the rows; cycles per super-block, A76: Q6_K 21.1 -> 18.1, Q5_K
# 24.0 -> 21.0, Q3_K 21.8 -> 18.7, IQ4_XS 18.5 -> 16.9, Q2_K 22.6 -> 21.6; A72: Q5_K 47.6 -> 45.2, Q4_K
# 44.6 -> 43.3). Q4_0 on the A76: 10 rows, an Emitter.fence after each (without it LLVM hoists every row's
# loads and spills the float accumulators: 8 rows 2.04), 1.82 -> 1.63; Q8_0 is cheapest at 4.
GEMM_NC = {("Q6_K", True): 8, ("Q5_K", True): 8, ("Q3_K", True): 8, ("IQ4_XS", True): 8, ("Q2_K", True): 8,
           ("Q5_K", False): 8, ("Q4_K", False): 8, ("Q4_0", True): 10}


def unroll(type_name: str, nc: int, dotprod: bool) -> int:
    return UNROLL.get((type_name, dotprod), 1) if nc == 1 else 1


def gemm_nc(type_name: str, dotprod: bool) -> int:
    """Activation rows per GEMM kernel call (8 or 10 where GEMM_NC says; the drivers run the rest 4, then 1
    at a time)."""
    return GEMM_NC.get((type_name, dotprod), NC)


@lru_cache(maxsize=None)
def group_kernel(type_name: str, nc: int, dotprod: bool):
    """Intrinsic: one group of 4 weight rows x ``nc`` activation rows over all blocks.

    Signature (int64 addresses / sizes)::

        tile(wg, nb, xq, xq_stride, xd, xd_stride, xb, xb_stride, out, out_stride)

    ``wg`` the group's repacked blocks; ``xq`` int8 activations (q8_0 or q8_K), ``xd`` float32
    scales per block, ``xb`` the Q8_K sums (Q4_K / Q5_K: :func:`bsums_hilo`), the int32 sums of
    q per 32-block (Q5_0) or block_q8_1.s as float32 (Q4_1 / Q5_1); unused otherwise; writes
    out[c, 0..3] (``out`` = address of out[c0, r0]).
    """
    L = LAYOUTS[type_name]

    @intrinsic
    def tile(typingctx, wg, nb, xq, xq_stride, xd, xd_stride, xb, xb_stride, out, out_stride):
        sig = types.void(*([types.int64] * 10))

        def codegen(context, builder, signature, args):
            e = Emitter(builder)
            b = builder
            (wg_, nb_, xq_, xqs_, xd_, xds_, xb_, xbs_, out_, os_) = args
            wp, xqp, xdp, xbp, op = (b.inttoptr(a, P8) for a in (wg_, xq_, xd_, xb_, out_))
            xrow = [b.mul(xqs_, c64(c)) for c in range(nc)]
            drow = [b.mul(xds_, c64(c)) for c in range(nc)]
            brow = [b.mul(xbs_, c64(c)) for c in range(nc)]

            def body(i, accs):
                bp = e.ptr(wp, b.mul(i, c64(L.group_bytes)))
                xoff = b.mul(i, c64(L.qk))
                doff = b.mul(i, c64(4))

                def xvec(c, o):
                    return e.load(xqp, b.add(b.add(xrow[c], xoff), c64(o)), V16)

                dx = [e.load(xdp, b.add(drow[c], doff), F32) for c in range(nc)]
                new = []
                if type_name == "Q4_0":
                    dw = _f16x4(e, bp, 0)
                    vs = [e.load(bp, c64(8 + 16 * j), V16) for j in range(4)]
                    if dotprod:      # quants x 16, one logic op each
                        lo = [b.shl(v, _cv(I8, 16, 4)) for v in vs]
                        hi = [b.and_(v, _cv(I8, 16, 0xF0)) for v in vs]
                    else:            # signed nibbles -8..7
                        lo = [b.ashr(b.shl(v, _cv(I8, 16, 4)), _cv(I8, 16, 4)) for v in vs]
                        hi = [b.ashr(v, _cv(I8, 16, 4)) for v in vs]
                    for c in range(nc):
                        x0, x1 = xvec(c, 0), xvec(c, 16)
                        s = dot4(e, [(lo[j], x0, j) for j in range(4)] + [(hi[j], x1, j) for j in range(4)],
                                 dotprod, terms=8)
                        sf = _to_float(e, s, 4 if dotprod else 0)
                        new.append(e.fma(sf, e.fmul(dw, e.splat(dx[c], 4)), accs[c]))
                        if nc > NC and c < nc - 1:   # one row's loads and sums at a time (GEMM_NC: no spills)
                            e.fence(b.bitcast(new[-1], V4I))
                elif type_name in ("Q4_1", "Q5_0", "Q5_1"):   # unsigned 4/5-bit: 8 * 31 * 127 < 2^15
                    affine = type_name != "Q5_0"
                    q5 = type_name != "Q4_1"
                    dw = _f16x4(e, bp, 0)
                    mw = _f16x4(e, bp, 8) if affine else None
                    qo = 8 * (1 + affine) + 16 * q5
                    vs = [e.load(bp, c64(qo + 16 * j), V16) for j in range(4)]
                    lo = [b.and_(v, _cv(I8, 16, 0x0F)) for v in vs]
                    hi = [b.lshr(v, _cv(I8, 16, 4)) for v in vs]
                    if q5:       # bit 2j / 2j + 1 of the hbits -> bit 4 of chunk j's low / high quants
                        hb = e.load(bp, c64(qo - 16), V16)

                        def bit4(k):
                            v = hb if k == 4 else b.shl(hb, _cv(I8, 16, 4 - k)) if k < 4 else \
                                b.lshr(hb, _cv(I8, 16, k - 4))
                            return b.and_(v, _cv(I8, 16, 0x10))
                        lo = [b.or_(lo[j], bit4(2 * j)) for j in range(4)]
                        hi = [b.or_(hi[j], bit4(2 * j + 1)) for j in range(4)]
                    for c in range(nc):
                        x0, x1 = xvec(c, 0), xvec(c, 16)
                        s = dot4(e, [(lo[j], x0, j) for j in range(4)] + [(hi[j], x1, j) for j in range(4)],
                                 dotprod, terms=8)
                        xb_c = e.load(xbp, b.add(brow[c], doff), F32 if affine else I32)
                        if not affine:   # quants - 16: minus 16 * sum(q_x) (xb: the activations' block sums)
                            s = b.sub(s, e.splat(b.shl(xb_c, c32(4)), 4))
                        acc = e.fma(b.sitofp(s, vec(F32, 4)), e.fmul(dw, e.splat(dx[c], 4)), accs[c])
                        # Q4_1 / Q5_1: + m * block_q8_1.s (xb = the xs array)
                        new.append(e.fma(mw, e.splat(xb_c, 4), acc) if affine else acc)
                elif type_name == "IQ4_NL":
                    dw = _f16x4(e, bp, 0)
                    vs = [e.load(bp, c64(8 + 16 * j), V16) for j in range(4)]
                    tab = [int(v) for v in _iq4nl_values()]
                    lo = [simd.lookup16(e, b.and_(v, _cv(I8, 16, 0x0F)), tab) for v in vs]
                    hi = [simd.lookup16(e, b.lshr(v, _cv(I8, 16, 4)), tab) for v in vs]
                    for c in range(nc):
                        x0, x1 = xvec(c, 0), xvec(c, 16)
                        s = dot4(e, [(lo[j], x0, j) for j in range(4)] + [(hi[j], x1, j) for j in range(4)],
                                 dotprod, terms=2)
                        new.append(e.fma(b.sitofp(s, vec(F32, 4)), e.fmul(dw, e.splat(dx[c], 4)), accs[c]))
                elif type_name == "Q8_0":
                    dw = _f16x4(e, bp, 0)
                    vs = [e.load(bp, c64(8 + 16 * j), V16) for j in range(8)]
                    for c in range(nc):
                        xs = [xvec(c, 0), xvec(c, 16)]
                        s = dot4(e, [(vs[j], xs[j // 4], j % 4) for j in range(8)], dotprod, terms=2)
                        new.append(e.fma(b.sitofp(s, vec(F32, 4)), e.fmul(dw, e.splat(dx[c], 4)), accs[c]))
                elif type_name in ("Q4_K", "Q5_K"):
                    dw = _f16x4(e, bp, 0)
                    dm = _f16x4(e, bp, 8)
                    scv, mnv = _scales6(e, e.load(bp, c64(16), vec(I8, 32)), e.load(bp, c64(48), V16))
                    scj = _widen4_u(e, scv, dotprod)
                    mnh = [e.shuffle(mnv, None, range(16 * h, 16 * h + 16)) for h in range(2)]
                    q5 = type_name == "Q5_K"
                    qo = 192 if q5 else 64
                    qs = [[e.load(bp, c64(qo + 128 * cc + 16 * t), V16) for t in range(8)] for cc in range(4)]
                    subs = []
                    for cc in range(4):
                        subs.append([b.and_(v, _cv(I8, 16, 0x0F)) for v in qs[cc]])
                        subs.append([b.lshr(v, _cv(I8, 16, 4)) for v in qs[cc]])
                    if q5:       # bit j of the qh chunk -> bit 4 of sub-block j's quants
                        qh = [e.load(bp, c64(64 + 16 * t), V16) for t in range(8)]
                        for j in range(8):
                            for t in range(8):
                                h = qh[t]
                                h = b.shl(h, _cv(I8, 16, 4 - j)) if j < 4 else b.lshr(h, _cv(I8, 16, j - 4)) if j > 4 else h
                                subs[j][t] = b.or_(subs[j][t], b.and_(h, _cv(I8, 16, 0x10)))
                    for c in range(nc):
                        isum = None
                        for j in range(8):
                            xs = [xvec(c, 32 * j), xvec(c, 32 * j + 16)]
                            s = dot4(e, [(subs[j][t], xs[t // 4], t % 4) for t in range(8)], dotprod, terms=8)
                            p = b.mul(e.freeze(s), scj[j])
                            isum = p if isum is None else b.add(isum, p)
                        # sum_j min_j * bsum_j, bsum = 64 hi + lo (bsums_hilo: int8 hi
                        # of the 8 sums, then lo), as 4 dot products of the rows' mins with them
                        hl = e.load(xbp, b.add(brow[c], b.mul(i, c64(16))), V16)
                        chi = dot4(e, [(mnh[0], hl, 0), (mnh[1], hl, 1)], dotprod, terms=8)
                        clo = dot4(e, [(mnh[0], hl, 2), (mnh[1], hl, 3)], dotprod, terms=8)
                        corr = b.add(b.shl(chi, _cv(I32, 4, 6)), clo)
                        acc = e.fma(b.sitofp(isum, vec(F32, 4)), e.fmul(dw, e.splat(dx[c], 4)), accs[c])
                        new.append(b.fsub(acc, e.fmul(b.sitofp(corr, vec(F32, 4)), e.fmul(dm, e.splat(dx[c], 4))),
                                          flags=("contract",)))
                elif type_name == "Q6_K":
                    dw = _f16x4(e, bp, 0)
                    scg = _widen4(e, e.load(bp, c64(8), vec(I8, 64)), True)
                    P = [[e.load(bp, c64(72 + 128 * j + 16 * t), V16) for t in range(8)] for j in range(6)]
                    # dot product: 4 x the signed quants (and 0xFC); else the quants (sshr 2): int16 sums
                    subs = [[b.and_(v, _cv(I8, 16, 0xFC)) if dotprod else b.ashr(v, _cv(I8, 16, 2)) for v in P[j]]
                            for j in range(6)]
                    for h in range(2):      # elements 192 + 32h + ...: bits 0-1 of P[3h], P[3h + 1], P[3h + 2]
                        sub = []
                        for t in range(8):
                            v6 = b.shl(P[3 * h][t], _cv(I8, 16, 6))
                            v6 = _sri(e, v6, b.shl(P[3 * h + 1][t], _cv(I8, 16, 6)), 2)
                            v6 = _sri(e, v6, b.shl(P[3 * h + 2][t], _cv(I8, 16, 6)), 4)
                            sub.append(v6 if dotprod else b.ashr(v6, _cv(I8, 16, 2)))
                        subs.append(sub)
                    for c in range(nc):
                        isum = None
                        for j in range(8):
                            xs = [xvec(c, 32 * j), xvec(c, 32 * j + 16)]
                            for g in range(2):
                                s = dot4(e, [(subs[j][t], xs[g], t % 4) for t in range(4 * g, 4 * g + 4)],
                                         dotprod, terms=8)
                                p = b.mul(e.freeze(s), scg[2 * j + g])
                                isum = p if isum is None else b.add(isum, p)
                        new.append(e.fma(_to_float(e, isum, 2 if dotprod else 0), e.fmul(dw, e.splat(dx[c], 4)),
                                         accs[c]))
                elif type_name == "Q2_K":
                    dw = _f16x4(e, bp, 0)
                    dm = _f16x4(e, bp, 8)
                    scb = e.load(bp, c64(16), vec(I8, 32))
                    scj = _widen4_u(e, e.concat(b.and_(scb, _cv(I8, 32, 0x0F)), b.lshr(scb, _cv(I8, 32, 4))), dotprod)
                    mnb = [e.load(bp, c64(48 + 16 * h), V16) for h in range(2)]
                    mn = [b.and_(v, _cv(I8, 16, 0x0F)) for v in mnb] + [b.lshr(v, _cv(I8, 16, 4)) for v in mnb]
                    qs = [[e.load(bp, c64(80 + 128 * n_ + 16 * t), V16) for t in range(8)] for n_ in range(2)]
                    # bits 2j, 2j + 1 in place: x 1, 4, 16 (and), x 1 (ushr 6); sums brought to x 16 below
                    subs = {(n_, j): [b.lshr(v, _cv(I8, 16, 6)) if j == 3 else b.and_(v, _cv(I8, 16, 3 << (2 * j)))
                                      for v in qs[n_]] for n_ in range(2) for j in range(4)}
                    for c in range(nc):
                        part = [None, None, None]        # the sums x 1 (j = 0, 3), x 4 (j = 1), x 16 (j = 2)
                        for n_ in range(2):
                            for j in range(4):
                                g = (0, 1, 2, 0)[j]
                                for h in range(2):
                                    xv = xvec(c, 128 * n_ + 32 * j + 16 * h)
                                    s = dot4(e, [(subs[n_, j][4 * h + t], xv, t) for t in range(4)], dotprod, terms=4)
                                    p = b.mul(e.freeze(s), scj[8 * n_ + 2 * j + h])
                                    part[g] = p if part[g] is None else b.add(part[g], p)
                        two = _cv(I32, 4, 2)
                        isum = b.add(b.shl(b.add(b.shl(part[0], two), part[1]), two), part[2])
                        # sum_j min_j * bsum16_j, bsum = 64 hi + lo (bsums16_hilo: 16 hi, then 16 lo)
                        hl = [e.load(xbp, b.add(brow[c], b.add(b.mul(i, c64(32)), c64(16 * t))), V16) for t in range(2)]
                        chi = dot4(e, [(mn[h], hl[0], h) for h in range(4)], dotprod, terms=8)
                        clo = dot4(e, [(mn[h], hl[1], h) for h in range(4)], dotprod, terms=8)
                        corr = b.add(b.shl(chi, _cv(I32, 4, 6)), clo)
                        acc = e.fma(_to_float(e, isum, 4), e.fmul(dw, e.splat(dx[c], 4)), accs[c])
                        new.append(b.fsub(acc, e.fmul(b.sitofp(corr, vec(F32, 4)), e.fmul(dm, e.splat(dx[c], 4))),
                                          flags=("contract",)))
                elif type_name == "Q3_K":
                    dw = _f16x4(e, bp, 0)
                    sc6 = e.concat(*_scales6(e, e.load(bp, c64(8), vec(I8, 32)), e.load(bp, c64(40), V16)))
                    scj = _widen4(e, b.sub(sc6, _cv(I8, 64, 32)), True)
                    A, B, C = ([e.load(bp, c64(56 + 128 * a + 16 * t), V16) for t in range(8)] for a in range(3))

                    def m8(v, k):
                        return b.and_(v, _cv(I8, 16, k))

                    def sh8(v, k):
                        return b.shl(v, _cv(I8, 16, k))
                    # 32 x the signed quants (_q3_abc)
                    q = {(0, 0): [sh8(v, 5) for v in A], (0, 1): [m8(v, 0xE0) for v in A],
                         (0, 2): [sh8(v, 5) for v in B], (0, 3): [m8(v, 0xE0) for v in B],
                         (1, 0): [sh8(v, 5) for v in C], (1, 1): [m8(v, 0xE0) for v in C],
                         (1, 2): [b.or_(m8(sh8(cv, 4), 0x80), m8(sh8(av, 2), 0x60)) for av, cv in zip(A, C)],
                         (1, 3): [b.or_(m8(sh8(cv, 3), 0x80), m8(sh8(bv, 2), 0x60)) for bv, cv in zip(B, C)]}
                    for c in range(nc):
                        isum = None
                        for n_ in range(2):
                            for j in range(4):
                                for h in range(2):
                                    xv = xvec(c, 128 * n_ + 32 * j + 16 * h)
                                    s = dot4(e, [(q[n_, j][4 * h + t], xv, t) for t in range(4)], dotprod, terms=2)
                                    p = b.mul(e.freeze(s), scj[8 * n_ + 2 * j + h])
                                    isum = p if isum is None else b.add(isum, p)
                        new.append(e.fma(_to_float(e, isum, 5), e.fmul(dw, e.splat(dx[c], 4)), accs[c]))
                elif type_name == "IQ4_XS":
                    dw = _f16x4(e, bp, 0)
                    lo = e.load(bp, c64(8), V16)
                    h8 = e.load(bp, c64(24), vec(I8, 8))
                    hc = e.concat(h8, b.lshr(h8, _cv(I8, 8, 2)))     # byte t: bits 0-1 value t, bits 4-5 t + 16
                    sc6 = e.concat(b.or_(b.and_(lo, _cv(I8, 16, 0x0F)), b.and_(b.shl(hc, _cv(I8, 16, 4)), _cv(I8, 16, 0x30))),
                                   b.or_(b.lshr(lo, _cv(I8, 16, 4)), b.and_(hc, _cv(I8, 16, 0x30))))
                    scj = _widen4(e, b.sub(sc6, _cv(I8, 32, 32)), True)
                    vs = [e.load(bp, c64(32 + 16 * t), V16) for t in range(32)]
                    tab = [int(v) for v in _iq4nl_values()]
                    lo4 = [simd.lookup16(e, b.and_(v, _cv(I8, 16, 0x0F)), tab) for v in vs]
                    hi4 = [simd.lookup16(e, b.lshr(v, _cv(I8, 16, 4)), tab) for v in vs]
                    for c in range(nc):
                        isum = None
                        for j in range(8):
                            x0, x1 = xvec(c, 32 * j), xvec(c, 32 * j + 16)
                            s = dot4(e, [(lo4[4 * j + t], x0, t) for t in range(4)] +
                                     [(hi4[4 * j + t], x1, t) for t in range(4)], dotprod, terms=2)
                            p = b.mul(e.freeze(s), scj[j])
                            isum = p if isum is None else b.add(isum, p)
                        new.append(e.fma(b.sitofp(isum, vec(F32, 4)), e.fmul(dw, e.splat(dx[c], 4)), accs[c]))
                return new

            accs = [ir.Constant(vec(F32, 4), None)] * nc
            u = unroll(type_name, nc, dotprod)
            if u > 1:        # u blocks per iteration, then the nb % u left one at a time
                nmain = b.and_(nb_, c64(-u))

                def body_u(i, a):
                    for t in range(u):
                        a = body(b.add(i, c64(t)), a)
                    return a
                accs = counted_loop(b, nmain, accs, body_u, step=u)
                accs = counted_loop(b, b.sub(nb_, nmain), accs, lambda i, a: body(b.add(i, nmain), a))
            else:
                accs = counted_loop(b, nb_, accs, body)
            for c in range(nc):
                e.store(accs[c], op, b.mul(os_, c64(c)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    tile.kernel_name = f"arm4_{type_name}_x{nc}_d{int(dotprod)}_a{int(simd.TARGET_ARCH == 'aarch64')}_{_HASH}"
    return tile


# ------------------------------------------------------------------ activation prep
@nb.njit(cache=True, nogil=True)
def bsums_hilo(xb, out):
    """Q8_K sums per 32 (n, k/32) int32 -> (n, k/256 * 16) int8: per super-block the 8 sums' high parts
    s >> 6 (-64..63), then their low parts s & 63 (0..63); s = 64 hi + lo (|s| <= 32 * 127). The Q4_K /
    Q5_K kernels' activation sums (matmul.py's arm driver)."""
    n, m = xb.shape
    for i in range(n):
        for sb in range(m // 8):
            for j in range(8):
                v = xb[i, 8 * sb + j]
                out[i, 16 * sb + j] = v >> 6
                out[i, 16 * sb + 8 + j] = v & 63


@nb.njit(cache=True, nogil=True)
def bsums16_hilo(xq, out):
    """Q8_K quants (n, k) int8 -> (n, k/256 * 32) int8: per super-block the 16 sums per 16 quants' high
    parts s >> 6 (-32..31), then their low parts s & 63; s = 64 hi + lo (|s| <= 16 * 127). The Q2_K
    kernels' activation sums (the mins term as sdot by lane)."""
    n, k = xq.shape
    for i in range(n):
        for sb in range(k // 256):
            for j in range(16):
                v = np.int32(0)
                for t in range(16):
                    v += np.int32(xq[i, 256 * sb + 16 * j + t])
                out[i, 32 * sb + j] = v >> 6
                out[i, 32 * sb + 16 + j] = v & 63


def _iq4nl_values():
    return KVALUES_IQ4NL


def mca_kernel(type_name: str, kind: str, dotprod: bool):
    """(label, intrinsic, nargs, row-blocks x activation rows per loop iteration) of the kernel the
    drivers run for ``kind`` (gemv: n == 1, gemm: n > 1), for benchmarks/arm_mca.py; None when the
    type has no aarch64 layout."""
    if type_name not in LAYOUTS:
        return None
    n = 1 if kind == "gemv" else gemm_nc(type_name, dotprod)
    u = unroll(type_name, n, dotprod)
    return (f"arm 4x{n}{f'u{u}' if u > 1 else ''} {'sdot' if dotprod else 'smull'}",
            group_kernel(type_name, n, dotprod), 10, ROWS * n * u)
