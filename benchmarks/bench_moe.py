"""A mixture of experts side by side with llama-bench, and the resident memory after load.

    MOE_SHAPE=1024,16,32,4,512 python ../shared/tools/make_arch_models.py ../shared/reference/vocab DIR qwen3moe
    llama-quantize DIR/synthetic-qwen3moe-F16.gguf DIR/qwen3moe-1024-Q4_K_M.gguf Q4_K_M
    python benchmarks/bench_moe.py --llama-bench BIN/llama-bench -t 1,2 -r 3 DIR/qwen3moe-1024-Q4_K_M.gguf

Each round runs ``llama-bench -p 128 -n 32 -r 1`` and ``python -m tinyinfer bench`` with the same
arguments for every thread count, alternating, so both see the same machine load; the table gives
the median t/s over the rounds of each ± its standard deviation, and their ratio (ours / llama.cpp) with
its range over the rounds.

``--gemm-rows``: time one expert's matmul per row by rows per call (where ``MoE.expert`` cuts groups).

``--profile``: where a decode step's wall time goes at each thread count (attention, the MoE block: its
routing and its experts' one jitted call, the output head), after a 128-token prompt as in the tg test.

``--rss``: load the file in a fresh process (Engine, as the CLI does) and print VmRSS split into file
pages (RssFile: the mmapped weights touched) and anonymous memory (RssAnon: copies, caches, numba),
after load, after one decode step, after a 128-token prompt and 32 decode steps after it, next to the file's
size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def _rss() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def rss_child(path: str) -> None:
    import numpy as np
    from tinyinfer.engine import Engine
    rows = {"file": Path(path).stat().st_size}
    eng = Engine(path, n_ctx=512, n_threads=1)
    rows["after load"] = _rss()
    eng.ingest_prompt([1000])
    rows["after 1 token"] = _rss()
    eng.reset()
    eng.ingest_prompt(list(np.arange(2000, 2128)))
    rows["after pp128"] = _rss()
    for i in range(32):
        eng.eval([3000 + i])
    rows["+ 32 tokens"] = _rss()
    print(json.dumps(rows))


def gemm_rows(path: str) -> None:
    """Time per row of one expert's matmul (blk.0.ffn_gate_exps, all experts in turn, 1 thread) by rows per
    call, in the file's layout (GEMV) and the default (packed) one: where MoE.expert cuts a group."""
    import time

    import numba
    import numpy as np

    from tinyinfer.gguf import GGUFFile
    from tinyinfer.kernels import matmul as mm
    numba.set_num_threads(1)
    t = GGUFFile(path).tensors["blk.0.ffn_gate_exps.weight"]
    rows, k, n_exp = t.shape[1], t.shape[0], t.shape[2]
    for repack in (False, True):
        pws = [mm.prepare(t.data[e * rows:(e + 1) * rows], t.ggml_type, k, repack=repack) for e in range(n_exp)]
        for n in (1, 2, 4, 8, 12, 16, 32):
            x = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
            out = np.empty((n, rows), np.float32)
            best = 1e9
            for _ in range(5):
                t0 = time.perf_counter()
                for pw in pws:
                    mm.run(pw, x, out)
                best = min(best, (time.perf_counter() - t0) / n_exp)
            print(f"{'packed' if repack else 'file layout':<12} rows {n:>3}: {best * 1e3:7.3f} ms a call, "
                  f"{best * 1e6 / n:6.1f} us a row")


def decode_profile(path: str, threads: list, n: int, rounds: int) -> None:
    """ms a decode token of each component (median over rounds), by thread count: the forward pass's
    pieces timed in place (class-level wrappers), the layers stacked by a 128-token prompt first."""
    import time
    from collections import defaultdict

    import numpy as np

    from tinyinfer.engine import Engine, set_threads
    from tinyinfer.models import base, moe

    eng = Engine(path, n_ctx=512, n_threads=threads[0])
    rng = np.random.default_rng(0)
    eng.eval(rng.integers(0, 10000, 128))
    spent: dict = defaultdict(float)

    def timed(owner, attr, key):
        fn = getattr(owner, attr)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        setattr(owner, attr, wrapper)

    m = eng.model
    timed(base.Attention, "__call__", "attention (projections, kernel)")
    timed(moe.MoE, "__call__", "MoE block")
    timed(moe.MoE, "route", "  routing (router, softmax, top-k)")
    timed(moe, "_one_token", "  experts (one jitted call)")
    timed(m, "output", "output head")
    res: dict = defaultdict(list)
    for _ in range(rounds):
        for t in threads:
            eng.n_threads = set_threads(t)
            eng.reset()
            eng.eval(rng.integers(0, 10000, 4))
            for _ in range(3):
                eng.eval([int(rng.integers(0, 10000))])
            spent.clear()
            t0 = time.perf_counter()
            for _ in range(n):
                eng.eval([int(rng.integers(0, 10000))])
            res[t, "token"].append((time.perf_counter() - t0) / n * 1e3)
            for k, v in spent.items():
                res[t, k].append(v / n * 1e3)
    keys = ["token"] + list(dict.fromkeys(k for _, k in res if k != "token"))
    print("| ms a decode token | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads) + " |")
    print("| --- |" + " ---: |" * len(threads))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{statistics.median(res[t, k]):.2f}" for t in threads) + " |")


def _ts(v: list) -> str:
    """median t/s ± the sample standard deviation over the rounds"""
    return f"{statistics.median(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}"


def runs(cmd: list) -> list:
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--repack", choices=["0", "1"], default=None,
                    help="llama-bench's --repack (default: llama-bench's own, on; a build made on another host "
                         "segfaults in its repacked mul_mat_id here: --repack 0)")
    ap.add_argument("--rss", action="store_true")
    ap.add_argument("--gemm-rows", action="store_true", help="time one expert's matmul by rows per call")
    ap.add_argument("--profile", action="store_true", help="where a decode token's time goes, by thread count")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.gemm_rows:
        gemm_rows(a.model)
        return
    if a.profile:
        decode_profile(a.model, [int(t) for t in a.threads.split(",")], a.n, a.rounds)
        return
    if a.rss_child:
        rss_child(a.model)
        return
    if a.rss:
        r = json.loads(subprocess.run([sys.executable, __file__, "--rss-child", a.model], capture_output=True,
                                      text=True, check=True).stdout.splitlines()[-1])
        mib = 1 << 20
        print(f"file {r.pop('file') / mib:.1f} MiB")
        for k, v in r.items():
            print(f"{k:<14} VmRSS {v['VmRSS'] / mib:8.1f} MiB  RssFile {v['RssFile'] / mib:8.1f} MiB  "
                  f"RssAnon {v['RssAnon'] / mib:8.1f} MiB")
        return
    res: dict = {}
    for _ in range(a.rounds):
        for t in a.threads.split(","):
            common = ["-m", a.model, "-p", str(a.p), "-n", str(a.n), "-t", t, "-r", "1", "-o", "jsonl"]
            if a.llama_bench:
                extra = [] if a.repack is None else ["--repack", a.repack]
                for row in runs([a.llama_bench, *common, *extra]):
                    key = f"pp{a.p}" if row["n_prompt"] else f"tg{a.n}"
                    res.setdefault((t, key, "llama.cpp"), []).append(row["avg_ts"])
            for row in runs([sys.executable, "-m", "tinyinfer", "bench", *common, "--no-roofline"]):
                key = f"pp{a.p}" if row["n_prompt"] else f"tg{a.n}"
                res.setdefault((t, key, "tinyinfer"), []).append(row["avg_ts"])
    print(f"| threads | test | llama.cpp t/s | tinyinfer t/s | ratio (median) | ratio range |")
    print("| ---: | --- | ---: | ---: | ---: | --- |")
    for t in a.threads.split(","):
        for key in (f"pp{a.p}", f"tg{a.n}"):
            ours = res.get((t, key, "tinyinfer"), [])
            ref = res.get((t, key, "llama.cpp"), [])
            if not ours:
                continue
            if ref:
                ratios = [o / r for o, r in zip(ours, ref)]
                print(f"| {t} | {key} | {_ts(ref)} | {_ts(ours)} | "
                      f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f} |")
            else:
                print(f"| {t} | {key} | - | {_ts(ours)} | - | - |")


if __name__ == "__main__":
    main()
