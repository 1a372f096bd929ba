"""Beyond one box, on Ray (no cluster protocol of our own).

* ``serve``  replicas of the HTTP server on Ray Serve: the same FastAPI app as ``python -m tinyinfer serve``
  in each replica, behind one gateway that turns a lost replica into 503 + Retry-After.
* ``split``  one model split by layer ranges over Ray actors (pipeline of hidden states).

Ray is an optional dependency: ``pip install 'tinyinfer[ray]'``.
"""
