"""Where a token's time goes: matmul vs attention vs the other kernels vs Python dispatch.

    python benchmarks/profile_step.py [-m MODEL.gguf] [--ctx 512] [--steps 32] [--pp 512] [-r 5] [--cprofile]
                                      [--batch 4] [-t 2] [--batch-invariant]

1 thread unless ``-t``. ``--batch B``: the decode step of ``serve --parallel B`` with every slot busy: B
sequences of one shared cache (each at context ``ctx``), one token each, as one forward pass (the batcher's
Batch.one_each), so that a step's kernels and Python can be set against the server's whole step
(benchmarks/bench_serving.py). Decode: the cache is filled with ``ctx`` prompt tokens, then ``steps`` single-token forward
passes are timed (median per step over ``-r`` repeats, spread = min..max). Prefill: one forward pass of
``pp`` tokens at position 0. Per-kernel times come from wrapping every function of
tinyinfer.kernels.ops and matmul.matmul with a timer (a second pass, so the wrapping does not
inflate the plain timings); "python" = the plain step time minus the kernels' time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

DEFAULT = Path.home() / ".cache/tinyinfer/SmolLM2-135M-Instruct.Q4_0.gguf"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=str(DEFAULT))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("-r", "--repeats", type=int, default=5)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded per step (serve --parallel)")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--batch-invariant", action="store_true", help="serve --batch-invariant's kernels")
    a = ap.parse_args()
    if a.threads != 1:
        os.environ["NUMBA_NUM_THREADS"] = str(a.threads)

    from tinyinfer.engine import Engine
    from tinyinfer.kernels import matmul as mm
    from tinyinfer.kernels import ops

    timers = defaultdict(float)
    counts = defaultdict(int)
    originals = {}

    def wrap(mod, name, label):
        f = getattr(mod, name)
        originals[(mod, name)] = f

        def w(*args, **kw):
            t = time.perf_counter()
            r = f(*args, **kw)
            timers[label] += time.perf_counter() - t
            counts[label] += 1
            return r
        return w

    wrapped = {}
    called_by_kernels = {n for f in vars(ops).values() if hasattr(f, "py_func") for n in f.py_func.__code__.co_names}
    for name in dir(ops):
        f = getattr(ops, name)
        if name in called_by_kernels:
            continue                     # a global of other jitted kernels (expf, qkv_store): a wrapper would not type
        if callable(f) and getattr(f, "__module__", None) == ops.__name__ and not name.startswith("_") and not isinstance(f, type):
            wrapped[(ops, name)] = wrap(ops, name, name)
    wrapped[(mm, "matmul")] = wrap(mm, "matmul", "matmul")
    if hasattr(mm, "run"):               # the models' linear layers call mm.run (prepared weights)
        wrapped[(mm, "run")] = wrap(mm, "run", "matmul (mm.run)")

    def install(on):
        for (mod, name), w in wrapped.items():
            setattr(mod, name, w if on else originals[(mod, name)])

    t0 = time.perf_counter()
    # models bind some kernels at load time: load with the wrappers in place, switch them off after
    install(True)
    from tinyinfer.kernels.matmul import KernelConfig, using_config
    from tinyinfer.kvcache import Batch
    with using_config(KernelConfig(batch_invariant=True) if a.batch_invariant else None):
        eng = Engine(a.model, n_ctx=max(a.ctx + a.steps + 8, a.pp + 8), n_batch=512, n_threads=a.threads,
                     verbose=False, n_seq=a.batch)
    install(False)
    if a.batch_invariant:               # the kernels' configuration stays on for the timed passes
        _cfg = using_config(KernelConfig(batch_invariant=True))
        _cfg.__enter__()
    print(f"model {Path(a.model).name}: load {eng.timings.load_ms:.0f} ms, warmup/compile {eng.timings.compile_ms:.0f} ms, "
          f"KV cache {eng.cache.nbytes / 2**20:.1f} MiB")
    model = eng.model
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 1000, size=max(a.ctx, a.pp)).astype(np.int64)

    def prefill():
        return model.forward(prompt[:a.pp], 0, eng.cache)

    B = a.batch

    def fill():
        for q in range(B):
            model.forward(prompt[:a.ctx], Batch.run(q, 0, a.ctx), eng.cache)

    def step(s):
        if B == 1:
            return model.forward(prompt[s:s + 1], a.ctx + s, eng.cache)
        return model.forward(prompt[s:s + B], Batch.one_each(list(range(B)), [a.ctx + s] * B), eng.cache, n_out=B)

    def decode():
        fill()
        t = time.perf_counter()
        for s in range(a.steps):
            step(s)
        return (time.perf_counter() - t) / a.steps

    def run(kind):
        plain, kern = [], []
        for _ in range(a.repeats):
            if kind == "tg":
                plain.append(decode())
            else:
                t = time.perf_counter(); prefill(); plain.append(time.perf_counter() - t)
        per = a.steps if kind == "tg" else 1
        for _ in range(a.repeats):
            timers.clear(); counts.clear()
            install(True)
            try:
                if kind == "tg":
                    fill()                                          # not counted below
                    timers.clear(); counts.clear()
                    t = time.perf_counter()
                    for s in range(a.steps):
                        step(s)
                    wall = (time.perf_counter() - t) / per
                else:
                    t = time.perf_counter(); prefill(); wall = time.perf_counter() - t
            finally:
                install(False)
            kern.append(({k: v / per for k, v in timers.items()}, {k: c / per for k, c in counts.items()}, wall))
        return plain, kern

    kinds = (("tg", f"decode step of {B} sequence{'s' if B > 1 else ''} at context {a.ctx}"),) + \
        ((("pp", f"prefill of {a.pp} tokens"),) if B == 1 else ())
    decode()                             # first calls compile (numba), not timed
    for kind, title in kinds:
        plain, kern = run(kind)
        med = statistics.median(plain)
        unit, mul = ("ms", 1e3)
        rate = (B / med) if kind == "tg" else (a.pp / med)
        print(f"\n== {title}, {a.threads} thread{'s' if a.threads > 1 else ''}: median {med * mul:.2f} {unit} (min {min(plain) * mul:.2f}, max {max(plain) * mul:.2f}; "
              f"{a.repeats} repeats) = {rate:.1f} t/s")
        labels = sorted({k for t, _, _ in kern for k in t}, key=lambda k: -statistics.median(t.get(k, 0) for t, _, _ in kern))
        tot_k = statistics.median(sum(t.values()) for t, _, _ in kern)
        for k in labels:
            v = statistics.median(t.get(k, 0.0) for t, _, _ in kern)
            c = statistics.median(cn.get(k, 0) for _, cn, _ in kern)
            print(f"  {k:22s} {v * mul:9.3f} {unit}  {100 * v / med:5.1f}%   {c:7.0f} calls")
        print(f"  {'kernels total':22s} {tot_k * mul:9.3f} {unit}  {100 * tot_k / med:5.1f}%")
        print(f"  {'python (rest)':22s} {(med - tot_k) * mul:9.3f} {unit}  {100 * (med - tot_k) / med:5.1f}%")

    if a.cprofile:
        fill()
        pr = cProfile.Profile()
        pr.enable()
        for s in range(a.steps):
            step(s)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    main()
