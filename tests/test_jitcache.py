"""kernels/jitcache.py: a cached kernel loads without numba's registry refresh, and works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODULE = textwrap.dedent('''
    import numba as nb
    import numpy as np
    from numba import prange

    @nb.njit(cache=True)
    def total(a):
        s = 0.0
        for i in range(a.size):
            s += a[i]
        return s

    @nb.njit(cache=True, parallel=True)
    def scaled(a, k):
        out = np.empty_like(a)          # allocates: needs numba's runtime (NRT)
        for i in prange(a.size):
            out[i] = a[i] * k
        return out
''')

PROBE = textwrap.dedent('''
    import sys
    import numpy as np
    import tinyinfer.kernels              # installs the light cache load
    import numba
    numba.set_num_threads(2)
    import jitmod
    a = np.arange(10000, dtype=np.float64)
    assert jitmod.total(a) == a.sum()
    print("refreshed" if "numba.np.arrayobj" in sys.modules else "light")
    # a parallel kernel's cache entry starts the thread pool itself (its reload_init)
    assert np.array_equal(jitmod.scaled(a, 3.0), a * 3.0)
''')


def _run(tmp_path, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


def test_cached_kernels_load_without_the_registry_refresh(tmp_path):
    (tmp_path / "jitmod.py").write_text(MODULE)
    cache = tmp_path / "cache"
    assert _run(tmp_path, cache) == "refreshed"      # first process: compiles (numba refreshes)
    assert _run(tmp_path, cache) == "light"          # second: loads both from the cache, no refresh


SERIAL_AND_PARALLEL = textwrap.dedent('''
    import numpy as np
    from tinyinfer.ggml_types import GGMLType
    from tinyinfer.kernels import matmul as mm, quants
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    pw = mm.prepare(quants.quantize(w, GGMLType.Q8_0), int(GGMLType.Q8_0), 256, repack=False)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    out = {}
    for parallel in (True, False):          # the parallel build compiles (and is stored) first
        d = mm.driver(pw.info, False, parallel, pw.config)
        o = np.empty((3, 64), np.float32)
        d(pw.w, x, o)
        out[parallel] = o
        print(parallel, sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()))
    assert (out[True] == out[False]).all()
''')


def test_serial_and_parallel_drivers_are_cached_apart(tmp_path):
    """The serial and the parallel build of one driver closure get separate entries in numba's disk
    cache (it keys a function by name, code and cells, not by its flags): before, the serial driver
    loaded the parallel one's machine code, which ran outside kernels/parallel.call's lock (workqueue:
    an abort with two engines in two threads, found by the emulated arm job)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SERIAL_AND_PARALLEL], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines == {"True": "0 1", "False": "0 1"}, r.stdout      # both compiled: neither loaded the other
