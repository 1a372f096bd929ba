"""Micro-benchmark of the quantized matmul kernels (tinyinfer.kernels.matmul).

    python benchmarks/bench_kernels.py                    # all types, n=1 and pp, 1 and 2 threads
    python benchmarks/bench_kernels.py --types Q4_0 Q8_0 --threads 1 --n 1
    python benchmarks/bench_kernels.py --asm Q4_0         # vector instructions of the compiled drivers
    python benchmarks/bench_kernels.py --arm-asm          # the kernels cross-compiled for cortex-a76/a72

n == 1 (token generation) is memory-bound: reported as GB/s of weight bytes
streamed, next to read rooflines measured in the same run: np.max over a
512 MiB float32 array (one thread) and a streaming vector-load loop with 1
and 2 threads. Every matrix is cycled with enough copies to exceed the
last-level cache, so each call streams from DRAM as in a real model.

n > 1 (prompt processing) is compute-bound: reported as GMAC/s (weight x
activation multiply-adds per second; int8 x int8 for the quantized types)
and the equivalent GFLOP/s (2 x MAC). Shapes default to SmolLM2-135M's.

Timings on a shared machine are noisy: each figure is the median of
``--repeat`` runs with [min..max]. One-thread runs are timed by the thread's
CPU time (time descheduled by other processes does not count; memory
contention still does), multi-thread runs by wall clock.

Recorded results (2026-11-22; x86-64 VM: AMD EPYC Zen 4 (znver4, AVX-512
VNNI), 2 vCPUs, 32 MiB L3; numba 0.68.1 / LLVM 22; other engineers' jobs
running on the same 2 cores, so the figures below are from the quieter
minutes; medians, ranges over several runs):

    read roofline, 1 thread: 25-29 GB/s (np.max and vector loads agree)
    read roofline, 2 threads: 28-32 GB/s  <- one core nearly saturates this VM

    tg (n=1), GB/s of weights        1 thread    2 threads
      Q4_0  (repacked x16)           23-28       30-36
      Q4_1  (repacked x16)           23-28       27-36
      Q5_0  (repacked x16)           17-24       29-35
      Q5_1  (repacked x16)           16-25       26-30
      Q8_0  (repacked x16)           24-31       29-34
      Q6_K  (native, kgemv)          19-20       (see below)
      Q4_K  (native, kgemv)          16-16.5     (see below)
      F16 / BF16 / F32 (native)      15-27       16-44  (k=5632 rows: 10-19)
    K-quants, same run (2026-11-22, roofline 23-25 GB/s, Q4_0 18-20 in that run): before the
    x86 kgemv kernels (generic ktile 1x1) Q4_K 6.6-7.1, Q6_K 9.0-9.2 GB/s at 1 thread.
    2-thread runs at that time were dominated by the other tenants' load (roofline 17,
    medians 6-12 GB/s for every type including Q4_0): not meaningful, re-measure when quiet.
    shapes 5632x2048, 2048x5632, 49152x576 (rows x k); llama.cpp on this
    machine kind: 22 GB/s Q4_0 and 28 GB/s Q8_0 at 1 thread.

    pp (n=512), int8 GMAC/s          1 thread    2 threads
      Q4_0                           84-95       162-170   (= 170-190 / 330-340 GFLOP/s)
      Q4_1                           83-90       147-160
      Q5_0 / Q5_1                    68-82
      Q8_0                           80-94       162-168
      Q6_K / Q4_K (native)           29-37       48-54
      F16 / BF16 / F32 (f32 FMA)     35-46       75-85
    shapes 576x576, 192x576, 1536x576, 576x1536 (2048x2048, 1024x2048 for K-quants).

    Single stream vs several: reading one sequential stream runs at ~26 GB/s
    here, two interleaved streams (2 rows at a time) at ~14 and four at ~17,
    which is why the n == 1 kernels read one weight row (native) or one
    repacked group (x16) at a time.

First compile (cold numba cache, this machine): 0.5-1.9 s per type for the
serial driver (n == 1 and n > 1 share one), 1.3-3.6 s for the parallel one,
2.2 s for the repacker; loaded from cache afterwards in ~10 ms per driver.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "--asm" in sys.argv:          # cached code cannot be inspected: compile into a scratch cache
    import tempfile
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="tinyinfer-asm-")

import numba  # noqa: E402

from tinyinfer.kernels import matmul as mm  # noqa: E402

from tinyinfer.kernels import quants  # noqa: E402

TYPES = {e.name: int(t) for t, e in quants.TYPES.items() if e.runnable}
LLC_BYTES = 32 << 20
CPU_TIME = True
CONFIG = mm.DEFAULT_CONFIG     # the kernel knobs under test (experiment switches: see main's flags)


def config_from_args(a) -> "mm.KernelConfig":
    """The experiment switches (formerly TINYINFER_* environment variables read by the kernels)."""
    from dataclasses import replace
    cfg = mm.DEFAULT_CONFIG
    tilings = []
    for t in a.tile or ():
        name, kind, v = t.split(":")
        f = [int(x) for x in v.split(",")]
        tilings.append((name.upper(), kind.lower(), mm.Tiling(f[0], f[1], f[2], bool(f[3]), bool(f[4]))))
    return replace(cfg, repack=cfg.repack if a.repack is None else a.repack == 1,
                   kgemv=cfg.kgemv if a.kgemv is None else a.kgemv == 1,
                   packed_nc=a.packed_nc or cfg.packed_nc, packed_chains=a.packed_chains or cfg.packed_chains,
                   parallel_min_bytes=cfg.parallel_min_bytes if a.parallel_min_bytes is None else a.parallel_min_bytes,
                   prefetch=cfg.prefetch if a.prefetch is None else a.prefetch,
                   prefetch_packed=cfg.prefetch_packed if a.prefetch_packed is None else a.prefetch_packed,
                   batch_invariant=cfg.batch_invariant if a.batch_invariant is None else a.batch_invariant == 1,
                   tilings=tuple(tilings))


def random_weight(rows, k, ggml_type, rng):
    """Random but well-formed weight bytes: random quants, sane fp16 scales in the fields
    the registry's layout names d / dmin / m."""
    e = quants.type_info(ggml_type)
    if not e.is_quantized:
        x = rng.standard_normal((rows, k)).astype(np.float32)
        return quants.quantize(x, ggml_type)
    nb = k // e.block_size
    w = rng.integers(0, 256, size=(rows, nb * e.type_size), dtype=np.uint8)
    blk = w.reshape(rows, nb, e.type_size)
    for f in ("d", "dmin", "m"):
        if f in e.layout:
            o = e.layout[f]
            sc = rng.uniform(0.001, 0.01, size=(rows, nb, 1)).astype(np.float16)
            blk[:, :, o:o + 2] = sc.view(np.uint8).reshape(rows, nb, 2)
    return w


def roofline(repeat=5):
    """Single-thread read bandwidth: np.max over a 512 MiB float32 array (GB/s, median, min, max)."""
    a = np.ones(128 << 20, np.float32)
    a.max()
    clock = _clock(1)
    ts = []
    for _ in range(repeat):
        t = clock()
        a.max()
        ts.append(clock() - t)
    gb = a.nbytes / np.array(ts) / 1e9
    del a
    return np.median(gb), gb.min(), gb.max()


def _clock(threads):
    """CPU time of this thread for 1-thread runs: time spent descheduled by other
    processes on a shared machine is not counted (memory contention still is);
    wall time for multi-threaded runs."""
    return time.thread_time if threads == 1 and CPU_TIME else time.perf_counter


def _make_par_read():
    """A jitted parallel read of a float32 array: each thread streams one contiguous part
    with 64-byte vector loads (an LLVM-IR intrinsic like the kernels' own)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    from tinyinfer.kernels.simd import F32, P8, Emitter, c64, counted_loop, vec

    @intrinsic
    def read_sum(typingctx, addr, nvec):
        sig = types.float32(types.int64, types.int64)

        def codegen(context, b, signature, args):
            e = Emitter(b)
            p = b.inttoptr(args[0], P8)
            zero = ir.Constant(vec(F32, 16), None)

            def body(i, accs):
                off = b.mul(i, c64(256))
                return [e.fadd(accs[u], e.load(p, b.add(off, c64(64 * u)), vec(F32, 16))) for u in range(4)]

            accs = counted_loop(b, b.sdiv(args[1], c64(4)), [zero] * 4, lambda i, a: body(i, a))
            return e.reduce_fadd(e.fadd(e.fadd(accs[0], accs[1]), e.fadd(accs[2], accs[3])))

        return sig, codegen

    @numba.njit(parallel=True)
    def par_read(a, parts):
        n = a.shape[0] // parts // 64 * 64
        out = np.zeros(parts, np.float32)
        base = a.ctypes.data
        for t in numba.prange(parts):
            out[t] = read_sum(base + t * n * 4, n // 16)
        return out.sum()

    return par_read


_par_read = None


def roofline_threads(threads, repeat=5):
    """Read bandwidth with ``threads`` threads, each streaming its own half (third, ...) of 512 MiB."""
    global _par_read
    if _par_read is None:
        _par_read = _make_par_read()
    numba.set_num_threads(threads)
    a = np.ones(128 << 20, np.float32)
    _par_read(a, threads)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        _par_read(a, threads)
        ts.append(time.perf_counter() - t)
    gb = a.nbytes / np.array(ts) / 1e9
    return np.median(gb), gb.min(), gb.max()


def bench_gemv(ggml_type, rows, k, threads, repeat, rng):
    numba.set_num_threads(threads)
    w0 = random_weight(rows, k, ggml_type, rng)
    copies = max(1, -(-2 * LLC_BYTES // w0.nbytes))
    pws = [mm.prepare(w0 if i == 0 else w0.copy(), ggml_type, k, config=CONFIG) for i in range(copies)]
    x = rng.standard_normal((1, k)).astype(np.float32)
    out = np.empty((1, rows), np.float32)
    mm.matmul(pws[0], x, out)                       # compile / warm up
    clock = _clock(threads)
    ts = []
    for _ in range(repeat):
        t = clock()
        for pw in pws:
            mm.matmul(pw, x, out)
        ts.append((clock() - t) / copies)
    gb = w0.nbytes / np.array(ts) / 1e9
    return np.median(gb), gb.min(), gb.max(), np.median(ts)


def bench_gemm(ggml_type, rows, k, n, threads, repeat, rng):
    numba.set_num_threads(threads)
    pw = mm.prepare(random_weight(rows, k, ggml_type, rng), ggml_type, k, config=CONFIG)
    x = rng.standard_normal((n, k)).astype(np.float32)
    out = np.empty((n, rows), np.float32)
    mm.matmul(pw, x, out)
    clock = _clock(threads)
    ts = []
    for _ in range(repeat):
        t = clock()
        mm.matmul(pw, x, out)
        ts.append(clock() - t)
    gmac = rows * k * n / np.array(ts) / 1e9
    return np.median(gmac), gmac.min(), gmac.max(), np.median(ts)


def asm_report(type_name, packed):
    """Count the vector instructions of a type's compiled driver (kernels are inlined into it)."""
    info = mm._TYPES[TYPES[type_name]]
    if packed and not info.repack:
        return None
    rows = 48 if packed else 8
    pw = mm.prepare(random_weight(rows, 256, TYPES[type_name], np.random.default_rng(0)), TYPES[type_name], 256,
                    repack=packed, config=CONFIG)
    mm.matmul(pw, np.ones((1, 256), np.float32))
    drv = mm.driver(info, packed, False, CONFIG)
    asm = drv.inspect_asm(drv.signatures[0])
    ops = Counter(re.findall(r"^\s+([a-z][a-z0-9]*)\s", asm, re.M))
    vec_ops = {o: c for o, c in ops.items() if o.startswith("v") or o in
               ("sdot", "smull", "smull2", "addp", "smlal", "smlal2", "saddw", "saddw2", "fmla", "scvtf")}
    kind = "row-interleaved (repacked)" if packed else "native"
    print(f"{type_name} {kind}: driver asm {sum(ops.values())} instructions; vector ops:")
    print("   " + ", ".join(f"{o} {c}" for o, c in sorted(vec_ops.items(), key=lambda t: -t[1])))
    return asm


def cross_asm_report(targets=("cortex-a76", "cortex-a72", "haswell", "znver4")):
    """Compile each kernel intrinsic's IR on its own for other CPUs and count instructions.

    No ARM machine needed: LLVM (inside llvmlite) cross-compiles the same IR
    the JIT would build there. aarch64 runs use the aarch64 flavour of the
    IR (block dot products as llvm.vector.partial.reduce.add, 4-lane
    accumulators), as simd.py picks it on an aarch64 host. Counts are per
    loop body plus prologue/epilogue (loops are unrolled by LLVM as it likes).
    """
    from tinyinfer.kernels import dispatch, simd

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from arm_mca import compile_asm, module_ir as module_for

    def asm(text, triple, cpu):
        return compile_asm(text, cpu, triple)

    keys = {"aarch64": ["sdot", "smull", "smull2", "smlal", "smlal2", "addp", "uzp1", "uzp2", "tbl", "fmla", "scvtf",
                        "fcvtl", "fcvtl2", "fmul", "fadd", "faddp", "prfm", "ldr", "str"],
            "x86_64": ["vpdpwssd", "vpmaddwd", "vpmaddubsw", "vpmovzxbw", "vpmovsxbw", "vpshufb", "vcvtdq2ps", "vfmadd231ps",
                       "vcvtph2ps", "vmulps", "vaddps", "prefetcht0", "vmovups", "vmovaps"]}
    kernels = [("Q4_0 x16 n=1", lambda: dispatch.make("itile", "Q4_0", 1), 10),
               ("Q8_0 x16 n=1", lambda: dispatch.make("itile", "Q8_0", 1), 10),
               ("Q4_0 x16 n=4", lambda: dispatch.make("itile", "Q4_0", 4), 10),
               ("Q4_0 native 4x1", lambda: dispatch.make("tile", "Q4_0", 4, 1), 11),
               ("Q8_0 native 4x1", lambda: dispatch.make("tile", "Q8_0", 4, 1), 11),
               ("Q5_0 native 4x1", lambda: dispatch.make("tile", "Q5_0", 4, 1), 11),
               ("Q4_K native 1x1", lambda: dispatch.make("ktile", "Q4_K", 1, 1), 11),
               ("Q6_K native 1x1", lambda: dispatch.make("ktile", "Q6_K", 1, 1), 11),
               ("Q2_K native 1x1", lambda: dispatch.make("ktile", "Q2_K", 1, 1), 11),
               ("Q3_K native 1x1", lambda: dispatch.make("ktile", "Q3_K", 1, 1), 11),
               ("Q5_K native 1x1", lambda: dispatch.make("ktile", "Q5_K", 1, 1), 11),
               ("IQ4_XS native 1x1", lambda: dispatch.make("ktile", "IQ4_XS", 1, 1), 11),
               ("IQ4_NL native 1x1", lambda: dispatch.make("tile", "IQ4_NL", 1, 1, unroll=2), 11),
               ("F16 native 4x1", lambda: dispatch.make("tile", "F16", 4, 1), 11),
               ("F16 native 4x4", lambda: dispatch.make("tile", "F16", 4, 4), 11),
               ("F16 fma 1x1", lambda: dispatch.make("ftile", "F16", 1, prefetch=4096), 11),
               ("F16 fma 1x8", lambda: dispatch.make("ftile", "F16", 8, prefetch=4096), 11)]
    saved = simd.PARTIAL_REDUCE, simd.ACC_LANES
    try:
        for name, make, nargs in kernels:
            for cpu in targets:
                arm = cpu.startswith("cortex")
                simd.PARTIAL_REDUCE, simd.ACC_LANES = (True, 4) if arm else (False, {"haswell": 8}.get(cpu, 16))
                simd.tile_kernel.cache_clear()
                simd.ktile_kernel.cache_clear()
                simd.interleaved_kernel.cache_clear()
                simd.ftile_kernel.cache_clear()
                triple = "aarch64-unknown-linux-gnu" if arm else "x86_64-unknown-linux-gnu"
                a = asm(module_for(make(), nargs), triple, cpu)
                body = [ln for ln in a.splitlines() if ln.startswith("\t") and not ln.startswith("\t.")]
                ops = Counter(re.findall(r"^\t([a-z][a-z0-9.]*)", "\n".join(body), re.M))
                fam = "aarch64" if arm else "x86_64"
                print(f"{name:18s} {cpu:10s} {len(body):5d} instructions: "
                      + ", ".join(f"{k} {ops[k]}" for k in keys[fam] if ops[k]))
    finally:
        simd.PARTIAL_REDUCE, simd.ACC_LANES = saved
        simd.tile_kernel.cache_clear()
        simd.ktile_kernel.cache_clear()
        simd.interleaved_kernel.cache_clear()
        simd.ftile_kernel.cache_clear()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="*", default=list(TYPES))
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--n", nargs="*", type=int, default=[1, 512], help="activation rows (1 = tg, >1 = pp)")
    ap.add_argument("--shapes", nargs="*", default=["5632x2048", "2048x5632", "49152x576"],
                    help="ROWSxK weight shapes for n=1")
    ap.add_argument("--pp-shapes", nargs="*", default=["576x576", "192x576", "1536x576", "576x1536"],
                    help="ROWSxK shapes for n>1 (SmolLM2-135M's)")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--wall", action="store_true",
                    help="time 1-thread runs by wall clock (default: the thread's CPU time)")
    ap.add_argument("--asm", nargs="*", default=None, help="print vector instruction counts for these types")
    ap.add_argument("--arm-asm", action="store_true",
                    help="cross-compile the kernels for cortex-a76/a72 (and x86) and count instructions")
    g = ap.add_argument_group("experiment switches (matmul.KernelConfig)")
    g.add_argument("--repack", type=int, choices=(0, 1), help="row-interleaved copies (default: on for x86-64)")
    g.add_argument("--kgemv", type=int, choices=(0, 1), help="x86 K-quant single-row kernels")
    g.add_argument("--packed-nc", type=int, help="activation rows per repacked tile (default 4)")
    g.add_argument("--packed-chains", type=int, help="int32 chains per repacked tile (default 4)")
    g.add_argument("--parallel-min-bytes", type=int, help="smallest work split over threads")
    g.add_argument("--prefetch", type=int, help="software prefetch distance of the native tiles (bytes; 0 off)")
    g.add_argument("--prefetch-packed", type=int, help="software prefetch distance of the x16 groups (bytes)")
    g.add_argument("--batch-invariant", type=int, choices=(0, 1), help="one float order per row for every n")
    g.add_argument("--tile", action="append", metavar="TYPE:gemv|gemm:NR,NC,unroll,act16,wide",
                   help="native tile override, e.g. Q4_0:gemm:4,4,1,0,0 (repeatable)")
    a = ap.parse_args(argv)
    global CONFIG
    CONFIG = config_from_args(a)

    if a.arm_asm:
        cross_asm_report()
        return
    global CPU_TIME
    CPU_TIME = not a.wall

    if a.asm is not None:
        for t in a.asm or a.types:
            for packed in (True, False):
                asm_report(t, packed)
        return

    rng = np.random.default_rng(0)
    print(f"# {platform.machine()} {platform.processor() or ''} cpu={numba.config.CPU_NAME or 'host'} "
          f"numba {numba.__version__}, {os.cpu_count()} cpus")
    t = time.perf_counter()
    mm.prepare(random_weight(4, 64, TYPES["Q4_0"], rng), TYPES["Q4_0"], 64)
    med, lo, hi = roofline()
    print(f"# 1-thread timings: {'wall clock' if a.wall else 'thread CPU time'}; 2+ threads: wall clock")
    print(f"roofline (np.max, 512 MiB f32, 1 thread): {med:.1f} GB/s  [{lo:.1f}..{hi:.1f}]")
    for th in a.threads:
        med, lo, hi = roofline_threads(th)
        print(f"roofline (vector loads, 512 MiB f32, {th} thread{'s' if th > 1 else ''}, wall): "
              f"{med:.1f} GB/s  [{lo:.1f}..{hi:.1f}]")
    for n in a.n:
        shapes = a.shapes if n == 1 else a.pp_shapes
        for tn in a.types:
            for th in a.threads:
                for sh in shapes:
                    rows, k = map(int, sh.split("x"))
                    if k % mm._TYPES[TYPES[tn]].block:
                        continue
                    if n == 1:
                        med, lo, hi, tmed = bench_gemv(TYPES[tn], rows, k, th, a.repeat, rng)
                        print(f"tg {tn:5s} {rows:6d}x{k:<5d} threads={th}: {med:6.1f} GB/s [{lo:.1f}..{hi:.1f}]"
                              f"  {tmed * 1e6:8.1f} us/call")
                    else:
                        med, lo, hi, tmed = bench_gemm(TYPES[tn], rows, k, n, th, a.repeat, rng)
                        print(f"pp {tn:5s} {rows:6d}x{k:<5d} n={n} threads={th}: {med:6.1f} GMAC/s [{lo:.1f}..{hi:.1f}]"
                              f" = {2 * med:.0f} GFLOP/s  {tmed * 1e3:7.2f} ms/call")
                    sys.stdout.flush()
    med, lo, hi = roofline()
    print(f"roofline again: {med:.1f} GB/s  [{lo:.1f}..{hi:.1f}]")


if __name__ == "__main__":
    main()
