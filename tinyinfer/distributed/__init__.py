"""Beyond one box, on Ray (no cluster protocol of our own).

* ``tinyinfer.ray_serve``  replicas of the HTTP server on Ray Serve: the same FastAPI app as ``python -m tinyinfer serve``
  in each replica, behind one gateway that turns a lost replica into 503 + Retry-After.
* ``tinyinfer.models.split``  one model split by layer ranges over Ray actors (pipeline of hidden states).

Ray is an optional dependency: ``pip install 'tinyinfer[ray]'``.
"""

from __future__ import annotations

import os
from typing import Optional

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}    # see ensure_ray


def pythonpath() -> str:
    """PYTHONPATH for Ray's workers: the folder holding this tinyinfer package first, so they run this code."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    old = os.environ.get("PYTHONPATH")
    return here + (os.pathsep + old if old else "")


def use_loopback() -> None:
    """Make Ray advertise 127.0.0.1 for the nodes this process starts or joins on this machine.

    Ray picks the machine's outward address by default, even for a local instance; with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it uses loopback. Ray reads that variable when it is first
    imported, so the value it derived is set too when ray is already loaded."""
    os.environ.update(LOOPBACK_ENV)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import sys
    consts = sys.modules.get("ray._private.ray_constants")
    if consts is not None:
        consts.ENABLE_RAY_CLUSTER = False


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None):
    """Connect to Ray (``address`` or $RAY_ADDRESS), or start a local instance on 127.0.0.1."""
    # no usage reports to Ray's servers from clusters we start (RAY_USAGE_STATS_ENABLED=1 to allow)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address.startswith(("127.", "localhost")):
        use_loopback()
    kw = dict(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath()}})
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=80 << 20, **kw)
    _started.append(ray)
    return ray


_started: list = []     # the Ray connection ensure_ray opened (shutdown_ray closes it)


def shutdown_ray() -> None:
    """Close the connection ensure_ray opened, stopping the local Ray instance it started (its raylet,
    GCS and agent processes): what a CLI run calls on its way out, error or not."""
    while _started:
        ray = _started.pop()
        if ray.is_initialized():
            ray.shutdown()
