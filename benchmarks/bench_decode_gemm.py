"""The matmuls of one decode pass of n rows (one token per busy server slot), cold: every weight of a
model in model order, each read once per pass from memory, as ``serve --parallel n`` reads them.

    python benchmarks/bench_decode_gemm.py [-m FILE ...] [-n 1,2,4,8] [-t 1,2] [-r 30]
                                           [--config NAME:field=v,field=v ...] [--batch-invariant 0|1]

Per model, every ``--config`` (KernelConfig fields over the default; ``base`` = no change; default: just
``base``) loads its own copy of the weights; the timed passes alternate between the configs (config A's
pass, B's, A's, ...) so that they see the same machine. Rows: model x threads x n; per config the
median ms of a pass of all matmuls (spread = min..max of the medians of 3 thirds), and the ratio to the
first config. Threads through ``numba.set_num_threads`` (started with max(-t)). Run it from the main
thread. Batch invariance (``serve --batch-invariant``) is on unless ``--batch-invariant 0``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

DEFAULT = Path.home() / ".cache/tinyinfer/SmolLM2-135M-Instruct.Q4_0.gguf"


def _linears(model):
    """Every base.Linear of a model, in the order a pass reads them (layers, then the output)."""
    from tinyinfer.models.base import Linear
    seen, out = set(), []

    def walk(o, depth):
        if isinstance(o, Linear):
            if id(o) not in seen:
                seen.add(id(o))
                out.append(o)
            return
        if depth > 4 or isinstance(o, (str, bytes, int, float)) or type(o).__module__ == "numpy":
            return
        if isinstance(o, (list, tuple)):
            for v in o:
                walk(v, depth + 1)
        elif hasattr(o, "__dict__"):
            for k, v in vars(o).items():
                if k != "output":
                    walk(v, depth + 1)

    for layer in model.layers:
        walk(layer, 0)
    if getattr(model, "output", None) is not None:
        walk(model.output, 0)
    return out


def parse_config(s, base):
    from tinyinfer.kernels import matmul as mm
    name, _, rest = s.partition(":")
    kinds = {f.name: f.type for f in fields(mm.KernelConfig)}
    changes = {}
    for a in filter(None, rest.split(",")):
        k, _, v = a.partition("=")
        if k not in kinds:
            raise SystemExit(f"unknown KernelConfig field {k!r}; fields: {', '.join(kinds)}")
        changes[k] = bool(int(v)) if "bool" in str(kinds[k]) else int(v)
    return name, replace(base, **changes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", nargs="*", default=[str(DEFAULT)])
    ap.add_argument("-n", default="1,2,4,8")
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("-r", "--repeats", type=int, default=30)
    ap.add_argument("--config", nargs="*", default=["base"])
    ap.add_argument("--batch-invariant", type=int, default=1)
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    os.environ["NUMBA_NUM_THREADS"] = str(max(threads))
    import numba
    import numpy as np

    from tinyinfer.engine import Engine
    from tinyinfer.kernels import matmul as mm

    base = replace(mm.DEFAULT_CONFIG, batch_invariant=bool(a.batch_invariant))
    configs = [parse_config(c, base) for c in a.config]
    ns = [int(n) for n in a.n.split(",")]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}, "
          f"{' '.join(sys.argv)}")
    for name, cfg in configs:
        print(f"# {name}: {cfg}")
    hdr = "| model | t | n | " + " | ".join(f"{name} ms" for name, _ in configs) + " | " + \
          " | ".join(f"{configs[0][0]}/{name}" for name, _ in configs[1:]) + " |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1), flush=True)
    rng = np.random.default_rng(0)
    for path in a.model:
        lins = []
        for _, cfg in configs:
            with mm.using_config(cfg):
                e = Engine(path, n_ctx=64)
            lins.append(_linears(e.model))
        mb = sum(lin.nbytes for lin in lins[0]) / 2**20
        for t in threads:
            numba.set_num_threads(t)
            for n in ns:
                xs = [rng.standard_normal((n, lin.k), np.float32) for lin in lins[0]]
                bufs = [[(x, np.empty((n, lin.rows), np.float32)) for x, lin in zip(xs, ls)] for ls in lins]

                def step(i):
                    for lin, (x, o) in zip(lins[i], bufs[i]):
                        lin(x, o)

                for i in range(len(configs)):       # compile + warm
                    for _ in range(3):
                        step(i)
                ts = [[] for _ in configs]
                for _ in range(a.repeats):
                    for i in range(len(configs)):
                        t0 = time.perf_counter()
                        step(i)
                        ts[i].append((time.perf_counter() - t0) * 1e3)
                for i in range(1, len(configs)):   # a knob of the kernels never changes a float
                    if not all(np.array_equal(b0[1], bi[1]) for b0, bi in zip(bufs[0], bufs[i])):
                        print(f"# WARNING: config {configs[i][0]} gives other floats than {configs[0][0]}")

                def cell(v):
                    third = max(1, len(v) // 3)
                    meds = [statistics.median(v[j:j + third]) for j in range(0, len(v) - third + 1, third)]
                    return f"{statistics.median(v):.2f} ({min(meds):.2f}-{max(meds):.2f})"

                meds = [statistics.median(v) for v in ts]
                print(f"| {Path(path).name} ({mb:.0f} MiB) | {t} | {n} | " + " | ".join(cell(v) for v in ts)
                      + " | " + " | ".join(f"{meds[0] / m:.2f}x" for m in meds[1:]) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
