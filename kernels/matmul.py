"""Quantized matrix multiply: y = x @ W.T with llama.cpp's activation quantization.

API::

    pw = prepare(w_raw, ggml_type, k)   # w_raw: uint8 (rows, row_bytes), a view of the GGUF data
    y = matmul(pw, x, out=None)         # x: float32 (n, k) -> float32 (n, rows)

Semantics follow ggml's ``vec_dot_type``: the activations are quantized once
per call to the type the weight's dot product wants, and the inner loop is
an integer dot product:

=========  ==================  ==============================================
weights    activations         per 32-block
=========  ==================  ==============================================
Q4_0 Q5_0  Q8_0 (d fp16, i8)   d_w * d_x * sum(q_w * q_x)
Q8_0
Q4_1 Q5_1  Q8_1 (d, s fp16)    d_w * d_x * sum(q_w * q_x) + m_w * s_x
Q4_K Q6_K  Q8_K (d f32, i8,    d_w*d_x * sum_j sc_j * sum(q_w * q_x) over 256
           sums per 32)        (- dmin_w*d_x * sum_j m_j * sum_32(q_x), Q4_K)
F16        f16 (rounded)       f32 sum of f16 x f16 products
BF16       bf16 (rounded)      f32 sum of bf16 x bf16 products
F32        f32                 f32 sum
=========  ==================  ==============================================

Activation quantization is ggml's x86 (AVX2/AVX-512) and ARM NEON one, which
the reference llama.cpp builds run: ``d = amax/127`` stored as fp16,
``q = round(x * (127/amax))`` with ties to even, and for Q8_1
``s = fp16(d * sum(q))``; Q8_K is ggml's reference quantize_row_q8_K (which
x86 builds use): ``iscale = -127/max``, ``d = 1/iscale`` kept in float32.

Kernels (LLVM-IR intrinsics from ``simd.py``):

* **row-interleaved** (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; on x86-64): ``prepare``
  repacks the weight once into groups of 16 rows whose blocks are stored
  together. Same size as the original, so RSS grows by that tensor's bytes
  while the mmapped original also stays resident (a loader may drop those
  pages: only rows % 16 leftovers are read from it); ~1 GB/s per core to
  build. A kernel call yields 16 outputs as the lanes of one vector, with no
  horizontal sums (int16 pair products, ``vpdpwssd``; with AVX-512 VNNI two
  pairs joined into u8 x s8 quads, ``vpdpbusd``, int8 activations:
  ``simd.interleaved_quads_kernel``, ``KernelConfig.packed_quads``, the same
  floats at twice the products an instruction), and reads the matrix as
  one sequential stream. 1 thread, Zen 4: 23-31 GB/s for n = 1 (the read
  roofline is 25-29), 80-95 G int8 MAC/s for n = 512 (pairs).
* **K-quant row-interleaved** (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS; x86-64, every n: n = 1 too
  since ``KernelConfig.gemv_x16``, 1.8x the kgemv kernel's GB/s for Q4_K / Q2_K on the Xeon VM):
  ``prepare`` repacks groups of 16 rows per super-block
  (``simd.KInterleaved``: unpacked scales, unsigned quants in 64-byte quad chunks, one
  int32 lane per row) for ``simd.kinterleaved_kernel``: ``vpdpbusd`` of 4 unsigned weights x 4
  broadcast int8 activations (``Emitter.dot_quads``; without AVX-512 VNNI ``vpmaddubsw`` +
  ``vpmaddwd``), times the group scales in int32, mins / offsets through the activation sums:
  ggml's integers exactly. Copies of 1.0x (Q2_K, Q4_K, IQ4_XS), 1.3x (Q3_K, Q6_K), 1.6x (Q5_K: its
  5-bit values as bytes) the file's bytes; the originals' pages are released (kept only under
  ``gemv_x16=False``, where n = 1 runs the kgemv kernels on them).
* **native** (every type, zero-copy): tiles of NR weight rows x NC activation
  rows over the original block layout; per block an int32 vector converted
  to float and fused-multiply-added with the block's scale. One row at a
  time for n = 1, 4 x 4 tiles for n > 1. The only kernels on aarch64, where
  they use ``sdot`` (cortex-a76); K-quants (Q4_K, Q6_K with Q8_K
  activations) are native everywhere.
* **float FMA tiles** (F16, BF16, F32, every n; ``KernelConfig.float_fma``):
  ``simd.ftile_kernel``, one weight row x up to 8 activation rows, each weight block decoded once
  and fused-multiply-added into two accumulators per output (one summation order for every n:
  batch invariant), the weight rows read as one software-prefetched stream. The native tiles
  (4 x 4, multiply + fold + add per 32 products) decoded F16 blocks again per 4 activation rows:
  a 9-row F16 pass (speculative decoding's check of 8 guesses) cost 2.3 one-row passes on this
  x86 VM, 1.8 now; 2 and 4 rows 1.4 / 1.8 -> 1.1 / 1.15 (benchmarks/RESULTS.md, "Speculative decoding").
* **K-quant single row** (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, n = 1, x86-64, a weight with no x16 copy
  (``repack=False``, < 16 rows) or ``gemv_x16=False``; ``KGEMV``):
  ``simd.kgemv_kernel``, 64 elements per vector: unsigned quants x int8
  activations as int16 pair sums (``vpmaddubsw``), x int16 sub-block scales
  (``vpmaddwd``/``vpdpwssd``), one <16 x i32> per super-block; Q4_K mins and
  the Q6_K -32 through activation sums. Zero-copy; the driver permutes the
  Q4_K activations' sub-blocks (``permute_q4k``) and gives Q6_K int16 sums
  per 16 (``bsums16``). Zen 4, 1 thread from DRAM: Q4_K 16 GB/s, Q6_K 20
  (the generic tile kernel: 7 and 9). Loop: 55 / 52 instructions per
  super-block (144 / 210 bytes). Q2_K / Q3_K: the 2-bit fields of all 64 qs
  bytes per shift as one vector (Q3_K: + the hmask bit as bit 2, the -4 through
  int16 sums per 16; Q2_K: mins through them); activations read as two 32-byte
  halves, no permutation. 23 GB/s each (generic: 16 / 14).

One jitted driver per (type, kernel kind, compile-time choices, serial|parallel) quantizes x and
walks the tiles in a single call, rows split across threads with ``prange``
when the matrix is big enough (``KernelConfig.parallel_min_bytes``). The drivers are ordinary
closures (``_make_native``, ``_make_knative``, ``_make_packed``, ``_make_kpacked``, ``_make_arm``)
whose cells hold the compile-time constants and the kernels' spec strings (kernels/dispatch.py):
no source text is generated. A call costs ~2.5 us on a tiny matrix (1.3 us of it the Python
wrapper, ~0.5 us numba's dispatch). Measurements and their commands: benchmarks/bench_kernels.py.
``KernelConfig.batch_invariant`` makes every row's result independent of n and of the thread split.
Adding a type = a registry row in quants.py with its ``WeightFormat`` / ``KFormat`` decoder from
simd.py (docs/DESIGN-NOTES.md, "How to add a format").
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import mmap
import platform
import types
from dataclasses import dataclass, field, replace

import numba as nb
import numpy as np
from numba import prange

from ..ggml_types import GGMLType as GT
from . import arm, parallel as _par, quants, simd
from .dispatch import call, spec
from .simd import GROUP

QK = 32  # elements per block of the legacy formats

_X86 = platform.machine().lower() in ("x86_64", "amd64")


@dataclass(frozen=True)
class KernelConfig:
    """The matmul kernels' runtime knobs, in one object: given to :func:`prepare` (default
    :data:`DEFAULT_CONFIG`), kept with the weight, read by :func:`matmul`. Experiments build
    their own (benchmarks/bench_kernels.py); nothing here reads the environment. A model gets one
    through ``Llama(..., kernel_config=...)`` / ``Engine(..., kernel_config=...)`` (:func:`using_config`)."""

    # row-interleaved copies (simd.Interleaved) of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL, Q2_K..Q6_K, IQ4_XS weights
    # of >= 16 rows, built at prepare(). On by default on x86-64 only: their int16 pair
    # products map to vpmaddwd/vpdpwssd there, but on NEON they compile to smull + uzp
    # shuffles with register spills (5-10x the instructions of the native sdot kernels;
    # benchmarks/bench_kernels.py --arm-asm).
    repack: bool = _X86
    # K-quant single-row kernels through u8 x s8 pair products (simd.kgemv_kernel, x86
    # vpmaddubsw) where a format has one; elsewhere (aarch64: sdot) the generic ktile_kernel
    kgemv: bool = not simd.PARTIAL_REDUCE
    # n == 1 of a K-quant weight that has an x16 copy runs the x16 groups (simd.kinterleaved_kernel with
    # one activation row: the GEMM's kernel and float order, so batch invariant; 16 rows in flight, one
    # read stream), and the original rows are released after repacking. False: the kgemv kernel on the
    # original rows (the default before 2026-12-07; the originals then stay resident). Xeon VM, 1 thread,
    # from DRAM (benchmarks/bench_kernels.py --n 1): Q4_K 5.6-5.8 -> 10.3-10.4 GB/s, Q2_K 4.3-4.6 -> 8.1-8.4,
    # Q3_K 5.0 -> 6.8, Q5_K 5.1 -> 7.8, Q6_K 8.0-8.1 -> 8.3-9.8 (benchmarks/RESULTS.md, issue 20)
    gemv_x16: bool = True
    # below this much work (weight bytes x max(1, n/2)) a call runs on one thread: the
    # parallel region's launch costs more than it saves on small matrices. 1 MiB (weight bytes x
    # n/4) left most matrices of a 135M-0.5B model serial: at -t 2 on the Xeon VM, 256 KiB and n/2
    # give SmolLM2 Q4_0 tg32 100 -> 170 t/s, pp128 567 -> 906; Qwen2.5-0.5B Q4_K_M tg32 30 -> 40.5
    parallel_min_bytes: int = 1 << 18
    packed_nc: int = 4        # activation rows per repacked tile
    packed_chains: int = 4    # independent int32 sums per repacked tile (legacy formats)
    # the x16 legacy groups through u8 x s8 quads (simd.interleaved_quads_kernel: vpdpbusd, int8
    # activations) where the target has AVX-512 VNNI and the format a byte form (Q4_0, Q4_1, Q5_0,
    # Q5_1, Q8_0, IQ4_NL); False: int16 pairs (vpdpwssd). The same floats either way. Xeon VM, 1
    # thread, 3072 x 576 in cache, n = 1 / 4 / 8: Q4_0 1.19 / 1.96 / 1.84x, Q8_0 1.10 / 1.72 / 1.78x;
    # TinyLlama 1.1B pp512 Q4_0 1.79x, Q8_0 1.83x (benchmarks/RESULTS.md, issue 26)
    packed_quads: bool = True
    # software prefetch distance (bytes ahead in each weight row; 0 = off) of the native tiles: an
    # experiment for multi-row native tiles, whose several concurrent streams the hardware prefetchers
    # follow poorly; it did not help on Zen 4 (single-row tiles do), so it is off
    prefetch: int = 0
    # software prefetch distance (bytes ahead in a group; 0 = off) of the x16 groups, legacy and K: one
    # prefetch per cache line, in a group's first tile of a call only (a GEMM's later tiles find the
    # group in cache). A decode pass of several rows does more arithmetic per weight byte than one row,
    # and fewer bytes are in flight from the out-of-order window alone: memory and arithmetic stopped
    # overlapping. Xeon VM (2 vCPU, machine shared), 1 thread, every matmul of a pass from memory
    # (benchmarks/bench_decode_gemm.py, batch invariant), ms for n = 1 / 4 / 8 rows, quads kernel:
    # SmolLM2 Q4_0 0: 9.5 / 11.3 / 15.0, 1024: 8.3 / 10.7 / 12.8, 2048: 8.5 / 10.4 / 12.0, 4096: 8.5 /
    # 10.0 / 12.1; Qwen2.5-Coder-0.5B Q4_K_M (Q8_0, Q5_0, Q4_K, Q6_K) 0: 36.3 / 46.3 / 67.0, 1024: 31.2 /
    # 38.3 / 55.5, 2048: 29.2 / 36.9 / 51.4, 4096: 30.2 / 37.6 / 52.1 (benchmarks/RESULTS.md, issue 26).
    # Not used on aarch64 (no x16 groups there by default).
    prefetch_packed: int = 2048
    tilings: tuple = ()       # ((type name, "gemv" | "gemm", Tiling), ...): native tile overrides
    # batch invariance: a weight row x an activation row gives bit-identical floats whatever the number
    # of activation rows (GEMV or any GEMM) and threads. Every row then runs one kernel family for every
    # n, summing its blocks in one order: the native GEMV takes the GEMM tiling's accumulators (no
    # unroll 2), K-quants no x86 kgemv kernel (n == 1 runs the GEMM's tiles: ktile, or the x16 groups).
    # Off by default: it costs the x86 K-quant GEMV its kgemv speed (benchmarks, docs/DESIGN-NOTES.md).
    # The x16 legacy groups and the aarch64 4-row groups are invariant either way.
    batch_invariant: bool = False
    # aarch64 4-row interleaved copies (kernels/arm.py: sdot by lane / smull + smlal) of the types
    # that have one, for matrices whose row count is a multiple of 4; taken before ``repack``
    arm: bool = arm.ENABLED
    # float weights (F16 / BF16 / F32) through the fused multiply-add tiles (_make_ffma,
    # simd.ftile_kernel: a weight block decoded once per 8 activation rows, 32 / lanes FMAs per block
    # and row, one summation order for every n); False: the native tiles (multiply, fold, add)
    float_fma: bool = True
    # software prefetch distance of those tiles (bytes ahead in the weight rows, which they read as
    # one stream; 0 = off): F16 49152 x 576 from DRAM, 1 thread, this x86 VM (shared): n = 1 / 2 /
    # 4 / 9 rows 3.6-3.9 / 3.5-3.8 / 5.1-5.3 / 7.1-7.6 ms at 2-8 KiB ahead, 4.7 / 5.4 / 7.4 / 10.0
    # without (the native tiles: 4.6 / 7.0 / 10.1 / 11.4); not measured on aarch64
    prefetch_float: int = 4096
    # a GEMM of more activation rows than fit this many bytes (as the kernels read them: int16 quants of
    # the x16 legacy layouts, int8 of the K-quant and aarch64 ones, float32 of the float tiles) runs as
    # several driver calls of that many rows (a multiple of GEMM_ROWS_STEP, at least one step; the last
    # call takes the rest, up to 1.5 chunks; a call of up to 1.5 chunks stays whole): every weight group
    # walks all the activation rows of a call, which then stay in the core's L2 instead of streaming from
    # L3 once per group. 1.1B TinyLlama Q4_0 on the Xeon VM (2 MiB L2 a core), n = 512, 1 thread, CPU time:
    # ffn_down (2048 x 5632) 98-107 ms in one call, 92-95 chunked; ffn_up 96-97 -> 87-91 (K-quants, int8:
    # within the noise, 0.97-1.03x; 2 threads: within the noise). A row's result does not change (the
    # chunks are whole multiples of every tile's activation count). 0: one call.
    gemm_chunk_bytes: int = 1 << 20

    def kgemv_on_rows(self, info) -> bool:
        """Whether n == 1 of a K-quant weight with an x16 copy runs the kgemv kernel on its original rows."""
        return self.kgemv and not self.gemv_x16 and not self.batch_invariant and info.has_gemv

    def tiling(self, info, kind: str):
        if kind == "gemv" and self.batch_invariant:
            m = self.tiling(info, "gemm")        # one row at a time, the GEMM's per-output order
            return Tiling(1, 1, m.unroll, m.act16, m.wide)
        for name, k, t in self.tilings:
            if name == info.name and k == kind:
                return t
        return info.gemv if kind == "gemv" else info.gemm


DEFAULT_CONFIG = KernelConfig()
_SCOPED = contextvars.ContextVar("tinyinfer_kernel_config", default=None)


def current_config() -> KernelConfig:
    """The config :func:`prepare` uses when given none: the innermost :func:`using_config`'s, else
    :data:`DEFAULT_CONFIG`."""
    return _SCOPED.get() or DEFAULT_CONFIG


@contextlib.contextmanager
def using_config(config: KernelConfig | None):
    """Within the block (this thread / context), :func:`prepare` without a ``config`` takes ``config``
    (None: no change). How ``Engine(..., kernel_config=...)`` reaches every weight a model loads."""
    if config is None:
        yield
        return
    if not isinstance(config, KernelConfig):
        raise TypeError(f"kernel_config must be a tinyinfer.kernels.matmul.KernelConfig, got {type(config).__name__}")
    token = _SCOPED.set(config)
    try:
        yield
    finally:
        _SCOPED.reset(token)


_NOPY = dict(cache=True, nogil=True, fastmath=False)


@nb.njit(**_NOPY)
def _keep_alive(*arrays):
    """A use of arrays whose raw pointers the kernels read. Numba frees a local array right
    after its last use by name; the drivers below pass raw addresses to the kernels, so
    without this call the activation buffers would be freed before the kernels read them
    (and reused by another thread's allocation: garbage results under concurrency)."""
    return len(arrays)


def _njit(fn, parallel: bool):
    """A driver closure (or a row-parallel helper) jitted serial or parallel. numba's on-disk cache keys a
    function by its qualified name, its code and its cells, not by its flags: the two builds of one
    factory's closure would share an entry, and whichever compiled first was loaded for both (a "serial"
    call then ran the parallel code outside kernels/parallel.call's lock: workqueue aborts on concurrent
    access; a "parallel" one ran on one thread). The parallel build is a copy of the function with a name
    of its own."""
    if parallel:
        fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        fn.__qualname__ += "__parallel"
    return nb.njit(parallel=parallel, **_NOPY)(fn)


# ------------------------------------------------------ activation quantizers
# Functions that call simd/arm intrinsics are closures made by factories, the intrinsics named by
# spec strings in their cells (kernels/dispatch.py): numba's cache keys them by those cells.
def _make_quantize_q8(parallel: bool = False):
    Q16S, Q16 = spec("quant_row", True, True), spec("quant_row", True, False)
    Q8S, Q8 = spec("quant_row", False, True), spec("quant_row", False, False)

    def quantize_q8(x, xq, xd, xs, xsum, with_s, sum_mul):
        """ggml quantize_row_q8_0 / q8_1 (their x86 AVX and ARM NEON flavour) over each row of x (n, k).

        x must have C-contiguous rows. xq (n, k) int8 or int16 quants, xd (n, k/32)
        float32 fp16-rounded scales: d = amax/127, q = round_half_even(x * (127/amax));
        xsum (n, k/32) int32 = sum_mul * sum(q) per block (the Q4_0 kernels' -8
        offset correction); if with_s, xs (n, k/32) = fp16(d * sum(q)) (block_q8_1.s).
        """
        n, k = x.shape
        nb_ = k // 32
        xp = np.int64(x.ctypes.data)
        qp = np.int64(xq.ctypes.data)
        dp = np.int64(xd.ctypes.data)
        sp = np.int64(xs.ctypes.data)
        cp = np.int64(xsum.ctypes.data)
        for i in prange(n):
            a0, a2 = xp + i * x.strides[0], qp + i * xq.strides[0]
            a3, a4, a5 = dp + i * xd.strides[0], sp + i * xs.strides[0], cp + i * xsum.strides[0]
            if xq.itemsize == 2:
                if with_s:
                    call(Q16S, a0, nb_, a2, a3, a4, a5, sum_mul)
                else:
                    call(Q16, a0, nb_, a2, a3, a4, a5, sum_mul)
            else:
                if with_s:
                    call(Q8S, a0, nb_, a2, a3, a4, a5, sum_mul)
                else:
                    call(Q8, a0, nb_, a2, a3, a4, a5, sum_mul)

    return _njit(quantize_q8, parallel)


quantize_q8 = _make_quantize_q8()
quantize_q8_par = _make_quantize_q8(True)     # rows across threads (the prompt's GEMMs' parallel drivers)


def _make_round_f16():
    F16 = spec("f16_round")

    def round_f16(x, out):
        """out = float32(float16(x)) (ties to even), as ggml converts activations for F16 weights."""
        n, k = x.shape
        for i in range(n):
            for j in range(k):
                out[i, j] = call(F16, x[i, j])

    return nb.njit(**_NOPY)(round_f16)


round_f16 = _make_round_f16()


@nb.njit(**_NOPY)
def round_bf16(x, out):
    """out = float32(bfloat16(x)): ggml_compute_fp32_to_bf16 (ties to even, NaN kept quiet)."""
    n, k = x.shape
    xi = x.reshape(n * k).view(np.uint32)
    oi = out.reshape(n * k).view(np.uint32)
    for t in range(n * k):
        u = xi[t]
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            oi[t] = (u | np.uint32(0x00400000)) & np.uint32(0xFFFF0000)  # quiet NaN
        else:
            oi[t] = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)


def _quantize_q8_K(x, xq, xd, xb):
    """ggml quantize_row_q8_K (the reference one, which x86 builds use) over each row of x (n, k).

    Per 256: max = the x of largest |x| (first one), iscale = -127/max,
    q = min(127, round_half_even(iscale * x)) int8 into xq (n, k),
    d = 1/iscale (float32, not rounded to fp16) into xd (n, k/256), and the
    sums of q per 32 into xb (n, k/32) int32 (block_q8_K.bsums, in pairs).
    """
    n, k = x.shape
    for i in prange(n):
        for b in range(k // 256):
            o = b * 256
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(256):
                a = abs(x[i, o + j])
                if a > amax:
                    amax = a
                    mx = x[i, o + j]
            if amax == 0:
                xd[i, b] = 0
                for j in range(256):
                    xq[i, o + j] = 0
                for g in range(8):
                    xb[i, b * 8 + g] = 0
                continue
            iscale = np.float32(-127.0) / mx
            for g in range(8):
                sm = 0
                for j in range(o + 32 * g, o + 32 * g + 32):
                    v = min(127, np.int32(np.rint(iscale * x[i, j])))
                    xq[i, j] = v
                    sm += v
                xb[i, b * 8 + g] = sm
            xd[i, b] = np.float32(1.0) / iscale


def _bsums16(xq, out):
    """out (n, k/16) int16 = sums of the int8 quants xq (n, k) per 16 (ggml's block_q8_K.bsums)."""
    n, k = xq.shape
    for i in prange(n):
        for g in range(k // 16):
            s = 0
            for j in range(16 * g, 16 * g + 16):
                s += xq[i, j]
            out[i, g] = s


# serial builds, and parallel ones (rows across threads: a row's numbers are the same) for the drivers'
# parallel builds. Quantizing a prompt's activations ran on one thread while the GEMM ran on all: Q8_K of
# 512 x 2048 floats takes ~1.9 ms, ~5 % of a 1.1B K-quant pp512 at -t 2 on the Xeon VM
quantize_q8_K, quantize_q8_K_par = _njit(_quantize_q8_K, False), _njit(_quantize_q8_K, True)
bsums16, bsums16_par = _njit(_bsums16, False), _njit(_bsums16, True)


@nb.njit(**_NOPY)
def permute_q4k(xq):
    """In place: the 32-element sub-blocks of each 256 of xq (n, k) int8 in the order
    simd.Q4K_GEMV_PERM = 0 2 1 3 4 6 5 7 (swaps 1 <-> 2 and 5 <-> 6)."""
    n, k = xq.shape
    for i in range(n):
        for o in range(0, k, 128):
            for j in range(o + 32, o + 64):
                t = xq[i, j]
                xq[i, j] = xq[i, j + 32]
                xq[i, j + 32] = t


def quantize_activations(x: np.ndarray, act: str, act16: bool = False, sum_mul: int = 1):
    """x (n, k) float32 -> (xq, xd, xs, xsum) as the kernels see them (for tests and tools).

    The drivers do the same inside their single jitted call.
    """
    x = np.ascontiguousarray(x, np.float32)
    n, k = x.shape
    if act == "q8_K":
        xq = np.empty((n, k), np.int8)
        xd = np.empty((n, k // 256), np.float32)
        xb = np.empty((n, k // 32), np.int32)
        quantize_q8_K(x, xq, xd, xb)
        return xq, xd, None, xb
    if act in ("q8_0", "q8_1"):
        xq = np.empty((n, k), np.int16 if act16 else np.int8)
        xd = np.empty((n, k // QK), np.float32)
        xsum = np.empty((n, k // QK), np.int32)
        xs = np.empty((n, k // QK), np.float32) if act == "q8_1" else xd
        quantize_q8(x, xq, xd, xs, xsum, act == "q8_1", sum_mul)
        return xq, xd, xs, xsum
    if act == "f16":
        xr = np.empty_like(x)
        round_f16(x, xr)
    elif act == "bf16":
        xr = np.empty_like(x)
        round_bf16(x, xr)
    else:
        xr = x
    return xr, xr, xr, None


# ------------------------------------------------------------------ type table
@dataclass(frozen=True)
class Tiling:
    """Shape of the work one native intrinsic call does (see simd.tile_kernel)."""

    NR: int = 4          # weight rows per tile
    NC: int = 4          # activation rows per tile
    unroll: int = 1      # blocks per loop iteration, each into its own accumulators
    act16: bool = False  # activations stored as int16 (pre-widened) instead of int8
    wide: bool = False   # unpack nibbles to int16 lanes instead of int8

    @property
    def tag(self) -> str:
        return f"{self.NR}x{self.NC}u{self.unroll}a{int(self.act16)}w{int(self.wide)}"


@dataclass
class _TypeInfo:
    name: str
    block: int            # elements per block (1 for the float types)
    block_bytes: int
    act: str              # q8_0 | q8_1 | q8_K | f16 | bf16 | f32
    # native tiles for n == 1: one weight row at a time, two blocks per loop
    # iteration into separate accumulators. Several rows at once (NR > 1) is
    # faster on data in cache but slower from DRAM: on Zen 4 one sequential
    # stream reads at ~26 GB/s, two interleaved streams at ~14 (benchmarks/bench_kernels.py)
    gemv: Tiling = Tiling(1, 1, 2)
    gemm: Tiling = Tiling(4, 4)      # native tiles for n > 1
    repacked: object = None          # the registry's row-interleaved layout (simd.Interleaved) or None
    has_gemv: bool = False           # an x86 single-row K kernel (simd.kgemv_kernel) exists for it
    drivers: dict = field(default_factory=dict)

    @property
    def repack(self):
        """(nscales, nchunks, qh bytes) of a legacy row-interleaved layout, or None."""
        r = self.repacked
        return r.shape if r is not None and not r.kquant else None


_ACT = {GT.Q8_0: "q8_0", GT.Q8_1: "q8_1", GT.Q8_K: "q8_K", GT.F16: "f16", GT.BF16: "bf16", GT.F32: "f32"}


def _kernel_info(e: quants.QuantType) -> _TypeInfo:
    """The kernels' view of a registry entry (tilings and compiled drivers are per process)."""
    info = _TypeInfo(e.name, e.block_size, e.type_size, _ACT[e.vec_dot_type], repacked=e.repacked,
                     has_gemv=bool(getattr(e.simd, "has_gemv", False)))
    if _X86 and not e.is_quantized:
        # F16 / BF16 / F32 GEMV on x86: one accumulator set (the GEMM's per-output order, so batch
        # invariant) measured faster than unroll 2 from DRAM (F16 2048x2048, 1 thread, Zen 4 VM:
        # 9.4-9.8 vs 6.2-7.2 GB/s; issue 20)
        info.gemv = Tiling(1, 1, 1)
    return info


# int(ggml type) -> kernel info, for every runnable registry entry
_TYPES = {int(t): _kernel_info(e) for t, e in quants.TYPES.items() if e.runnable}
SUPPORTED_TYPES = tuple(_TYPES)


# -------------------------------------------------------------------- drivers
# One jitted driver per (type, layout, compile-time choices, serial | parallel): a closure made by one of
# the factories below, its constants (tile shapes, flags, kernel specs) in its cells. Activation prep:
_I8, _I16 = np.empty(0, np.int8), np.empty(0, np.int16)      # the quants' dtype, for _act_buffers


@nb.njit(**_NOPY)
def _act_buffers(x, like, with_s):
    """Empty activation buffers of x (n, k): quants of ``like``'s dtype (n, k), per-32 scales, sums
    (q8_1's own array when ``with_s``, else the scales again) and int32 corrections."""
    n, k = x.shape
    xq = np.empty((n, k), like.dtype)
    xd = np.empty((n, k // 32), np.float32)
    xc = np.empty((n, k // 32), np.int32)
    xs = np.empty((n, k // 32), np.float32) if with_s else xd
    return xq, xd, xs, xc


@nb.njit(**_NOPY)
def _act_q8(x, with_s, sum_mul):
    """x (n, k) -> int8 quants, scales, sums (q8_1: fp16(d * sum)), sum_mul * sums of q per 32."""
    xq, xd, xs, xc = _act_buffers(x, _I8, with_s)
    quantize_q8(x, xq, xd, xs, xc, with_s, sum_mul)
    return xq, xd, xs, xc


@nb.njit(**_NOPY)
def _act_q16(x, with_s, sum_mul):
    """:func:`_act_q8` with the quants stored as int16 (pre-widened)."""
    xq, xd, xs, xc = _act_buffers(x, _I16, with_s)
    quantize_q8(x, xq, xd, xs, xc, with_s, sum_mul)
    return xq, xd, xs, xc


@nb.njit(**_NOPY)
def _act_f16(x):
    xq = np.empty_like(x)
    round_f16(x, xq)
    return xq, xq, xq, np.empty((1, 1), np.int32)


@nb.njit(**_NOPY)
def _act_bf16(x):
    xq = np.empty_like(x)
    round_bf16(x, xq)
    return xq, xq, xq, np.empty((1, 1), np.int32)


@nb.njit(**_NOPY)
def _act_q8_K_buffers(x):
    """Empty Q8_K activation buffers of x (n, k): int8 quants, float32 scales per 256, int32 sums per 32."""
    n, k = x.shape
    return np.empty((n, k), np.int8), np.empty((n, k // 256), np.float32), np.empty((n, k // 32), np.int32)


@nb.njit(**_NOPY)
def _act_q8_K(x):
    """Q8_K activations: int8 quants, float32 scales per 256, int32 sums of the quants per 32."""
    xq, xd, xb = _act_q8_K_buffers(x)
    quantize_q8_K(x, xq, xd, xb)
    return xq, xd, xb


# the parallel drivers quantize the activations of calls of at least this many rows across the threads
# (the same numbers: rows are independent); fewer (a decode step's) on the calling thread
QUANT_PAR_MIN = 8


@nb.njit(**_NOPY)
def _act_q8_p(x, with_s, sum_mul):
    """:func:`_act_q8`, rows across threads."""
    xq, xd, xs, xc = _act_buffers(x, _I8, with_s)
    quantize_q8_par(x, xq, xd, xs, xc, with_s, sum_mul)
    return xq, xd, xs, xc


@nb.njit(**_NOPY)
def _act_q16_p(x, with_s, sum_mul):
    """:func:`_act_q16`, rows across threads."""
    xq, xd, xs, xc = _act_buffers(x, _I16, with_s)
    quantize_q8_par(x, xq, xd, xs, xc, with_s, sum_mul)
    return xq, xd, xs, xc


@nb.njit(**_NOPY)
def _act_q8_K_p(x):
    """:func:`_act_q8_K`, rows across threads."""
    xq, xd, xb = _act_q8_K_buffers(x)
    quantize_q8_K_par(x, xq, xd, xb)
    return xq, xd, xb


# activation kinds of the legacy / float drivers (ACT cell): a constant, so numba prunes the others
_A_Q8, _A_Q16, _A_F16, _A_BF16, _A_F32 = 0, 1, 2, 3, 4


def _act_kind(info: _TypeInfo, act16: bool) -> int:
    if info.act in ("q8_0", "q8_1"):
        return _A_Q16 if act16 else _A_Q8
    return {"f16": _A_F16, "bf16": _A_BF16, "f32": _A_F32}[info.act]


def _make_native(info: _TypeInfo, parallel: bool, cfg: KernelConfig):
    """Native (zero-copy) blocks: n == 1 one weight row (VR rows) at a time, n > 1 NR x NC tiles."""
    v, m = cfg.tiling(info, "gemv"), cfg.tiling(info, "gemm")
    if v.act16 != m.act16:
        raise ValueError(f"tilings of {info.name}: gemv and gemm must agree on act16")
    if info.act == "q8_K":
        return _make_knative(info, parallel, cfg, v, m)
    f = info.name

    def tile(NR, NC, t):
        return spec("tile", f, NR, NC, unroll=t.unroll, act16=t.act16, wide=t.wide, prefetch=cfg.prefetch)

    ACT, WITH_S = _act_kind(info, m.act16), info.act == "q8_1"
    VR, NR, NC = v.NR, m.NR, m.NC
    T_VEC, T_ONE = tile(v.NR, 1, v), tile(1, 1, v)
    T_MAIN, T_COL, T_ROW = tile(m.NR, m.NC, m), tile(m.NR, 1, m), tile(1, m.NC, m)

    PQ = parallel

    def native(w, x, out):
        n, k = x.shape
        if ACT == 0:
            if PQ and n >= QUANT_PAR_MIN:
                xq, xd, xs, xc = _act_q8_p(x, WITH_S, 1)
            else:
                xq, xd, xs, xc = _act_q8(x, WITH_S, 1)
        elif ACT == 1:
            if PQ and n >= QUANT_PAR_MIN:
                xq, xd, xs, xc = _act_q16_p(x, WITH_S, 1)
            else:
                xq, xd, xs, xc = _act_q16(x, WITH_S, 1)
        elif ACT == 2:
            xq, xd, xs, xc = _act_f16(x)
        elif ACT == 3:
            xq, xd, xs, xc = _act_bf16(x)
        else:
            xq, xd, xs, xc = x, x, x, np.empty((1, 1), np.int32)
        rows = w.shape[0]
        nb_ = k // 32
        ntail = k - nb_ * 32
        ws = np.int64(w.strides[0])
        wp = np.int64(w.ctypes.data)
        xqs = np.int64(xq.strides[0])
        xqp = np.int64(xq.ctypes.data)
        xst = np.int64(xd.strides[0])
        xdp = np.int64(xd.ctypes.data)
        xsp = np.int64(xs.ctypes.data)
        osd = np.int64(out.strides[0])
        op = np.int64(out.ctypes.data)
        if n == 1:
            ntr = rows // VR
            for t in prange(ntr):
                r0 = t * VR
                call(T_VEC, wp + r0 * ws, ws, xqp, xqs, xdp, xsp, xst, nb_, ntail, op + r0 * 4, osd)
            for r0 in range(ntr * VR, rows):
                call(T_ONE, wp + r0 * ws, ws, xqp, xqs, xdp, xsp, xst, nb_, ntail, op + r0 * 4, osd)
            _keep_alive(xq, xd, xs, xc)
            return
        ntr = rows // NR
        nc_main = n - n % NC
        for t in prange(ntr + (rows - ntr * NR)):
            if t < ntr:
                r0 = t * NR
                for c0 in range(0, nc_main, NC):
                    call(T_MAIN, wp + r0 * ws, ws, xqp + c0 * xqs, xqs, xdp + c0 * xst, xsp + c0 * xst, xst,
                         nb_, ntail, op + c0 * osd + r0 * 4, osd)
                for c0 in range(nc_main, n):
                    call(T_COL, wp + r0 * ws, ws, xqp + c0 * xqs, xqs, xdp + c0 * xst, xsp + c0 * xst, xst,
                         nb_, ntail, op + c0 * osd + r0 * 4, osd)
            else:
                r0 = ntr * NR + (t - ntr)
                for c0 in range(0, nc_main, NC):
                    call(T_ROW, wp + r0 * ws, ws, xqp + c0 * xqs, xqs, xdp + c0 * xst, xsp + c0 * xst, xst,
                         nb_, ntail, op + c0 * osd + r0 * 4, osd)
                for c0 in range(nc_main, n):
                    call(T_ONE, wp + r0 * ws, ws, xqp + c0 * xqs, xqs, xdp + c0 * xst, xsp + c0 * xst, xst,
                         nb_, ntail, op + c0 * osd + r0 * 4, osd)
        _keep_alive(xq, xd, xs, xc)

    return _njit(native, parallel)


# float weights (F16 / BF16 / F32) through simd.ftile_kernel (_make_ffma): tiles of FF_NR weight rows x
# FF_NC activation rows (NR * NC * FMA_CHAINS accumulators + NR weight vectors + 1 within the target's
# vector registers: 32 on AVX-512 and NEON, 16 on AVX2), and weight rows per group (a group's rows and
# a tile's activations stay in L1 together; a multiple of FF_NR)
FF_NR, FF_NC = {16: (2, 6), 8: (1, 8)}.get(simd.ACC_LANES, (2, 4))
FF_RG = 16


def _make_ffma(info: _TypeInfo, parallel: bool, cfg: KernelConfig, single: bool = False):
    """Float weights, every n: fused multiply-add tiles of FF_NR weight rows x up to FF_NC activation
    rows (simd.ftile_kernel: each weight block decoded once per tile, each activation vector loaded
    once per FF_NR rows, 32 / lanes FMAs per block and output). n == 1: one row at a time, one
    sequential stream. n > 1: groups of FF_RG weight rows, each against FF_NC activation rows at a
    time (the n % FF_NC left over in one tile of exactly that many), FF_NR rows per tile (the rows %
    FF_NR of the last group in 1-row tiles). Every output is summed in the one order of ftile_kernel,
    whatever the tile and thread split: batch invariant. Speculative decoding's verification passes
    (2-9 rows) and prompts are its n > 1. ``single``: a driver for n == 1 only (matmul.run's
    "ffma1"), the tile loops left out (they made the GEMV loop run about 2x slower on a 56 MB F16
    matrix at 1 thread, the same instructions: code placement; measured 2026-12-06)."""
    f = info.name
    ACT = _act_kind(info, False)
    NR, NC, RG = FF_NR, FF_NC, FF_RG
    pf = cfg.prefetch_float

    def sp(c, nr):      # a tile of nr x c; column counts beyond NC never run (their branches are dead)
        return spec("ftile", f, min(c, NC), prefetch=pf, **({"NR": nr} if nr > 1 else {}))

    M, O = sp(NC, NR), sp(NC, 1)
    M1, M2, M3, M4, M5, M6, M7 = (sp(c, NR) for c in range(1, 8))
    O1, O2, O3, O4, O5, O6, O7 = (sp(c, 1) for c in range(1, 8))

    def ffma(w, x, out):
        n, k = x.shape
        if ACT == 2:
            xq, xd, xs, xc = _act_f16(x)
        elif ACT == 3:
            xq, xd, xs, xc = _act_bf16(x)
        else:
            xq, xd, xs, xc = x, x, x, np.empty((1, 1), np.int32)
        rows = w.shape[0]
        nb_ = k // 32
        ntail = k - nb_ * 32
        ws = np.int64(w.strides[0])
        wp = np.int64(w.ctypes.data)
        xqs = np.int64(xq.strides[0])
        xqp = np.int64(xq.ctypes.data)
        osd = np.int64(out.strides[0])
        op = np.int64(out.ctypes.data)
        if n == 1 or single:
            for r in prange(rows):
                call(O1, wp + r * ws, ws, xqp, xqs, xqp, xqp, xqs, nb_, ntail, op + r * 4, osd)
            _keep_alive(xq, xd, xs, xc)
            return
        nc_main = n - n % NC
        rem = n - nc_main
        xr = xqp + nc_main * xqs
        for g in prange((rows + RG - 1) // RG):
            r0 = g * RG
            r1 = min(rows, r0 + RG)
            rm = r1 - (r1 - r0) % NR
            for c0 in range(0, nc_main, NC):
                xc0 = xqp + c0 * xqs
                for r in range(r0, rm, NR):
                    call(M, wp + r * ws, ws, xc0, xqs, xqp, xqp, xqs, nb_, ntail, op + c0 * osd + r * 4, osd)
                for r in range(rm, r1):
                    call(O, wp + r * ws, ws, xc0, xqs, xqp, xqp, xqs, nb_, ntail, op + c0 * osd + r * 4, osd)
            if rem == 0:
                continue
            for r in range(r0, rm, NR):
                wr = wp + r * ws
                orr = op + nc_main * osd + r * 4
                if rem == 1:
                    call(M1, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 2:
                    call(M2, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 3:
                    call(M3, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 4:
                    call(M4, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 5:
                    call(M5, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 6:
                    call(M6, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 7:
                    call(M7, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
            for r in range(rm, r1):
                wr = wp + r * ws
                orr = op + nc_main * osd + r * 4
                if rem == 1:
                    call(O1, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 2:
                    call(O2, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 3:
                    call(O3, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 4:
                    call(O4, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 5:
                    call(O5, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 6:
                    call(O6, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
                elif rem == 7:
                    call(O7, wr, ws, xr, xqs, xqp, xqp, xqs, nb_, ntail, orr, osd)
        _keep_alive(xq, xd, xs, xc)

    return _njit(ffma, parallel)


def _make_knative(info: _TypeInfo, parallel: bool, cfg: KernelConfig, v: Tiling, m: Tiling):
    """Native K-quant super-blocks against Q8_K activations. n == 1 on x86: the single-row kgemv kernel,
    which wants the activation sums per 16 (int16) for Q6_K (Q2_K / Q3_K have them already) and the
    sub-blocks of Q4_K / Q5_K activations permuted (simd.Q4K_GEMV_PERM)."""
    f = info.name
    dec = quants.type_info(f).simd

    def kt(NR, NC):
        return spec("ktile", f, NR, NC, prefetch=cfg.prefetch)

    kg = cfg.kgemv and not cfg.batch_invariant and v.NR == 1 and dec.has_gemv
    VR, NR, NC = v.NR, m.NR, m.NC
    T_VEC = spec("kgemv", f) if kg else kt(v.NR, 1)
    T_GV = T_VEC if v.NR == 1 else kt(1, 1)
    T_ONE, T_MAIN, T_COL, T_ROW = kt(1, 1), kt(m.NR, m.NC), kt(m.NR, 1), kt(1, m.NC)
    B16 = (kg and f == "Q6_K") or dec.bsums == 16
    PERM = kg and f in ("Q4_K", "Q5_K")

    PQ = parallel

    def knative(w, x, out):
        n, k = x.shape
        pq = PQ and n >= QUANT_PAR_MIN
        if pq:
            xq, xd, xb32 = _act_q8_K_p(x)
        else:
            xq, xd, xb32 = _act_q8_K(x)
        if B16:
            xb = np.empty((n, k // 16), np.int16)
            if pq:
                bsums16_par(xq, xb)
            else:
                bsums16(xq, xb)
        else:
            xb = xb32
        rows = w.shape[0]
        nb_ = k // 256
        ws = np.int64(w.strides[0])
        wp = np.int64(w.ctypes.data)
        xqs = np.int64(xq.strides[0])
        xqp = np.int64(xq.ctypes.data)
        xds = np.int64(xd.strides[0])
        xdp = np.int64(xd.ctypes.data)
        xbs = np.int64(xb.strides[0])
        xbp = np.int64(xb.ctypes.data)
        osd = np.int64(out.strides[0])
        op = np.int64(out.ctypes.data)
        if n == 1:
            if PERM:
                permute_q4k(xq)
            ntr = rows // VR
            for t in prange(ntr):
                r0 = t * VR
                call(T_VEC, wp + r0 * ws, ws, xqp, xqs, xdp, xds, xbp, xbs, nb_, op + r0 * 4, osd)
            for r0 in range(ntr * VR, rows):
                call(T_GV, wp + r0 * ws, ws, xqp, xqs, xdp, xds, xbp, xbs, nb_, op + r0 * 4, osd)
            _keep_alive(xq, xd, xb)
            return
        ntr = rows // NR
        nc_main = n - n % NC
        for t in prange(ntr + (rows - ntr * NR)):
            if t < ntr:
                r0 = t * NR
                for c0 in range(0, nc_main, NC):
                    call(T_MAIN, wp + r0 * ws, ws, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xbp + c0 * xbs, xbs,
                         nb_, op + c0 * osd + r0 * 4, osd)
                for c0 in range(nc_main, n):
                    call(T_COL, wp + r0 * ws, ws, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xbp + c0 * xbs, xbs,
                         nb_, op + c0 * osd + r0 * 4, osd)
            else:
                r0 = ntr * NR + (t - ntr)
                for c0 in range(0, nc_main, NC):
                    call(T_ROW, wp + r0 * ws, ws, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xbp + c0 * xbs, xbs,
                         nb_, op + c0 * osd + r0 * 4, osd)
                for c0 in range(nc_main, n):
                    call(T_ONE, wp + r0 * ws, ws, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xbp + c0 * xbs, xbs,
                         nb_, op + c0 * osd + r0 * 4, osd)
        _keep_alive(xq, xd, xb)

    return _njit(knative, parallel)


def _make_packed(info: _TypeInfo, parallel: bool, cfg: KernelConfig):
    """x16 row-interleaved groups (simd.Interleaved), the rows % 16 after them on the native layout."""
    f = info.name
    fmt = info.repacked
    if fmt.kquant:
        return _make_kpacked(info, parallel, cfg)
    NC, ch, GB = cfg.packed_nc, cfg.packed_chains, GROUP * 4
    WITH_S, SUM_MUL = info.act == "q8_1", -fmt.offset
    # int8 activations x u8 quads (vpdpbusd) where the format has a byte form and the target
    # AVX-512 VNNI; else int16 activations x int16 pairs. The same floats either way (simd.py).
    QUADS = cfg.packed_quads and simd.VNNI512 and fmt.bytes is not None
    # software prefetch in a group's first tile only (the later tiles of a GEMM find the group in cache)
    PF = cfg.prefetch_packed
    if QUADS:
        SUM_MUL_G = -(fmt.offset + fmt.quad_bias)
        T_FIRST = spec("iqtile", f, NC, prefetch=PF)
        T_MAIN = spec("iqtile", f, NC)
        T_ONE = spec("iqtile", f, 1, prefetch=PF)
        T_2 = spec("iqtile", f, 2, prefetch=PF)
        T_3 = spec("iqtile", f, 3, prefetch=PF)
    else:
        SUM_MUL_G = SUM_MUL
        T_FIRST = spec("itile", f, NC, ch, prefetch=PF)
        T_MAIN = spec("itile", f, NC, ch)
        T_ONE = spec("itile", f, 1, ch, prefetch=PF)
        T_2 = spec("itile", f, 2, ch, prefetch=PF)
        T_3 = spec("itile", f, 3, ch, prefetch=PF)
    HAS2, HAS3 = NC > 2, NC > 3         # the rows after the last NC: 3- and 2-row tiles, then 1-row ones
    TAIL_MAIN = spec("tile", f, 1, NC, act16=True, prefetch=cfg.prefetch)
    TAIL_ONE = spec("tile", f, 1, 1, act16=True, prefetch=cfg.prefetch)

    PQ = parallel

    def packed(wr, wt, x, out):
        n, k = x.shape
        pq = PQ and n >= QUANT_PAR_MIN
        if QUADS:
            if pq:
                xg, xd, xs, xc = _act_q8_p(x, WITH_S, SUM_MUL_G)
            else:
                xg, xd, xs, xc = _act_q8(x, WITH_S, SUM_MUL_G)
            if wt.shape[0]:         # the tail's native tiles read int16 quants
                xq, _d, _s, _c = _act_q16(x, WITH_S, SUM_MUL)
            else:
                xq = np.empty((1, 1), np.int16)
        else:
            if pq:
                xq, xd, xs, xc = _act_q16_p(x, WITH_S, SUM_MUL)
            else:
                xq, xd, xs, xc = _act_q16(x, WITH_S, SUM_MUL)
            xg = xq
        ng = wr.shape[0]
        nb_ = k // 32
        wp = np.int64(wr.ctypes.data)
        gs = np.int64(wr.strides[0])
        xgp = np.int64(xg.ctypes.data)
        xgs = np.int64(xg.strides[0])
        xqp = np.int64(xq.ctypes.data)
        xqs = np.int64(xq.strides[0])
        xdp = np.int64(xd.ctypes.data)
        xsp = np.int64(xs.ctypes.data)
        xcp = np.int64(xc.ctypes.data)
        xst = np.int64(xd.strides[0])
        op = np.int64(out.ctypes.data)
        osd = np.int64(out.strides[0])
        nc_main = n - n % NC
        for g in prange(ng):
            gp = wp + g * gs
            o = op + g * GB
            if nc_main:
                call(T_FIRST, gp, nb_, xgp, xgs, xdp, xsp, xcp, xst, o, osd)
            for c0 in range(NC, nc_main, NC):
                call(T_MAIN, gp, nb_, xgp + c0 * xgs, xgs, xdp + c0 * xst, xsp + c0 * xst, xcp + c0 * xst, xst,
                     o + c0 * osd, osd)
            c0 = nc_main
            if HAS3 and n - c0 == 3:
                call(T_3, gp, nb_, xgp + c0 * xgs, xgs, xdp + c0 * xst, xsp + c0 * xst, xcp + c0 * xst, xst,
                     o + c0 * osd, osd)
                c0 += 3
            if HAS2 and n - c0 >= 2:
                call(T_2, gp, nb_, xgp + c0 * xgs, xgs, xdp + c0 * xst, xsp + c0 * xst, xcp + c0 * xst, xst,
                     o + c0 * osd, osd)
                c0 += 2
            for c in range(c0, n):
                call(T_ONE, gp, nb_, xgp + c * xgs, xgs, xdp + c * xst, xsp + c * xst, xcp + c * xst, xst,
                     o + c * osd, osd)
        # rows after the last full group: native kernels on the original layout
        tp = np.int64(wt.ctypes.data)
        ts = np.int64(wt.strides[0])
        ot = op + ng * GB
        for r in range(wt.shape[0]):
            for c0 in range(0, nc_main, NC):
                call(TAIL_MAIN, tp + r * ts, ts, xqp + c0 * xqs, xqs, xdp + c0 * xst, xsp + c0 * xst, xst,
                     nb_, 0, ot + c0 * osd + r * 4, osd)
            for c0 in range(nc_main, n):
                call(TAIL_ONE, tp + r * ts, ts, xqp + c0 * xqs, xqs, xdp + c0 * xst, xsp + c0 * xst, xst,
                     nb_, 0, ot + c0 * osd + r * 4, osd)
        _keep_alive(xq, xg, xd, xs, xc)

    return _njit(packed, parallel)


def _make_kpacked(info: _TypeInfo, parallel: bool, cfg: KernelConfig):
    """x16 K-quant groups (simd.kinterleaved_kernel: int8 activations, u8 quads; the activation sums
    ``fmt.xsums``: int16 per 16 for groups of 16 (Q3_K -4, Q6_K -32, Q2_K's mins), int16 per 32 for
    IQ4_XS's +128, else int32 per 32 for the mins); the rows % 16 after them on native ktile tiles."""
    f = info.name
    fmt = info.repacked
    NC, GB = cfg.packed_nc, GROUP * 4
    T16 = quants.type_info(f).simd.bsums == 16      # the tail tiles (ktile) read int16 sums per 16
    K16 = fmt.xsums == 16                           # so does the x16 kernel (groups of 16: offset or mins)
    K32 = fmt.xsums == -32                          # the x16 kernel reads int16 sums per 32
    PF = cfg.prefetch_packed           # software prefetch in a group's first tile only (as _make_packed)
    T_FIRST, T_MAIN = spec("kitile", f, NC, prefetch=PF), spec("kitile", f, NC)
    T_ONE = spec("kitile", f, 1, prefetch=PF)
    T_2, T_3 = spec("kitile", f, 2, prefetch=PF), spec("kitile", f, 3, prefetch=PF)
    HAS2, HAS3 = NC > 2, NC > 3
    TAIL_MAIN, TAIL_ONE = spec("ktile", f, 1, NC, prefetch=cfg.prefetch), spec("ktile", f, 1, 1, prefetch=cfg.prefetch)

    PQ = parallel

    def kpacked(wr, wt, x, out):
        n, k = x.shape
        pq = PQ and n >= QUANT_PAR_MIN
        if pq:
            xq, xd, xb32 = _act_q8_K_p(x)
        else:
            xq, xd, xb32 = _act_q8_K(x)
        x16 = np.empty((n, k // 16) if T16 or K16 else (1, 1), np.int16)
        if T16 or K16:                                  # activation sums per 16
            if pq:
                bsums16_par(xq, x16)
            else:
                bsums16(xq, x16)
        if T16:
            xt = x16
        else:
            xt = xb32
        if K16:
            xb = x16
        elif K32:
            xb = xb32.astype(np.int16)
        else:
            xb = xb32
        ng = wr.shape[0]
        nb_ = k // 256
        wp = np.int64(wr.ctypes.data)
        gs = np.int64(wr.strides[0])
        xqp = np.int64(xq.ctypes.data)
        xqs = np.int64(xq.strides[0])
        xdp = np.int64(xd.ctypes.data)
        xds = np.int64(xd.strides[0])
        xbp = np.int64(xb.ctypes.data)
        xbs = np.int64(xb.strides[0])
        xtp = np.int64(xt.ctypes.data)
        xts = np.int64(xt.strides[0])
        op = np.int64(out.ctypes.data)
        osd = np.int64(out.strides[0])
        nc_main = n - n % NC
        for g in prange(ng):
            gp = wp + g * gs
            o = op + g * GB
            if nc_main:
                call(T_FIRST, gp, nb_, xqp, xqs, xdp, xds, xbp, xbs, o, osd)
            for c0 in range(NC, nc_main, NC):
                call(T_MAIN, gp, nb_, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xbp + c0 * xbs, xbs,
                     o + c0 * osd, osd)
            c0 = nc_main
            if HAS3 and n - c0 == 3:
                call(T_3, gp, nb_, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xbp + c0 * xbs, xbs, o + c0 * osd, osd)
                c0 += 3
            if HAS2 and n - c0 >= 2:
                call(T_2, gp, nb_, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xbp + c0 * xbs, xbs, o + c0 * osd, osd)
                c0 += 2
            for c in range(c0, n):
                call(T_ONE, gp, nb_, xqp + c * xqs, xqs, xdp + c * xds, xds, xbp + c * xbs, xbs, o + c * osd, osd)
        # rows after the last full group: native kernels on the original layout
        tp = np.int64(wt.ctypes.data)
        ts = np.int64(wt.strides[0])
        ot = op + ng * GB
        for r in range(wt.shape[0]):
            for c0 in range(0, nc_main, NC):
                call(TAIL_MAIN, tp + r * ts, ts, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xtp + c0 * xts, xts,
                     nb_, ot + c0 * osd + r * 4, osd)
            for c0 in range(nc_main, n):
                call(TAIL_ONE, tp + r * ts, ts, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xtp + c0 * xts, xts,
                     nb_, ot + c0 * osd + r * 4, osd)
        _keep_alive(xq, xd, xb, xt, x16)

    return _njit(kpacked, parallel)


def _make_arm(info: _TypeInfo, parallel: bool):
    """aarch64 4-row groups (kernels/arm.py): one group x NC activation rows per kernel call."""
    f = info.name
    L = arm.LAYOUTS[f]
    NC, QKB = arm.gemm_nc(f, arm.DOTPROD), L.qk      # 4, 8 or 10 activation rows per call; the rest 4, then 1
    KQ = L.act == "q8_K"
    HILO, HILO16 = L.sums == "hilo32", L.sums == "hilo16"     # Q4_K / Q5_K, Q2_K: int8 sums (arm.py)
    WITH_S = info.act == "q8_1"
    T_MAIN, T_ONE = spec("arm4", f, NC, arm.DOTPROD), spec("arm4", f, 1, arm.DOTPROD)
    T_4, MID = spec("arm4", f, arm.NC, arm.DOTPROD), NC > arm.NC     # MID: 4-row calls for the rest

    PQ = parallel

    def arm4(wr, x, out):
        n, k = x.shape
        pq = PQ and n >= QUANT_PAR_MIN
        if KQ:
            if pq:
                xq, xd, xb32 = _act_q8_K_p(x)
            else:
                xq, xd, xb32 = _act_q8_K(x)
            if HILO:
                xb = np.empty((n, k // 256 * 16), np.int8)
                arm.bsums_hilo(xb32, xb)
            elif HILO16:
                xb = np.empty((n, k // 256 * 32), np.int8)
                arm.bsums16_hilo(xq, xb)
            else:
                xb = xb32
        else:
            if pq:
                xq, xd, xs, xb = _act_q8_p(x, WITH_S, 1)
            else:
                xq, xd, xs, xb = _act_q8(x, WITH_S, 1)
            if WITH_S:       # Q4_1: the kernels read block_q8_1.s (float32) where the others read sums
                xb = xs.view(np.int32)
        ng = wr.shape[0]
        nb_ = k // QKB
        wp = np.int64(wr.ctypes.data)
        gs = np.int64(wr.strides[0])
        xqp = np.int64(xq.ctypes.data)
        xqs = np.int64(xq.strides[0])
        xdp = np.int64(xd.ctypes.data)
        xds = np.int64(xd.strides[0])
        xbp = np.int64(xb.ctypes.data)
        xbs = np.int64(xb.strides[0])
        op = np.int64(out.ctypes.data)
        osd = np.int64(out.strides[0])
        nc_main = n - n % NC
        n4 = nc_main + (n - nc_main) // 4 * 4 if MID else nc_main
        for g in prange(ng):
            gp = wp + g * gs
            o = op + g * 16
            for c0 in range(0, nc_main, NC):
                call(T_MAIN, gp, nb_, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xbp + c0 * xbs, xbs,
                     o + c0 * osd, osd)
            if MID:                                # (a constant: no 4-row code where NC is 4)
                for c0 in range(nc_main, n4, 4):
                    call(T_4, gp, nb_, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xbp + c0 * xbs, xbs,
                         o + c0 * osd, osd)
            for c0 in range(n4, n):
                call(T_ONE, gp, nb_, xqp + c0 * xqs, xqs, xdp + c0 * xds, xds, xbp + c0 * xbs, xbs,
                     o + c0 * osd, osd)
        _keep_alive(xq, xd, xb)

    return _njit(arm4, parallel)


def driver(info: _TypeInfo, packed, parallel: bool, cfg: KernelConfig):
    """The jitted driver (x, out from a prepared weight's arrays) of a type and layout, cached on the type
    info; matmul.run and kernels/moe.py call it. packed: False (native), True (x16 row-interleaved),
    "ffma" (float FMA tiles; "ffma1": its n == 1 driver) or "arm" (kernels/arm.py's 4-row layouts)."""
    key = (packed, parallel, cfg.kgemv, cfg.packed_nc, cfg.packed_chains, cfg.packed_quads, cfg.tilings, cfg.prefetch,
           cfg.prefetch_packed, cfg.batch_invariant, cfg.prefetch_float)           # the fields the drivers depend on
    d = info.drivers.get(key)
    if d is None:
        if packed == "arm":
            d = _make_arm(info, parallel)
        elif packed in ("ffma", "ffma1"):
            d = _make_ffma(info, parallel, cfg, packed == "ffma1")
        else:
            d = (_make_packed if packed else _make_native)(info, parallel, cfg)
        info.drivers[key] = d
    return d


@nb.njit(parallel=True, **_NOPY)
def _repack_x16(w16, block_u16, nscales, nchunks, qh_bytes, out16):
    """Native blocks -> row-interleaved groups of 16 rows (see simd.Interleaved), in uint16 units.

    w16: the weight rows viewed as uint16 (rows, nb*block_u16) (every field of
    the legacy blocks is 2-byte aligned); out16 (rows//16, nb, 16*nscales +
    8*qh_bytes + 16*nchunks). Per block: the 16 rows' fp16 scales (d, then m);
    for Q5 formats 16 u32 masks (mask j bit 2r+t = row r's 5th bit of element
    2j+t); then pair chunks: chunk j holds row r's quant bytes 2j, 2j+1 at
    uint16 16j + r. The output is written in order (4.7 GB/s on Zen 4, 1.6x the row-by-row loop).
    """
    ng, nb_, bb = out16.shape
    mo = 16 * nscales                    # masks offset (uint16 units)
    qo = mo + 8 * qh_bytes               # chunks offset
    for g in prange(ng):
        r0 = g * 16
        for b in range(nb_):             # each output block written front to back (16 row streams read)
            src = b * block_u16
            o = out16[g, b]
            for sc in range(nscales):
                for r in range(16):
                    o[16 * sc + r] = w16[r0 + r, src + sc]
            q0 = src + nscales
            if qh_bytes:
                for r in range(16):
                    # row r's 32 fifth bits -> bit 2r+t of mask j (e = 2j + t)
                    qh = np.uint32(w16[r0 + r, q0]) | (np.uint32(w16[r0 + r, q0 + 1]) << np.uint32(16))
                    for j in range(16):
                        bits = np.uint16((qh >> np.uint32(2 * j)) & np.uint32(3))
                        if bits:
                            hw = mo + 2 * j + (r >> 3)            # the uint16 holding bits 2r, 2r+1
                            o[hw] |= bits << np.uint16(2 * (r & 7))
                q0 += 2
            for j in range(nchunks):
                for r in range(16):
                    o[qo + 16 * j + r] = w16[r0 + r, q0 + j]


@nb.njit(parallel=True, **_NOPY)
def _repack_q4k_x16(w, out):
    """Q4_K rows (rows, nb*144) -> groups of 16 rows (rows//16, nb, 2368), see simd.Q4_Kx16.

    Per super-block of a group: the rows' d and dmin (fp16 bytes as they are), the 6-bit
    scales and mins unpacked to bytes (sub-block j, row r at 16j + r), then the quant
    bytes of sub-block pair c as 8 quad chunks of 64: chunk m byte 4r+t = row r's qs[32c + 4m + t].
    """
    ng, nb_, bb = out.shape
    for g in prange(ng):
        for r in range(16):
            row = g * 16 + r
            src = w[row]
            for b in range(nb_):
                o = b * 144
                dst = out[g, b]
                dst[2 * r] = src[o]
                dst[2 * r + 1] = src[o + 1]
                dst[32 + 2 * r] = src[o + 2]
                dst[32 + 2 * r + 1] = src[o + 3]
                for j in range(8):
                    sc, m = quants._scale_min_k4(j, src, o + 4)
                    dst[64 + 16 * j + r] = sc
                    dst[192 + 16 * j + r] = m
                for c in range(4):
                    for m in range(8):
                        for t in range(4):
                            dst[320 + 512 * c + 64 * m + 4 * r + t] = src[o + 16 + 32 * c + 4 * m + t]


@nb.njit(parallel=True, **_NOPY)
def _repack_q2k_x16(w, out):
    """Q2_K rows (rows, nb*84) -> groups of 16 rows (rows//16, nb, 1344), see simd.Q2_Kx16: d, dmin (fp16
    bytes as they are), the scale/min bytes in pairs (group g, row r at 64 + 32(g//2) + 2r + g%2), the
    values 0..3 (group g, element 4m+t of it: byte 320 + 64g + 4r + t, bits 2m)."""
    ng, nb_, bb = out.shape
    for g in prange(ng):
        for r in range(16):
            src = w[g * 16 + r]
            for b in range(nb_):
                o = b * 84
                dst = out[g, b]
                for t in range(2):
                    dst[2 * r + t] = src[o + 80 + t]
                    dst[32 + 2 * r + t] = src[o + 82 + t]
                for j in range(16):
                    dst[64 + 32 * (j // 2) + 2 * r + j % 2] = src[o + j]
                for e in range(256):
                    v = (np.int64(src[o + 16 + 32 * (e // 128) + e % 32]) >> (2 * ((e % 128) // 32))) & 3
                    gg, t16 = e // 16, e % 16
                    q = 320 + 64 * gg + 4 * r + t16 % 4
                    if t16 // 4:
                        dst[q] |= v << (2 * (t16 // 4))
                    else:
                        dst[q] = v


@nb.njit(parallel=True, **_NOPY)
def _repack_q3k_x16(w, out):
    """Q3_K rows (rows, nb*110) -> groups of 16 rows (rows//16, nb, 2336), see simd.Q3_Kx16: d, the
    scales less 32 in pairs (group g, row r at 32 + 32(g//2) + 2r + g%2), the values 0..7 as nibbles
    (group g, element 4m+t of it: byte 288 + 256(g//2) + 64m + 4r + t, high nibble for odd g)."""
    ng, nb_, bb = out.shape
    for g in prange(ng):
        for r in range(16):
            src = w[g * 16 + r]
            for b in range(nb_):
                o = b * 110
                dst = out[g, b]
                dst[2 * r] = src[o + 108]
                dst[2 * r + 1] = src[o + 109]
                for j in range(16):
                    dst[32 + 32 * (j // 2) + 2 * r + j % 2] = quants._q3k_scale(src, o + 96, j) & 0xFF
                for e in range(256):
                    h, jj, l = e // 128, (e % 128) // 32, e % 32
                    v = (np.int64(src[o + 32 + 32 * h + l]) >> (2 * jj)) & 3
                    v |= ((np.int64(src[o + l]) >> (4 * h + jj)) & 1) << 2
                    gg, t16 = e // 16, e % 16
                    q = 288 + 256 * (gg // 2) + 64 * (t16 // 4) + 4 * r + t16 % 4
                    if gg % 2:
                        dst[q] |= v << 4
                    else:
                        dst[q] = v


@nb.njit(parallel=True, **_NOPY)
def _repack_iq4xs_x16(w, out):
    """IQ4_XS rows (rows, nb*136) -> groups of 16 rows (rows//16, nb, 2208), see simd.IQ4_XSx16: d, the
    scales less 32 in pairs (sub-block g, row r at 32 + 32(g//2) + 2r + g%2), the nibbles (sub-block g,
    element 4m+t of it: byte 160 + 512(g//2) + 64m + 4r + t, high nibble for odd g)."""
    ng, nb_, bb = out.shape
    for g in prange(ng):
        for r in range(16):
            src = w[g * 16 + r]
            for b in range(nb_):
                o = b * 136
                dst = out[g, b]
                dst[2 * r] = src[o]
                dst[2 * r + 1] = src[o + 1]
                for j in range(8):
                    dst[32 + 32 * (j // 2) + 2 * r + j % 2] = quants._iq4xs_scale(src, o, j) & 0xFF
                for e in range(256):
                    gg, jj = e // 32, e % 32
                    v = (np.int64(src[o + 8 + 16 * gg + jj % 16]) >> (4 * (jj // 16))) & 0xF
                    q = 160 + 512 * (gg // 2) + 64 * (jj // 4) + 4 * r + jj % 4
                    if gg % 2:
                        dst[q] |= v << 4
                    else:
                        dst[q] = v


@nb.njit(parallel=True, **_NOPY)
def _repack_q5k_x16(w, out):
    """Q5_K rows (rows, nb*176) -> groups of 16 rows (rows//16, nb, 4416), see simd.Q5_Kx16: d, dmin
    (fp16 bytes as they are), the scales and mins unpacked (sub-block j, row r at 64 + 16j + r and
    192 + 16j + r), the 5-bit values as bytes (quad chunk m byte 4r+t at 320 + 64m = element 4m + t)."""
    ng, nb_, bb = out.shape
    for g in prange(ng):
        for r in range(16):
            src = w[g * 16 + r]
            for b in range(nb_):
                o = b * 176
                dst = out[g, b]
                for t in range(2):
                    dst[2 * r + t] = src[o + t]
                    dst[32 + 2 * r + t] = src[o + 2 + t]
                for j in range(8):
                    sc, m = quants._scale_min_k4(j, src, o + 4)
                    dst[64 + 16 * j + r] = sc
                    dst[192 + 16 * j + r] = m
                for e in range(256):
                    l = e % 32
                    q = np.int64(src[o + 48 + 32 * (e // 64) + l])
                    q = (q >> 4) if (e // 32) % 2 else (q & 0xF)
                    q |= ((np.int64(src[o + 16 + l]) >> (e // 32)) & 1) << 4
                    dst[320 + 64 * (e // 4) + 4 * r + e % 4] = q


@nb.njit(parallel=True, **_NOPY)
def _repack_q6k_x16(w, out):
    """Q6_K rows (rows, nb*210) -> groups of 16 rows (rows//16, nb, 4384), see simd.Q6_Kx16:
    d, the int8 scales in pairs (group g, row r at 32 + 32(g//2) + 2r + g%2), the values q (0..63) as bytes (quad
    chunk m byte 4r+t at 288 + 64m = element 4m + t)."""
    ng, nb_, bb = out.shape
    for g in prange(ng):
        for r in range(16):
            src = w[g * 16 + r]
            for b in range(nb_):
                o = b * 210
                dst = out[g, b]
                dst[2 * r] = src[o + 208]
                dst[2 * r + 1] = src[o + 209]
                for j in range(16):
                    dst[32 + 32 * (j // 2) + 2 * r + j % 2] = src[o + 192 + j]
                for h in range(2):
                    ql = o + 64 * h
                    qh = o + 128 + 32 * h
                    for l in range(32):
                        a = np.int64(src[ql + l])
                        c = np.int64(src[ql + l + 32])
                        hb = np.int64(src[qh + l])
                        for t, v in enumerate(((a & 0xF) | ((hb & 3) << 4), (c & 0xF) | (((hb >> 2) & 3) << 4),
                                               (a >> 4) | (((hb >> 4) & 3) << 4), (c >> 4) | (((hb >> 6) & 3) << 4))):
                            e = 128 * h + l + 32 * t
                            dst[288 + 64 * (e // 4) + 4 * r + e % 4] = v


_KREPACK = {"IQ4_XS": _repack_iq4xs_x16, "Q2_K": _repack_q2k_x16, "Q3_K": _repack_q3k_x16, "Q4_K": _repack_q4k_x16, "Q5_K": _repack_q5k_x16, "Q6_K": _repack_q6k_x16}   # repack functions of the K layouts


# ---------------------------------------------------------------- public API
@dataclass
class PreparedWeight:
    """A weight matrix ready for :func:`matmul`.

    ``w`` is the caller's (zero-copy) view. For types with a row-interleaved
    kernel, ``packed`` holds the first ``rows - rows % 16`` rows repacked (a
    copy of the same size) and the remaining rows are read from ``w``.
    """

    w: np.ndarray        # uint8 (rows, row_bytes)
    ggml_type: int
    k: int
    rows: int
    info: _TypeInfo
    packed: np.ndarray | None = None   # uint8 (rows // 16, nb, group_block_bytes)
    tail: np.ndarray | None = None     # w[rows - rows % 16:] when packed
    config: KernelConfig = None        # the knobs it was prepared with
    arm: np.ndarray | None = None      # uint8 (rows // 4, nb, group_block_bytes): kernels/arm.py's layout
    gemv: list | None = field(default=None, repr=False, compare=False)   # a single-row call's plan (_plan)
    plans: dict = field(default_factory=dict, repr=False, compare=False)  # n -> plan, for 2 <= n <= _PLANS_MAX_N
    chunk: int | None = field(default=None, repr=False, compare=False)   # GEMM rows per driver call (chunk_rows)

    @property
    def type_name(self) -> str:
        return self.info.name

    @property
    def nbytes(self) -> int:
        """Bytes of weight data one call streams."""
        return self.rows * self.w.shape[1]

    def __repr__(self):
        how = "repacked x16" if self.packed is not None else "repacked arm x4" if self.arm is not None else "native"
        return f"PreparedWeight({self.info.name}, rows={self.rows}, k={self.k}, {how})"


def type_name(ggml_type: int) -> str:
    info = _TYPES.get(ggml_type)
    return info.name if info else f"ggml type {ggml_type}"


def prepare(w_raw: np.ndarray, ggml_type: int, k: int, repack: bool | None = None,
            config: KernelConfig | None = None) -> PreparedWeight:
    """Check a weight matrix and wrap it for :func:`matmul`.

    ``w_raw``: uint8 array (rows, row_bytes), each row one output feature of
    ``k`` inputs in ggml's block layout (a 1-D buffer is split into rows).
    ``config`` (default :func:`current_config`): the kernels' knobs; ``repack``
    overrides its ``repack``, which builds the row-interleaved copy for types whose
    registry entry has one (Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL / Q2_K..Q6_K / IQ4_XS) and matrices of
    at least 16 rows; otherwise the data is used in place.
    """
    cfg = config or current_config()
    if repack is not None and repack != cfg.repack:
        cfg = replace(cfg, repack=bool(repack))
    info = _TYPES.get(int(ggml_type))
    if info is None:
        raise ValueError(f"matmul: unsupported weight type {type_name(ggml_type)} "
                         f"(supported: {', '.join(t.name for t in _TYPES.values())})")
    k = int(k)
    if k <= 0 or k % info.block:
        raise ValueError(f"matmul: k={k} is not a positive multiple of the {info.name} block size {info.block}")
    row_bytes = k // info.block * info.block_bytes
    w = np.asarray(w_raw)
    if w.dtype != np.uint8:
        raise ValueError(f"matmul: weight data must be uint8 bytes, got {w.dtype}")
    if w.ndim == 1:
        if w.size % row_bytes:
            raise ValueError(f"matmul: {w.size} bytes is not a whole number of {info.name} rows "
                             f"of k={k} ({row_bytes} bytes)")
        w = w.reshape(-1, row_bytes)
    if w.ndim != 2 or w.shape[1] != row_bytes:
        raise ValueError(f"matmul: {info.name} weight of k={k} needs rows of {row_bytes} bytes, got shape {w.shape}")
    if w.shape[0] == 0:
        raise ValueError("matmul: weight has no rows")
    if w.strides[1] != 1 or w.strides[0] < row_bytes:
        w = np.ascontiguousarray(w)
    if w.flags.writeable:
        # one compiled signature for mmap'd (read-only) and in-memory (fused, requantized) weights:
        # a writeable and a read-only array are two numba types, i.e. two first-run compiles
        w = w.view()
        w.flags.writeable = False
    pw = PreparedWeight(w, int(ggml_type), k, w.shape[0], info, config=cfg)
    lay = arm.layout(info.name)
    if cfg.arm and repack is not False and lay is not None and w.shape[0] % arm.ROWS == 0:
        # aarch64: 4-row groups for sdot by lane (A76) / smull + smlal (A72), GEMV and GEMM;
        # same bytes as the original, which is not read again
        pw.arm = lay.repack(w)
        drop_file_pages(w)
        return pw
    if cfg.repack and info.repacked is not None and info.repacked.kquant and w.shape[0] >= GROUP:
        # the original rows stay in use only where n = 1 runs the kgemv kernels on them (gemv_x16 off)
        ng = w.shape[0] // GROUP
        packed = np.empty((ng, k // 256, info.repacked.block_bytes), np.uint8)
        _par.call(_KREPACK[info.name], w[: ng * GROUP], packed)
        pw.packed = packed
        pw.tail = w[ng * GROUP:]
        if not cfg.kgemv_on_rows(info):
            drop_file_pages(w[: ng * GROUP])     # n = 1 runs the x16 groups too
    elif cfg.repack and info.repack and w.shape[0] >= GROUP:
        nsc, nch, nqh = info.repack
        ng = w.shape[0] // GROUP
        bb = 32 * nsc + 16 * nqh + 32 * nch
        packed = (np.zeros if nqh else np.empty)((ng, k // QK, bb), np.uint8)
        w16 = w[: ng * GROUP]
        if w16.strides[0] % 2 or w16.ctypes.data % 2:
            w16 = np.ascontiguousarray(w16)
            w16.flags.writeable = False         # the same compiled signature as a mapped tensor
        _par.call(_repack_x16, w16.view(np.uint16), info.block_bytes // 2, nsc, nch, nqh, packed.view(np.uint16))
        pw.packed = packed
        pw.tail = w[ng * GROUP:]
        drop_file_pages(w16)
    return pw


def drop_file_pages(a: np.ndarray) -> None:
    """After repacking rows of a read-only file mapping (a GGUF's mmap), tell the kernel their pages
    need not stay resident: the process then holds the repacked copy, not both (~ the weights' size
    less RSS). A page touched again is read back from the page cache. Anonymous memory is left alone."""
    base = a
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if base is None or not hasattr(base, "madvise") or a.size == 0:
        return
    start = a.ctypes.data - np.frombuffer(base, np.uint8, count=1).ctypes.data
    end = start + a.nbytes
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page       # whole pages inside the rows only
    if hi > lo:
        try:
            base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError, AttributeError):
            pass


def matmul(pw: PreparedWeight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W.T for x float32 (n, k) (a 1-D x is one row); returns float32 (n, rows).

    ``out``, if given, must be a writeable C-contiguous float32 (n, rows) array
    that does not overlap x. The jitted code releases the GIL.
    """
    if type(pw) is not PreparedWeight:
        raise TypeError("matmul: pass the object returned by prepare()")
    if type(x) is not np.ndarray or x.ndim != 2 or x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.asarray(x)
        if x.ndim == 1:
            x = x.reshape(1, -1)
        if x.ndim != 2 or x.dtype != np.float32:
            raise ValueError(f"matmul: x must be a float32 array of shape (n, {pw.k}), got {x.dtype} {x.shape}")
        x = np.ascontiguousarray(x)
    n, k = x.shape
    if k != pw.k:
        raise ValueError(f"matmul: x must have shape (n, {pw.k}) for this {pw.info.name} weight, got {x.shape}")
    if out is None:
        out = np.empty((n, pw.rows), np.float32)
    elif (type(out) is not np.ndarray or out.shape != (n, pw.rows) or out.dtype != np.float32
          or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"matmul: out must be a writeable C-contiguous float32 array of shape {(n, pw.rows)}")
    elif np.may_share_memory(out, x):
        raise ValueError("matmul: out must not overlap x")
    if n == 0:
        return out
    return run(pw, x, out)


def _plan(pw: PreparedWeight, n: int) -> list:
    """[layout, leading driver arguments, parallel worth it, serial driver, parallel driver] of a call
    with n activation rows (the drivers are compiled on first use: filled in by :func:`run`)."""
    cfg = pw.config
    if pw.arm is not None:
        packed, a0 = "arm", (pw.arm,)
    elif cfg.float_fma and pw.info.block == 1:
        packed, a0 = "ffma1" if n == 1 else "ffma", (pw.w,)
    else:
        packed = pw.packed is not None and not (n == 1 and pw.info.repacked.kquant and cfg.kgemv_on_rows(pw.info))
        a0 = (pw.packed, pw.tail) if packed else (pw.w,)
    return [packed, a0, pw.nbytes * max(1, n >> 1) >= cfg.parallel_min_bytes, None, None]


_PLANS_MAX_N = 64     # plans of calls with up to this many rows are kept on the weight
# chunks of a long GEMM (KernelConfig.gemm_chunk_bytes) are whole multiples of this many activation rows:
# a multiple of every driver's activation rows per tile (packed_nc 4, FF_NC 4 / 6 / 8, aarch64 4 / 8 / 10),
# so each chunk is tiled as the rows were in one call (the results do not depend on the chunking)
GEMM_ROWS_STEP = 120


def _act_row_bytes(pw: PreparedWeight) -> int:
    """Bytes of one activation row as the weight's GEMM kernels read it."""
    if pw.info.block == 1:
        return 4 * pw.k                                   # float32 (f16 / bf16 rounded) rows
    if pw.packed is not None and not pw.info.repacked.kquant:
        return 2 * pw.k                                   # int16 quants of the x16 legacy groups
    return pw.k


def chunk_rows(pw: PreparedWeight) -> int:
    """Activation rows per driver call of a GEMM on ``pw`` (see ``KernelConfig.gemm_chunk_bytes``)."""
    c = pw.chunk
    if c is None:
        b = pw.config.gemm_chunk_bytes
        if b <= 0:
            c = 1 << 62
        else:
            step = math.lcm(GEMM_ROWS_STEP, pw.config.packed_nc)
            c = max(1, b // _act_row_bytes(pw) // step) * step
        pw.chunk = c
    return c


def run(pw: PreparedWeight, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """:func:`matmul` without its argument checks, for the forward pass (per-token cost counts on a
    Pi): x float32 C-contiguous (n, k), n >= 1; out float32 (n, rows), rows contiguous, its row stride
    free (a column slice of a wider output). The plan of a call of up to ``_PLANS_MAX_N`` rows is kept on
    the weight (a decode step's Python cost counts on a Pi). More than 1.5 x :func:`chunk_rows` rows run
    as several calls of that many, the last one taking the rest (a pp128 of the 1.1B Q4_0 stays one call
    where its ffn_down chunk is 120 rows; a pp512 runs 120 + 120 + 120 + 152)."""
    n = x.shape[0]
    if n == 1:
        p = pw.gemv
    else:
        c = pw.chunk or chunk_rows(pw)
        if n > c + (c >> 1):
            s = 0
            while n - s > c + (c >> 1):
                run(pw, x[s:s + c], out[s:s + c])
                s += c
            run(pw, x[s:], out[s:])            # the last chunk takes the rest: 0.5 to 1.5 chunks
            return out
        p = pw.plans.get(n)
    if p is None:
        p = _plan(pw, n)
        if n == 1:
            pw.gemv = p
        elif n <= _PLANS_MAX_N:          # a server's decode steps (one row per busy slot)
            pw.plans[n] = p
    if p[2] and _par.num_threads() > 1:
        fn = p[4]
        if fn is None:
            fn = p[4] = driver(pw.info, p[0], True, pw.config)
        _par.call(fn, *p[1], x, out)     # one thread at a time under workqueue
    else:
        fn = p[3]
        if fn is None:
            fn = p[3] = driver(pw.info, p[0], False, pw.config)
        fn(*p[1], x, out)
    return out
