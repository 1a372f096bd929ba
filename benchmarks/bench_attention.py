"""The decode attention kernel alone: a pass of n tokens (each its own sequence, all at context ``ctx``)
over an f16 KV cache, hot in the caches, through the serial driver (``ops._attention_serial``: one task a
token, all kv heads), the parallel one (``ops._attention_parallel``: a task per token and kv head, ``-t``
threads) and, for one token, the fused one-token call (``ops.decode_attention``: q/k/v split, RoPE, the
cells stored, then the serial attention).

    python benchmarks/bench_attention.py [--heads 9 --kv 3 --hd 64] [-n 1,4,16] [--ctx 40,128,512] [-t 2] [-r 7]

Defaults: SmolLM2-135M's attention (9 query heads, 3 kv heads, head size 64). Times are per call (one
layer), median over ``-r`` repeats of a timed loop (spread: min-max), from the main thread. ``work`` is
the multiply-adds (keys x query heads x (hd_k + hd_v), summed over the tokens), what attention() weighs
against ``ops._PARALLEL_MIN_WORK`` to pick a driver.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv", type=int, default=3)
    ap.add_argument("--hd", type=int, default=64)
    ap.add_argument("-n", default="1,4,16", help="tokens a pass (comma-separated)")
    ap.add_argument("--ctx", default="40,128,512", help="context of each token (comma-separated)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repeats", type=int, default=7)
    a = ap.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, a.threads)))
    import numba
    import numpy as np
    from tinyinfer.kernels import ops
    from tinyinfer.kvcache import KVStore

    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    ns = [int(x) for x in a.n.split(",")]
    ctxs = [int(x) for x in a.ctx.split(",")]
    nh, nkv, hd = a.heads, a.kv, a.hd
    rng = np.random.default_rng(0)
    k, v = (KVStore("f16", max(ns), max(ctxs), nkv, hd) for _ in range(2))
    for st in (k, v):
        st.q[:] = rng.standard_normal(st.q.shape).astype(np.float16).view(np.uint16)

    def timed(f, args, work):
        f(*args)
        reps = max(10, int(2e7 / max(work, 1)))
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for _ in range(reps):
                f(*args)
            ts.append((time.perf_counter() - t0) / reps * 1e6)
        return statistics.median(ts), min(ts), max(ts)

    print(f"attention, {nh} heads / {nkv} kv heads, hd {hd}, f16 cells, {a.threads} threads, hot; us a call (min-max)")
    print("| n | ctx | work (MAC) | serial us | parallel us | decode_attention us |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in ns:
        for ctx in ctxs:
            q = rng.standard_normal((n, nh, hd)).astype(np.float32)
            out = np.empty((n, nh, hd), np.float32)
            pos = np.full(n, ctx - 1, np.int64)
            seq = np.arange(n, dtype=np.int64)
            args = (q, k.arrays, v.arrays, pos, seq, ops.attn_record(hd ** -0.5, 0, 0.0), out)
            work = n * ctx * nh * 2 * hd
            s = timed(ops._attention_serial, args, work)
            p = timed(ops._attention_parallel, args, work) if a.threads > 1 else None
            d = "-"
            if n == 1:
                qkv = rng.standard_normal((1, (nh + 2 * nkv) * hd)).astype(np.float32)
                heads = ops.heads_record(nh, nkv, hd, hd, np.zeros(0, np.float32), np.zeros(0, np.float32), 1e-6)
                cos, sin = ops.rope_cache(pos, hd, 10000.0, 1.0)
                dargs = (qkv, heads, (cos, sin, True), k.arrays, v.arrays, pos, seq, q, args[5], out)
                dd = timed(ops.decode_attention, dargs, work)
                d = f"{dd[0]:.1f} ({dd[1]:.1f}-{dd[2]:.1f})"
            pc = f"{p[0]:.1f} ({p[1]:.1f}-{p[2]:.1f})" if p else "-"
            print(f"| {n} | {ctx} | {work} | {s[0]:.1f} ({s[1]:.1f}-{s[2]:.1f}) | {pc} | {d} |", flush=True)


if __name__ == "__main__":
    main()
