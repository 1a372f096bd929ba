"""``python -m tinyinfer bench -m M [-p 512] [-n 128] [-pg 512,128] [-d 0,512] [-t 1,2] [-r 5] [-o md|csv|json|jsonl]``: llama-bench's tests.

pp<N>: N random tokens evaluated from an empty cache in batches of -b.
tg<N>: N tokens evaluated one at a time from an empty cache (as llama-bench does).
pp<P>+tg<G> (-pg P,G): P prompt tokens then G single tokens, one timing; t/s = (P+G)/time.
`` @ d<D>`` (-d D): the test runs after D tokens already in the KV cache (evaluated untimed).
Before the table and after it: the CPU (model, performance/efficiency cores), governor,
frequency, temperature and throttle state (tinyinfer/sysinfo.py); a warning when the board
throttled during the run. Default threads: the performance cores.
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
    """Bytes of weights a single-token step reads: every matmul weight (one embedding row aside; of a
    mixture of experts, expert_used_count of its experts)."""
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
        elif hasattr(o, "nbytes_per_token"):        # a mixture-of-experts block: only the chosen experts
            total += o.nbytes_per_token()
        elif isinstance(o, (list, tuple)):
            for x in o:
                visit(x)
        elif type(o).__module__.startswith("tinyinfer.models"):
            for x in vars(o).values():
                visit(x)
    visit(model)
    return total


def run_test(eng, kind: str, n: int, reps: int, rng, depth: int = 0, n_gen: int = 0) -> list:
    """t/s of each repetition (after a warm-up): ``pp`` n tokens in one eval, ``tg`` n single-token
    evals, ``pg`` n prompt tokens then ``n_gen`` single-token evals; each after ``depth`` tokens
    already in the cache (evaluated untimed, as llama-bench's -d)."""
    rates = []
    vocab = eng.n_vocab
    for r in range(reps + 1):  # first run is the warm-up
        eng.reset()
        if depth:
            eng.eval(rng.integers(0, vocab, size=depth))
        ids = rng.integers(0, vocab, size=n)
        t = time.perf_counter()
        if kind in ("pp", "pg"):
            eng.eval(ids)
        else:
            for tok in ids:
                eng.eval([int(tok)])
        if kind == "pg":
            for tok in rng.integers(0, vocab, size=n_gen):
                eng.eval([int(tok)])
        dt = time.perf_counter() - t
        if r:
            rates.append((n + (n_gen if kind == "pg" else 0)) / dt)
    return rates


FIELDS = ["model", "model_path", "size", "n_params", "threads", "n_prompt", "n_gen", "n_depth", "test", "avg_ts",
          "stddev_ts", "samples_ts", "weight_bytes_per_token", "roofline_gbs", "roofline_share", "compile_ms", "load_ms"]


def _ints(s, flag):
    try:
        return [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {s!r}") from None


def main(argv=None, sysroot: str = "/") -> int:
    from ..engine import Engine, set_threads
    from .. import sysinfo

    ap = argparse.ArgumentParser(prog="python -m tinyinfer bench", description="llama-bench's pp/tg/pg tests, with "
                                 "the board's state (governor, frequency, temperature, throttling) before and after")
    ap.add_argument("-m", "--model", action="append", help="GGUF file or store name (repeatable; default: SmolLM2)")
    ap.add_argument("-p", "--n-prompt", default="512", help="prompt sizes, comma separated (0 to skip)")
    ap.add_argument("-n", "--n-gen", default="128", help="generation lengths, comma separated (0 to skip)")
    ap.add_argument("-pg", action="append", default=[], metavar="PP,TG",
                    help="prompt of PP tokens then TG generated tokens, as one test (repeatable)")
    ap.add_argument("-d", "--n-depth", default="0", help="tokens already in the KV cache before each test, "
                    "comma separated (default 0)")
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    ap.add_argument("-t", "--threads", default=None, help="thread counts, comma separated "
                    "(default: the performance cores, big.LITTLE aware)")
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("-o", "--output", choices=("md", "csv", "json", "jsonl"), default="md")
    ap.add_argument("--no-roofline", action="store_true", help="skip the memory-read measurement")
    a = ap.parse_args(argv)

    pps, tgs, depths = _ints(a.n_prompt, "-p"), _ints(a.n_gen, "-n"), _ints(a.n_depth, "-d")
    threads = _ints(a.threads, "-t") if a.threads else [sysinfo.performance_cores(sysroot)]
    pgs = []
    for s in a.pg:
        v = _ints(s, "-pg")
        if len(v) != 2 or min(v) < 1:
            raise ValueError(f"-pg takes PP,TG (two positive integers), got {s!r}")
        pgs.append(tuple(v))
    if any(t < 1 for t in threads):
        raise ValueError("-t values must be >= 1")
    if a.repetitions < 1:
        raise ValueError("-r must be >= 1")
    if any(d < 0 for d in depths) or not depths:
        raise ValueError("-d values must be >= 0")
    from ..cli import resolve_model
    models = [resolve_model(m) for m in a.model] if a.model else [resolve_model(None)]
    rng = np.random.default_rng(1234)
    out = sys.stdout
    info = sys.stdout if a.output == "md" else sys.stderr      # keep csv/json parseable
    system = {"cpu": sysinfo.header(sysroot), "before": sysinfo.snapshot(sysroot)}
    for line in system["cpu"]:
        print(("" if a.output == "md" else "# ") + line, file=info)
    print(f"before: {system['before'].line()}\n", file=info, flush=True)
    rows = []
    roof = {}
    writer = None
    if a.output == "md":
        print(f"| {'model':<30} | {'size':>10} | {'params':>10} | {'backend':<10} | {'threads':>7} | "
              f"{'test':>13} | {'t/s':>20} | {'roofline':>9} |", file=out)
        print(f"| {'-' * 30} | {'-' * 9}: | {'-' * 9}: | {'-' * 10} | {'-' * 6}: | {'-' * 12}: | {'-' * 19}: | {'-' * 8}: |",
              file=out)
    elif a.output == "csv":
        import csv
        writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
    for path in models:
        n_ctx = max([p for p in pps] + [t for t in tgs] + [p + g for p, g in pgs] + [16]) + max(depths) + 1
        eng = Engine(path, n_ctx=n_ctx, n_batch=a.batch_size, n_threads=threads[0], verbose=True)
        label, size, n_params = model_label(eng)
        wbytes = weight_bytes_per_token(eng.model)
        for t in threads:
            eng.n_threads = set_threads(t)     # the engine applies its count before each pass
            if t not in roof and not a.no_roofline:
                roof[t] = memory_roofline(t)
            tests = ([("pp", n, 0) for n in pps if n > 0] + [("tg", n, 0) for n in tgs if n > 0]
                     + [("pg", p, g) for p, g in pgs])
            for depth in depths:
                for kind, n, g in tests:
                    rates = run_test(eng, kind, n, a.repetitions, rng, depth=depth, n_gen=g)
                    mean = statistics.fmean(rates)
                    sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
                    share = (wbytes * mean / 1e9 / roof[t]) if (kind == "tg" and t in roof) else None
                    name = f"pp{n}+tg{g}" if kind == "pg" else f"{kind}{n}"
                    if depth:
                        name += f" @ d{depth}"
                    row = {"model": label, "model_path": str(path), "size": size, "n_params": n_params, "threads": t,
                           "n_prompt": n if kind in ("pp", "pg") else 0, "n_gen": n if kind == "tg" else g,
                           "n_depth": depth, "test": name, "avg_ts": mean, "stddev_ts": sd, "samples_ts": rates,
                           "weight_bytes_per_token": wbytes, "roofline_gbs": roof.get(t),
                           "roofline_share": share, "compile_ms": eng.timings.compile_ms,
                           "load_ms": eng.timings.load_ms}
                    rows.append(row)
                    if a.output == "md":
                        share_s = f"{share * 100:.0f}%" if share is not None else ""
                        print(f"| {label:<30} | {size / 2**20:6.2f} MiB | {n_params / 1e6:8.2f} M | {'CPU':<10} | "
                              f"{t:7d} | {name:>13} | {mean:11.2f} ± {sd:6.2f} | {share_s:>9} |", file=out, flush=True)
                    elif a.output == "csv":
                        writer.writerow({**row, "samples_ts": ";".join(f"{x:.3f}" for x in rates)})
                        out.flush()
                    elif a.output == "jsonl":
                        print(json.dumps(row), file=out, flush=True)
    after = sysinfo.snapshot(sysroot)
    warning = sysinfo.throttle_warning(system["before"], after)
    if a.output == "md":
        cpu = platform.processor() or platform.machine()
        print(f"\nroofline (memory read, GB/s): " + ", ".join(f"{t} thread(s): {v:.1f}" for t, v in roof.items())
              + f"; machine: {cpu}, {nb.config.NUMBA_NUM_THREADS} cores visible", file=out)
    elif a.output == "json":
        print(json.dumps({"system": {"cpu": system["cpu"], "before": system["before"].line(), "after": after.line(),
                                     "throttle_warning": warning},
                          "results": rows, "roofline_gbs": roof}, indent=2), file=out)
    print(f"after:  {after.line()}", file=info)
    if warning:
        print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    from ..cli import _guard
    sys.exit(_guard(main))
