"""tinyinfer kernels: numba-jitted quantized matmuls, formats, ops. Importing the package makes numba
load cached kernels without refreshing its registries first (jitcache.py) and keeps the forward pass's
temporaries in glibc's heap (heap.py); OpenMP's workers spin only briefly after a parallel region
(parallel.py)."""

from . import heap as _heap
from . import jitcache as _jitcache
from . import parallel as _parallel

_jitcache.install()
_heap.tune()
_parallel.tune_waits()
