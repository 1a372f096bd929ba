"""Explicit SIMD for numba: LLVM generic vector IR emitted through ``@intrinsic``.

numba's own loops over int8 data stay scalar or use 64-bit lanes (see
DESIGN.md), so the inner loops of the quantized matmul are written here as
LLVM IR with llvmlite: a whole tile of the output (NR weight rows x NC
activation rows, all blocks of k) is one intrinsic call. Only generic IR is
used (vector types, ``sext``/``mul``/``shufflevector``/``fptrunc``/``freeze``,
``llvm.vector.reduce.*``, ``llvm.vector.partial.reduce.add``,
``llvm.roundeven``), no target intrinsic names, so the same Python compiles
for x86 (AVX2 / AVX-512) and aarch64 (NEON, ``sdot`` with +dotprod).

Kernel families (entry points used by matmul.py):

* :func:`interleaved_kernel` -- weights repacked in groups of 16 rows
  (:class:`Interleaved`): lane r of every vector belongs to row r, so 16
  outputs come out of one vector with no horizontal sums. Quants are
  unpacked to int16 *pairs* (elements 2j, 2j+1 of each row side by side)
  and multiplied with the activation pair broadcast from memory; the
  even + odd lane sum is matched by LLVM as x86 ``vpmaddwd``, and
  ``add(acc, that)`` as ``vpdpwssd`` (AVX-512 VNNI) with an embedded
  ``{1to16}`` broadcast operand. Zen 4, Q4_0: 74 instructions per block of
  16 rows x 32 (288 bytes). On NEON the same IR is smull + uzp shuffles with
  spills (~10x more), so matmul.py only repacks on x86-64.
* :func:`kinterleaved_kernel` -- K-quant super-blocks repacked in groups of 16
  rows (:class:`KInterleaved`: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS): unsigned quants
  in 64-byte *quad* chunks (4 elements of each row side by side) times int8
  activations, four at a time, by ``vpdpbusd`` (:meth:`Emitter.dot_quads`, named
  where the host has AVX-512 VNNI; else ``vpmaddubsw`` + ``vpmaddwd``); signs and
  mins come back through the activation sums. x86-64 only (``repack``).
* :func:`tile_kernel` -- the native (zero-copy) block layouts, every type.
  Per (row, activation row, block): a <W x i32> partial dot product, converted
  to float and fused-multiply-added with the block's scale into a float
  accumulator; one horizontal sum per output at the end. x86: the pairs
  pattern (``vpmovsxbw`` + ``vpmaddwd``); aarch64: ``partial.reduce.add``
  into 4 lanes, which is ``sdot`` on cortex-a76 (the lane grouping of
  partial.reduce is unspecified, harmless here because all lanes of a block
  get the same scale).
* :func:`ktile_kernel` -- Q4_K / Q6_K super-blocks against Q8_K activations.
* :func:`kgemv_kernel` -- the same for one row (n == 1) on x86: u8 x s8 pair
  products written so that LLVM matches ``vpmaddubsw`` (a ``freeze`` or an
  opaque mask keeps InstCombine from narrowing them to int16 multiplies).
* :func:`quantize_row_kernel` -- ggml's quantize_row_q8_0/q8_1, vectorized.

Lessons from the assembly (``benchmarks/bench_kernels.py --asm`` and
``--arm-asm``, which cross-compiles for cortex-a76/a72):

* LLVM's reassociate pass merges independent integer accumulation chains
  into one serial chain of ``vpdpwssd`` (5-cycle latency each): ``freeze``
  on each partial sum keeps them apart (Q4_0 n=1 in L2: 20 -> 28 GB/s).
* known-non-negative values (nibbles) get their ``sext`` turned into
  ``zext``, which breaks both the ``vpmaddwd`` and the ``sdot`` patterns:
  ``freeze`` the scaled values (Q4_K x86), or dot ``q - 8`` and correct with
  the activation sums (Q4_K aarch64).
* max |x| of the activation blocks through the integer bit patterns
  (``reduce.umax``) instead of ``reduce.fmax``, which LLVM scalarizes.
* the Q5 fifth bits: ``bitcast i32 -> <32 x i1>`` is ``kmovd`` + a masked op
  on AVX-512 but a long expansion on NEON, where a byte spread + ``cmtst``
  is used instead.

Everything here is compile-time Python that builds IR; nothing runs per call.
Pointers are passed as integers (``arr.ctypes.data`` in the jitted caller):
the caller validates every shape before calling, the IR does no bounds checks.
Nothing here reads the environment: software prefetch distances are factory arguments
(``prefetch``, from matmul.KernelConfig), the target facts (``PARTIAL_REDUCE``, ``TARGET_ARCH``,
``VECTOR_BITS``) come from the machine.
Every intrinsic carries a ``kernel_name`` that spells out all its compile-time
choices (for reports). The factories take the registry's decoder objects (kernels/quants.py);
kernels/dispatch.py names them by type name for the drivers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import platform
from functools import lru_cache

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F16 = ir.HalfType()
F32 = ir.FloatType()
P8 = I8.as_pointer()


def vec(t, n):
    return ir.VectorType(t, n)


def c64(v):
    return ir.Constant(I64, v)


def c32(v):
    return ir.Constant(I32, v)


def _host_vector_bits() -> int:
    """Width of the host's vector registers: picks tile accumulator widths only."""
    try:
        feats = llvm.get_host_cpu_features()
        if feats.get("avx512f", False) and feats.get("avx512bw", False):
            return 512
        if feats.get("avx2", False):
            return 256
    except Exception:  # pragma: no cover - exotic hosts
        pass
    return 128


VECTOR_BITS = _host_vector_bits()
# Software prefetch (bytes ahead in each weight row) is a factory argument (``prefetch``), from
# matmul.KernelConfig.prefetch / prefetch_packed: nothing here reads the environment.
# aarch64: block dot products as llvm.vector.partial.reduce.add (sdot with
# +dotprod, e.g. cortex-a76); elsewhere as pairwise sums (x86 vpmaddwd). A fact of the target,
# set for cross-compiling experiments only (benchmarks/bench_kernels.py --arm-asm, arm_mca.py).
PARTIAL_REDUCE = platform.machine().lower() in ("aarch64", "arm64")
# the host's instruction set family, for the few target intrinsics (lookup16)
TARGET_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
# float lanes per accumulator: one register on this machine
ACC_LANES = {512: 16, 256: 8}.get(VECTOR_BITS, 4)


def _host_vnni512() -> bool:
    """x86-64 with AVX-512 VNNI (``vpdpbusd`` on 64 bytes) in the CPU numba compiles for (the host
    unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise): :meth:`Emitter.dot_quads` names it."""
    from numba import config
    feats_set = config.CPU_FEATURES or ""
    if "-avx512vnni" in feats_set or (config.CPU_NAME or "host") != "host" and "+avx512vnni" not in feats_set:
        return False
    try:
        feats = llvm.get_host_cpu_features()
        return TARGET_ARCH == "x86_64" and VECTOR_BITS == 512 and bool(feats.get("avx512vnni", False))
    except Exception:  # pragma: no cover - exotic hosts
        return False


VNNI512 = _host_vnni512()


# ---------------------------------------------------------------- IR helpers
def _intrinsic_call(b, name, ret, args):
    """Call an LLVM generic intrinsic (llvm.vector.reduce.*, llvm.roundeven.*, ...)."""
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return b.call(fn, args)


class Emitter:
    """Small wrapper over an llvmlite IRBuilder with the vector idioms we need."""

    def __init__(self, builder: ir.IRBuilder):
        self.b = builder

    # --- memory
    def ptr(self, base, off):
        """i8* base + byte offset (i64)."""
        return self.b.gep(base, [off])

    def load(self, base, off, ty, align=1):
        p = self.b.bitcast(self.ptr(base, off), ty.as_pointer())
        return self.b.load(p, align=align)

    def store(self, val, base, off, align=1):
        p = self.b.bitcast(self.ptr(base, off), val.type.as_pointer())
        self.b.store(val, p, align=align)

    def fence(self, *live):
        """An empty ``asm sideeffect`` with a memory clobber, taking the values ``live`` as operands: no
        instruction, but the scheduler moves no load across it (C's ``asm volatile("" ::: "memory")``) and
        computes ``live`` before it. Keeps LLVM from hoisting the loads of a later step of an unrolled
        loop body above this one's work and from sinking this step's sums below, both spilled."""
        # vector registers (read now, not at import: the cross-compiling tools set TARGET_ARCH), one
        # operand per register-sized piece (a <16 x i32> is four NEON / two AVX2 registers)
        reg, bits = {"x86_64": ("v", VECTOR_BITS), "aarch64": ("w", 128)}.get(TARGET_ARCH, (None, 0))
        pieces = []
        for v in live if reg else ():
            if isinstance(v, ir.Constant):
                continue
            lanes = max(1, bits // v.type.element.width)
            n = v.type.count
            pieces += [v] if n <= lanes else [self.shuffle(v, None, range(i, i + lanes)) for i in range(0, n, lanes)]
        live = pieces
        self.b.asm(ir.FunctionType(ir.VoidType(), [v.type for v in live]), "",
                   ",".join([reg] * len(live) + ["~{memory}"]), live, True)

    def prefetch(self, base, off):
        """llvm.prefetch (read, keep in all cache levels): prefetcht0 / prfm pldl1keep. Never faults."""
        p = self.ptr(base, off)
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(ir.VoidType(), [P8, I32, I32, I32]), "llvm.prefetch.p0")
        self.b.call(fn, [p, c32(0), c32(3), c32(1)])

    def load_f16(self, base, off):
        return self.b.fpext(self.load(base, off, F16), F32)

    # --- vectors
    def splat(self, v, n):
        vt = vec(v.type, n)
        u = self.b.insert_element(ir.Constant(vt, ir.Undefined), v, c32(0))
        return self.b.shuffle_vector(u, ir.Constant(vt, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))

    def const_vec(self, t, n, value):
        return ir.Constant(vec(t, n), [value] * n)

    def shuffle(self, a, b, idx):
        if b is None:
            b = ir.Constant(a.type, ir.Undefined)
        return self.b.shuffle_vector(a, b, ir.Constant(vec(I32, len(idx)), list(idx)))

    def concat(self, a, b):
        n = a.type.count
        return self.shuffle(a, b, range(2 * n))

    def half(self, v, hi):
        n = v.type.count // 2
        return self.shuffle(v, None, range(n * hi, n * hi + n))

    def fold_add(self, v, lanes, fp=False):
        """Add the halves of v until it has ``lanes`` lanes (lane i keeps sum of i mod lanes)."""
        add = (lambda a, b: self.b.fadd(a, b, flags=("reassoc", "contract"))) if fp else self.b.add
        while v.type.count > lanes:
            v = add(self.half(v, 0), self.half(v, 1))
        return v

    def reduce_fadd(self, v):
        n = v.type.count
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(F32, [F32, v.type]), f"llvm.vector.reduce.fadd.v{n}f32"
        )
        return self.b.call(fn, [ir.Constant(F32, 0.0), v], fastmath=("reassoc",))

    def dot_pairs(self, a, b):
        """<2n x iX> a, b (signed) -> <n x i32>: lane i = a[2i]*b[2i] + a[2i+1]*b[2i+1].

        LLVM matches this as vpmaddwd on x86 when the inputs are <= 16-bit values.
        """
        n2 = a.type.count
        t32 = vec(I32, n2)
        a32 = a if a.type.element == I32 else self.b.sext(a, t32)
        b32 = b if b.type.element == I32 else self.b.sext(b, t32)
        p = self.b.mul(a32, b32, flags=("nsw",))
        ev = self.shuffle(p, None, range(0, n2, 2))
        od = self.shuffle(p, None, range(1, n2, 2))
        return self.b.add(ev, od, flags=("nsw",))

    def dot_quads(self, acc, a, x, amax=255):
        """acc <16 x i32> + the u8 x s8 quad sums of <64 x i8> a (unsigned, at most ``amax``) and x
        (signed): lane i += sum_t a[4i+t] * x[4i+t]. x86 with AVX-512 VNNI: ``vpdpbusd`` (named: LLVM
        does not match it from generic IR); elsewhere u8 x s8 pair sums (:func:`_maddubs`:
        ``vpmaddubsw``, which saturates: only while 2 * amax * 128 fits int16, amax <= 127) then int16
        pair sums (``vpmaddwd``), else int16 products summed in int32 (``vpmaddwd`` + adds)."""
        b = self.b
        if VNNI512 and a.type.count == 64:
            t = vec(I32, 16)
            return _intrinsic_call(b, "llvm.x86.avx512.vpdpbusd.512", t,
                                   [acc, b.bitcast(a, t), b.bitcast(x, t)])
        n = a.type.count
        if amax <= 127:
            p16 = _maddubs(self, a, x)
            return b.add(acc, self.dot_pairs(p16, self.const_vec(I16, n // 2, 1)))
        p32 = self.dot_pairs(b.zext(a, vec(I16, n)), b.sext(x, vec(I16, n)))       # <n/2 x i32>, exact
        return b.add(acc, b.add(self.shuffle(p32, None, range(0, n // 2, 2)), self.shuffle(p32, None, range(1, n // 2, 2))))

    def freeze(self, v):
        """LLVM ``freeze``: an identity that optimizers do not look through.

        Used to keep independent accumulation chains apart: LLVM's reassociate
        pass would otherwise merge them into one serial chain of multiply-adds.
        """
        ins = _Freeze(self.b.block, v.type, "freeze", [v])
        self.b._insert(ins)
        return ins

    def dot_block(self, a, b, lanes):
        """Signed dot product of two <32 x i8|i16> vectors as a <lanes x i32> whose lanes sum to it.

        Which products land in which lane is unspecified: use only where the
        lanes are summed later with the same weight (one block, one scale).
        """
        if PARTIAL_REDUCE and lanes == 4:
            n = a.type.count
            t32 = vec(I32, n)
            p = self.b.mul(self.b.sext(a, t32), self.b.sext(b, t32), flags=("nsw",))
            return _intrinsic_call(self.b, f"llvm.vector.partial.reduce.add.v4i32.v{n}i32", vec(I32, 4),
                                   [ir.Constant(vec(I32, 4), None), p])
        return self.fold_add(self.dot_pairs(a, b), lanes)

    def fmul(self, a, b):
        return self.b.fmul(a, b, flags=("contract",))

    def fadd(self, a, b):
        return self.b.fadd(a, b, flags=("contract",))

    def fma(self, a, b, c):
        """a*b + c with contraction allowed (LLVM emits an fma where the target has one)."""
        return self.fadd(self.fmul(a, b), c)


class _Freeze(ir.instructions.Instruction):
    def descr(self, buf):
        v = self.operands[0]
        buf.append(f"freeze {v.type} {v.get_reference()}\n")


def counted_loop(b: ir.IRBuilder, n, inits, body, step=1):
    """for i in range(0, n, step): vals = body(i, vals) -- as IR with phi nodes.

    ``n`` must be a multiple of ``step`` (the caller splits off remainders).
    Returns the final values.
    """
    pre = b.block
    loop = b.append_basic_block("loop")
    done = b.append_basic_block("done")
    zero = c64(0)
    b.cbranch(b.icmp_signed(">", n, zero), loop, done)
    b.position_at_end(loop)
    i = b.phi(I64)
    phis = [b.phi(v.type) for v in inits]
    i.add_incoming(zero, pre)
    for p, v in zip(phis, inits):
        p.add_incoming(v, pre)
    new = body(i, phis)
    inext = b.add(i, c64(step))
    end = b.block
    i.add_incoming(inext, end)
    for p, v in zip(phis, new):
        p.add_incoming(v, end)
    b.cbranch(b.icmp_signed("<", inext, n), loop, done)
    b.position_at_end(done)
    out = []
    for v, nv in zip(inits, new):
        r = b.phi(v.type)
        r.add_incoming(v, pre)
        r.add_incoming(nv, end)
        out.append(r)
    return out


# ------------------------------------------------------- weight block formats
class BlockDecoder:
    """How the kernels read one block of a format: the ``simd`` field of a registry entry.

    ``name`` and ``block_bytes`` come from the registry entry; ``layout`` maps field
    names ("d", "qs", ...) to their byte offsets inside a block, also from the entry
    (kernels/quants.py), so no byte offset is typed twice. Subclasses implement
    ``decode``; :meth:`at` is the address of a field.
    """

    act = "q8_0"          # activation (vec_dot) format of the tile kernels: q8_0, q8_1 or float
    integer = True

    def __init__(self, name: str, block_bytes: int, layout: dict):
        self.name, self.block_bytes, self.layout = name, block_bytes, dict(layout)

    def at(self, e: "Emitter", off, field: str, extra: int = 0):
        """Byte offset of ``field`` (+ ``extra``) in the block that starts at ``off``."""
        return e.b.add(off, c64(self.layout[field] + extra))

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"


class WeightFormat(BlockDecoder):
    """A 32-element block format for :func:`tile_kernel`.

    ``decode`` returns (q, scales): q is <32 x i8> (<32 x i16> if wide; <32 x float>
    for float formats) in element order; scales a dict with 'd' (and 'm' for the
    affine formats) as float scalars.
    """

    def decode(self, e: Emitter, wp, off, wide=False):
        raise NotImplementedError


def _nibbles(e: Emitter, wp, off, wide=False):
    """16 bytes -> <32 x i8> (<32 x i16> if wide): low nibbles are elements 0..15, high nibbles 16..31."""
    qs = e.load(wp, off, vec(I8, 16))
    t = I8
    if wide:
        t = I16
        qs = e.b.zext(qs, vec(I16, 16))
    lo = e.b.and_(qs, e.const_vec(t, 16, 0x0F))
    hi = e.b.lshr(qs, e.const_vec(t, 16, 4))
    return e.concat(lo, hi)


def _high_bits(e: Emitter, wp, off, wide=False):
    """4 bytes (little-endian u32) -> <32 x i8> (i16) with bit j of the word as 0x10 in lane j."""
    t = I16 if wide else I8
    if PARTIAL_REDUCE:
        # NEON: no mask registers; spread the 4 bytes over 32 lanes and test
        # one bit per lane (dup/tbl + cmtst) instead of expanding an i1 vector
        qh = e.load(wp, off, vec(I8, 4))
        spread = e.shuffle(qh, None, [j // 8 for j in range(32)])
        bit = ir.Constant(vec(I8, 32), [1 << (j % 8) for j in range(32)])
        bits = e.b.icmp_unsigned("!=", e.b.and_(spread, bit), ir.Constant(vec(I8, 32), None))
    else:
        bits = e.b.bitcast(e.load(wp, off, I32), vec(I1, 32))
    return e.b.shl(e.b.zext(bits, vec(t, 32)), e.const_vec(t, 32, 4))


def lookup16(e: Emitter, idx, table):
    """<n x i8> indices 0..15 -> <n x i8> table[idx] (a 16-entry int8 table, n a multiple of 16).

    The one place where target intrinsics are named: a byte shuffle is ``pshufb`` on
    x86 (SSSE3; AVX2 on 32 bytes, which shuffles within 128-bit lanes, hence the
    table twice) and ``tbl`` on aarch64; other targets get a select tree.
    """
    b = e.b
    n = idx.type.count
    v16 = vec(I8, 16)
    if PARTIAL_REDUCE or TARGET_ARCH == "aarch64":
        tab = ir.Constant(v16, list(table))
        parts = [_intrinsic_call(b, "llvm.aarch64.neon.tbl1.v16i8", v16, [tab, e.shuffle(idx, None, range(o, o + 16))])
                 for o in range(0, n, 16)]
    elif TARGET_ARCH == "x86_64" and VECTOR_BITS >= 256 and n % 32 == 0:
        v32 = vec(I8, 32)
        tab = ir.Constant(v32, list(table) * 2)
        parts = [_intrinsic_call(b, "llvm.x86.avx2.pshuf.b", v32, [tab, e.shuffle(idx, None, range(o, o + 32))])
                 for o in range(0, n, 32)]
    elif TARGET_ARCH == "x86_64":
        tab = ir.Constant(v16, list(table))
        parts = [_intrinsic_call(b, "llvm.x86.ssse3.pshuf.b.128", v16, [tab, e.shuffle(idx, None, range(o, o + 16))])
                 for o in range(0, n, 16)]
    else:
        vals = [ir.Constant(vec(I8, n), [t] * n) for t in table]
        for bit in (1, 2, 4, 8):
            m = b.icmp_unsigned("!=", b.and_(idx, e.const_vec(I8, n, bit)), ir.Constant(vec(I8, n), None))
            vals = [b.select(m, vals[i + 1], vals[i]) for i in range(0, len(vals), 2)]
        return vals[0]
    while len(parts) > 1:
        parts = [e.concat(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return parts[0]


class Q4_0(WeightFormat):
    def decode(self, e, wp, off, wide=False):
        d = e.load_f16(wp, self.at(e, off, "d"))
        q = _nibbles(e, wp, self.at(e, off, "qs"), wide)
        q = e.b.sub(q, e.const_vec(q.type.element, 32, 8))
        return q, {"d": d}


class Q4_1(WeightFormat):
    act = "q8_1"

    def decode(self, e, wp, off, wide=False):
        d = e.load_f16(wp, self.at(e, off, "d"))
        m = e.load_f16(wp, self.at(e, off, "m"))
        q = _nibbles(e, wp, self.at(e, off, "qs"), wide)
        return q, {"d": d, "m": m}


class Q5_0(WeightFormat):
    def decode(self, e, wp, off, wide=False):
        d = e.load_f16(wp, self.at(e, off, "d"))
        h = _high_bits(e, wp, self.at(e, off, "qh"), wide)
        q = e.b.or_(_nibbles(e, wp, self.at(e, off, "qs"), wide), h)
        return e.b.sub(q, e.const_vec(q.type.element, 32, 16)), {"d": d}


class Q5_1(WeightFormat):
    act = "q8_1"

    def decode(self, e, wp, off, wide=False):
        d = e.load_f16(wp, self.at(e, off, "d"))
        m = e.load_f16(wp, self.at(e, off, "m"))
        h = _high_bits(e, wp, self.at(e, off, "qh"), wide)
        q = e.b.or_(_nibbles(e, wp, self.at(e, off, "qs"), wide), h)
        return q, {"d": d, "m": m}


class Q8_0(WeightFormat):
    def decode(self, e, wp, off, wide=False):
        d = e.load_f16(wp, self.at(e, off, "d"))
        q = e.load(wp, self.at(e, off, "qs"), vec(I8, 32))
        return q, {"d": d}


class IQ4_NL(WeightFormat):
    """block_iq4_nl: d (fp16), qs[16]: nibbles index the non-linear table ``values``."""

    def __init__(self, name, block_bytes, layout, values):
        super().__init__(name, block_bytes, layout)
        self.values = tuple(int(v) for v in values)

    def decode(self, e, wp, off, wide=False):
        d = e.load_f16(wp, self.at(e, off, "d"))
        q = lookup16(e, _nibbles(e, wp, self.at(e, off, "qs")), self.values)
        if wide:
            q = e.b.sext(q, vec(I16, 32))
        return q, {"d": d}


class F32W(WeightFormat):
    """Float formats: a "block" is 32 consecutive elements (block_bytes = 32 x element size)."""

    act, integer = "float", False

    def decode(self, e, wp, off, wide=False):
        return e.load(wp, off, vec(F32, 32)), {}

    def decode_scalar(self, e, wp, off):
        return e.load(wp, off, F32)


class F16W(F32W):
    def decode(self, e, wp, off, wide=False):
        return e.b.fpext(e.load(wp, off, vec(F16, 32)), vec(F32, 32)), {}

    def decode_scalar(self, e, wp, off):
        return e.load_f16(wp, off)


class BF16W(F32W):
    def decode(self, e, wp, off, wide=False):
        raw = e.load(wp, off, vec(I16, 32))
        w = e.b.shl(e.b.zext(raw, vec(I32, 32)), e.const_vec(I32, 32, 16))
        return e.b.bitcast(w, vec(F32, 32)), {}

    def decode_scalar(self, e, wp, off):
        w = e.b.shl(e.b.zext(e.load(wp, off, I16), I32), c32(16))
        return e.b.bitcast(w, F32)


# ------------------------------------------------------------- tile kernels
@dataclass
class _Tile:
    """What one tile kernel's IR builders share: the emitter, the format, the tile shape and
    the base pointers / row offsets of weights, activations, scales and output."""

    e: "Emitter"
    fmt: "WeightFormat"
    NR: int
    NC: int
    W: int
    wide: bool
    xelem: object
    xsize: int
    wp: object
    xqp: object
    xdp: object
    xsp: object
    op: object
    wrow: list
    xrow: list
    srow: list
    prefetch: int = 0     # software prefetch distance in bytes ahead in each weight row (0: off)

    @property
    def affine(self) -> bool:
        return self.fmt.act == "q8_1"


def _tile_block(t: _Tile, i, accs):
    """Accumulate block i of the NR weight rows x NC activation rows into accs (one set)."""
    e, b, fmt = t.e, t.e.b, t.fmt
    NR, NC, W = t.NR, t.NC, t.W
    woff = b.mul(i, c64(fmt.block_bytes))
    if t.prefetch:
        for r in range(NR):
            e.prefetch(t.wp, b.add(b.add(t.wrow[r], woff), c64(t.prefetch)))
    blocks = [fmt.decode(e, t.wp, b.add(t.wrow[r], woff), t.wide) for r in range(NR)]
    new = list(accs)
    if not fmt.integer:
        xoff = b.mul(i, c64(128))
        for c in range(NC):
            xv = e.load(t.xqp, b.add(t.xrow[c], xoff), vec(F32, 32))
            for r in range(NR):
                k = r * NC + c
                new[k] = e.fadd(accs[k], e.fold_add(e.fmul(blocks[r][0], xv), W, fp=True))
        return new
    xoff = b.mul(i, c64(32 * t.xsize))
    soff = b.mul(i, c64(4))
    for c in range(NC):
        xv = e.load(t.xqp, b.add(t.xrow[c], xoff), vec(t.xelem, 32))
        dx = e.load(t.xdp, b.add(t.srow[c], soff), F32)
        sx = e.load(t.xsp, b.add(t.srow[c], soff), F32) if t.affine else None
        for r in range(NR):
            q, sc = blocks[r]
            sf = b.sitofp(e.dot_block(q, xv, W), vec(F32, W))     # <W x i32> partial dot
            k = r * NC + c
            new[k] = e.fma(sf, e.splat(e.fmul(sc["d"], dx), W), accs[k])
            if t.affine:
                new[NR * NC + k] = e.fma(sc["m"], sx, accs[NR * NC + k])
    return new


def _tile_float_tail(t: _Tile, nb_, ntail_):
    """Float formats: the k % 32 elements after the blocks, one at a time; NR*NC float sums."""
    e, b, fmt = t.e, t.e.b, t.fmt
    esz = fmt.block_bytes // 32
    wbase = b.mul(nb_, c64(fmt.block_bytes))
    xbase = b.mul(nb_, c64(128))

    def tail_body(j, ts):
        new = list(ts)
        xt = [e.load(t.xqp, b.add(t.xrow[c], b.add(xbase, b.mul(j, c64(4)))), F32) for c in range(t.NC)]
        for r in range(t.NR):
            wv = fmt.decode_scalar(e, t.wp, b.add(t.wrow[r], b.add(wbase, b.mul(j, c64(esz)))))
            for c in range(t.NC):
                new[r * t.NC + c] = e.fma(wv, xt[c], ts[r * t.NC + c])
        return new

    return counted_loop(b, ntail_, [ir.Constant(F32, 0.0)] * (t.NR * t.NC), tail_body)


@lru_cache(maxsize=None)
def tile_kernel(fmt, NR: int, NC: int, lanes: int = 0, unroll: int = 1,
                act16: bool = False, wide: bool = False, prefetch: int = 0):
    """An intrinsic computing an NR x NC tile of out = x @ W.T over ``nb`` blocks of 32.

    Signature (all int64; pointers are addresses of C-contiguous arrays)::

        tile(w, w_stride, xq, xq_stride, xd, xs, x_stride, nb, ntail, out, out_stride)

    * ``w``: address of weight row r0; row r is at ``w + r*w_stride`` bytes.
    * integer formats: ``xq`` int8 activations (row c at ``xq + c*xq_stride``),
      ``xd`` float32 block scales (fp16-rounded) and ``xs`` float32 block
      sums d*sum(q) (Q8_1 formats only), both with ``x_stride`` bytes per
      activation row.
      float formats: ``xq`` float32 activations, ``xd``/``xs`` unused, and
      ``ntail`` more elements after the ``nb`` blocks (k % 32) summed by a
      scalar loop.
    * ``out``: address of out[c0, r0] (float32), row c at ``out + c*out_stride``.

    Writes out[c, r] = sum over blocks for r < NR, c < NC (overwrites).
    """
    fmt_name = fmt.name
    W = lanes or ACC_LANES
    W = min(W, 16 if fmt.integer else 32)
    U = max(1, unroll)
    xelem, xsize = (I16, 2) if act16 else (I8, 1)

    @intrinsic
    def tile(typingctx, w, w_stride, xq, xq_stride, xd, xs, x_stride, nb, ntail, out, out_stride):
        sig = types.void(*([types.int64] * 11))

        def codegen(context, builder, signature, args):
            e = Emitter(builder)
            b = builder
            (w_, ws_, xq_, xqs_, xd_, xs_, xst_, nb_, ntail_, out_, os_) = args
            t = _Tile(e, fmt, NR, NC, W, wide, xelem, xsize, *(b.inttoptr(a, P8) for a in (w_, xq_, xd_, xs_, out_)),
                      [b.mul(ws_, c64(r)) for r in range(NR)], [b.mul(xqs_, c64(c)) for c in range(NC)],
                      [b.mul(xst_, c64(c)) for c in range(NC)], prefetch)
            zero_v = ir.Constant(vec(F32, W), None)
            inits = [zero_v] * (NR * NC) + [ir.Constant(F32, 0.0)] * (NR * NC if t.affine else 0)
            nacc = len(inits)

            def body(i, accs):
                new = []
                for u in range(U):
                    new += _tile_block(t, b.add(i, c64(u)), accs[u * nacc:(u + 1) * nacc])
                return new

            nmain = b.mul(b.sdiv(nb_, c64(U)), c64(U)) if U > 1 else nb_
            accs = counted_loop(b, nmain, inits * U, body, step=U)
            if U > 1:
                sets = [accs[u * nacc:(u + 1) * nacc] for u in range(U)]
                accs = [functools.reduce(e.fadd, vs) for vs in zip(*sets)]
                accs = counted_loop(b, b.sub(nb_, nmain), accs, lambda j, a: _tile_block(t, b.add(nmain, j), a))
            tails = [] if fmt.integer else _tile_float_tail(t, nb_, ntail_)
            for r in range(NR):
                for c in range(NC):
                    k = r * NC + c
                    v = e.reduce_fadd(accs[k])
                    if t.affine:
                        v = b.fadd(v, accs[NR * NC + k])
                    if tails:
                        v = b.fadd(v, tails[k])
                    e.store(v, t.op, b.add(b.mul(os_, c64(c)), c64(4 * r)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    tile.kernel_name = (f"tile_{fmt_name}_{NR}x{NC}_l{W}_u{U}_a{int(act16)}_w{int(wide)}"
                        f"_pr{int(PARTIAL_REDUCE)}_pf{prefetch}")
    return tile


# ------------------------------------------------------ scalar conversions
@intrinsic
def f32_to_f16_to_f32(typingctx, x):
    """Round a float32 to the nearest float16 (ties to even) and back: ggml's FP32_TO_FP16."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        h = builder.fptrunc(args[0], F16)
        return builder.fpext(h, F32)

    return sig, codegen


f32_to_f16_to_f32.kernel_name = "f32_to_f16_to_f32"


# ------------------------------------------------------ fixed-order float dot products
def _make_dot_lanes(half: bool):
    @intrinsic
    def dot(typingctx, ap, bp, n):
        """sum(a[j] * b[j]) for j < n (n a multiple of 16; a float32, b float32 or f16 bits at the
        addresses ap, bp): 16 lanes, lane l sums j = l mod 16 in order by fused multiply-adds
        (llvm.fma: one rounding on every target), then the lanes are added as a fixed tree (lane l
        and l + 8, then l and l + 4, ...). No reassociation anywhere: the floats do not depend on
        the enclosing code, the buffers' addresses or the target's vector width (the attention's
        batch invariance, kernels/ops.py)."""
        sig = types.float32(types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            e = Emitter(builder)
            b = builder
            a_, b_ = (b.inttoptr(x, P8) for x in args[:2])
            v16 = vec(F32, 16)

            def body(i, accs):
                x = e.load(a_, b.mul(i, c64(4)), v16, align=4)
                if half:
                    y = b.fpext(e.load(b_, b.mul(i, c64(2)), vec(F16, 16), align=2), v16)
                else:
                    y = e.load(b_, b.mul(i, c64(4)), v16, align=4)
                return [_fma(b, x, y, accs[0])]

            (v,) = counted_loop(b, args[2], [ir.Constant(v16, None)], body, step=16)
            while v.type.count > 1:
                v = b.fadd(e.half(v, 0), e.half(v, 1))
            return b.extract_element(v, c32(0))

        return sig, codegen

    dot.kernel_name = f"dot_lanes16_{'f16' if half else 'f32'}"
    return dot


dot_lanes16_f32 = _make_dot_lanes(False)
dot_lanes16_f16 = _make_dot_lanes(True)


# ------------------------------------------------------ decode attention over f16 cells
def _lane_tree(b, e, v):
    """The lanes of v summed as :func:`_make_dot_lanes` sums them (lane l and l + n/2, ...)."""
    while v.type.count > 1:
        v = b.fadd(e.half(v, 0), e.half(v, 1))
    return b.extract_element(v, c32(0))


def _make_lanes16(op: str):
    @intrinsic
    def lanes(typingctx, p, n16):
        """Over the float32s at p[0..n16) (n16 a positive multiple of 16), 16 lanes (lane l takes the
        elements j = l mod 16 in order), then the lanes combined as :func:`_lane_tree` adds them (lane l
        and l + 8, ...). ``sum``: ``((0 + x_l) + x_(l+16)) + ...``, each add rounded: the order of the
        attention's 16 scalar lanes (ops._sum). ``max``: a max is exact, any order gives its value."""
        sig = types.float32(types.int64, types.int64)

        def codegen(context, builder, signature, args):
            e = Emitter(builder)
            b = builder
            p0 = b.inttoptr(args[0], P8)
            v16 = vec(F32, 16)

            def comb(a, x):
                if op == "sum":
                    return b.fadd(a, x)
                return b.select(b.fcmp_ordered(">", x, a), x, a)

            first = e.load(p0, c64(0), v16, align=4) if op == "max" else ir.Constant(v16, None)

            def body(i, accs):
                return [comb(accs[0], e.load(p0, b.mul(i, c64(4)), v16, align=4))]

            (v,) = counted_loop(b, args[1], [first], body, step=16)
            while v.type.count > 1:
                v = comb(e.half(v, 0), e.half(v, 1))
            return b.extract_element(v, c32(0))

        return sig, codegen

    lanes.kernel_name = f"{op}_lanes16_f32"
    return lanes


sum_lanes16_f32 = _make_lanes16("sum")
max_lanes16_f32 = _make_lanes16("max")


#: keys whose scores :func:`attn_scores_f16` computes at once for one query head: as many 16-lane sums
#: in flight (independent FMA chains), reduced together (16 keys x 16 lanes: 16 AVX-512 registers;
#: 4 keys elsewhere: 8 AVX2 / 16 NEON registers)
SCORE_KEYS = 16 if VECTOR_BITS >= 512 else 4


def _lane_trees(b, e, accs):
    """The lane trees of :func:`_lane_tree` of len(accs) <16 x float> vectors at once (a power of 2 <= 16)
    -> a <len(accs) x float> vector, lane t = the sum of accs[t]. Each step adds the same two partial sums
    as the one-vector tree (lane l and l + w/2 of a w-lane partial sum), only placed side by side in
    one vector (two-source shuffles), so each lane is bit-identical to ``_lane_tree(accs[t])``."""
    vs = list(accs)
    w = 16                 # lanes of each key's partial sum
    while w > 1:
        h = w // 2
        if len(vs) > 1:    # pair up the vectors: each holds 16 / w keys' w-lane partial sums
            nxt = []
            for a, c in zip(vs[0::2], vs[1::2]):
                lo = [k * w + l for k in range(32 // w) for l in range(h)]
                hi = [k * w + h + l for k in range(32 // w) for l in range(h)]
                nxt.append(b.fadd(e.shuffle(a, c, lo), e.shuffle(a, c, hi)))
            vs = nxt
        else:              # one vector left: halve each key's partial sum inside it
            n = vs[0].type.count
            lo = [k * w + l for k in range(n // w) for l in range(h)]
            hi = [k * w + h + l for k in range(n // w) for l in range(h)]
            vs = [b.fadd(e.shuffle(vs[0], None, lo), e.shuffle(vs[0], None, hi))]
        w = h
    return vs[0]


_SHAPE3 = types.UniTuple(types.int64, 3)      # (kv heads, query heads per kv head, elements) of the attn_* kernels


@intrinsic
def attn_scores_f16(typingctx, qp, qs, kp, ks, khs, sp, ss, nkeys, shape, scale):
    """Scores of nkv * group query heads against nkeys keys of f16 cells, one attention task's q.k:
    head hh = kl * group + g (float32 at qp + hh * qs) against the key of kv head kl at row t (f16 at
    kp + t * ks + kl * khs), times ``scale``, to the float at sp + hh * ss + 4 * t. Each score is
    :func:`dot_lanes16_f16`'s sum over the first n16 elements (a multiple of 16): 16 lanes by
    ``llvm.fma`` in element order, then the same lane tree, then one multiply by scale: bit-identical
    to ``dot_lanes16_f16(q, k, n16) * scale``. SCORE_KEYS keys at a time per head (independent FMA
    chains; their lane trees reduced together, :func:`_lane_trees`), the rest one by one. The caller
    passes key ranges that stay in L1 while each head of the group walks them. ``shape``: the tuple
    (nkv, group, n16)."""
    sig = types.void(*([types.int64] * 8), _SHAPE3, types.float32)
    KB = SCORE_KEYS

    def codegen(context, builder, signature, args):
        e = Emitter(builder)
        b = builder
        qp_, qs_, kp_, ks_, khs_, sp_, ss_, nk_, shape_, sc_ = args
        nkv_, g_, n16_ = (b.extract_value(shape_, i) for i in range(3))
        q0, k0, s0 = (b.inttoptr(x, P8) for x in (qp_, kp_, sp_))
        v16 = vec(F32, 16)
        nkb = b.mul(b.sdiv(nk_, c64(KB)), c64(KB))

        def kvhead(kl, _):
            koff0 = b.mul(kl, khs_)
            hh0 = b.mul(kl, g_)

            def head(g, _):
                hh = b.add(hh0, g)
                qoff = b.mul(hh, qs_)
                soff0 = b.mul(hh, ss_)

                def dots(t0, nkeys_):
                    krows = [b.add(koff0, b.mul(b.add(t0, c64(t)), ks_)) for t in range(nkeys_)]

                    def chunk(j, accs):
                        x = e.load(q0, b.add(qoff, b.mul(j, c64(4))), v16, align=4)
                        jo = b.mul(j, c64(2))
                        return [_fma(b, x, b.fpext(e.load(k0, b.add(kr, jo), vec(F16, 16), align=2), v16), a)
                                for kr, a in zip(krows, accs)]

                    return counted_loop(b, n16_, [ir.Constant(v16, None)] * nkeys_, chunk, step=16)

                def block(t0, _):
                    s = _lane_trees(b, e, dots(t0, KB))
                    s = b.fmul(s, e.splat(sc_, KB))
                    e.store(s, s0, b.add(soff0, b.mul(t0, c64(4))), align=4)
                    return []

                def single(tt, _):
                    t = b.add(nkb, tt)
                    (acc,) = dots(t, 1)
                    s = b.fmul(_lane_tree(b, e, acc), sc_)
                    e.store(s, s0, b.add(soff0, b.mul(t, c64(4))), align=4)
                    return []

                counted_loop(b, nkb, [], block, step=KB)
                counted_loop(b, b.sub(nk_, nkb), [], single)
                return []

            counted_loop(b, g_, [], head)
            return []

        counted_loop(b, nkv_, [], kvhead)
        return context.get_dummy_value()

    return sig, codegen


attn_scores_f16.kernel_name = f"attn_scores_f16_k{SCORE_KEYS}"

#: chunks of 16 value elements whose sums one pass of :func:`attn_pv_f16` keeps in registers for each of
#: PV_HEADS query heads (independent add chains: the adds' latency is hidden; a value chunk converted
#: once for the heads): 2 x 4 x 16 floats = 8 AVX-512 registers; 2 x 2 x 16 = 16 NEON / 8 AVX2 ones
PV_CHUNKS = 4 if VECTOR_BITS >= 512 else 2
PV_HEADS = 2


@intrinsic
def attn_pv_f16(typingctx, wp, ws, vp, vs, vhs, op, os_, nkeys, shape):
    """out += P V for nkv * group query heads over nkeys values of f16 cells, an attention task's p.v:
    for head hh = kl * group + g and element j < n16 (a multiple of 16), the float at op + hh * os_ + 4 j
    becomes ``(((o + w_0 * v_0j) + w_1 * v_1j) + ...)`` over the keys t in order, w_t the float at
    wp + hh * ws + 4 t and v_tj the f16 at vp + t * vs + kl * vhs + 2 j: each product rounded, then
    added (no fused multiply-add), as the scalar loop ``acc[j] += w * v[j]`` does. PV_HEADS heads of a
    group and PV_CHUNKS chunks of 16 elements at a time keep their sums in registers across the keys
    (then the remaining heads / chunks one at a time): each element's sum is in the same order whatever
    the blocking. ``shape``: the tuple (nkv, group, n16)."""
    sig = types.void(*([types.int64] * 8), _SHAPE3)
    HB = PV_HEADS

    def codegen(context, builder, signature, args):
        e = Emitter(builder)
        b = builder
        wp_, ws_, vp_, vs_, vhs_, op_, os2, nk_, shape_ = args
        nkv_, g_, n16_ = (b.extract_value(shape_, i) for i in range(3))
        w0, v0, o0 = (b.inttoptr(x, P8) for x in (wp_, vp_, op_))
        v16 = vec(F32, 16)
        wide = 16 * PV_CHUNKS
        nwide = b.mul(b.sdiv(n16_, c64(wide)), c64(wide))
        gwide = b.mul(b.sdiv(g_, c64(HB)), c64(HB))

        def kvhead(kl, _):
            voff0 = b.mul(kl, vhs_)
            hh0 = b.mul(kl, g_)

            def heads(g, nh):
                hhs = [b.add(hh0, b.add(g, c64(u))) for u in range(nh)]
                woffs = [b.mul(hh, ws_) for hh in hhs]
                ooffs = [b.mul(hh, os2) for hh in hhs]

                def block(j0, nch):
                    offs = [b.add(oo, b.mul(b.add(j0, c64(16 * c)), c64(4))) for oo in ooffs for c in range(nch)]
                    accs = [e.load(o0, off, v16, align=4) for off in offs]

                    def key(t, accs):
                        t4 = b.mul(t, c64(4))
                        w = [e.splat(e.load(w0, b.add(wo, t4), F32, align=4), 16) for wo in woffs]
                        vrow = b.add(b.mul(t, vs_), voff0)
                        x = [b.fpext(e.load(v0, b.add(vrow, b.mul(b.add(j0, c64(16 * c)), c64(2))),
                                            vec(F16, 16), align=2), v16) for c in range(nch)]
                        return [b.fadd(accs[u * nch + c], b.fmul(w[u], x[c])) for u in range(nh) for c in range(nch)]

                    accs = counted_loop(b, nk_, accs, key)
                    for off, a in zip(offs, accs):
                        e.store(a, o0, off, align=4)

                def wide_block(j0, _):
                    block(j0, PV_CHUNKS)
                    return []

                def narrow_block(jj, _):
                    block(b.add(nwide, jj), 1)
                    return []

                counted_loop(b, nwide, [], wide_block, step=wide)
                counted_loop(b, b.sub(n16_, nwide), [], narrow_block, step=16)

            def head_block(g, _):
                heads(g, HB)
                return []

            def head_one(gg, _):
                heads(b.add(gwide, gg), 1)
                return []

            counted_loop(b, gwide, [], head_block, step=HB)
            counted_loop(b, b.sub(g_, gwide), [], head_one)
            return []

        counted_loop(b, nkv_, [], kvhead)
        return context.get_dummy_value()

    return sig, codegen


attn_pv_f16.kernel_name = f"attn_pv_f16_h{PV_HEADS}_c{PV_CHUNKS}"


# ------------------------------------------------------ float FMA tiles
#: accumulators per output of the float FMA tiles (ftile_kernel): element e of a block of 32 goes to
#: accumulator (e // ACC_LANES) % FMA_CHAINS, lane e % ACC_LANES; two chains so that a GEMV (one
#: output at a time) is not bound by the FMA latency
FMA_CHAINS = 2


def _fma(b, a, x, c):
    """llvm.fma: one rounding, whatever the backend (the order of every tile shape is the same)."""
    t = a.type
    return _intrinsic_call(b, f"llvm.fma.v{t.count}f32", t, [a, x, c])


@lru_cache(maxsize=None)
def ftile_kernel(fmt, NC: int, lanes: int = 0, prefetch: int = 0, NR: int = 1):
    """Float weights (F16 / BF16 / F32): NR weight rows x NC activation rows, fused multiply-adds.

    Same signature and result layout as :func:`tile_kernel` (``xd``, ``xs`` unused; weight row r at
    ``w + r * w_stride``). Each block of 32 weights is decoded to float32 once and multiplied into the
    NC rows' sums with ``llvm.fma`` (ACC_LANES lanes per instruction), each activation vector loaded
    once for the NR weight rows: per output FMA_CHAINS accumulators, element e of a block into chain
    (e // lanes) % FMA_CHAINS, lane e % lanes, in block order; then the chains added, the lanes summed
    (a fixed tree), and the k % 32 tail (the scalar loop of the tile kernels). That order does not
    depend on NR or NC: a GEMV (1 x 1) and any GEMM tile give bit-identical outputs. Per block and
    output: 32 / lanes FMAs; per activation vector loaded: NR FMAs. Registers: NR * NC * FMA_CHAINS
    accumulators + NR weight vectors + 1 (matmul.FF_NR / FF_NC keep that within the target's 32).
    """
    W = lanes or ACC_LANES
    S = FMA_CHAINS
    NJ = 32 // W

    @intrinsic
    def tile(typingctx, w, w_stride, xq, xq_stride, xd, xs, x_stride, nb, ntail, out, out_stride):
        sig = types.void(*([types.int64] * 11))

        def codegen(context, builder, signature, args):
            e = Emitter(builder)
            b = builder
            (w_, ws_, xq_, xqs_, xd_, xs_, xst_, nb_, ntail_, out_, os_) = args
            t = _Tile(e, fmt, NR, NC, W, False, F32, 4, *(b.inttoptr(a, P8) for a in (w_, xq_, xd_, xs_, out_)),
                      [b.mul(ws_, c64(r)) for r in range(NR)], [b.mul(xqs_, c64(c)) for c in range(NC)],
                      [c64(0)] * NC, 0)
            zero_v = ir.Constant(vec(F32, W), None)

            def body(i, accs):
                new = list(accs)
                woff = b.mul(i, c64(fmt.block_bytes))
                wj = []
                for r in range(NR):
                    wo = b.add(t.wrow[r], woff)
                    if prefetch:
                        e.prefetch(t.wp, b.add(wo, c64(prefetch)))
                    wv, _ = fmt.decode(e, t.wp, wo)
                    wj.append([e.shuffle(wv, None, range(j * W, j * W + W)) for j in range(NJ)])
                xoff = b.mul(i, c64(128))
                xb = [b.add(t.xrow[c], xoff) for c in range(NC)]
                for j in range(NJ):             # j outer: NR weight vectors live at a time
                    for c in range(NC):
                        xv = e.load(t.xqp, b.add(xb[c], c64(4 * W * j)), vec(F32, W))
                        for r in range(NR):
                            a = (r * NC + c) * S + j % S
                            new[a] = _fma(b, wj[r][j], xv, new[a])
                return new

            accs = counted_loop(b, nb_, [zero_v] * (NR * NC * S), body)
            tails = _tile_float_tail(t, nb_, ntail_)
            for r in range(NR):
                for c in range(NC):
                    k = r * NC + c
                    v = accs[k * S]
                    for j in range(1, S):
                        v = b.fadd(v, accs[k * S + j])
                    v = b.fadd(e.reduce_fadd(v), tails[k])
                    e.store(v, t.op, b.add(b.mul(os_, c64(c)), c64(4 * r)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    tile.kernel_name = f"ftile_{fmt.name}_{NR}x{NC}_l{W}_s{S}_pf{prefetch}"
    return tile


# ------------------------------------------- row-interleaved (repacked) kernels
GROUP = 16  # weight rows interleaved in one repacked group: one <16 x float> lane per row


class Interleaved:
    """A repacked layout: GROUP rows' block b stored together so lanes = rows.

    Per block of a group: the GROUP fp16 scales d (then GROUP fp16 mins m for
    the affine formats), then the quants in *pair chunks*: chunk j holds, for
    each row r, the two values of elements (2j, 2j+1) next to each other, so a
    <32 x i16> vector of chunk j multiplied by the activation pair (x[2j],
    x[2j+1]) broadcast to all lanes and summed pairwise (x86 ``vpmaddwd`` /
    ``vpdpwssd`` with an embedded broadcast) adds row r's partial dot into
    lane r. No horizontal sums anywhere: a tile's result is GROUP consecutive
    outputs, stored with one vector store.
    """

    name = ""
    block_bytes = 0       # bytes per block of one group (GROUP rows)
    affine = False
    offset = 0            # constant subtracted from every quant (via the activation sums)
    shape = (1, 8, 0)     # (fp16 scales per row, 2-byte quant chunks per row, bytes of 5th bits) per block
    kquant = False        # a 256-element super-block layout (kinterleaved_kernel), not a 32-block one
    # kquant layouts: ``chunks(e, bp, c)`` yields (scale group, j, <64 x i8> unsigned quads j of the group)

    def pairs(self, e: Emitter, bp):
        """Yield (j, <32 x i16>) for j in 0..15 (any order): rows' (q[2j], q[2j+1]) pairs.

        A generator, so that the caller consumes each vector right after it is
        unpacked (few live registers: matters on AVX2 and NEON).
        """
        raise NotImplementedError

    # the quads kernel (interleaved_quads_kernel): pair j's bytes as unsigned int8, the quants plus
    # ``quad_bias`` (128 for the signed formats), the bias taken back with the offset through the
    # activation sums; None: the format has no byte form (the pairs kernel only)
    quad_bias = 0
    bytes = None


class Q4_0x16(Interleaved):
    """Q4_0: 32 B scales + 8 chunks of 32 B; chunk j byte 2r+t = row r's qs[2j+t].

    The low nibbles of chunk j are elements (2j, 2j+1), the high nibbles
    (16+2j, 17+2j). Quants are used as 0..15; the -8 is applied once per block
    through -8*sum(q_x) (integer, exact).
    """

    name, block_bytes, offset = "Q4_0", 32 + 256, 8
    shape = (1, 8, 0)

    qs_offset = 32

    def pairs(self, e, bp):
        for j in range(8):
            raw = e.load(bp, c64(self.qs_offset + 32 * j), vec(I8, 32))
            z = e.b.zext(raw, vec(I16, 32))
            yield j, e.b.and_(z, e.const_vec(I16, 32, 0x0F))
            yield j + 8, e.b.lshr(z, e.const_vec(I16, 32, 4))

    def bytes(self, e, bp):
        """Yield (j, <32 x i8>) for j in 0..15: pair j's bytes (byte 2r+t = row r's q[2j+t], 0..15),
        j and j + 1 next to each other (the quads kernel joins them)."""
        for j in range(0, 8, 2):
            raw = [e.load(bp, c64(self.qs_offset + 32 * (j + u)), vec(I8, 32)) for u in (0, 1)]
            for u in (0, 1):
                yield j + u, e.b.and_(raw[u], e.const_vec(I8, 32, 0x0F))
            for u in (0, 1):
                yield j + 8 + u, e.b.and_(e.b.lshr(raw[u], e.const_vec(I8, 32, 4)), e.const_vec(I8, 32, 0x0F))


class IQ4_NLx16(Q4_0x16):
    """IQ4_NL: Q4_0x16's layout (32 B scales + 8 chunks of 32 B); each nibble indexes the
    non-linear table (``lookup16``: pshufb on the 32 bytes of a chunk), signed values, no offset."""

    name, block_bytes, offset = "IQ4_NL", 32 + 256, 0
    shape = (1, 8, 0)

    def __init__(self, values=()):
        self.values = tuple(int(v) for v in values)

    def pairs(self, e, bp):
        for j in range(8):
            raw = e.load(bp, c64(self.qs_offset + 32 * j), vec(I8, 32))
            lo = lookup16(e, e.b.and_(raw, e.const_vec(I8, 32, 0x0F)), self.values)
            hi = lookup16(e, e.b.lshr(raw, e.const_vec(I8, 32, 4)), self.values)
            yield j, e.b.sext(lo, vec(I16, 32))
            yield j + 8, e.b.sext(hi, vec(I16, 32))

    quad_bias = 128

    def bytes(self, e, bp):
        flip = e.const_vec(I8, 32, -128)
        for j in range(0, 8, 2):
            raw = [e.load(bp, c64(self.qs_offset + 32 * (j + u)), vec(I8, 32)) for u in (0, 1)]
            for u in (0, 1):
                yield j + u, e.b.xor(lookup16(e, e.b.and_(raw[u], e.const_vec(I8, 32, 0x0F)), self.values), flip)
            for u in (0, 1):
                yield j + 8 + u, e.b.xor(lookup16(e, e.b.lshr(raw[u], e.const_vec(I8, 32, 4)), self.values), flip)


class Q4_1x16(Q4_0x16):
    name, block_bytes, offset, affine = "Q4_1", 64 + 256, 0, True
    shape = (2, 8, 0)
    qs_offset = 64


class Q8_0x16(Interleaved):
    """Q8_0: 32 B scales + 16 chunks of 32 B (chunk j byte 2r+t = row r's q[2j+t])."""

    name, block_bytes = "Q8_0", 32 + 512
    shape = (1, 16, 0)
    quad_bias = 128

    def pairs(self, e, bp):
        for j in range(16):
            yield j, e.b.sext(e.load(bp, c64(32 + 32 * j), vec(I8, 32)), vec(I16, 32))

    def bytes(self, e, bp):
        for j in range(16):     # q + 128 as unsigned: the sign bit flipped
            yield j, e.b.xor(e.load(bp, c64(32 + 32 * j), vec(I8, 32)), e.const_vec(I8, 32, -128))


class Q5_0x16(Q4_0x16):
    """Q5_0: 32 B scales, 16 x u32 high-bit masks, 8 chunks of 32 B as Q4_0.

    Mask j bit (2r+t) is the 5th bit of row r's element of pair j (t = 0, 1),
    so it lines up with the i16 lanes of pair vector j: a masked OR of 0x10
    (AVX-512: ``kmovd`` + masked ``vpaddw``/``vpor``). Offset 16 as in Q4_0.
    """

    name, block_bytes, offset = "Q5_0", 32 + 64 + 256, 16
    shape = (1, 8, 4)
    qh_offset, qs_offset = 32, 96

    def pairs(self, e, bp):
        for j, pv in Q4_0x16.pairs(self, e, bp):
            m = e.b.bitcast(e.load(bp, c64(self.qh_offset + 4 * j), I32), vec(I1, 32))
            yield j, e.b.select(m, e.b.or_(pv, e.const_vec(I16, 32, 0x10)), pv)

    def bytes(self, e, bp):
        for j, pv in Q4_0x16.bytes(self, e, bp):
            m = e.b.bitcast(e.load(bp, c64(self.qh_offset + 4 * j), I32), vec(I1, 32))
            yield j, e.b.select(m, e.b.or_(pv, e.const_vec(I8, 32, 0x10)), pv)


class Q5_1x16(Q5_0x16):
    name, block_bytes, offset, affine = "Q5_1", 64 + 64 + 256, 0, True
    shape = (2, 8, 4)
    qh_offset, qs_offset = 64, 128


def _itile_codegen(fmt, NC: int, prefetch: int, x_block: int, ch: int, corr: bool, block_sums):
    """The codegen shared by :func:`interleaved_kernel` and :func:`interleaved_quads_kernel`: per block,
    the optional prefetch, the group's f16 scales (and mins), ``block_sums(e, bp, xbase, part)`` adding the
    block's integer products into ``part[c]`` (``ch`` int32 chains per activation row, the first started
    from the per-block correction ``xc`` when ``corr``), then each row's float step
    acc = fma(float(sum), dw * dx, acc) [+ dm * sx]; the accumulators stored at the end. ``x_block``:
    bytes of activation quants per block and row."""
    G = GROUP

    def codegen(context, builder, signature, args):
        e = Emitter(builder)
        b = builder
        (wg_, nb_, xq_, xqs_, xd_, xs_, xc_, xst_, out_, os_) = args
        wp, xqp, xdp, xsp, xcp, op = (b.inttoptr(x, P8) for x in (wg_, xq_, xd_, xs_, xc_, out_))
        xrow = [b.mul(xqs_, c64(c)) for c in range(NC)]
        srow = [b.mul(xst_, c64(c)) for c in range(NC)]
        zero_i = ir.Constant(vec(I32, G), None)

        def body(i, accs):
            bp = e.ptr(wp, b.mul(i, c64(fmt.block_bytes)))
            if prefetch:
                for o in range(0, fmt.block_bytes, 64):     # every cache line of the block
                    e.prefetch(bp, c64(prefetch + o))
            dw = b.fpext(e.load(bp, c64(0), vec(F16, G)), vec(F32, G))
            dm = b.fpext(e.load(bp, c64(2 * G), vec(F16, G)), vec(F32, G)) if fmt.affine else None
            xoff = b.mul(i, c64(x_block))
            soff = b.mul(i, c64(4))
            xbase = [e.ptr(xqp, b.add(xrow[c], xoff)) for c in range(NC)]
            part = [[zero_i] * ch for c in range(NC)]
            if corr:
                for c in range(NC):
                    part[c][0] = e.splat(e.load(xcp, b.add(srow[c], soff), I32), G)
            block_sums(e, bp, xbase, part)
            new = []
            for c in range(NC):
                s = functools.reduce(b.add, [e.freeze(p) for p in part[c]])
                dx = e.load(xdp, b.add(srow[c], soff), F32)
                acc = e.fma(b.sitofp(s, vec(F32, G)), e.fmul(dw, e.splat(dx, G)), accs[c])
                if fmt.affine:
                    sx = e.load(xsp, b.add(srow[c], soff), F32)
                    acc = e.fma(dm, e.splat(sx, G), acc)
                new.append(acc)
            return new

        accs = counted_loop(b, nb_, [ir.Constant(vec(F32, G), None)] * NC, body)
        for c in range(NC):
            e.store(accs[c], op, b.mul(os_, c64(c)), align=4)
        return context.get_dummy_value()

    return codegen


@lru_cache(maxsize=None)
def interleaved_kernel(fmt, NC: int, chains: int = 4, prefetch: int = 0):
    """Intrinsic for GROUP weight rows (one repacked group) x NC activation rows.

    Signature (int64 addresses / sizes)::

        tile(wg, nb, xq, xq_stride, xd, xs, xc, x_stride, out, out_stride)

    * ``wg``: the group's repacked bytes (nb blocks of ``block_bytes``).
    * ``xq``: int16 activations (row c at ``xq + c*xq_stride``); ``xd`` /
      ``xs`` float32 per-block scales / Q8_1 sums, ``xc`` int32 per-block
      corrections (-offset*sum(q)), all three with ``x_stride`` bytes per row.
    * ``out``: address of out[c0, r0]; writes GROUP floats per activation row.
    """
    fmt_name = fmt.name
    G = GROUP
    ch = max(1, chains // NC)       # independent int32 chains per activation row

    def block_sums(e, bp, xbase, part):
        b = e.b
        for t, (j, pv) in enumerate(fmt.pairs(e, bp)):
            for c in range(NC):
                xv = b.bitcast(e.splat(e.load(xbase[c], c64(4 * j), I32), G), vec(I16, 2 * G))
                part[c][t % ch] = b.add(part[c][t % ch], e.dot_pairs(pv, xv))

    @intrinsic
    def tile(typingctx, wg, nb, xq, xq_stride, xd, xs, xc, x_stride, out, out_stride):
        sig = types.void(*([types.int64] * 10))
        # 32 int16 activations a block
        return sig, _itile_codegen(fmt, NC, prefetch, 64, ch, bool(fmt.offset), block_sums)

    tile.kernel_name = f"itile_{fmt_name}_g{G}_x{NC}_c{chains}_pf{prefetch}_v2"
    return tile


@lru_cache(maxsize=None)
def interleaved_quads_kernel(fmt, NC: int, prefetch: int = 0):
    """:func:`interleaved_kernel` through u8 x s8 quads (x86 AVX-512 VNNI ``vpdpbusd``: four products a
    lane, twice ``vpdpwssd``'s pairs) on the same repacked groups: pairs j and j + 1 of a block
    (``fmt.bytes``, unsigned) joined by 16-bit units into quads = elements 4i..4i+3 of each row, times
    int8 activations (``xq`` int8, 32 a block, row c at ``xq + c*xq_stride``), and ``xc`` = -(offset +
    quad_bias) * sum(q_x) per block. Each row's int32 block sum is the pairs kernel's exactly, and the
    float steps are its own: the same floats, for any NC. ``prefetch``: bytes ahead, one prefetch per
    64 bytes of a block. Signature as :func:`interleaved_kernel`'s."""
    fmt_name = fmt.name
    G = GROUP
    OFF = fmt.offset + fmt.quad_bias
    # two <32 x i8> joined by 16-bit units: lane r = (a[2r], a[2r+1], b[2r], b[2r+1])
    JOIN = [x for r in range(G) for x in (2 * r, 2 * r + 1, 2 * G + 2 * r, 2 * G + 2 * r + 1)]
    ch = max(1, 4 // NC)            # independent int32 chains per activation row

    def block_sums(e, bp, xbase, part):
        b = e.b
        pend = {}
        t = 0
        for j, v in fmt.bytes(e, bp):
            pend[j] = v
            q = j // 2
            if 2 * q not in pend or 2 * q + 1 not in pend:
                continue
            qv = e.shuffle(pend.pop(2 * q), pend.pop(2 * q + 1), JOIN)
            for c in range(NC):
                xv = b.bitcast(e.splat(e.load(xbase[c], c64(4 * q), I32), G), vec(I8, 4 * G))
                part[c][t % ch] = e.dot_quads(part[c][t % ch], qv, xv)
            t += 1
        assert not pend and t == 8, (fmt_name, sorted(pend), t)

    @intrinsic
    def tile(typingctx, wg, nb, xq, xq_stride, xd, xs, xc, x_stride, out, out_stride):
        sig = types.void(*([types.int64] * 10))
        # 32 int8 activations a block
        return sig, _itile_codegen(fmt, NC, prefetch, 32, ch, bool(OFF), block_sums)

    tile.kernel_name = f"iqtile_{fmt_name}_g{G}_x{NC}_pf{prefetch}"
    return tile


class KInterleaved(Interleaved):
    """A 256-element super-block layout of GROUP rows (:func:`kinterleaved_kernel`): scales per
    ``group`` elements, ``chunks`` of unsigned quads (at most ``umax``), optional mins (``has_min``)
    or ``offset``."""

    kquant = True
    umax = 63             # largest unsigned quant (IQ4_XS: 241, the table + 128)
    group, has_min, signed_scales = 32, False, False
    layout: dict = {}

    def step_scales(self, e, bp, c):
        """(the rows' scales of groups 2c, 2c+1 (step c) as <16 x i32>, None or for an ``offset``
        the <32 x i16> scale pairs of those groups, see :class:`Q6_Kx16`)."""
        ext = e.b.sext if self.signed_scales else e.b.zext
        return [ext(e.load(bp, c64(self.layout["scales"] + 16 * g), vec(I8, GROUP)), vec(I32, GROUP))
                for g in (2 * c, 2 * c + 1)], None

    def step_mins(self, e, bp, c):
        """The rows' mins of groups 2c, 2c+1 (step c) as <32 x i16> pairs (lane 2r + t: row r, group 2c+t),
        for layouts whose mins are per 16 (``has_min`` and ``group == 16``: Q2_K); else None."""
        return None

    @property
    def xsums(self) -> int:
        """The activation sums the kernel reads: 16 = int16 per 16 (groups of 16 with an offset or mins),
        -32 = int16 per 32 (an offset on groups of 32), 32 = int32 per 32 (mins per 32)."""
        if self.group == 16:
            return 16
        return -32 if self.offset else 32

    def chunks(self, e, bp, c):
        """Yield (scale group, j, <64 x i8>) for groups 2c, 2c+1 (step c): rows' unsigned quads j of the
        group (chunk byte 4r+t = row r's element 4j+t of the group)."""
        raise NotImplementedError


class Q4_Kx16(KInterleaved):
    """Q4_K repacked for prompt processing: one super-block of GROUP rows per 2368 bytes.

    d[16], dmin[16] (fp16), the 6-bit scales and mins unpacked to bytes (sub-block j,
    row r at 16j + r), then the quants of sub-blocks (2c, 2c+1) as 8 quad chunks of 64 B:
    chunk m byte 4r+t = row r's qs[32c + 4m + t], whose low nibble is element 4m+t of
    sub-block 2c and high nibble element 4m+t of sub-block 2c+1 (Q4_K's own pairing).
    Unsigned quants (one ``vpdpbusd`` lane per row, :meth:`Emitter.dot_quads`), one int32
    sum per (row, sub-block) times its scale; the mins go through the activations' sums per 32.
    """

    name, block_bytes, kquant = "Q4_K", 64 + 256 + 2048, True
    layout = dict(d=0, dmin=32, scales=64, mins=192, qs=320)
    group, has_min, signed_scales = 32, True, False   # elements per scale; mins; int8 scales

    def chunks(self, e, bp, c):
        for m in range(8):
            raw = e.load(bp, c64(self.layout["qs"] + 512 * c + 64 * m), vec(I8, 64))
            yield 2 * c, m, e.b.and_(raw, e.const_vec(I8, 64, 0x0F))
            yield 2 * c + 1, m, e.b.lshr(raw, e.const_vec(I8, 64, 4))


class Q6_Kx16(KInterleaved):
    """Q6_K repacked for prompt processing: d[16] (fp16), the int8 scales in pairs (byte 32p + 2r + t
    = row r's scale of group 2p+t, a group being 16 elements), then the 6-bit values q (0..63,
    unsigned) as bytes in quad chunks of 64 B: chunk m byte 4r+t = row r's element 4m + t (one
    ``vpdpbusd`` lane per row, :meth:`Emitter.dot_quads`). The -32 goes through the activations' sums
    per 16, once per super-block: -32 * sum_g scale_g * sum(x_g) as int16 pair products (the scale
    pairs against the sums of groups 2p, 2p+1, ``vpdpwssd``). 4384 bytes per super-block of 16 rows
    (the file's 3360 + 30%: the values are stored as bytes, decoded once at load)."""

    name, block_bytes, kquant, offset = "Q6_K", 32 + 256 + 4096, True, 32
    layout = dict(d=0, scales=32, qs=288)
    group, has_min, signed_scales = 16, False, True

    def step_scales(self, e, bp, c):
        b = e.b
        pv = b.sext(e.load(bp, c64(self.layout["scales"] + 32 * c), vec(I8, 32)), vec(I16, 32))
        v = b.bitcast(pv, vec(I32, 16))
        sh = e.const_vec(I32, 16, 16)
        return [b.ashr(b.shl(v, sh), sh), b.ashr(v, sh)], pv

    def chunks(self, e, bp, c):
        for m in range(8 * c, 8 * c + 8):
            yield m // 4, m % 4, e.load(bp, c64(self.layout["qs"] + 64 * m), vec(I8, 64))


class Q3_Kx16(Q6_Kx16):
    """Q3_K repacked for prompt processing: :class:`Q6_Kx16`'s d[16] and scale pairs (the 6-bit scales
    less 32), then the 3-bit values (0..7: the 2 low bits and the hmask bit, unsigned; the -4 goes
    through the activations' sums per 16 as Q6_K's -32) as nibbles of 64-byte quad chunks: step c,
    chunk m byte 4r+t at 288 + 256c + 64m = row r's element 4m+t of group 2c (low nibble) and of
    group 2c+1 (high nibble). 2336 bytes per super-block of 16 rows (the file's 1760 + 33%)."""

    name, block_bytes, kquant, offset = "Q3_K", 32 + 256 + 2048, True, 4
    layout = dict(d=0, scales=32, qs=288)

    def chunks(self, e, bp, c):
        for m in range(4):
            raw = e.load(bp, c64(self.layout["qs"] + 256 * c + 64 * m), vec(I8, 64))
            yield 2 * c, m, e.b.and_(raw, e.const_vec(I8, 64, 0x0F))
            yield 2 * c + 1, m, e.b.lshr(raw, e.const_vec(I8, 64, 4))


class IQ4_XSx16(Q6_Kx16):
    """IQ4_XS repacked for prompt processing: d[16] (fp16), the scales less 32 in pairs as
    :class:`Q6_Kx16` (groups of 32 here), then the nibbles (table indices) in 64-byte quad chunks:
    step c, chunk m byte 4r+t at 160 + 512c + 64m = row r's element 4m+t of sub-block 2c (low
    nibble) and of 2c+1 (high). The kernel looks the table up with 128 added (``lookup16``: values
    1..241, unsigned) and takes 128 * sum_g scale_g * sum(x_g) back (int16 sums per 32).
    2208 bytes per super-block of 16 rows (the file's 2176)."""

    name, block_bytes, kquant, offset, umax = "IQ4_XS", 32 + 128 + 2048, True, 128, 255
    layout = dict(d=0, scales=32, qs=160)
    group, has_min, signed_scales = 32, False, True

    def __init__(self, values=()):
        self.values = tuple(int(v) for v in values)
        self.u8 = tuple((int(v) + 128) & 0xFF for v in values)     # as the int8 bit patterns lookup16 takes
        self.u8 = tuple(v - 256 if v > 127 else v for v in self.u8)

    def chunks(self, e, bp, c):
        for m in range(8):
            raw = e.load(bp, c64(self.layout["qs"] + 512 * c + 64 * m), vec(I8, 64))
            yield 2 * c, m, lookup16(e, e.b.and_(raw, e.const_vec(I8, 64, 0x0F)), self.u8)
            yield 2 * c + 1, m, lookup16(e, e.b.lshr(raw, e.const_vec(I8, 64, 4)), self.u8)


class Q5_Kx16(KInterleaved):
    """Q5_K repacked for prompt processing: d[16], dmin[16] (fp16), the 6-bit scales and mins
    unpacked to bytes (sub-block j, row r at 16j + r; :class:`Q4_Kx16`'s head), then the 5-bit
    values (0..31) as bytes in quad chunks of 64 B as :class:`Q6_Kx16` (chunk m byte 4r+t = row r's
    element 4m + t). 4416 bytes per super-block of 16 rows (the file's 2816 + 57%)."""

    name, block_bytes, kquant = "Q5_K", 64 + 256 + 4096, True
    layout = dict(d=0, dmin=32, scales=64, mins=192, qs=320)
    group, has_min, signed_scales = 32, True, False

    def chunks(self, e, bp, c):
        for m in range(16 * c, 16 * c + 16):
            yield m // 8, m % 8, e.load(bp, c64(self.layout["qs"] + 64 * m), vec(I8, 64))


class Q2_Kx16(KInterleaved):
    """Q2_K repacked for prompt processing: d[16], dmin[16] (fp16), the file's scale bytes (low nibble
    the scale, high nibble the min of a group of 16) in pairs (byte 64 + 32p + 2r + t = row r's byte of
    group 2p+t), then the 2-bit values (0..3) in one 64-byte chunk per group: byte 4r+t at 320 + 64g
    holds row r's elements 4m+t of group g (m = 0..3) at bits 2m. The mins go through the
    activations' int16 sums per 16 as int16 pair products (``step_mins``). 1344 bytes per super-block
    of 16 rows: the file's size."""

    name, block_bytes, kquant, umax = "Q2_K", 64 + 256 + 1024, True, 3
    layout = dict(d=0, dmin=32, scales=64, qs=320)
    group, has_min, signed_scales = 16, True, False

    def _pairs(self, e, bp, c):
        return e.b.zext(e.load(bp, c64(self.layout["scales"] + 32 * c), vec(I8, 32)), vec(I16, 32))

    def step_scales(self, e, bp, c):
        b = e.b
        v = b.bitcast(self._pairs(e, bp, c), vec(I32, 16))
        m = e.const_vec(I32, 16, 0x0F)
        return [b.and_(v, m), b.and_(b.lshr(v, e.const_vec(I32, 16, 16)), m)], None

    def step_mins(self, e, bp, c):
        # frozen: 0..15 known non-negative would turn dot_pairs' sext into a zext (no vpmaddwd)
        return e.freeze(e.b.lshr(self._pairs(e, bp, c), e.const_vec(I16, 32, 4)))

    def chunks(self, e, bp, c):
        for g in (2 * c, 2 * c + 1):
            raw = e.load(bp, c64(self.layout["qs"] + 64 * g), vec(I8, 64))
            for m in range(4):
                yield g, m, e.b.and_(e.b.lshr(raw, e.const_vec(I8, 64, 2 * m)), e.const_vec(I8, 64, 3))


@lru_cache(maxsize=None)
def kinterleaved_kernel(fmt, NC: int, prefetch: int = 0):
    """Intrinsic for GROUP rows of a repacked K-quant (:class:`Q4_Kx16`) x NC Q8_K activation rows.

    Signature (int64 addresses / sizes)::

        tile(wg, nb, xq, xq_stride, xd, xd_stride, xb, xb_stride, out, out_stride)

    ``xq`` int8 activations; ``xd`` float32 scale per 256; ``xb`` the activations' sums: int32
    per 32 (formats with mins), int16 per 16 (formats with an ``offset``: Q6_K's -32); ``nb``
    super-blocks. Per super-block and activation row: one <16 x i32> sum per scale group
    (``vpdpbusd`` of 4 unsigned weights x 4 broadcast int8 activations, :meth:`Emitter.dot_quads`),
    times the rows' group scales, summed in int32, less offset * sum_g scale_g * sum(x_g)
    (ggml's integers exactly); the mins as sum_j min_j * xsum_j; then d_w*d_x and dmin_w*d_x in
    float. The float order per row does not depend on NC: batch invariant. Writes GROUP floats per row.
    ``prefetch``: bytes ahead (0: off), one software prefetch per 64 bytes of a super-block, spread over
    its steps.
    """
    fmt_name = fmt.name
    G = GROUP
    L = fmt.layout

    @intrinsic
    def tile(typingctx, wg, nb, xq, xq_stride, xd, xd_stride, xb, xb_stride, out, out_stride):
        sig = types.void(*([types.int64] * 10))

        def codegen(context, builder, signature, args):
            e = Emitter(builder)
            b = builder
            (wg_, nb_, xq_, xqs_, xd_, xds_, xb_, xbs_, out_, os_) = args
            wp, xqp, xdp, xbp, op = (b.inttoptr(a, P8) for a in (wg_, xq_, xd_, xb_, out_))
            zero_i = ir.Constant(vec(I32, G), None)
            zero_f = ir.Constant(vec(F32, G), None)

            def body(i, accs):
                bp = e.ptr(wp, b.mul(i, c64(fmt.block_bytes)))
                xbase = [e.ptr(xqp, b.add(b.mul(xqs_, c64(c)), b.mul(i, c64(256)))) for c in range(NC)]
                ng = 256 // fmt.group                 # scale groups per super-block
                isum = [zero_i] * NC
                msum = [zero_i] * NC                   # mins per 16 (Q2_K): min pairs x int16 sum pairs
                per = 2                                # groups per step: 2*ch*NC chains live (AVX-512: 32 registers)
                ch = max(1, 4 // NC)                   # independent int32 chains per (group, activation row)
                lines = list(range(0, fmt.block_bytes, 64)) if prefetch else []
                steps = ng // per
                for cc in range(ng // per):
                    if cc:      # the previous step's sums done, its loads not moved past here (spills)
                        e.fence(*isum, *msum)
                    for o in lines[cc * len(lines) // steps:(cc + 1) * len(lines) // steps]:
                        e.prefetch(bp, c64(prefetch + o))
                    # this step's groups: per*ch*NC independent chains, finished (times the scales) at once
                    part = [[zero_i] * (per * ch) for _ in range(NC)]
                    for g, j, qv in fmt.chunks(e, bp, cc):
                        u = (g % per) * ch + j % ch
                        for c in range(NC):
                            xv = b.bitcast(e.splat(e.load(xbase[c], c64(fmt.group * g + 4 * j), I32), G),
                                           vec(I8, 4 * G))
                            part[c][u] = e.dot_quads(part[c][u], qv, xv, fmt.umax)
                    sc, scp = fmt.step_scales(e, bp, cc)    # loaded here: few live registers
                    mnp = fmt.step_mins(e, bp, cc)
                    for c in range(NC):
                        for t in range(per):
                            s = functools.reduce(b.add, [e.freeze(p) for p in part[c][t * ch:(t + 1) * ch]])
                            isum[c] = b.add(isum[c], b.mul(s, sc[t]))
                        if scp is not None or mnp is not None:     # int16 pairs x this step's int16 sum pairs
                            xb16 = b.add(b.mul(xbs_, c64(c)), b.mul(i, c64(2 * ng)))
                            xs2 = b.bitcast(e.splat(e.load(xbp, b.add(xb16, c64(2 * per * cc)), I32), G),
                                            vec(I16, 2 * G))
                        if scp is not None:     # - offset * sum_g scale_g * sum(x_g)
                            corr = e.dot_pairs(scp, xs2)
                            isum[c] = b.sub(isum[c], b.mul(corr, e.const_vec(I32, G, fmt.offset)))
                        if mnp is not None:     # sum_g min_g * sum(x_g)
                            msum[c] = b.add(msum[c], e.dot_pairs(mnp, xs2))
                dw = b.fpext(e.load(bp, c64(L["d"]), vec(F16, G)), vec(F32, G))
                if fmt.has_min:
                    if fmt.group == 32:
                        mn = [b.zext(e.load(bp, c64(L["mins"] + 16 * j), vec(I8, G)), vec(I32, G)) for j in range(8)]
                    dm = b.fpext(e.load(bp, c64(L["dmin"]), vec(F16, G)), vec(F32, G))
                new = []
                for c in range(NC):
                    dx = e.splat(e.load(xdp, b.add(b.mul(xds_, c64(c)), b.mul(i, c64(4))), F32), G)
                    new.append(e.fma(b.sitofp(isum[c], vec(F32, G)), e.fmul(dw, dx), accs[2 * c]))
                    if fmt.has_min:
                        if fmt.group == 32:     # mins per 32: int32 sums per 32
                            xb8 = e.load(xbp, b.add(b.mul(xbs_, c64(c)), b.mul(i, c64(32))), vec(I32, 8))
                            msum[c] = functools.reduce(b.add, [b.mul(mn[j], e.splat(b.extract_element(xb8, c32(j)), G))
                                                               for j in range(8)])
                        new.append(e.fma(b.sitofp(msum[c], vec(F32, G)), e.fmul(dm, dx), accs[2 * c + 1]))
                    else:
                        new.append(accs[2 * c + 1])
                return new

            accs = counted_loop(b, nb_, [zero_f] * (2 * NC), body)
            for c in range(NC):
                e.store(b.fsub(accs[2 * c], accs[2 * c + 1]), op, b.mul(os_, c64(c)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    tile.kernel_name = f"kitile_{fmt_name}_g{G}_x{NC}_pf{prefetch}_v7"
    return tile


# --------------------------------------------------- activation quantization
@lru_cache(maxsize=None)
def quantize_row_kernel(act16: bool, with_s: bool):
    """Intrinsic: ggml quantize_row_q8_0 / q8_1 (x86 AVX / ARM NEON flavour) of one row, vectorized.

    Signature (int64 addresses)::

        qrow(x, nb, q, d, s, c, sum_mul)

    per block of 32 floats at ``x``: d = amax/127, q = roundeven(x * (127/amax))
    written as int8 (int16 if act16) at ``q``; float32 fp16-rounded d at ``d``;
    int32 sum_mul*sum(q) at ``c``; if with_s, float32 fp16(d*sum(q)) at ``s``.
    """
    qt = I16 if act16 else I8

    @intrinsic
    def qrow(typingctx, x, nb, q, d, s, c, sum_mul):
        sig = types.void(*([types.int64] * 7))

        def codegen(context, builder, signature, args):
            e = Emitter(builder)
            b = builder
            x_, nb_, q_, d_, s_, c_, mul_ = args
            xp, qp, dp, sp, cp = (b.inttoptr(a, P8) for a in (x_, q_, d_, s_, c_))
            mul32 = b.trunc(mul_, I32)
            v32 = vec(F32, 32)

            def body(i, _):
                v = e.load(xp, b.mul(i, c64(128)), v32)
                # max |x| through the bit patterns: for non-negative floats the
                # unsigned integer order is the float order (and a NaN wins)
                a = b.and_(b.bitcast(v, vec(I32, 32)), e.const_vec(I32, 32, 0x7FFFFFFF))
                amax = b.bitcast(_intrinsic_call(b, "llvm.vector.reduce.umax.v32i32", I32, [a]), F32)
                c127 = ir.Constant(F32, 127.0)
                dd = b.fdiv(amax, c127)
                nz = b.fcmp_ordered("!=", amax, ir.Constant(F32, 0.0))
                iv = b.select(nz, b.fdiv(c127, amax), ir.Constant(F32, 0.0))
                r = _intrinsic_call(b, "llvm.roundeven.v32f32", v32, [b.fmul(v, e.splat(iv, 32))])
                qi = b.fptosi(r, vec(I32, 32))
                e.store(b.trunc(qi, vec(qt, 32)), qp, b.mul(i, c64(32 * (2 if act16 else 1))))
                sm = _intrinsic_call(b, "llvm.vector.reduce.add.v32i32", I32, [qi])
                soff = b.mul(i, c64(4))
                e.store(b.fpext(b.fptrunc(dd, F16), F32), dp, soff)
                e.store(b.mul(sm, mul32), cp, soff)
                if with_s:
                    sv = b.fmul(dd, b.sitofp(sm, F32))
                    e.store(b.fpext(b.fptrunc(sv, F16), F32), sp, soff)
                return []

            counted_loop(b, nb_, [], body)
            return context.get_dummy_value()

        return sig, codegen

    qrow.kernel_name = f"qrow_a{int(act16)}_s{int(with_s)}"
    return qrow


# ------------------------------------------------------------------- K-quants
class KFormat(BlockDecoder):
    """A 256-element super-block format dotted with Q8_K activations (:func:`ktile_kernel`).

    ``decode`` returns (subs, scales, d, dmin, mins): subs = 8 <32 x i8> vectors,
    sub-block j = elements 32j..32j+31 as small integers; scales[j] = the integer
    scale of each 16-element half of sub-block j, (lo, hi) as i32 scalars (equal
    where a scale covers 32); d, dmin float scalars; mins a <8 x i32> (one per 32,
    ``min_group = 32``) or <16 x i32> (per 16) vector of the sub-block mins, or None.
    The dot with a Q8_K block (d_x, q, sums of q per 32 or 16) is then, in integers,
    d_w*d_x*sum_j scale_j*dot(subs_j, q_j) - dmin_w*d_x*sum_g mins_g*sum(q_g), as
    ggml's vec_dot_*_q8_K compute it.

    ``offset``: for unsigned quants (formats with mins), the aarch64 tiles dot
    ``q - offset`` (sdot needs signed bytes) and add ``offset * sum_g scale_g *
    sum(x_g)`` back. ``bsums``: what the driver puts in the activation sums array:
    32 (int32 per 32), 16 (int16 per 16) or 0 (none needed).
    """

    min_group = 0
    offset = 0            # aarch64: subtracted from unsigned quants (sdot takes signed bytes)
    u8_offset = 0         # x86: added to signed quants (vpmaddubsw takes unsigned weights)
    sign_trick = False    # x86: |w| * (x * sign(w)) instead (table formats)
    scale_group = 32      # elements per distinct scale: 32 or 16
    has_gemv = False      # a kgemv_kernel (x86 single-row) exists for it

    @property
    def bsums(self) -> int:
        """Activation sums the tiles read: per min group, else per scale group if an offset needs them."""
        if self.min_group:
            return self.min_group
        if (self.offset if PARTIAL_REDUCE else self.u8_offset):
            return self.scale_group
        return 0

    def decode(self, e: Emitter, wp, off):
        raise NotImplementedError


def _k4_scales_mins(e: Emitter, wp, off):
    """get_scale_min_k4 for j = 0..7 at once: the 12 bytes at ``off`` -> (<8 x i32> scales, <8 x i32> mins)."""
    b = e.b
    q = e.load(wp, off, vec(I8, 16))                     # bytes 12..15 are not scales: masked below
    x = 12
    A = e.shuffle(q, None, [0, 1, 2, 3, 8, 9, 10, 11])
    B = e.shuffle(q, None, [4, 5, 6, 7, 8, 9, 10, 11])
    C = e.shuffle(q, None, [x, x, x, x, 0, 1, 2, 3])
    D = e.shuffle(q, None, [x, x, x, x, 4, 5, 6, 7])

    def cv(vals):
        return ir.Constant(vec(I8, 8), vals)

    hi2 = cv([0] * 4 + [0x30] * 4)                       # ((q >> 6) << 4) for j >= 4
    scb = b.or_(b.and_(A, cv([63] * 4 + [15] * 4)), b.and_(b.shl(b.lshr(C, cv([6] * 8)), cv([4] * 8)), hi2))
    mnb = b.or_(b.and_(b.lshr(B, cv([0] * 4 + [4] * 4)), cv([63] * 4 + [15] * 4)),
                b.and_(b.shl(b.lshr(D, cv([6] * 8)), cv([4] * 8)), hi2))
    return b.zext(scb, vec(I32, 8)), b.zext(mnb, vec(I32, 8))


def _lanes(e: Emitter, v):
    return [e.b.extract_element(v, c32(j)) for j in range(v.type.count)]


class Q4_K(KFormat):
    """block_q4_K: d, dmin (fp16), scales (8 x 6-bit scale + 8 x 6-bit min in 12 bytes), qs[128].

    Sub-block 2c / 2c+1 are the low / high nibbles of qs[32c .. 32c+31].
    """

    min_group, offset, has_gemv = 32, 8, True

    def decode(self, e, wp, off):
        b = e.b
        d = e.load_f16(wp, self.at(e, off, "d"))
        dmin = e.load_f16(wp, self.at(e, off, "dmin"))
        scv, mins = _k4_scales_mins(e, wp, self.at(e, off, "scales"))
        subs = []
        for c in range(4):
            raw = e.load(wp, self.at(e, off, "qs", 32 * c), vec(I8, 32))
            subs.append(b.and_(raw, e.const_vec(I8, 32, 0x0F)))
            subs.append(b.lshr(raw, e.const_vec(I8, 32, 4)))
        return subs, [(t, t) for t in _lanes(e, scv)], d, dmin, mins


class Q5_K(KFormat):
    """block_q5_K: Q4_K's head, qh[32] (bit j of qh[l] is the 5th bit of element 32j + l), qs[128]."""

    min_group, offset, has_gemv = 32, 16, True

    def decode(self, e, wp, off):
        b = e.b
        d = e.load_f16(wp, self.at(e, off, "d"))
        dmin = e.load_f16(wp, self.at(e, off, "dmin"))
        scv, mins = _k4_scales_mins(e, wp, self.at(e, off, "scales"))
        qh = e.load(wp, self.at(e, off, "qh"), vec(I8, 32))
        subs = []
        for c in range(4):
            raw = e.load(wp, self.at(e, off, "qs", 32 * c), vec(I8, 32))
            for t, lo in enumerate((b.and_(raw, e.const_vec(I8, 32, 0x0F)), b.lshr(raw, e.const_vec(I8, 32, 4)))):
                j = 2 * c + t
                hb = b.and_(b.shl(b.lshr(qh, e.const_vec(I8, 32, j)), e.const_vec(I8, 32, 4)),
                            e.const_vec(I8, 32, 0x10))
                subs.append(b.or_(lo, hb))
        return subs, [(t, t) for t in _lanes(e, scv)], d, dmin, mins


class Q2_K(KFormat):
    """block_q2_K: scales[16] (low nibble scale, high nibble min, one per 16), qs[64], d, dmin.

    Element 128n + 32j + l is (qs[32n + l] >> 2j) & 3: sub-block 4n + j.
    """

    min_group, offset, scale_group, has_gemv = 16, 2, 16, True

    def decode(self, e, wp, off):
        b = e.b
        d = e.load_f16(wp, self.at(e, off, "d"))
        dmin = e.load_f16(wp, self.at(e, off, "dmin"))
        sc = e.load(wp, self.at(e, off, "scales"), vec(I8, 16))
        scv = b.zext(b.and_(sc, e.const_vec(I8, 16, 0x0F)), vec(I32, 16))
        mins = b.zext(b.lshr(sc, e.const_vec(I8, 16, 4)), vec(I32, 16))
        s = _lanes(e, scv)
        subs = []
        for n in range(2):
            raw = e.load(wp, self.at(e, off, "qs", 32 * n), vec(I8, 32))
            for j in range(4):
                subs.append(b.and_(b.lshr(raw, e.const_vec(I8, 32, 2 * j)), e.const_vec(I8, 32, 3)))
        return subs, [(s[2 * j], s[2 * j + 1]) for j in range(8)], d, dmin, mins


class Q3_K(KFormat):
    """block_q3_K: hmask[32], qs[64], scales (16 x 6-bit in 12 bytes, minus 32), d.

    Element 128n + 32j + l: ((qs[32n + l] >> 2j) & 3) - 4 unless bit 4n + j of hmask[l] is set.
    """

    scale_group, u8_offset, has_gemv = 16, 4, True

    def scales6(self, e, wp, off):
        """The 16 6-bit scales (before the -32) as <16 x i8>."""
        b = e.b
        raw = e.load(wp, self.at(e, off, "scales"), vec(I8, 12))
        lo = e.shuffle(raw, None, [j % 8 for j in range(16)])
        lo = b.and_(b.lshr(lo, ir.Constant(vec(I8, 16), [0] * 8 + [4] * 8)), e.const_vec(I8, 16, 0x0F))
        hi = e.shuffle(raw, None, [8 + (j & 3) for j in range(16)])
        hi = b.and_(b.lshr(hi, ir.Constant(vec(I8, 16), [2 * (j >> 2) for j in range(16)])), e.const_vec(I8, 16, 3))
        return b.or_(lo, b.shl(hi, e.const_vec(I8, 16, 4)))

    def decode(self, e, wp, off):
        b = e.b
        d = e.load_f16(wp, self.at(e, off, "d"))
        scv = b.sub(b.zext(self.scales6(e, wp, off), vec(I32, 16)), e.const_vec(I32, 16, 32))
        s = _lanes(e, scv)
        hm = e.load(wp, self.at(e, off, "hmask"), vec(I8, 32))
        subs = []
        for n in range(2):
            q = e.load(wp, self.at(e, off, "qs", 32 * n), vec(I8, 32))
            for j in range(4):
                low = b.and_(b.lshr(q, e.const_vec(I8, 32, 2 * j)), e.const_vec(I8, 32, 3))
                clear = b.icmp_unsigned("==", b.and_(hm, e.const_vec(I8, 32, 1 << (4 * n + j))),
                                        ir.Constant(vec(I8, 32), None))
                subs.append(b.sub(low, b.select(clear, e.const_vec(I8, 32, 4), ir.Constant(vec(I8, 32), None))))
        return subs, [(s[2 * j], s[2 * j + 1]) for j in range(8)], d, None, None


class Q6_K(KFormat):
    """block_q6_K: ql[128], qh[64], scales[16] (int8, one per 16 elements), d (fp16).

    Half h (elements 128h..), group g (32 elements): low 4 bits from
    ql[64h + 32(g&1) + l] (low nibble for g < 2, high for g >= 2), high 2 bits
    from qh[32h + l] >> 2g; value - 32; scale sc[8h + 2g + l//16].
    """

    scale_group, u8_offset, has_gemv = 16, 32, True

    def decode(self, e, wp, off):
        b = e.b
        d = e.load_f16(wp, self.at(e, off, "d"))
        subs, scales = [], []
        for h in range(2):
            qh = e.load(wp, self.at(e, off, "qh", 32 * h), vec(I8, 32))
            ql = [e.load(wp, self.at(e, off, "ql", 64 * h + 32 * t), vec(I8, 32)) for t in (0, 1)]
            for g in range(4):
                lo = ql[g & 1]
                lo = b.and_(lo, e.const_vec(I8, 32, 0x0F)) if g < 2 else b.lshr(lo, e.const_vec(I8, 32, 4))
                hb = b.and_(b.lshr(qh, e.const_vec(I8, 32, 2 * g)), e.const_vec(I8, 32, 3))
                subs.append(b.sub(b.or_(lo, b.shl(hb, e.const_vec(I8, 32, 4))), e.const_vec(I8, 32, 32)))
                s = 8 * h + 2 * g
                scales.append(tuple(b.sext(e.load(wp, self.at(e, off, "scales", s + t), I8), I32) for t in (0, 1)))
        return subs, scales, d, None, None


class IQ4_XS(KFormat):
    """block_iq4_xs: d (fp16), scales_h (u16: 2 high bits per sub-block), scales_l[4] (nibbles),
    qs[128]: sub-block j = table values of the nibbles of qs[16j .. 16j+15] (low: 0..15, high: 16..31),
    scale ((scales_l >> 4(j%2)) & 15 | ((scales_h >> 2j) & 3) << 4) - 32."""

    sign_trick = True

    def __init__(self, name, block_bytes, layout, values):
        super().__init__(name, block_bytes, layout)
        self.values = tuple(int(v) for v in values)

    def decode(self, e, wp, off):
        b = e.b
        d = e.load_f16(wp, self.at(e, off, "d"))
        sh = b.zext(e.load(wp, self.at(e, off, "scales_h"), I16), I32)
        sl = e.load(wp, self.at(e, off, "scales_l"), vec(I8, 4))
        lo = b.zext(e.shuffle(sl, None, [j // 2 for j in range(8)]), vec(I32, 8))
        lo = b.and_(b.lshr(lo, ir.Constant(vec(I32, 8), [4 * (j % 2) for j in range(8)])), e.const_vec(I32, 8, 15))
        hi = b.and_(b.lshr(e.splat(sh, 8), ir.Constant(vec(I32, 8), [2 * j for j in range(8)])), e.const_vec(I32, 8, 3))
        scv = b.sub(b.or_(lo, b.shl(hi, e.const_vec(I32, 8, 4))), e.const_vec(I32, 8, 32))
        subs = []
        for c in range(4):
            raw = e.load(wp, self.at(e, off, "qs", 32 * c), vec(I8, 32))
            idx = e.shuffle(b.and_(raw, e.const_vec(I8, 32, 0x0F)), b.lshr(raw, e.const_vec(I8, 32, 4)),
                            list(range(16)) + list(range(32, 48)) + list(range(16, 32)) + list(range(48, 64)))
            v = lookup16(e, idx, self.values)
            subs += [e.half(v, 0), e.half(v, 1)]
        return subs, [(t, t) for t in _lanes(e, scv)], d, None, None


def _kdot_arm(e: Emitter, fmt: KFormat, subs, scales, xv8, scv_bs):
    """aarch64: sum_j scale_j * dot(sub_j - offset, x_j) as a <4 x i32> (sdot per scale group),
    plus offset * sum_g scale_g * sum(x_g) in lane 0 (``scv_bs``: that sum's two <n x i32> factors)."""
    b = e.b
    g = fmt.scale_group
    off = fmt.offset
    isum = None
    for j in range(8):
        q = b.sub(subs[j], e.const_vec(I8, 32, off)) if off else subs[j]
        for t in range(32 // g):
            part = range(g * t, g * t + g)
            qq, xx = (q, xv8[j]) if g == 32 else (e.shuffle(q, None, part), e.shuffle(xv8[j], None, part))
            h = b.mul(e.freeze(e.dot_block(qq, xx, 4)), e.splat(scales[j][t], 4))
            isum = h if isum is None else b.add(isum, h)
    if off:
        scv, bs = scv_bs
        n = scv.type.count
        corr = _intrinsic_call(b, f"llvm.vector.reduce.add.v{n}i32", I32, [b.mul(scv, bs)])
        lane0 = b.add(b.extract_element(isum, c32(0)), b.mul(corr, c32(off)))
        isum = b.insert_element(isum, lane0, c32(0))
    return isum


def _kdot_x86(e: Emitter, fmt: KFormat, subs, scales, xv8, scv_bs):
    """x86: u8 x s8 pair products (``vpmaddubsw``) per sub-block, times the int16 scales as pair
    sums (``vpmaddwd``): a <16 x i32> whose lanes sum to sum_j scale_j * dot(sub_j, x_j).

    Signed quants are made unsigned by ``u8_offset`` (taken back as u8_offset * sum_g scale_g *
    sum(x_g)), or for table formats (``sign_trick``) by moving each weight's sign onto its
    activation: |w| * (x * sign(w)), as ggml's AVX2 code does. Pair sums stay below 2**15.
    """
    b = e.b
    # sub-blocks per vector: two (64 bytes) on AVX-512 for the table formats (IQ4_XS 15 -> 18 GB/s);
    # the others lose the vpmaddubsw pattern at 64 bytes (Q2_K 15 -> 6 GB/s), so one
    V = 2 if VECTOR_BITS >= 512 and fmt.sign_trick else 1
    n8 = 32 * V
    z8 = ir.Constant(vec(I8, n8), None)
    parts = []
    for j in range(0, 8, V):
        q = subs[j] if V == 1 else e.concat(subs[j], subs[j + 1])
        x = xv8[j] if V == 1 else e.concat(xv8[j], xv8[j + 1])
        if fmt.sign_trick:
            neg = b.icmp_signed("<", q, z8)
            x = b.select(neg, b.sub(z8, x), x)
            q = b.select(neg, b.sub(z8, q), q)
        elif fmt.u8_offset:
            q = b.add(q, e.const_vec(I8, n8, fmt.u8_offset))
        # OR with an opaque zero: no known bits left for InstCombine to narrow the products
        # with (small masked quants, e.g. Q2_K's 0..3, would lose the vpmaddubsw pattern)
        q = b.or_(q, _opaque_splat(e, f"zero_v{n8}i8", 0, vec(I8, n8)))
        p = _maddubs(e, q, x)                                          # <16V x i16>
        sv = ir.Constant(vec(I16, 16 * V), None)
        for u in range(V):
            lo, hi = (b.trunc(t, I16) for t in scales[j + u])
            sv = b.insert_element(sv, lo, c32(16 * u))
            sv = b.insert_element(sv, hi, c32(16 * u + 8))
        idx = [16 * u + 8 * h for u in range(V) for h in (0, 1) for _ in range(8)]
        parts.append(e.dot_pairs(p, e.shuffle(sv, None, idx)))   # <8V x i32>
    if V == 1:
        half = [functools.reduce(b.add, [e.freeze(p) for p in parts[h:h + 4]]) for h in (0, 4)]
        s = e.concat(half[0], half[1])
    else:
        s = functools.reduce(b.add, [e.freeze(p) for p in parts])      # <16 x i32>
    if fmt.u8_offset:
        scv, bs = scv_bs
        n = scv.type.count
        corr = _intrinsic_call(b, f"llvm.vector.reduce.add.v{n}i32", I32, [b.mul(scv, bs)])
        lane0 = b.sub(b.extract_element(s, c32(0)), b.mul(corr, c32(fmt.u8_offset)))
        s = b.insert_element(s, lane0, c32(0))
    return s


def _load_bsums(e: Emitter, fmt: KFormat, xbp, off):
    """The activation sums of one super-block that ``fmt`` needs, as <8|16 x i32>."""
    if fmt.bsums == 16:
        return e.b.sext(e.load(xbp, off, vec(I16, 16)), vec(I32, 16))
    return e.load(xbp, off, vec(I32, 8))


@lru_cache(maxsize=None)
def ktile_kernel(fmt, NR: int, NC: int, lanes: int = 0, prefetch: int = 0):
    """Intrinsic for an NR x NC tile of a K-quant weight against Q8_K activations.

    Signature (int64 addresses / sizes)::

        tile(w, w_stride, xq, xq_stride, xd, xd_stride, xb, xb_stride, nb, out, out_stride)

    ``xq`` int8 activations; ``xd`` float32 Q8_K scale per 256; ``xb`` the sums of
    q the format needs (``KFormat.bsums``: int32 per 32 or int16 per 16); ``nb``
    super-blocks. Writes out[c, r].
    """
    fmt_name = fmt.name
    W = min(lanes or ACC_LANES, 16)
    bsz = 2 * 16 if fmt.bsums == 16 else 4 * 8          # bytes of sums per super-block

    @intrinsic
    def tile(typingctx, w, w_stride, xq, xq_stride, xd, xd_stride, xb, xb_stride, nb, out, out_stride):
        sig = types.void(*([types.int64] * 11))

        def codegen(context, builder, signature, args):
            e = Emitter(builder)
            b = builder
            (w_, ws_, xq_, xqs_, xd_, xds_, xb_, xbs_, nb_, out_, os_) = args
            wp, xqp, xdp, xbp, op = (b.inttoptr(a, P8) for a in (w_, xq_, xd_, xb_, out_))
            wrow = [b.mul(ws_, c64(r)) for r in range(NR)]
            zero_v = ir.Constant(vec(F32, W), None)
            zero_s = ir.Constant(F32, 0.0)
            has_min = bool(fmt.min_group)
            inits = [zero_v] * (NR * NC) + ([zero_s] * (NR * NC) if has_min else [])

            def body(i, accs):
                woff = b.mul(i, c64(fmt.block_bytes))
                if prefetch:
                    for r in range(NR):
                        e.prefetch(wp, b.add(b.add(wrow[r], woff), c64(prefetch)))
                blocks = [fmt.decode(e, wp, b.add(wrow[r], woff)) for r in range(NR)]
                new = list(accs)
                for c in range(NC):
                    xbase = b.add(b.mul(xqs_, c64(c)), b.mul(i, c64(256)))
                    xv8 = [e.load(xqp, b.add(xbase, c64(32 * j)), vec(I8, 32)) for j in range(8)]
                    dx = e.load(xdp, b.add(b.mul(xds_, c64(c)), b.mul(i, c64(4))), F32)
                    bs = (_load_bsums(e, fmt, xbp, b.add(b.mul(xbs_, c64(c)), b.mul(i, c64(bsz))))
                          if fmt.bsums else None)
                    for r in range(NR):
                        subs, scales, d, dmin, mins = blocks[r]
                        flat = [t for j in range(8) for t in (scales[j] if fmt.scale_group == 16 else scales[j][:1])]
                        scv = ir.Constant(vec(I32, len(flat)), None)
                        for t, v in enumerate(flat):
                            scv = b.insert_element(scv, v, c32(t))
                        if PARTIAL_REDUCE:
                            s = _kdot_arm(e, fmt, subs, scales, xv8, (scv, bs))
                            s = e.fold_add(s, W) if W < 4 else s
                            if W > 4:
                                s = e.shuffle(s, ir.Constant(s.type, None), list(range(4)) + [4] * (W - 4))
                        else:
                            s = e.fold_add(_kdot_x86(e, fmt, subs, scales, xv8, (scv, bs)), W)
                        sf = b.sitofp(s, vec(F32, W))
                        k = r * NC + c
                        new[k] = e.fma(sf, e.splat(e.fmul(d, dx), W), accs[k])
                        if has_min:
                            n = mins.type.count
                            md = _intrinsic_call(b, f"llvm.vector.reduce.add.v{n}i32", I32, [b.mul(mins, bs)])
                            k2 = NR * NC + k
                            new[k2] = e.fma(e.fmul(dmin, dx), b.sitofp(md, F32), accs[k2])
                return new

            accs = counted_loop(b, nb_, inits, body)
            for r in range(NR):
                for c in range(NC):
                    k = r * NC + c
                    v = e.reduce_fadd(accs[k])
                    if has_min:
                        v = b.fsub(v, accs[NR * NC + k])
                    e.store(v, op, b.add(b.mul(os_, c64(c)), c64(4 * r)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    tile.kernel_name = f"ktile_{fmt_name}_{NR}x{NC}_l{W}_pr{int(PARTIAL_REDUCE)}_pf{prefetch}_v5"
    return tile


# ------------------------------------------- K-quant GEMV (x86: u8 x s8 pairs)
def _maddubs(e: Emitter, a, x):
    """<2n x i8> a (unsigned) . <2n x i8> x (signed) -> <n x i16>: lane i = a[2i]x[2i] + a[2i+1]x[2i+1].

    Written as ggml's vpmaddubsw semantics (products of zext/sext even and odd
    elements, summed, saturated to int16); LLVM matches the pattern as x86
    ``vpmaddubsw``. Callers keep sums within int16 (no saturation happens).
    """
    b = e.b
    a = e.freeze(a)
    n2 = a.type.count
    n = n2 // 2
    t32 = vec(I32, n)
    ev, od = list(range(0, n2, 2)), list(range(1, n2, 2))
    p = b.add(b.mul(b.zext(e.shuffle(a, None, ev), t32), b.sext(e.shuffle(x, None, ev), t32), flags=("nsw",)),
              b.mul(b.zext(e.shuffle(a, None, od), t32), b.sext(e.shuffle(x, None, od), t32), flags=("nsw",)),
              flags=("nsw",))
    p = _intrinsic_call(b, f"llvm.smax.v{n}i32", t32, [p, ir.Constant(t32, [-32768] * n)])
    p = _intrinsic_call(b, f"llvm.smin.v{n}i32", t32, [p, ir.Constant(t32, [32767] * n)])
    return b.trunc(p, vec(I16, n))


def _opaque_splat(e: Emitter, name, value, ty):
    """A splat constant loaded from a writable (linkonce_odr) global: the optimizer cannot see its
    value, so ``and(q, mask)`` keeps no known bits and InstCombine does not narrow the u8 x s8
    pair products below (which would lose the ``vpmaddubsw`` pattern). The load is hoisted out
    of the loop (nothing in the kernels stores to memory it could alias)."""
    m = e.b.module
    gname = f"_tinyinfer_{name}"
    try:
        g = m.get_global(gname)
    except KeyError:
        g = ir.GlobalVariable(m, ty, gname)
        g.linkage = "linkonce_odr"
        g.initializer = ir.Constant(ty, [value] * ty.count)
        g.align = 64
    return e.b.load(g, align=64)


# Q4_K single-row kernel: order of the eight 32-element sub-blocks of each
# 256 in the activations it reads (its 64-byte vectors hold sub-blocks 0, 2 | 1, 3 | 4, 6 | 5, 7)
Q4K_GEMV_PERM = (0, 2, 1, 3, 4, 6, 5, 7)


def _c16(v):
    return ir.Constant(vec(I16, 32), v if isinstance(v, list) else [v] * 32)


def _kgemv_q4k(e: Emitter, fmt, wp, off, xqp, xoff, xbp, bsum, dx, q5=False):
    """One Q4_K super-block x one Q8_K row, 64 elements per vector (activations in the order of
    ``Q4K_GEMV_PERM``, which the driver permutes them to): (<16 x i32> scaled sums, <16 x f32>
    d_w*d_x, (<8 x i32> mins x activation sums per 32, <8 x f32> dmin_w*d_x)).

    ``q5``: Q5_K, the fifth bit of sub-block s (bit s of qh) or-ed in as 0x10; quants 0..31,
    pair sums still within int16."""
    b = e.b
    v64 = vec(I8, 64)
    dd = e.fmul(b.fpext(e.load(wp, fmt.at(e, off, "d"), vec(F16, 2)), vec(F32, 2)), e.splat(dx, 2))
    scv, mnv = _k4_scales_mins(e, wp, fmt.at(e, off, "scales"))
    sc16 = b.trunc(scv, vec(I16, 8))
    # 64 bytes of qs (chunks 2L, 2L+1) & 0x0F are sub-blocks 4L, 4L+2, >> 4 are 4L+1, 4L+3
    m0f = _opaque_splat(e, "m0f_v64i8", 0x0F, v64)
    if q5:
        qh = e.load(wp, fmt.at(e, off, "qh"), vec(I8, 32))
        qh2 = b.bitcast(e.concat(qh, qh), vec(I16, 32))
    parts = []
    for L in range(2):
        raw = e.load(wp, fmt.at(e, off, "qs", 64 * L), v64)
        for t, qv in enumerate((b.and_(raw, m0f), b.and_(b.lshr(raw, e.const_vec(I8, 64, 4)), m0f))):
            s0, s1 = 4 * L + t, 4 * L + t + 2
            if q5:
                # bit s of every qh byte to bit 4 (16-bit shifts: the 0x1010 mask drops what
                # crosses bytes; L = 1 starts from bits 4..7 moved down to 0..3)
                base = b.lshr(qh2, _c16(4)) if L else qh2
                hb = b.and_(b.shl(base, _c16([4 - t] * 16 + [2 - t] * 16)), _c16(0x1010))
                qv = b.or_(qv, b.bitcast(hb, v64))
            p = _maddubs(e, qv, e.load(xqp, b.add(xoff, c64(128 * L + 64 * t)), v64))
            parts.append(e.dot_pairs(p, e.shuffle(sc16, None, [s0] * 16 + [s1] * 16)))
    s = b.add(e.freeze(b.add(parts[0], parts[1])), e.freeze(b.add(parts[2], parts[3])))
    bs = e.load(xbp, bsum, vec(I32, 8))
    mm = b.mul(mnv, bs, flags=("nsw",))
    return s, e.shuffle(dd, None, [0] * 16), (mm, e.shuffle(dd, None, [1] * 8))


def _kgemv_q5k(e: Emitter, fmt, wp, off, xqp, xoff, xbp, bsum, dx):
    """Q5_K: :func:`_kgemv_q4k` with the fifth bit from qh."""
    return _kgemv_q4k(e, fmt, wp, off, xqp, xoff, xbp, bsum, dx, q5=True)


def _kgemv_q6k(e: Emitter, fmt, wp, off, xqp, xoff, xbp, bsum, dx):
    """One Q6_K super-block x one Q8_K row, 64 elements per vector: (<16 x i32> scaled sums with
    the -32 of every quant taken back through the int16 activation sums per 16, <16 x f32>
    d_w*d_x, None)."""
    b = e.b
    v64 = vec(I8, 64)
    d_ = e.load_f16(wp, fmt.at(e, off, "d"))
    sc16 = b.sext(e.load(wp, fmt.at(e, off, "scales"), vec(I8, 16)), vec(I16, 16))
    parts = []
    for h in range(2):
        ql = e.load(wp, fmt.at(e, off, "ql", 64 * h), v64)
        qh = e.load(wp, fmt.at(e, off, "qh", 32 * h), vec(I8, 32))
        qh2 = b.bitcast(e.concat(qh, qh), vec(I16, 32))
        # elements 128h + 0..63 (groups 0, 1) and 128h + 64..127 (groups 2, 3)
        hA = b.and_(b.shl(qh2, _c16([4] * 16 + [2] * 16)), _c16(0x3030))
        hB = b.and_(b.lshr(qh2, _c16([0] * 16 + [2] * 16)), _c16(0x3030))
        qA = b.or_(b.and_(ql, e.const_vec(I8, 64, 0x0F)), b.bitcast(hA, v64))
        qB = b.or_(b.lshr(ql, e.const_vec(I8, 64, 4)), b.bitcast(hB, v64))
        for t, qv in enumerate((qA, qB)):
            p = _maddubs(e, qv, e.load(xqp, b.add(xoff, c64(128 * h + 64 * t)), v64))
            g = 8 * h + 4 * t
            parts.append(e.dot_pairs(p, e.shuffle(sc16, None, [g + j // 8 for j in range(32)])))
    s = b.add(e.freeze(b.add(parts[0], parts[1])), e.freeze(b.add(parts[2], parts[3])))
    # the -32 of every quant: 32 * sum_g sc_g * (sum of the 16 activations of group g)
    b16 = e.load(xbp, bsum, vec(I16, 16))
    corr = b.shl(e.dot_pairs(sc16, b16), ir.Constant(vec(I32, 8), [5] * 8))
    s = b.sub(s, e.shuffle(corr, ir.Constant(vec(I32, 8), None), list(range(16))))
    return s, e.splat(e.fmul(d_, dx), 16), None


def _q23k_x(e: Emitter, xqp, xoff, j):
    """Activations of Q2_K / Q3_K shift j as one <64 x i8>: elements 32j.. and 128 + 32j.."""
    # frozen: InstCombine would otherwise fold the concat into _maddubs' even / odd shuffles
    # and the vpmaddubsw pattern would be lost
    return e.freeze(e.concat(e.load(xqp, e.b.add(xoff, c64(32 * j)), vec(I8, 32)),
                             e.load(xqp, e.b.add(xoff, c64(128 + 32 * j)), vec(I8, 32))))


def _q23k_sum(e: Emitter, qs, sc16, xqp, xoff):
    """sum_g sc_g * dot(q_g, x_g) as a <16 x i32> over the four 64-byte vectors ``qs`` (shift j:
    elements 32j + l and 128 + 32j + l, sub-blocks of 16: 2j, 2j+1, 8+2j, 9+2j)."""
    b = e.b
    parts = []
    for j, qv in enumerate(qs):
        p = _maddubs(e, qv, _q23k_x(e, xqp, xoff, j))
        parts.append(e.dot_pairs(p, e.shuffle(sc16, None, [g for g in (2 * j, 2 * j + 1, 8 + 2 * j, 9 + 2 * j)
                                                            for _ in range(8)])))
    return b.add(e.freeze(b.add(parts[0], parts[1])), e.freeze(b.add(parts[2], parts[3])))


def _kgemv_q2k(e: Emitter, fmt, wp, off, xqp, xoff, xbp, bsum, dx):
    """One Q2_K super-block x one Q8_K row, 64 elements per vector (the 2-bit fields of all 64
    qs bytes at once): (<16 x i32> scaled sums, <16 x f32> d_w*d_x, (<8 x i32> mins x
    activation sums per 16 as pair sums, <8 x f32> dmin_w*d_x))."""
    b = e.b
    v64 = vec(I8, 64)
    dd = e.fmul(b.fpext(e.load(wp, fmt.at(e, off, "d"), vec(F16, 2)), vec(F32, 2)), e.splat(dx, 2))
    sc = e.load(wp, fmt.at(e, off, "scales"), vec(I8, 16))
    sc16 = b.zext(b.and_(sc, e.const_vec(I8, 16, 0x0F)), vec(I16, 16))
    mn16 = b.zext(b.lshr(sc, e.const_vec(I8, 16, 4)), vec(I16, 16))
    m03 = _opaque_splat(e, "m03_v64i8", 3, v64)
    raw = e.load(wp, fmt.at(e, off, "qs"), v64)
    qs = [b.and_(b.lshr(raw, e.const_vec(I8, 64, 2 * j)) if j else raw, m03) for j in range(4)]
    s = _q23k_sum(e, qs, sc16, xqp, xoff)
    mm = e.dot_pairs(mn16, e.load(xbp, bsum, vec(I16, 16)))
    return s, e.shuffle(dd, None, [0] * 16), (mm, e.shuffle(dd, None, [1] * 8))


def _kgemv_q3k(e: Emitter, fmt, wp, off, xqp, xoff, xbp, bsum, dx):
    """One Q3_K super-block x one Q8_K row, 64 elements per vector: the quants + 4 (0..7, the
    hmask bit as bit 2), the -4 taken back through the int16 activation sums per 16:
    (<16 x i32> scaled sums, <16 x f32> d_w*d_x, None)."""
    b = e.b
    v64 = vec(I8, 64)
    d_ = e.load_f16(wp, fmt.at(e, off, "d"))
    sc16 = b.sub(b.zext(fmt.scales6(e, wp, off), vec(I16, 16)), ir.Constant(vec(I16, 16), [32] * 16))
    m03 = _opaque_splat(e, "m03_v64i8", 3, v64)
    raw = e.load(wp, fmt.at(e, off, "qs"), v64)
    hm = e.load(wp, fmt.at(e, off, "hmask"), vec(I8, 32))
    hh = e.concat(hm, b.lshr(hm, e.const_vec(I8, 32, 4)))     # bit j: the high bit of shift j
    qs = []
    for j in range(4):
        low = b.and_(b.lshr(raw, e.const_vec(I8, 64, 2 * j)) if j else raw, m03)
        hb = b.shl(hh, e.const_vec(I8, 64, 2 - j)) if j <= 2 else b.lshr(hh, e.const_vec(I8, 64, 1))
        qs.append(b.or_(low, b.and_(hb, e.const_vec(I8, 64, 4))))
    s = _q23k_sum(e, qs, sc16, xqp, xoff)
    corr = b.shl(e.dot_pairs(sc16, e.load(xbp, bsum, vec(I16, 16))), ir.Constant(vec(I32, 8), [2] * 8))
    s = b.sub(s, e.shuffle(corr, ir.Constant(vec(I32, 8), None), list(range(16))))
    return s, e.splat(e.fmul(d_, dx), 16), None


_KGEMV = {"Q2_K": _kgemv_q2k, "Q3_K": _kgemv_q3k, "Q4_K": _kgemv_q4k, "Q5_K": _kgemv_q5k, "Q6_K": _kgemv_q6k}


@lru_cache(maxsize=None)
def kgemv_kernel(fmt):
    """Intrinsic for one K-quant weight row x one Q8_K activation row (n == 1), x86 flavour.

    Same signature as :func:`ktile_kernel`. Per super-block, 64 elements per
    vector: the unsigned 4-/6-bit quants times the int8 activations as pair sums
    in int16 (``vpmaddubsw``), times an int16 vector of the sub-block scales as
    pair sums in int32 (``vpmaddwd``); one <16 x i32> per super-block converted
    and fused-multiply-added with d_w*d_x. Q4_K: the mins through the
    activation sums as an <8 x i32> vector (no horizontal sums in the loop).
    Q6_K: the -32 offset through int16 sums of the activations per 16 (``xb``
    holds those for Q6_K: see matmul.bsums16), as ggml's AVX2 code. Q2_K / Q3_K:
    see :func:`_kgemv_q2k`, :func:`_kgemv_q3k`. Exactly the integers of ggml's
    vec_dot_q*_K_q8_K; only float order differs.
    """
    fmt_name = fmt.name
    q4 = bool(fmt.min_group)              # Q4_K, Q2_K: a second accumulator for the mins
    gemv = _KGEMV[fmt_name]

    @intrinsic
    def tile(typingctx, w, w_stride, xq, xq_stride, xd, xd_stride, xb, xb_stride, nb, out, out_stride):
        sig = types.void(*([types.int64] * 11))

        def codegen(context, builder, signature, args):
            e = Emitter(builder)
            b = builder
            (w_, ws_, xq_, xqs_, xd_, xds_, xb_, xbs_, nb_, out_, os_) = args
            wp, xqp, xdp, xbp, op = (b.inttoptr(a, P8) for a in (w_, xq_, xd_, xb_, out_))
            def body(i, accs):
                off = b.mul(i, c64(fmt.block_bytes))
                xoff = b.mul(i, c64(256))
                dx = e.load(xdp, b.mul(i, c64(4)), F32)
                bsum = b.mul(i, c64(32))                 # this super-block's activation sums
                s, ddx, mins = gemv(e, fmt, wp, off, xqp, xoff, xbp, bsum, dx)
                new = [e.fma(b.sitofp(s, vec(F32, 16)), ddx, accs[0])]
                if mins is not None:
                    mm, mdx = mins
                    new.append(e.fma(b.sitofp(mm, vec(F32, 8)), mdx, accs[1]))
                return new

            inits = [ir.Constant(vec(F32, 16), None)]
            if q4:
                inits.append(ir.Constant(vec(F32, 8), None))
            accs = counted_loop(b, nb_, inits, body)
            v = e.reduce_fadd(accs[0])
            if q4:
                v = b.fsub(v, e.reduce_fadd(accs[1]))
            e.store(v, op, c64(0), align=4)
            return context.get_dummy_value()

        return sig, codegen

    tile.kernel_name = f"kgemv_{fmt_name}_v4"
    return tile
