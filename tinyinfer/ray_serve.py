"""Replicas of the HTTP server on Ray Serve.

    python -m tinyinfer serve --ray --replicas 2 -m MODEL.gguf [--port 8000] [serve's other flags]
    serve run tinyinfer.ray_serve:app model=MODEL.gguf replicas=2      # Ray's own CLI

::

    client ──HTTP──▶ Ray Serve proxy ──▶ Gateway (1 replica, no CPU) ──handle, streamed──▶ TinyInferReplica × N
                                            │                                              (the server's FastAPI app,
                                            └─ a lost replica → 503 + Retry-After            its engine and slots)

Each replica runs the very app ``python -m tinyinfer serve`` runs (:func:`tinyinfer.server.app.create_app`:
the same routes, validation, errors and metrics), driven in-process over ASGI; its messages
(status, headers, body chunks) stream back through the gateway. Ray Serve routes each request to
a replica with room (``max_ongoing_requests`` = slots + 1, so few requests wait inside a replica
that may die) and replaces a replica whose process dies. The gateway exists for that moment: a
request the dead replica held fails with 503, ``Retry-After`` and an OpenAI-shaped error body
(``code: replica_lost``) instead of Ray's bare 500; one whose response had already started ends
with an error event in its stream. Requests still queued in Ray's router go to a live replica.

``/metrics`` through the gateway is one replica's; Ray exports per-deployment metrics of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .distributed import ensure_ray, pythonpath
from .server.config import ServerConfig

log = logging.getLogger("tinyinfer.ray_serve")

RETRY_AFTER_S = 2           # a replica restarts (loads its model) in a few seconds


@dataclass
class RayServeOptions:
    """What ``serve run ...:app key=value`` and the RayService's ``args`` accept."""
    model: str
    alias: Optional[str] = None
    ctx_size: int = 4096
    batch_size: int = 512
    threads: int = 1
    parallel: int = 1
    max_queue: int = 16
    api_key: Optional[str] = None
    chat_template: Optional[str] = None
    replicas: int = 1
    autoscale: Optional[str] = None          # "MIN:MAX": autoscale on ongoing requests instead of a fixed count
    cpus_per_replica: float = 1.0
    retry_after: int = RETRY_AFTER_S
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_args(cls, args: dict) -> "RayServeOptions":
        known = {f.name for f in fields(cls)} - {"extra"}
        args = {k.replace("-", "_"): v for k, v in dict(args).items()}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown tinyinfer Ray Serve argument(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        if "model" not in args:
            raise ValueError("tinyinfer Ray Serve needs model=PATH.gguf")
        typed = {}
        for f in fields(cls):
            if f.name not in args:
                continue
            v = args[f.name]
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            try:
                typed[f.name] = kind(v) if kind else (None if v in (None, "") else str(v))
            except (TypeError, ValueError):
                raise ValueError(f"{f.name}={v!r}: expected a number") from None
        o = cls(**typed)
        for name in ("ctx_size", "batch_size", "threads", "parallel", "max_queue", "replicas", "retry_after"):
            if getattr(o, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(o, name)}")
        if o.cpus_per_replica < 0:
            raise ValueError(f"cpus_per_replica must be >= 0, got {o.cpus_per_replica}")
        o.autoscale_range()          # validates
        return o

    def autoscale_range(self):
        if not self.autoscale:
            return None
        lo, sep, hi = str(self.autoscale).partition(":")
        try:
            lo, hi = int(lo), int(hi)
        except ValueError:
            raise ValueError(f"autoscale={self.autoscale!r}: expected MIN:MAX, e.g. 1:4") from None
        if not sep or lo < 1 or hi < lo:
            raise ValueError(f"autoscale={self.autoscale!r}: expected MIN:MAX with 1 <= MIN <= MAX")
        return lo, hi

    def server_config(self) -> dict:
        return asdict(ServerConfig(model_path=self.model, alias=self.alias, n_ctx=self.ctx_size,
                                   n_batch=self.batch_size, n_threads=self.threads, parallel=self.parallel,
                                   max_queue=self.max_queue, api_key=self.api_key,
                                   chat_template=self.chat_template))


# --- the replica: the server's app, driven over ASGI -------------------------------------------

class TinyInferReplica:
    """One model server: ``create_app`` with its engine(s), loaded before the replica takes requests."""

    async def __init__(self, config: dict):
        from .server.app import create_app
        self.app = create_app(ServerConfig(**config), load_in_background=False)
        self.state = self.app.state.tinyinfer
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()            # loads the model (the replica is not routed to before)
        if self.state.load_error:
            raise RuntimeError(f"could not load the model: {self.state.load_error}")

    def check_health(self):
        if self.state.status != "ok":
            raise RuntimeError(f"model status {self.state.status}: {self.state.load_error}")

    def pid(self) -> int:
        return os.getpid()

    async def handle(self, req: dict):
        """Run one HTTP request through the app; yield ("start", status, headers) then body chunks (bytes)."""
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": req["method"], "scheme": "http", "path": req["path"],
                 "raw_path": req["path"].encode(), "query_string": req["query_string"], "root_path": "",
                 "headers": [tuple(h) for h in req["headers"]], "client": tuple(req["client"]) if req.get("client")
                 else None, "server": ("127.0.0.1", 0), "state": {}}
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = [False]

        async def receive():
            if not body_sent[0]:
                body_sent[0] = True
                return {"type": "http.request", "body": req["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            await out.put(msg)

        task = asyncio.ensure_future(self.app(scope, receive, send))
        try:
            while True:
                get = asyncio.ensure_future(out.get())
                done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if task.exception() is not None:
                        raise task.exception()
                    if out.empty():
                        return
                    continue
                msg = get.result()
                if msg["type"] == "http.response.start":
                    yield ("start", msg["status"], [list(h) for h in msg.get("headers", [])])
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield msg["body"]
                    if not msg.get("more_body", False):
                        return
        finally:
            gone.set()                                # the client went away (or we are done): the app stops
            if not task.done():
                try:
                    await asyncio.wait_for(task, 5)
                except (asyncio.TimeoutError, Exception):
                    task.cancel()

    async def __del__(self):
        try:
            await self._lifespan.__aexit__(None, None, None)
        except Exception:
            pass


# --- the gateway: one front door, a lost replica becomes a retryable error ---------------------

def _replica_lost_body(path: str, retry_after: int) -> dict:
    from .server.core import error_body
    return error_body(path, 503, f"the model replica serving this request was lost; retry in {retry_after} s "
                                 "(another replica serves the retry)", "server_error", None, "replica_lost")


class Gateway:
    def __init__(self, replicas, retry_after: int = RETRY_AFTER_S):
        self.replicas = replicas.options(stream=True, method_name="handle")
        self.retry_after = int(retry_after)

    async def __call__(self, request):
        from ray.exceptions import RayActorError
        from starlette.responses import JSONResponse, StreamingResponse

        req = {"method": request.method, "path": request.url.path,
               "query_string": request.url.query.encode(), "headers": [list(h) for h in request.headers.raw],
               "client": list(request.client) if request.client else None, "body": await request.body()}
        gen = self.replicas.remote(req)
        try:
            first = await gen.__anext__()
        except RayActorError as e:
            log.warning("replica lost before answering %s %s: %s", req["method"], req["path"], type(e).__name__)
            return JSONResponse(_replica_lost_body(req["path"], self.retry_after), status_code=503,
                                headers={"Retry-After": str(self.retry_after)})
        _, status, headers = first
        headers = [(bytes(k), bytes(v)) for k, v in headers]
        ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        retry_after = self.retry_after

        async def body():
            try:
                async for chunk in gen:
                    yield chunk
            except RayActorError:
                # the response had started: say so in the stream's own framing, then end it
                err = json.dumps(_replica_lost_body(req["path"], retry_after))
                if ctype.startswith(b"text/event-stream"):
                    yield f"data: {err}\n\n".encode()
                else:
                    yield (err + "\n").encode()

        resp = StreamingResponse(body(), status_code=status)
        resp.raw_headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length",)]
        return resp


# --- building and running the application ------------------------------------------------------

def build(opts: RayServeOptions):
    from ray import serve
    actor_opts = {"num_cpus": opts.cpus_per_replica,
                  "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath(),
                                               "NUMBA_NUM_THREADS": str(opts.threads)}}}
    kw: dict[str, Any] = dict(name="TinyInferReplica", ray_actor_options=actor_opts,
                              max_ongoing_requests=opts.parallel + 1, health_check_period_s=5,
                              graceful_shutdown_timeout_s=30)
    rng = opts.autoscale_range()
    if rng:
        kw["autoscaling_config"] = {"min_replicas": rng[0], "max_replicas": rng[1],
                                    "target_ongoing_requests": opts.parallel, "upscale_delay_s": 5,
                                    "downscale_delay_s": 60}
    else:
        kw["num_replicas"] = opts.replicas
    replica = serve.deployment(TinyInferReplica, **kw)
    gateway = serve.deployment(Gateway, name="Gateway", num_replicas=1, max_ongoing_requests=1024,
                               ray_actor_options={"num_cpus": 0,
                                                  "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath()}}})
    return gateway.bind(replica.bind(opts.server_config()), opts.retry_after)


def app(args: dict):
    """Application builder for ``serve run tinyinfer.ray_serve:app model=... replicas=2`` and KubeRay."""
    return build(RayServeOptions.from_args(args))


def run(opts: RayServeOptions, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None,
        num_cpus: Optional[int] = None) -> int:
    """Start (or join) Ray, deploy, serve until SIGTERM / SIGINT, then shut Serve down."""
    from ray import serve
    ray = ensure_ray(address, num_cpus)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(opts), name="tinyinfer", route_prefix="/")
        n = f"autoscaling {opts.autoscale}" if opts.autoscale else f"{opts.replicas} replica(s)"
        print(f"tinyinfer: Ray Serve on http://{host}:{port} ({n} of {os.path.basename(opts.model)})", flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
