"""``python -m tinyinfer bench -m M [-p 512] [-n 128] [-t 1,2] [-r 5] [-o md|json]``: llama-bench's tests.

pp<N>: N random tokens evaluated from an empty cache in batches of -b.
tg<N>: N tokens evaluated one at a time from an empty cache (as llama-bench does).
Timings exclude tokenization and sampling. Each test is repeated -r times after a
warm-up; t/s is reported as mean ± sample standard deviation.

In the same run the memory-read roofline of this machine is measured (a max over a
512 MiB array, per thread count) and the table adds the share of it that tg reached:
weight bytes read per token × t/s ÷ roofline.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numba as nb
import numpy as np


def memory_roofline(threads: int, mib: int = 512, reps: int = 5) -> float:
    """Best-of-`reps` memory read bandwidth in GB/s: ``np.max`` over a 512 MiB float32 array,
    cut into `threads` slices read at once (numpy releases the GIL in reductions)."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(mib * (1 << 20) // 4, np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps + 1):
            t = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def model_label(eng) -> tuple:
    md = eng.gguf.metadata
    arch = md.get("general.architecture", "?")
    n_params = sum(t.n_elements for t in eng.gguf.tensors.values())
    size = sum(t.nbytes for t in eng.gguf.tensors.values())
    from gguf import LlamaFileType
    try:
        ft = LlamaFileType(int(md.get("general.file_type", -1))).name.replace("MOSTLY_", "")
    except ValueError:
        ft = "?"
    label = md.get("general.size_label") or (f"{n_params / 1e9:.1f}B" if n_params > 1e9 else f"{n_params / 1e6:.0f}M")
    return f"{arch} {label} {ft}", size, n_params


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a single-token step reads: every matmul weight (one embedding row aside)."""
    from ..models.base import Linear
    seen = set()
    total = 0

    def visit(o):
        nonlocal total
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, Linear):
            total += o.nbytes
        elif isinstance(o, (list, tuple)):
            for x in o:
                visit(x)
        elif type(o).__module__.startswith("tinyinfer.models"):
            for x in vars(o).values():
                visit(x)
    visit(model)
    return total


def run_test(eng, kind: str, n: int, reps: int, rng) -> list:
    rates = []
    vocab = eng.n_vocab
    for r in range(reps + 1):  # first run is the warm-up
        ids = rng.integers(0, vocab, size=n)
        eng.reset()
        t = time.perf_counter()
        if kind == "pp":
            eng.eval(ids)
        else:
            for tok in ids:
                eng.eval([int(tok)])
        dt = time.perf_counter() - t
        if r:
            rates.append(n / dt)
    return rates


def main(argv=None) -> int:
    from ..engine import Engine, set_threads

    ap = argparse.ArgumentParser(prog="python -m tinyinfer bench", description="llama-bench's pp/tg tests")
    ap.add_argument("-m", "--model", action="append", help="GGUF file (repeatable; default: SmolLM2)")
    ap.add_argument("-p", "--n-prompt", default="512", help="prompt sizes, comma separated (0 to skip)")
    ap.add_argument("-n", "--n-gen", default="128", help="generation lengths, comma separated (0 to skip)")
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    ap.add_argument("-t", "--threads", default="1", help="thread counts, comma separated")
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("-o", "--output", choices=("md", "json"), default="md")
    ap.add_argument("--no-roofline", action="store_true", help="skip the memory-read measurement")
    a = ap.parse_args(argv)

    def ints(s):
        try:
            return [int(x) for x in str(s).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {s!r}") from None
    pps, tgs, threads = ints(a.n_prompt), ints(a.n_gen), ints(a.threads)
    if any(t < 1 for t in threads):
        raise ValueError("-t values must be >= 1")
    if a.repetitions < 1:
        raise ValueError("-r must be >= 1")
    from ..cli import resolve_model
    models = a.model or [resolve_model(None)]
    rng = np.random.default_rng(1234)
    rows = []
    roof = {}
    if a.output == "md":
        print(f"| {'model':<30} | {'size':>10} | {'params':>10} | {'backend':<10} | {'threads':>7} | "
              f"{'test':>13} | {'t/s':>20} | {'roofline':>9} |")
        print(f"| {'-' * 30} | {'-' * 9}: | {'-' * 9}: | {'-' * 10} | {'-' * 6}: | {'-' * 12}: | {'-' * 19}: | {'-' * 8}: |")
    for path in models:
        n_ctx = max(pps + tgs + [16]) + 1
        eng = Engine(path, n_ctx=n_ctx, n_batch=a.batch_size, n_threads=threads[0])
        label, size, n_params = model_label(eng)
        wbytes = weight_bytes_per_token(eng.model)
        for t in threads:
            set_threads(t)
            if t not in roof and not a.no_roofline:
                roof[t] = memory_roofline(t)
            tests = [("pp", n) for n in pps if n > 0] + [("tg", n) for n in tgs if n > 0]
            for kind, n in tests:
                rates = run_test(eng, kind, n, a.repetitions, rng)
                mean = statistics.fmean(rates)
                sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
                share = (wbytes * mean / 1e9 / roof[t]) if (kind == "tg" and t in roof) else None
                row = {"model": label, "model_path": str(path), "size": size, "n_params": n_params, "threads": t,
                       "test": f"{kind}{n}", "avg_ts": mean, "stddev_ts": sd, "samples_ts": rates,
                       "weight_bytes_per_token": wbytes, "roofline_gbs": roof.get(t),
                       "roofline_share": share, "compile_ms": eng.timings.compile_ms,
                       "load_ms": eng.timings.load_ms}
                rows.append(row)
                if a.output == "md":
                    share_s = f"{share * 100:.0f}%" if share is not None else ""
                    print(f"| {label:<30} | {size / 2**20:6.2f} MiB | {n_params / 1e6:8.2f} M | {'CPU':<10} | {t:7d} | "
                          f"{kind + str(n):>13} | {mean:11.2f} ± {sd:6.2f} | {share_s:>9} |", flush=True)
    if a.output == "md":
        cpu = platform.processor() or platform.machine()
        print(f"\nroofline (memory read, GB/s): " + ", ".join(f"{t} thread(s): {v:.1f}" for t, v in roof.items())
              + f"; machine: {cpu}, {nb.config.NUMBA_NUM_THREADS} cores visible")
    else:
        print(json.dumps({"results": rows, "roofline_gbs": roof}, indent=2))
    return 0


if __name__ == "__main__":
    from ..cli import _guard
    sys.exit(_guard(main))
