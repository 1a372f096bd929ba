"""Time opening a GGUF file and reading all its metadata and tensor infos.

    python benchmarks/bench_gguf_open.py [--runs 20] [--models smollm2 gemma3] [--no-reader] [--json]

One run = ``GGUFFile(path)`` + touching every metadata value (the length of each
array, the value of each scalar) + every tensor's name, shape, type, offset and
size. Runs after the first find the file in the page cache (warm); the first run is
reported apart. ``gguf.GGUFReader`` is timed once for comparison (constructor +
``contents()`` of every field): it takes seconds on a big vocabulary.

Targets: Gemma 3 270M (262k-token vocabulary) < 0.3 s, SmolLM2-135M < 0.1 s (median,
warm, one core).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

TARGETS = {"smollm2": 0.1, "gemma3": 0.3}


def touch_all(f) -> int:
    """Read every metadata value and tensor info; returns a checksum so nothing is optimized away."""
    n = 0
    for k, v in f.metadata.items():
        n += len(v) if hasattr(v, "__len__") else 1
    for t in f.tensors.values():
        n += len(t.name) + len(t.shape) + t.ggml_type + t.offset + t.nbytes
    return n


def time_ours(path, runs):
    from tinyinfer.gguf import GGUFFile

    times, cpu = [], []
    for _ in range(runs + 1):  # +1: the first run, reported apart
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        f = GGUFFile(path)
        touch_all(f)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        f.close()
        del f
    return times[0], times[1:], cpu[1:]


def time_reader(path):
    from gguf import GGUFReader

    gc.collect()
    t0 = time.perf_counter()
    r = GGUFReader(path)
    for field in r.fields.values():
        field.contents()
    for t in r.tensors:
        (t.name, t.shape, t.tensor_type, t.data_offset, t.n_bytes)
    return time.perf_counter() - t0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=sorted(TARGETS))
    ap.add_argument("--no-reader", action="store_true", help="skip gguf.GGUFReader (slow)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from tinyinfer.fetch import fetch
    from tinyinfer.gguf import GGUFFile

    rows = []
    for m in args.models:
        path = fetch(m)
        f = GGUFFile(path)
        info = {"model": m, "file": os.path.basename(path), "mib": f.size / 2**20, "n_kv": len(f.metadata),
                "n_tensors": len(f.tensors), "n_vocab": len(f.get("tokenizer.ggml.tokens") or [])}
        f.close()
        del f
        first, ts, cpu = time_ours(path, args.runs)
        q1, med, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0],) * 3
        info.update(first_s=first, median_s=med, min_s=min(ts), max_s=max(ts), q1_s=q1, q3_s=q3, runs=len(ts),
                    target_s=TARGETS[m], ok=med < TARGETS[m],
                    cpu_median_s=statistics.median(cpu))
        info["reader_s"] = None if args.no_reader else time_reader(path)
        rows.append(info)

    meta = {"cpu": cpu_model(), "python": platform.python_version(), "cores_visible": os.cpu_count(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d")}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return 0
    print(f"GGUF open + all metadata + all tensor infos — {meta['cpu']}, Python {meta['python']}, "
          f"{args.runs} warm runs, load avg {', '.join(f'{x:.2f}' for x in meta['load_avg'] or [])}")
    print("times are wall clock (first run apart; median, min, IQR, max of the warm runs); "
          "'cpu med' is the median process CPU time")
    hdr = (f"{'model':<9}{'MiB':>8}{'kv':>5}{'tensors':>9}{'vocab':>8}{'first':>9}{'median':>9}{'min':>9}"
           f"{'IQR':>16}{'max':>9}{'cpu med':>9}{'GGUFReader':>12}{'speedup':>9}{'target':>9}  ")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        reader = f"{r['reader_s']:.2f} s" if r["reader_s"] is not None else "-"
        speed = f"{r['reader_s'] / r['median_s']:.0f}×" if r["reader_s"] is not None else "-"
        print(f"{r['model']:<9}{r['mib']:>8.1f}{r['n_kv']:>5}{r['n_tensors']:>9}{r['n_vocab']:>8}"
              f"{r['first_s'] * 1e3:>7.1f}ms{r['median_s'] * 1e3:>7.1f}ms{r['min_s'] * 1e3:>7.1f}ms"
              f"{r['q1_s'] * 1e3:>7.1f}–{r['q3_s'] * 1e3:>5.1f}ms{r['max_s'] * 1e3:>7.1f}ms{r['cpu_median_s'] * 1e3:>7.1f}ms"
              f"{reader:>12}{speed:>9}"
              f"{r['target_s'] * 1e3:>6.0f} ms  {'ok' if r['ok'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
