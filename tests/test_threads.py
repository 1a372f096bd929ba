"""Parallel kernels called from several Python threads under numba's workqueue layer.

Without libgomp (a minimal Raspberry Pi OS / Debian image) numba falls back to its
workqueue threading layer, which aborts the process when two threads enter parallel
regions at once (benchmarks/ARM.md). kernels/parallel.py serialises the regions there.
The check runs in a subprocess with the layer forced, so an abort fails the test
instead of killing pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys, threading
    import numba
    from tinyinfer.engine import Engine
    from tinyinfer.kernels import matmul as mm
    from tinyinfer.sampler import SamplerParams

    # every matmul takes the parallel driver
    with mm.using_config(mm.KernelConfig(parallel_min_bytes=1)):
        eng = Engine(sys.argv[1], n_ctx=128, n_batch=64, n_threads=2)
    assert numba.threading_layer() == "workqueue", numba.threading_layer()
    greedy = SamplerParams(temperature=0)
    ids = eng.tokenizer.encode("The capital of France is", special=True)
    ref = [s.token for s in eng.generate(ids, greedy, max_tokens=6)]
    engines = [eng.fork() for _ in range(3)]
    got, errors = [], []

    def run(e):
        try:
            for _ in range(2):
                e.reset()
                got.append([s.token for s in e.generate(ids, greedy, max_tokens=6)])
        except BaseException as exc:          # noqa: BLE001 - report it to the parent
            errors.append(repr(exc))

    ts = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert len(got) == 6 and all(g == ref for g in got), (ref, got)
    print("ok", numba.threading_layer(), ref)
""")


def test_engines_in_threads_under_workqueue(smollm2_path):
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(smollm2_path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert r.stdout.startswith("ok workqueue")


SPIN = textwrap.dedent("""
    import os, threading, time
    import numpy as np
    import tinyinfer.kernels                  # sets OpenMP's wait policy (kernels/parallel.py)
    import numba

    @numba.njit(parallel=True)
    def f(a):
        for i in numba.prange(a.size):
            a[i] += 1.0

    a = np.zeros(1000)
    f(a)
    me = threading.get_native_id()

    def others():                             # run time of the other threads (ns), the workers'
        tot = 0
        for t in os.listdir(f"/proc/{os.getpid()}/task"):
            if int(t) != me:
                with open(f"/proc/{os.getpid()}/task/{t}/schedstat") as fh:
                    tot += int(fh.read().split()[0])
        return tot

    spun = 0
    for _ in range(20):
        f(a)
        c0 = others()
        time.sleep(0.02)
        spun += others() - c0
    print(numba.threading_layer(), os.environ.get("GOMP_SPINCOUNT"), spun / 20 / 1e6)
""")


def test_openmp_workers_spin_briefly_between_regions():
    """Under OpenMP the workers of a parallel region spin a tenth as long when it ends as libgomp's
    default (~1.7 ms of CPU, taken from a server's other threads on a small machine); the setting is
    not left in the environment (child processes keep their defaults), and a user's own
    GOMP_SPINCOUNT is kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["NUMBA_NUM_THREADS"] = "2"
    out = subprocess.run([sys.executable, "-c", SPIN], capture_output=True, text=True, env=env, check=True)
    layer, left, ours_ms = out.stdout.split()
    if layer != "omp":
        return                                    # workqueue / tbb: no libgomp spinning to check
    assert left == "None"
    env["GOMP_SPINCOUNT"] = "300000"              # libgomp's default, set by the user: kept
    out = subprocess.run([sys.executable, "-c", SPIN], capture_output=True, text=True, env=env, check=True)
    _, left, default_ms = out.stdout.split()
    assert left == "300000"
    assert float(ours_ms) < float(default_ms) / 3, (ours_ms, default_ms)
