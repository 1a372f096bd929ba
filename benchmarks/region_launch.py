"""What a numba parallel region costs depending on which threads launch regions (issue 26, kernels/parallel.py).

    python benchmarks/region_launch.py [-m MODEL.gguf] [-t 2] [--passes 64]

Each case runs in a fresh process (libgomp's teams live as long as their threads):

* ``tiny, one thread``: a tiny ``prange`` region launched 2,000 times by the main thread, the process's only
  launching thread;
* ``tiny, second team``: the same from another thread while the main thread's team is alive (libgomp's
  throttled spin once its teams' threads outnumber the CPUs);
* ``pass, main thread``: a ``--parallel 4``-shaped decode pass (four sequences, one token each, batch-invariant
  kernels) run by the main thread (a script, the CLI);
* ``pass, four threads``: the same passes led in turn by four other threads directly, as a server's slot
  threads did before the pass thread (up to five teams);
* ``pass, four threads via run_pass``: led in turn by four threads through ``run_pass``, the model loaded in
  another thread: the server now (one team, the pass thread's).

Prints each case's median (min-max) per launch / per pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT = Path.home() / ".cache/tinyinfer/SmolLM2-135M-Instruct.Q4_0.gguf"
CASES = ["tiny, one thread", "tiny, second team", "pass, main thread", "pass, four threads",
         "pass, four threads via run_pass"]


def _thread(fn):
    box = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


def run_case(case: str, a) -> list:
    import numba as nb
    import numpy as np

    import tinyinfer.kernels  # noqa: F401 - (the package's OpenMP settings)
    from tinyinfer.kernels.parallel import run_pass
    if case.startswith("tiny"):
        @nb.njit(parallel=True, nogil=True)
        def tiny(x):
            for i in nb.prange(x.shape[0]):
                x[i] += 1.0
            return x

        x = np.zeros(64)

        def regions():
            nb.set_num_threads(a.threads)
            tiny(x)
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(2000):
                    tiny(x)
                ts.append((time.perf_counter() - t0) / 2000 * 1e6)
            return ts
        if case == "tiny, one thread":
            return regions()
        tiny(x)                                  # the main thread's team
        return _thread(regions)

    from tinyinfer.engine import Engine
    from tinyinfer.kernels.matmul import KernelConfig, using_config
    from tinyinfer.kvcache import Batch
    hop = case.endswith("run_pass")

    def load():
        with using_config(KernelConfig(batch_invariant=True)):
            return Engine(a.model, n_ctx=512, n_threads=a.threads, verbose=False, n_seq=4)
    eng = _thread(load) if hop else load()       # the server loads in a thread of its own
    model = eng.model
    ids = np.arange(200, 204)
    times = []

    def one(s):
        args = (ids, Batch.one_each([0, 1, 2, 3], [8 + s % 64] * 4), eng.cache)
        t0 = time.perf_counter()
        if hop:
            run_pass(a.threads, model.forward, *args, n_out=4)
        else:
            nb.set_num_threads(a.threads)
            model.forward(*args, n_out=4)
        times.append((time.perf_counter() - t0) * 1e3)

    fill = [(np.arange(100, 108), Batch.run(q, 0, 8), eng.cache) for q in range(4)]
    if case == "pass, main thread":
        for f in fill:
            model.forward(*f)
        for s in range(a.passes):
            one(s)
    else:
        for f in fill:                           # never on the main thread: its team would be a second one
            _thread(lambda f=f: run_pass(a.threads, model.forward, *f) if hop else model.forward(*f))
        turn = [0]
        cv = threading.Condition()

        def lead(k):                             # passes k, k + 4, ... in turn, as slots take the lead
            for s in range(k, a.passes, 4):
                with cv:
                    while turn[0] != s:
                        cv.wait()
                one(s)
                with cv:
                    turn[0] += 1
                    cv.notify_all()
        ts = [threading.Thread(target=lead, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return times[len(times) // 4:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=str(DEFAULT))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=64)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case is not None:
        print(json.dumps(run_case(a.case, a)))
        return
    env = {**os.environ, "NUMBA_NUM_THREADS": str(a.threads)}
    print(f"{a.threads} threads, {Path(a.model).name}")
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "-m", a.model, "-t", str(a.threads), "--passes",
                              str(a.passes), "--case", case], env=env, capture_output=True, text=True)
        if out.returncode:
            print(f"{case}: failed\n{out.stderr[-2000:]}")
            continue
        ts = json.loads(out.stdout.strip().splitlines()[-1])
        unit = "us a region" if case.startswith("tiny") else "ms a pass"
        print(f"{case:34s} {statistics.median(ts):8.2f} {unit} ({min(ts):.2f}-{max(ts):.2f})", flush=True)


if __name__ == "__main__":
    main()
