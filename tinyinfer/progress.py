"""The line a user sees while numba compiles the kernels (the first run after an install or upgrade).

Compiled kernels are cached (``cache=True``, next to the kernels or in ``$NUMBA_CACHE_DIR``);
loading them takes well under a second, compiling them for this CPU several seconds. When the
cache holds no entry for a kernel every forward pass uses, or loading runs long, say so.
"""

from __future__ import annotations

import os
import sys
import threading
import time


def _cache_is_cold() -> bool:
    try:
        from .kernels import ops
        return not os.path.exists(ops.rmsnorm._cache._cache_file._index_path)
    except Exception:  # noqa: BLE001 - a numba internals change must not break loading
        return False


class CompileNotice:
    """``with CompileNotice(enabled):`` around loading + warm-up; one line before, one after."""

    def __init__(self, enabled: bool = True, after_s: float = 4.0):
        self.enabled = enabled
        self.after_s = after_s
        self.said = False
        self._timer = None

    def _say(self, why: str) -> None:
        if not self.said:
            self.said = True
            print(f"tinyinfer: compiling the numba kernels for this CPU ({why}; cached afterwards) ...",
                  file=sys.stderr, flush=True)

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.enabled:
            if _cache_is_cold():
                self._say("first run after install")
            else:                    # a kernel changed (upgrade, other numba) and is being recompiled
                self._timer = threading.Timer(self.after_s, self._say, ("some kernels changed",))
                self._timer.daemon = True
                self._timer.start()
        return self

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()
        if self.said and exc[0] is None:
            print(f"tinyinfer: kernels ready in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)
        return False
