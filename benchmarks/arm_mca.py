"""Cycles per block of the aarch64 hot loops (Pi 5 = Cortex-A76, Pi 4 = Cortex-A72), tinyinfer's and
llama.cpp's, by one llvm-mca (LLVM 19).

    python benchmarks/arm_mca.py --llama-src DIR --markdown      # every type, GEMV and GEMM, both CPUs
    python benchmarks/arm_mca.py --llama-src DIR --kind gemv --estimate   # + tokens/s of a 1.1B on a Pi
    python benchmarks/arm_mca.py --types Q4_0 Q4_K --kind gemv --asm       # ours only, with the loops

Needs (Debian/Ubuntu) ``apt-get install llvm-19 clang-19 lld-19 libc6-dev-arm64-cross
libstdc++-12-dev-arm64-cross qemu-user-static``; no ARM machine. ``DIR``: a llama.cpp source tree, e.g.
the ``vendor/llama.cpp`` of llama-cpp-python's sdist (``pip download --no-deps --no-binary :all:
llama-cpp-python``). Both programs' loops go through the same ``llvm-mca-19`` (pinned by name: LLVM
14's "neoverse-n1" is the old A57 model), ``-mcpu=neoverse-n1`` for the A76 (LLVM's cortex-a76 model is
an A57 one; the N1 is the A76's server sibling) and ``-mcpu=cortex-a72`` for the A72.

Ours: the kernels' LLVM IR (the same IR numba JITs on a Pi) cross-compiled by llvmlite's LLVM for an
aarch64 triple (``-mcpu`` cortex-a76 / cortex-a72); the innermost loop of the assembly -- the one the
kernel spends its time in -- cut out (hot_loop) and run 100 iterations. Which kernel: the one
matmul.py's drivers call on aarch64 for n == 1 (GEMV, token generation) and n > 1 (GEMM, prompt
processing), chosen as the drivers choose (``kernels.arm.plan``): the 4-row interleaved kernels where a
type has a layout, else the native tiles; ``--before`` the native tiles only.

llama.cpp's (class LlamaLoops): what it runs there -- with dotprod (A76) its repacked
``ggml_gemv_* / ggml_gemm_*`` (arch/arm/repack.cpp) for the types it repacks, else ``ggml_vec_dot_*``
(arch/arm/quants.c) once per output, which is also its GEMM (the A72 has no repack and no llamafile
path); compiled by clang-19, traced under qemu-user, the trace through the same llvm-mca.

Figures are per 32-weight block (Q4_0, Q8_0, ...) or 256-weight super-block (K-quants) of one weight
row against one activation row: cycles (and instructions) divided by the row-blocks x activation rows
covered.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CPUS = {"A76": ("cortex-a76", "neoverse-n1"), "A72": ("cortex-a72", "cortex-a72")}
TRIPLE = "aarch64-unknown-linux-gnu"


def _setup_simd():
    """Make simd.py build its aarch64 flavour of IR (as it does on an aarch64 host)."""
    from tinyinfer.kernels import simd
    simd.PARTIAL_REDUCE, simd.ACC_LANES, simd.TARGET_ARCH = True, 4, "aarch64"
    for f in (simd.tile_kernel, simd.ktile_kernel, simd.interleaved_kernel):
        f.cache_clear()
    return simd


class _Ctx:
    def get_dummy_value(self):
        return None


def module_ir(intr, nargs: int) -> str:
    """IR of a module with one function ``kernel(i64 x nargs)`` that is the intrinsic's body."""
    from llvmlite import ir
    from numba import types
    m = ir.Module(name="k")
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [ir.IntType(64)] * nargs), "kernel")
    b = ir.IRBuilder(fn.append_basic_block())
    sig, cg = intr._defn(None, *([types.int64] * nargs))
    cg(_Ctx(), b, sig, list(fn.args))
    b.ret_void()
    return str(m)


def compile_asm(text: str, cpu: str, triple: str = TRIPLE) -> str:
    """Assembly of an IR module, optimized at O3 for ``cpu`` of ``triple``."""
    import llvmlite.binding as llvm
    for init in ("initialize_all_targets", "initialize_all_asmprinters"):
        getattr(llvm, init, lambda: None)()
    m = llvm.parse_assembly(text)
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, opt=3)
    m.triple = triple
    m.data_layout = str(tm.target_data)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(3))
    pb.getModulePassManager().run(m, pb)
    return tm.emit_assembly(m)


def hot_loop(asm: str) -> list[str]:
    """The instructions of the largest innermost loop: a label, a later branch back to it, and no
    other loop inside."""
    lines = [ln.split("//")[0].rstrip() for ln in asm.splitlines()]
    labels, loops = {}, []
    for i, ln in enumerate(lines):
        m = re.match(r"^(\.?L\w+):", ln)
        if m:
            labels[m.group(1)] = i
        m = re.match(r"^\s+(?:b\.\w+|b|cbnz|cbz|tbnz|tbz)\s+(?:\w+,\s*)?(?:#\d+,\s*)?(\.?L\w+)$", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops.append((labels[m.group(1)], i))
    inner = [(s, e) for s, e in loops if not any(s < s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    best: list[str] = []
    for s, e in inner:
        body = [t.strip() for t in lines[s + 1:e + 1] if t.startswith("\t") and t.strip()
                and not t.strip().startswith(".")]
        if len(body) > len(best):
            best = body
    return best


LLVM = 19  # the one LLVM whose llvm-mca measures both programs (and whose clang compiles llama.cpp)
APT = (f"apt-get install llvm-{LLVM} clang-{LLVM} lld-{LLVM} libc6-dev-arm64-cross libstdc++-12-dev-arm64-cross "
       "qemu-user-static")


def find_mca() -> str:
    """llvm-mca of LLVM 19, by name, never "the newest found": LLVM 14's neoverse-n1 is scheduled with the
    Cortex-A57 model (3-wide, one load pipe), the N1's own model (8-wide dispatch, two load pipes) came
    later, and figures from two models cannot be compared."""
    exe = shutil.which(f"llvm-mca-{LLVM}") or (f"/usr/lib/llvm-{LLVM}/bin/llvm-mca"
                                               if os.path.exists(f"/usr/lib/llvm-{LLVM}/bin/llvm-mca") else None)
    if exe is None:
        raise SystemExit(f"arm_mca.py: llvm-mca-{LLVM} not found (Debian/Ubuntu: apt-get install llvm-{LLVM})")
    return exe


MCA = None


def mca(loop: list[str], mcpu: str, iterations: int = 100) -> tuple[float, int]:
    """(cycles per iteration, instructions per iteration) of a loop body under llvm-mca."""
    exe = MCA or find_mca()
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(loop) + "\n")
    try:
        r = subprocess.run([str(exe), f"-mtriple={TRIPLE}", f"-mcpu={mcpu}", f"-iterations={iterations}",
                            f.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    cyc = int(re.search(r"Total Cycles:\s+(\d+)", r.stdout).group(1))
    ins = int(re.search(r"Instructions:\s+(\d+)", r.stdout).group(1))
    return cyc / iterations, ins // iterations


def kernels(type_name: str, kind: str, before: bool, dotprod: bool):
    """[(label, intrinsic, nargs, row-blocks x activation rows per loop iteration)] for one type.

    The per-iteration figure is the kernel's unit of work (``per_iter``): LLVM does not unroll
    these loops further (checked with ``--asm``: each loop holds one iteration's scvtf count).
    """
    _setup_simd()
    from tinyinfer.kernels import matmul as mm
    from tinyinfer.kernels import dispatch, quants
    info = mm._TYPES[int(quants.type_info(type_name).ggml_type)]
    if not before:
        from tinyinfer.kernels import arm
        arm.group_kernel.cache_clear()
        k = arm.mca_kernel(type_name, kind, dotprod)
        if k is not None:
            return k
    t = info.gemv if kind == "gemv" else info.gemm
    if info.act == "q8_K":
        return (f"native ktile {t.NR}x{t.NC}", dispatch.make("ktile", type_name, t.NR, t.NC), 11, t.NR * t.NC)
    return (f"native tile {t.NR}x{t.NC}u{t.unroll}",
            dispatch.make("tile", type_name, t.NR, t.NC, unroll=t.unroll, act16=t.act16, wide=t.wide), 11,
            t.NR * t.NC * t.unroll)


# ------------------------------------------------------------------ llama.cpp's loops, measured here
# What llama.cpp runs on aarch64 (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type): with the
# dot-product extension and no i8mm (the Pi 5's A76) these types are repacked at load and multiplied by
# ggml_gemv_<k> (one activation row) / ggml_gemm_<k> (4-row activation groups); every other type, and every
# type without dotprod (the Pi 4's A72), runs ggml_vec_dot_<t> (arch/arm/quants.c) once per output.
LLAMA_REPACKED = {  # type: (kernel suffix, interleaved weight rows)
    "Q4_0": ("q4_0_4x4_q8_0", 4), "Q8_0": ("q8_0_4x4_q8_0", 4), "IQ4_NL": ("iq4_nl_4x4_q8_0", 4),
    "Q4_K": ("q4_K_8x4_q8_K", 8), "Q5_K": ("q5_K_8x4_q8_K", 8), "Q6_K": ("q6_K_8x4_q8_K", 8)}
LLAMA_VEC_DOT = {"Q4_0": "q4_0_q8_0", "Q4_1": "q4_1_q8_1", "Q5_0": "q5_0_q8_0", "Q5_1": "q5_1_q8_1",
                 "Q8_0": "q8_0_q8_0", "Q2_K": "q2_K_q8_K", "Q3_K": "q3_K_q8_K", "Q4_K": "q4_K_q8_K",
                 "Q5_K": "q5_K_q8_K", "Q6_K": "q6_K_q8_K", "IQ4_NL": "iq4_nl_q8_0", "IQ4_XS": "iq4_xs_q8_K"}
GEMM_ROWS = 16  # activation rows of one measured GEMM call (gemm_q4_0_4x4's assembly takes 16 a pass)
# One call's PC trace is taken for two row lengths; their difference is whole blocks of the loop nest
# (inner loops, remainders, call overhead cancel out), so no loop has to be cut out of llama.cpp's code.
BLOCKS = {32: (8, 40), 256: (2, 6)}  # block size: (short, long) row in blocks

_HARNESS = r"""
#include <stdlib.h>
#include <stdint.h>
#include <stddef.h>
typedef void (*gemx)(int, float *, size_t, const void *, const void *, int, int);
typedef void (*vdot)(int, float *, size_t, const void *, size_t, const void *, size_t, int);
extern void FN(void);
static unsigned char x[1 << 18], y[1 << 18];
static float s[1 << 12];
int main(int argc, char **argv) {
    int n = atoi(argv[1]), nr = atoi(argv[2]), nc = atoi(argv[3]);
    uint32_t r = 12345;
    for (size_t i = 0; i < sizeof x; i++) { r = r * 1103515245u + 12345u; x[i] = r >> 16; y[i] = r >> 8; }
#ifdef VEC_DOT
    ((vdot)(void *)FN)(n, s, 0, x, 0, y, 0, 1);
#else
    ((gemx)(void *)FN)(n, s, nc, x, y, nr, nc);
#endif
    volatile float sink = s[0];
    (void)sink;
    return 0;
}
"""


def _need(tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing or not Path("/usr/aarch64-linux-gnu/include/stdio.h").exists():
        raise SystemExit(f"arm_mca.py --llama-src: missing {', '.join(missing) or 'the aarch64 libc headers'} "
                         f"(Debian/Ubuntu: {APT})")


def llama_tree(src: str) -> tuple[Path, str]:
    """(ggml dir, a line naming the tree) of a llama.cpp source tree (its root or its ggml/)."""
    root = Path(src).resolve()
    ggml = root / "ggml" if (root / "ggml" / "src").is_dir() else root
    arm = ggml / "src" / "ggml-cpu" / "arch" / "arm"
    if not (arm / "repack.cpp").exists() or not (arm / "quants.c").exists():
        raise SystemExit(f"arm_mca.py: {src} is not a llama.cpp tree (no ggml/src/ggml-cpu/arch/arm/repack.cpp)")
    cm = (ggml / "CMakeLists.txt").read_text()
    ver = ".".join(re.search(rf"set\(GGML_VERSION_{k} (\d+)\)", cm).group(1) for k in ("MAJOR", "MINOR", "PATCH"))
    return ggml, f"{root} (ggml {ver})"


class LlamaLoops:
    """llama.cpp's aarch64 kernels from its own source tree: arch/arm/repack.cpp and quants.c compiled by
    clang-19 (``--target=aarch64-linux-gnu -O3 -DNDEBUG -mcpu=...``, as a Release build for that CPU),
    each kernel linked into a small static program that calls it once on pseudo-random data, the
    instructions it executes traced one by one under qemu-user (``-singlestep -d exec``), and the
    trace (as disassembled by llvm-objdump-19) put through llvm-mca-19 once. Cycles per block of one
    weight row x one activation row = difference of two row lengths / (blocks x weight rows x activation
    rows). For a loop of one basic block this is what hot_loop() + llvm-mca gives for ours."""

    def __init__(self, src: str, mca_exe: str, workdir: str):
        _need([f"clang-{LLVM}", f"ld.lld-{LLVM}", f"llvm-objdump-{LLVM}", f"llvm-nm-{LLVM}", "qemu-aarch64-static"])
        self.ggml, self.name = llama_tree(src)
        self.mca, self.dir = mca_exe, Path(workdir)
        self.objs, self.done = {}, {}

    def _obj(self, cpu: str, which: str) -> Path:
        key = (cpu, which)
        if key not in self.objs:
            g = self.ggml
            src = g / "src" / "ggml-cpu" / "arch" / "arm" / ("repack.cpp" if which == "repack" else "quants.c")
            out = self.dir / f"{which}-{cpu}.o"
            lang = ["-x", "c++", "-std=c++17"] if which == "repack" else ["-std=c11"]
            subprocess.run([f"clang-{LLVM}", "--target=aarch64-linux-gnu", "-O3", "-DNDEBUG", "-D_GNU_SOURCE",
                            f"-mcpu={cpu}", "-c", f"-I{g / 'include'}", f"-I{g / 'src'}",
                            f"-I{g / 'src' / 'ggml-cpu'}", *lang, str(src), "-o", str(out)], check=True)
            self.objs[key] = out
        return self.objs[key]

    def kernel(self, cpu: str, type_name: str, kind: str):
        """(function, object kind, weight rows, activation rows) llama.cpp runs for this type on ``cpu``."""
        if cpu == "A76" and type_name in LLAMA_REPACKED:
            suffix, ncols = LLAMA_REPACKED[type_name]
            return f"ggml_{kind}_{suffix}", "repack", ncols, 1 if kind == "gemv" else GEMM_ROWS
        if type_name not in LLAMA_VEC_DOT:
            return None
        return f"ggml_vec_dot_{LLAMA_VEC_DOT[type_name]}", "quants", 1, 1

    def measure(self, cpu: str, type_name: str, kind: str):
        """(label, cycles per block, instructions per block) or None."""
        k = self.kernel(cpu, type_name, kind)
        if k is None:
            return None
        fn, which, ncols, nrows = k
        if (cpu, fn) in self.done:
            return self.done[(cpu, fn)]
        target, mcpu = CPUS[cpu]
        obj = self._obj(target, which)
        exe = self.dir / f"{fn}-{cpu}"
        h = self.dir / "harness.c"
        h.write_text(_HARNESS)
        defs = [f"-DFN={fn}"] + (["-DVEC_DOT"] if which == "quants" else [])
        subprocess.run([f"clang-{LLVM}", "--target=aarch64-linux-gnu", "-O2", *defs, "-c", str(h), "-o",
                        str(exe) + ".o"], check=True)
        subprocess.run([f"clang-{LLVM}", "--target=aarch64-linux-gnu", f"-fuse-ld=lld", "-static",
                        str(exe) + ".o", str(obj), "-Wl,--unresolved-symbols=ignore-all", "-o", str(exe)],
                       check=True, capture_output=True)
        nm = subprocess.run([f"llvm-nm-{LLVM}", "-S", str(exe)], capture_output=True, text=True, check=True).stdout
        m = re.search(rf"^([0-9a-f]+) ([0-9a-f]+) T {fn}$", nm, re.M)
        if m is None:
            raise SystemExit(f"arm_mca.py: {self.name} has no {fn} (a different llama.cpp: update LLAMA_REPACKED)")
        start, size = int(m.group(1), 16), int(m.group(2), 16)
        dis = subprocess.run([f"llvm-objdump-{LLVM}", "-d", "--no-show-raw-insn", f"--mcpu={target}",
                              f"--disassemble-symbols={fn}", str(exe)], capture_output=True, text=True,
                             check=True).stdout
        insn = {}
        for ln in dis.splitlines():
            mm = re.match(r"^\s*([0-9a-f]+):\s+(\S.*)$", ln)
            if mm:
                t = re.sub(r"0x[0-9a-f]+ <[^>]*>", "Ltr", mm.group(2).split("//")[0]).strip()
                insn[int(mm.group(1), 16)] = t
        from tinyinfer.kernels import quants
        qk = quants.type_info(type_name).block_size
        res = []
        for nb in BLOCKS[qk]:
            log = self.dir / "trace.log"
            subprocess.run(["qemu-aarch64-static", "-singlestep", "-d", "exec,nochain", "-dfilter",
                            f"{start:#x}+{size:#x}", "-D", str(log), str(exe), str(nb * qk), str(nrows), str(ncols)],
                           check=True)
            pcs = [int(x, 16) for x in re.findall(r"^Trace \d+: \S+ \[[0-9a-f]+/([0-9a-f]+)/", log.read_text(), re.M)]
            trace = [insn[pc] for pc in pcs]
            if any(t.split()[0] in ("bl", "blr") for t in trace):
                raise SystemExit(f"arm_mca.py: {fn} calls out of itself; the trace would miss the callee")
            cyc, ins = mca(["Ltr:"] + trace, mcpu, iterations=1)
            res.append((cyc, len(trace)))
        per = (BLOCKS[qk][1] - BLOCKS[qk][0]) * ncols * nrows
        short = fn.replace("ggml_", "")
        out = (short, (res[1][0] - res[0][0]) / per, (res[1][1] - res[0][1]) / per)
        self.done[(cpu, fn)] = out
        return out


# ------------------------------------------------------------------ token-rate estimate
# A TinyLlama-shaped 1.1B (d 2048, 22 layers, 4 KV heads of 64, ff 5632, vocab 32000): the
# weights one token streams through the matmuls (embedding lookup excluded).
D, LAYERS, KV, FF, VOCAB = 2048, 22, 256, 5632, 32000
MATMUL_PARAMS = LAYERS * (2 * D * D + 2 * D * KV + 3 * D * FF) + VOCAB * D
PI = {"A76": ("Pi 5", 2.4e9, {1: 6e9, 4: 11e9}), "A72": ("Pi 4", 1.8e9, {1: 3.5e9, 4: 4.5e9})}
# The per-token cost that does not grow with the weights (Python, dispatch, thread fork/join, graph,
# barriers), ms on the 2-vCPU Zen 4 VM, tinyinfer vs llama.cpp measured the same way in one run:
# `python benchmarks/dispatch_overhead.py -t 1,2 -r 15 --llama-bench BIN` (2026-12-01, --pure files;
# medians; benchmarks/RESULTS.md). 4 threads use the 2-thread figures (the VM has 2 cores).
FIXED_X86 = {  # (type, threads): (tinyinfer, llama.cpp)
    ("Q4_0", 1): (0.278, 0.099), ("Q4_0", 4): (0.417, 0.196),
    ("Q8_0", 1): (0.158, 0.050), ("Q8_0", 4): (0.373, 0.107),
    ("Q4_K", 1): (0.319, 0.127), ("Q4_K", 4): (0.457, 0.217),
    ("Q6_K", 1): (0.263, 0.123), ("Q6_K", 4): (0.426, 0.175),
}
# ... on a Pi, this many times as long as on the VM (assumed for both programs: a Pi 5 core runs
# Python and C at roughly a quarter of a Zen 4 core's speed, a Pi 4 core an eighth)
PI_SLOWER = {"A76": 4.0, "A72": 8.0}


def estimate(cpu: str, type_name: str, cyc: float, threads: int, fixed_ms: float = 0.0) -> float:
    """tokens/s = 1 / (weight bytes / bandwidth + matmul cycles / (clock x threads) + fixed cost):
    memory and compute not overlapped (a conservative model in which kernel cycles count fully)."""
    from tinyinfer.kernels import quants
    e = quants.type_info(type_name)
    _, hz, bw = PI[cpu]
    t = MATMUL_PARAMS * e.type_size / e.block_size / bw[threads] + MATMUL_PARAMS / e.block_size * cyc / (hz * threads)
    return 1.0 / (t + fixed_ms * 1e-3 * PI_SLOWER[cpu])


def read_fixed(path: str) -> dict:
    """{(type, threads): (tinyinfer ms, llama.cpp ms)} from dispatch_overhead.py's table (the medians of
    its "tinyinfer fixed" and "llama.cpp fixed" columns; Q4_K_S counts as Q4_K; 2 threads stand for 4)."""
    out = {}
    for ln in Path(path).read_text().splitlines():
        c = [x.strip() for x in ln.strip().strip("|").split("|")]
        if len(c) < 6 or not c[1].isdigit():
            continue
        tn, th = c[0].replace("_S", "").replace("_M", ""), int(c[1])
        ours, ll = (float(x.split()[0]) for x in (c[3], c[5]))
        out[(tn, 4 if th == 2 else th)] = (ours, ll)
    if not out:
        raise SystemExit(f"arm_mca.py --fixed: no dispatch_overhead.py rows with llama.cpp columns in {path}")
    return out


def print_estimates(ours: dict, llama: dict, fixed: dict):
    """``ours`` / ``llama``: {(cpu, type): GEMV cycles per block}; ``fixed``: as FIXED_X86."""
    print(f"\n# tokens/s estimate, 1.1B ({MATMUL_PARAMS / 1e9:.3f} G matmul weights, all of the type); "
          "bandwidth Pi 5 6 / 11 GB/s (1 / 4 threads), Pi 4 3.5 / 4.5; clock 2.4 / 1.8 GHz;")
    print("# t = bytes / bandwidth + blocks x GEMV cycles / (clock x threads) [+ fixed cost per token: the x86 "
          f"VM's x {PI_SLOWER['A76']:g} on a Pi 5, x {PI_SLOWER['A72']:g} on a Pi 4, for both programs]; "
          "break-even: the largest fixed-cost gap (ours - llama.cpp's, VM ms) at which ours is still >= 1.00x")
    print("| Pi | type | threads | llama.cpp t/s (kernels only) | tinyinfer t/s (kernels only) | ratio | "
          "fixed ms/token on the Pi, llama.cpp / tinyinfer | llama.cpp t/s | tinyinfer t/s | ratio | "
          "break-even gap, VM ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (cpu, tn), cyc in ours.items():
        if (cpu, tn) not in llama or (tn, 1) not in fixed:
            continue
        lc = llama[(cpu, tn)]
        for th in (1, 4):
            ll, us = estimate(cpu, tn, lc, th), estimate(cpu, tn, cyc, th)
            fo, fl = fixed[(tn, th)]
            ll_f, us_f = estimate(cpu, tn, lc, th, fl), estimate(cpu, tn, cyc, th, fo)
            k = PI_SLOWER[cpu]
            gap = (1 / ll - 1 / us) / (k * 1e-3)
            print(f"| {PI[cpu][0]} | {tn} | {th} | {ll:.2f} | {us:.2f} | {us / ll:.3f}x | "
                  f"{fl * k:.2f} / {fo * k:.2f} | {ll_f:.2f} | {us_f:.2f} | {us_f / ll_f:.3f}x | {gap:.3f} |")


def gated(cpu: str, type_name: str) -> bool:
    """The rows issue 20 asks ours <= llama.cpp's for: llama.cpp's repacked kernels on the A76, every type
    on the A72."""
    return cpu == "A72" or type_name in LLAMA_REPACKED


KEYS = ["sdot", "smull", "smull2", "smlal", "smlal2", "sadalp", "saddlp", "saddw", "saddw2",
        "mla", "scvtf", "fmla", "umov", "dup", "ldr", "ldp", "str"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="*", default=["Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q5_K", "Q2_K", "Q3_K",
                                                   "IQ4_NL", "IQ4_XS", "Q4_1", "Q5_0", "Q5_1"])
    ap.add_argument("--kind", nargs="*", default=["gemv", "gemm"], choices=["gemv", "gemm"])
    ap.add_argument("--cpus", nargs="*", default=list(CPUS), choices=list(CPUS))
    ap.add_argument("--llama-src", default=None, metavar="DIR",
                    help="a llama.cpp source tree (its root or ggml/): measure its loops the same way "
                         "(e.g. llama-cpp-python's sdist, vendor/llama.cpp)")
    ap.add_argument("--before", action="store_true", help="the native tiles only (no kernels/arm.py)")
    ap.add_argument("--asm", action="store_true", help="print each measured loop of ours")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--estimate", action="store_true",
                    help="also print a tokens/s estimate for a Pi 5 / Pi 4 (1.1B model) from the GEMV cycles "
                         "(needs --llama-src)")
    ap.add_argument("--fixed", default=None, metavar="FILE",
                    help="the fixed costs per token for --estimate: a saved table of benchmarks/dispatch_overhead.py "
                         "--llama-bench (default: FIXED_X86, 2026-12-01)")
    a = ap.parse_args(argv)
    global MCA
    MCA = find_mca()
    import llvmlite.binding as llvm
    ver = subprocess.run([MCA, "--version"], capture_output=True, text=True).stdout
    print(f"# {MCA}: LLVM {re.search(r'version ([0-9.]+)', ver).group(1)}; A76 = -mcpu=neoverse-n1, "
          f"A72 = -mcpu=cortex-a72. tinyinfer: its kernels' IR compiled by llvmlite's LLVM "
          f"{'.'.join(map(str, llvm.llvm_version_info))} (what numba JITs on a Pi), innermost loop x 100 iterations")
    work, ll = None, None
    if a.llama_src:
        work = tempfile.mkdtemp(prefix="arm_mca-")
        try:
            ll = LlamaLoops(a.llama_src, MCA, work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        print(f"# llama.cpp: {ll.name}, arch/arm/repack.cpp + quants.c compiled by clang-{LLVM} "
              f"(-O3 -DNDEBUG -mcpu=cortex-a76 / cortex-a72), one call traced under qemu-user, the trace "
              f"through the same llvm-mca")
    elif a.estimate:
        raise SystemExit("arm_mca.py --estimate needs --llama-src DIR (llama.cpp's cycles are measured, not stored)")
    else:
        print("# llama.cpp: not measured (pass --llama-src DIR)")
    print("# cycles (instructions) per block of one weight row x one activation row; ratio = ours / llama.cpp; "
          "* = a row issue 20 gates (llama.cpp's repacked kernels on the A76, every type on the A72)")
    if a.markdown:
        print("| CPU | type | kind | tinyinfer kernel | tinyinfer | llama.cpp kernel | llama.cpp | ratio |")
        print("| --- | --- | --- | --- | ---: | --- | ---: | ---: |")
    else:
        print(f"{'CPU':4s} {'type':6s} {'kind':5s} {'tinyinfer kernel':22s} {'cyc (ins)':>15s}  "
              f"{'llama.cpp kernel':22s} {'cyc (ins)':>15s}  {'ratio':>7s}  loop ops (ours)")
    ours_gemv, llama_gemv, dearer = {}, {}, []
    try:
        for cpu in a.cpus:
            target, mcpu = CPUS[cpu]
            for tn in a.types:
                for kind in a.kind:
                    label, intr, nargs, per = kernels(tn, kind, a.before, cpu == "A76")
                    loop = hot_loop(compile_asm(module_ir(intr, nargs), target))
                    cyc, ins = mca(loop, mcpu)
                    cyc, ins = cyc / per, ins / per
                    ops = Counter(t.split()[0] for t in loop)
                    m = ll.measure(cpu, tn, kind) if ll else None
                    if kind == "gemv":
                        ours_gemv[(cpu, tn)] = cyc
                        if m:
                            llama_gemv[(cpu, tn)] = m[1]
                    ratio = f"{cyc / m[1]:.2f}x" if m else ""
                    star = "*" if m and gated(cpu, tn) else ""
                    if m and gated(cpu, tn) and cyc > m[1]:
                        dearer.append(f"{tn} {kind} {cpu}: {cyc:.2f} vs {m[1]:.2f} cycles, {cyc / m[1]:.2f}x")
                    ref = f"{m[1]:.2f} ({m[2]:.1f})" if m else ""
                    if a.markdown:
                        print(f"| {cpu} | {tn} | {kind} | {label} | {cyc:.2f} ({ins:.1f}) | {m[0] if m else ''} | "
                              f"{ref} | {ratio}{star} |", flush=True)
                    else:
                        print(f"{cpu:4s} {tn:6s} {kind:5s} {label:22s} {f'{cyc:.2f} ({ins:.1f})':>15s}  "
                              f"{m[0] if m else '':22s} {ref:>15s}  {ratio + star:>7s}  "
                              + ", ".join(f"{k} {ops[k]}" for k in KEYS if ops[k]), flush=True)
                    if a.asm:
                        print("\n".join("      " + t for t in loop))
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    if ll:
        print("\n# gated rows where tinyinfer needs more cycles than llama.cpp: "
              + ("; ".join(dearer) if dearer else "none"))
    if a.estimate:
        print_estimates(ours_gemv, llama_gemv, read_fixed(a.fixed) if a.fixed else FIXED_X86)


if __name__ == "__main__":
    main()
