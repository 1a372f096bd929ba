"""Cycles per block of the aarch64 hot loops (Pi 5 = Cortex-A76, Pi 4 = Cortex-A72), by llvm-mca.

    python benchmarks/arm_mca.py                       # every type, GEMV (tg) and GEMM (pp), both CPUs
    python benchmarks/arm_mca.py --types Q4_0 Q4_K --kind gemv --asm   # also print the loops

No ARM machine and no emulation needed: the kernels' LLVM IR (the same IR numba JITs on a Pi)
is built here, cross-compiled by llvmlite's LLVM for an aarch64 triple (``-mcpu`` cortex-a76 /
cortex-a72), and the innermost loop of the assembly -- the one the kernel spends its time in --
is cut out and put through ``llvm-mca`` (100 iterations): for the A76 with
``-mcpu=neoverse-n1`` (LLVM's cortex-a76 scheduling model is an old A57 one; the N1 is the A76's
server sibling), for the A72 with ``-mcpu=cortex-a72``; the method of
``../shared/reference/speed.md``, whose llama.cpp figures are printed alongside.

Which loop: the kernels that matmul.py's drivers call on aarch64 for n == 1 (GEMV, token
generation) and n > 1 (GEMM, prompt processing), chosen the way the drivers choose them
(``kernels.arm.plan``): the aarch64 row-interleaved kernels where a type has one, else the
native tiles. Figures are per 32-weight block (Q4_0, Q8_0, ...) or 256-weight super-block
(K-quants) of one weight row against one activation row: cycles (and instructions) of one
loop iteration divided by the row-blocks x activation rows it covers. ``--before`` measures
the native tiles only (the kernels before kernels/arm.py).
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

# llama.cpp's figures (../shared/reference/speed.md): cycles (instructions) per block, GEMV
LLAMA = {("A76", "Q4_0"): (3.2, 8.3), ("A76", "Q8_0"): (2.3, 6.3), ("A76", "Q4_K"): (27, 72),
         ("A76", "Q6_K"): (64, 138), ("A72", "Q4_0"): (9.2, 24), ("A72", "Q8_0"): (8.7, 20.5),
         ("A72", "Q4_K"): (76, 177), ("A72", "Q6_K"): (122, 217)}
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


def find_mca() -> str:
    """The newest llvm-mca here: LLVM 14's neoverse-n1 is scheduled with the Cortex-A57 model (3-wide,
    one load pipe); the N1's own model (8-wide dispatch, two load pipes) came later (LLVM 19 has it)."""
    found = sorted(Path("/usr/lib").glob("llvm-*/bin/llvm-mca"), key=lambda p: int(p.parts[3].split("-")[1]))
    exe = str(found[-1]) if found else shutil.which("llvm-mca")
    if exe is None:
        raise SystemExit("llvm-mca not found (Debian: apt-get install llvm-19)")
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


def print_estimates(measured: dict):
    print(f"\n# tokens/s estimate, 1.1B ({MATMUL_PARAMS / 1e9:.3f} G matmul weights, all of the type); "
          "bandwidth Pi 5 6 / 11 GB/s (1 / 4 threads), Pi 4 3.5 / 4.5; clock 2.4 / 1.8 GHz;")
    print("# t = bytes / bandwidth + blocks x cycles / (clock x threads) [+ fixed cost per token: the VM's "
          f"(FIXED_X86) x {PI_SLOWER['A76']:g} on a Pi 5, x {PI_SLOWER['A72']:g} on a Pi 4, for both programs]")
    print("| Pi | type | threads | llama.cpp t/s (kernels only) | tinyinfer t/s (kernels only) | ratio | "
          "fixed ms/token, llama.cpp / tinyinfer | llama.cpp t/s | tinyinfer t/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (cpu, tn), cyc in measured.items():
        if (cpu, tn) not in LLAMA:
            continue
        for th in (1, 4):
            ll, ours = estimate(cpu, tn, LLAMA[(cpu, tn)][0], th), estimate(cpu, tn, cyc, th)
            fo, fl = FIXED_X86[(tn, th)]
            ll_f, ours_f = estimate(cpu, tn, LLAMA[(cpu, tn)][0], th, fl), estimate(cpu, tn, cyc, th, fo)
            k = PI_SLOWER[cpu]
            print(f"| {PI[cpu][0]} | {tn} | {th} | {ll:.1f} | {ours:.1f} | {ours / ll:.2f}x | "
                  f"{fl * k:.1f} / {fo * k:.1f} | {ll_f:.1f} | {ours_f:.1f} | {ours_f / ll_f:.2f}x |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="*", default=["Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q5_K", "Q2_K", "Q3_K",
                                                   "IQ4_NL", "IQ4_XS", "Q4_1", "Q5_0", "Q5_1"])
    ap.add_argument("--kind", nargs="*", default=["gemv", "gemm"], choices=["gemv", "gemm"])
    ap.add_argument("--cpus", nargs="*", default=list(CPUS), choices=list(CPUS))
    ap.add_argument("--before", action="store_true", help="the native tiles only (no kernels/arm.py)")
    ap.add_argument("--asm", action="store_true", help="print each measured loop")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--estimate", action="store_true",
                    help="also print a tokens/s estimate for a Pi 5 / Pi 4 (1.1B model) from the GEMV cycles")
    ap.add_argument("--mca", default=None, help="llvm-mca binary (default: the newest installed)")
    a = ap.parse_args(argv)
    global MCA
    MCA = a.mca or find_mca()
    ver = subprocess.run([MCA, "--version"], capture_output=True, text=True).stdout
    print(f"# {MCA}: LLVM {re.search(r'version ([0-9.]+)', ver).group(1)}; "
          f"A76 = -mcpu=neoverse-n1, A72 = -mcpu=cortex-a72; 100 iterations")
    if a.markdown:
        print("| CPU | type | kind | kernel | cycles (instructions) per block | llama.cpp | ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
    else:
        print(f"{'CPU':4s} {'type':6s} {'kind':5s} {'kernel':24s} {'cyc/blk':>8s} {'ins/blk':>8s}   "
              f"llama.cpp cyc (ins)   ratio   loop ops")
    measured = {}
    for cpu in a.cpus:
        target, mcpu = CPUS[cpu]
        for tn in a.types:
            for kind in a.kind:
                label, intr, nargs, per = kernels(tn, kind, a.before, cpu == "A76")
                asm = compile_asm(module_ir(intr, nargs), target)
                loop = hot_loop(asm)
                cyc, ins = mca(loop, mcpu)
                ops = Counter(t.split()[0] for t in loop)
                keys = ["sdot", "smull", "smull2", "smlal", "smlal2", "sadalp", "saddlp", "saddw", "saddw2",
                        "mla", "scvtf", "fmla", "umov", "dup", "ldr", "ldp", "str"]
                if kind == "gemv":
                    measured[(cpu, tn)] = cyc / per
                lc = LLAMA.get((cpu, tn)) if kind == "gemv" else None
                ref = f"{lc[0]:6.1f} ({lc[1]:5.1f})" if lc else " " * 14
                ratio = f"{cyc / per / lc[0]:5.2f}x" if lc else " " * 6
                if a.markdown:
                    print(f"| {cpu} | {tn} | {kind} | {label} | {cyc / per:.2f} ({ins / per:.1f}) | "
                          f"{f'{lc[0]} ({lc[1]})' if lc else ''} | {ratio.strip()} |", flush=True)
                    continue
                print(f"{cpu:4s} {tn:6s} {kind:5s} {label:24s} {cyc / per:8.2f} {ins / per:8.1f}   {ref}       "
                      f"{ratio}  " + ", ".join(f"{k} {ops[k]}" for k in keys if ops[k]), flush=True)
                if a.asm:
                    print("\n".join("      " + t for t in loop))
    if a.estimate:
        print_estimates(measured)


if __name__ == "__main__":
    main()
