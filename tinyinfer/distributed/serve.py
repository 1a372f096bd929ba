"""The old path of :mod:`tinyinfer.ray_serve` (``serve run tinyinfer.distributed.serve:app`` in existing
KubeRay manifests keeps working)."""

from ..ray_serve import *  # noqa: F401,F403
from ..ray_serve import app, build  # noqa: F401
