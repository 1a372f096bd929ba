"""Float FMA tiles, before/after (issue 24 follow-up): python benchmarks/ffma_ab.py [NRxNC]

A/B in one process: the float FMA driver with FF_NR x FF_NC = 1 x 8 (the old tiling, NR = 1 kernels)
against the new default, interleaved, 1 thread. Prints min and median per call and new/old ratios."""
import time, numpy as np, numba
numba.set_num_threads(1)
from tinyinfer.kernels import matmul as mm
from gguf import GGMLQuantizationType as T
rng = np.random.default_rng(0)
def mk(NR, NC, pw):
    mm.FF_NR, mm.FF_NC = NR, NC
    return mm._make_ffma(pw.info, False, pw.config)
import sys
new_t = tuple(map(int, sys.argv[1].split("x"))) if len(sys.argv) > 1 else (mm.FF_NR, mm.FF_NC)
print("new tile", new_t)
for name, rows, k, ns in [("F32", 1536, 384, (4, 10, 16)), ("F32", 384, 1536, (4, 10, 16)), ("F32", 384, 384, (4, 10, 16)),
                          ("F16", 1536, 576, (9,)), ("F16", 576, 1536, (9,)), ("F16", 49152, 576, (9,))]:
    wf = rng.standard_normal((rows, k)).astype(np.float32)
    raw = wf.view(np.uint8) if name == "F32" else wf.astype(np.float16).view(np.uint8)
    pw = mm.prepare(np.ascontiguousarray(raw), int(getattr(T, name)), k)
    old, new = mk(1, 8, pw), mk(*new_t, pw)
    for n in ns:
        x = rng.standard_normal((n, k)).astype(np.float32)
        yo, yn = np.zeros((n, rows), np.float32), np.zeros((n, rows), np.float32)
        old(pw.w, x, yo); new(pw.w, x, yn)
        assert np.array_equal(yo.view(np.uint32), yn.view(np.uint32))
        reps = max(2, int(1e7 / (rows * k * n)))
        to, tn = [], []
        for _ in range(9):
            for f, y, ts in ((old, yo, to), (new, yn, tn)):
                t0 = time.perf_counter()
                for _ in range(reps): f(pw.w, x, y)
                ts.append((time.perf_counter() - t0) / reps * 1e6)
        to.sort(); tn.sort()
        g = lambda t: 2 * rows * k * n / t / 1e3
        print(f"{name} {rows}x{k} n={n:2d}: old min {to[0]:8.1f} med {to[4]:8.1f} us ({g(to[0]):5.1f} GFLOP/s) | "
              f"new min {tn[0]:8.1f} med {tn[4]:8.1f} us ({g(tn[0]):5.1f} GFLOP/s) | speedup min {to[0]/tn[0]:.2f} med {to[4]/tn[4]:.2f}", flush=True)
