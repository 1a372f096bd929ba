
from . import jitcache as _jitcache

_jitcache.install()
