"""The per-token cost of a decode step that does not grow with the weights (Python, numba dispatch,
the thread pool's fork/join, the small kernels; for llama.cpp its graph and barriers), for a model of
TinyLlama's 22 layers, measured the same way for tinyinfer and llama.cpp.

    python benchmarks/dispatch_overhead.py [-t 1,2] [-r 7] [--steps 64] [--llama-bench BIN] [TYPE ...]

Two synthetic llama files with 22 layers, narrow matrices and a 259-token vocabulary (``narrow22``:
n_embd = n_ff = 256; ``narrow22ff768``: n_ff 768; both fit the L3 cache; made by make_synthetic.py on
first use; ``--pure`` quantizations by default, every matrix of the type, as the Pi estimate assumes)
decode single tokens: the whole forward pass, output head included, as llama-bench's tg. A
step's time is ``fixed + c * bytes``, ``bytes`` being the matmul weight bytes a token reads (the same for
both programs: the same files); the two sizes give the intercept ``fixed = (t1 * b2 - t2 * b1) / (b2 - b1)``,
the per-token cost that benchmarks/arm_mca.py's Pi estimate adds to the kernels' cycles. With threads,
every matmul of ours runs its parallel driver, as a 1.1B model's do. Each repeat times tinyinfer
(``--steps`` tokens per file) and then ``llama-bench -p 0 -n 64 -r 1`` on the same two files, so the
machine's noise hits both; the table gives medians over ``-r`` repeats and the intercepts' spread, and the
median of the per-repeat differences (two threads on this 2-vCPU VM are noisy: the pairs cancel most of it).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = ("narrow22", "narrow22ff768")


def step_ms(model, cache, steps: int, pos0: int = 32) -> float:
    ids = np.array([1], np.int64)
    t = time.perf_counter()
    for s in range(steps):
        model.forward(ids, pos0 + s, cache)
    return (time.perf_counter() - t) / steps * 1e3


def matmul_bytes(path) -> int:
    """Weight bytes one token's matmuls read: every 2-D tensor but the embedding table (looked up, one
    row), the output projection counted once (tied to the embeddings or not)."""
    from tinyinfer.gguf import GGUFFile
    g = GGUFFile(path)
    tied = "output.weight" not in g.tensors
    return sum(t.nbytes for n, t in g.tensors.items()
               if len(t.shape) == 2 and (n != "token_embd.weight" or tied))


def intercept(t1, t2, b1, b2) -> float:
    return (t1 * b2 - t2 * b1) / (b2 - b1)


def llama_bench_ms(binary: str, path, threads: int) -> float:
    """ms per token of one llama-bench tg64 run on ``path``."""
    out = subprocess.run([binary, "-m", str(path), "-p", "0", "-n", "64", "-r", "1", "-t", str(threads),
                          "-o", "csv"], capture_output=True, text=True, check=True).stdout
    row = next(csv.DictReader(io.StringIO(out)))
    return 1e3 / float(row["avg_ts"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="*", default=["Q4_0", "Q8_0", "Q4_K_S", "Q6_K"],
                    help="file types; with --pure (the default) every matrix is the type's base type")
    ap.add_argument("--mixed", action="store_true", help="llama-quantize's per-tensor mixes, not --pure")
    ap.add_argument("-t", "--threads", default="1")
    ap.add_argument("-r", "--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary: measure llama.cpp the same way")
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(threads)))

    import make_synthetic
    from tinyinfer.engine import set_threads
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.kernels import matmul as mm
    from tinyinfer.models import load_model

    from dataclasses import replace
    serial_cfg = mm.DEFAULT_CONFIG
    parallel_cfg = replace(serial_cfg, parallel_min_bytes=0)

    cols = "| type | threads | tinyinfer ms/token, ff 256 / 768 | tinyinfer fixed ms/token (min..max) |"
    if a.llama_bench:
        cols += (" llama.cpp ms/token, ff 256 / 768 | llama.cpp fixed ms/token (min..max) |"
                 " difference, paired (min..max) |")
    print(cols)
    print("|" + " --- |" * (cols.count("|") - 1))

    def fmt(t1, t2, fixed):
        return (f" {statistics.median(t1):.3f} / {statistics.median(t2):.3f} | "
                f"{statistics.median(fixed):.3f} ({min(fixed):.3f}..{max(fixed):.3f}) |")

    for ty in a.types:
        paths = [make_synthetic.ensure(s, ty, pure=not a.mixed) for s in SHAPES]
        b1, b2 = (matmul_bytes(p) for p in paths)
        for nt in threads:
            set_threads(nt)
            # with threads, every matmul runs its parallel driver, as a 1.1B model's do (these narrow ones
            # would stay under parallel_min_bytes): the fixed cost includes the pool's fork/join per call
            models = []
            with mm.using_config(serial_cfg if nt == 1 else parallel_cfg):
                for p in paths:
                    m = load_model(GGUFFile(p))
                    models.append((m, m.new_cache(512, 64)))
            for m, c in models:
                step_ms(m, c, 8)          # compile / warm
            ours, ref = ([], [], []), ([], [], [])
            for _ in range(a.repeats):     # tinyinfer and llama.cpp alternate: noise hits both
                step_ms(*models[0], 8)     # wake the thread pool and the caches after llama-bench
                u, v = (step_ms(*mc, a.steps) for mc in models)
                for lst, val in zip(ours, (u, v, intercept(u, v, b1, b2))):
                    lst.append(val)
                if a.llama_bench:
                    u, v = (llama_bench_ms(a.llama_bench, p, nt) for p in paths)
                    for lst, val in zip(ref, (u, v, intercept(u, v, b1, b2))):
                        lst.append(val)
            row = f"| {ty} | {nt} |" + fmt(*ours)
            if a.llama_bench:     # per repeat, ours - llama.cpp's: the noise of the moment cancels
                d = [o - r for o, r in zip(ours[2], ref[2])]
                row += fmt(*ref) + f" {statistics.median(d):.3f} ({min(d):.3f}..{max(d):.3f}) |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
