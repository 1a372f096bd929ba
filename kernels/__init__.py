"""tinyinfer kernels: numba-jitted quantized matmuls, formats, ops. Importing the package makes numba
load cached kernels without refreshing its registries first (jitcache.py)."""

from . import jitcache as _jitcache

_jitcache.install()
