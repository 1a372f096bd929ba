"""Loading numba's cached kernels without refreshing its compiler registries first.

Before numba loads *any* function from its on-disk cache it calls
``target_context.refresh()``: that imports ~60 modules of lowering code (numba.np,
numba.cpython, numba.typed, ...) and rebuilds the typing tables. A cached kernel
needs none of it (its machine code is linked in already; only the runtime (NRT)
and, for parallel kernels, the thread pool must be up, and the cache entry's own
``reload_init`` starts the pool). On a warm start of SmolLM2-135M that refresh is
0.1-0.2 s of a ~0.7 s run.

:func:`install` makes a cache load initialize just the runtime. Whatever compiles
still refreshes (numba's ``CompilerBase`` does it before every compilation), and a
load that fails without the refresh is retried the normal way, so the worst case
is numba's own behaviour. Only applied when numba's ``Cache`` has the internals
this relies on (numba 0.59-0.6x).
"""

from __future__ import annotations

_installed = False


def install() -> bool:
    global _installed
    if _installed:
        return True
    try:
        from numba.core import caching
        from numba.core.runtime import rtsys
    except ImportError:                  # pragma: no cover - numba internals moved
        return False
    cache = caching.Cache
    if not all(hasattr(cache, a) for a in ("load_overload", "_load_overload",
                                            "_guard_against_spurious_io_errors")):
        return False                     # pragma: no cover
    full_load = cache.load_overload

    def load_overload(self, sig, target_context):
        try:
            rtsys.initialize(target_context)
            with self._guard_against_spurious_io_errors():
                return self._load_overload(sig, target_context)
        except Exception:
            return full_load(self, sig, target_context)

    load_overload.__doc__ = full_load.__doc__
    cache.load_overload = load_overload
    _installed = True
    return True
