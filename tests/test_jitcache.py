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
