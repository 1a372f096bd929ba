"""The FastAPI application: common routes, errors, authentication, request metrics."""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from .. import __version__
from .core import ApiError, ServerConfig, ServerState, error_body, error_response, is_ollama_path, to_api_error

log = logging.getLogger("tinyinfer.server")

MAX_BODY = 16 << 20      # bytes; a prompt can't be longer than the context anyway

PUBLIC_PATHS = frozenset(("/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"))

DESCRIPTION = """\
One model, two dialects, one generation loop (the same as the CLI and the `Llama` class).

* **OpenAI**: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`
  (fields and defaults as llama-cpp-python's server; `stream: true` = server-sent events ending
  with `data: [DONE]`).
* **ollama**: `/api/generate`, `/api/chat` (NDJSON streams unless `stream: false`), `/api/tags`,
  `/api/show`, `/api/ps`, `/api/version`, `/api/embed`, `/api/embeddings`.
* **operations**: `/health` (GET, HEAD), `/metrics` (Prometheus; llama-server's names), `/slots` and
  `/props` (llama-server's shapes).
* **many models** (`--models-dir`, or no `-m`): each request's `model` is loaded on first use; `/api/ps`
  lists the loaded ones; `keep_alive` as ollama; `/models`, `/models/load`, `/models/unload` as
  llama-server's router; `/props`, `/slots`, `/metrics` take `?model=`.
"""


class _Gate:
    """ASGI middleware: API key, JSON bodies sent without a JSON content type, request metrics, and the
    direct routes.

    ``direct``: {path: (body model, endpoint)} for POST routes whose per-request cost is mostly the web
    framework's (a one-sentence embedding: ~0.5 ms of CPU in Starlette / FastAPI's middleware, routing
    and dependency solving, as much as a small model's forward of it). A body that validates against the
    model goes straight to the endpoint (the same function the app routes to, called with the validated
    body and a Request on ``fastapi_app``), its ApiError / exception answered as the app's handlers do;
    any other body goes the app's way, so every error reads the same. Not used with CORS (its headers
    come from a middleware inside this one)."""

    def __init__(self, app, state: ServerState, known_paths: Callable[[], frozenset], direct=None,
                 fastapi_app=None):
        self.app = app
        self.state = state
        self.known_paths = known_paths
        key = state.config.api_key
        self.key = key.encode() if key else None
        self.direct = direct or {}
        self.fastapi_app = fastapi_app

    def _authorized(self, scope) -> bool:
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                scheme, _, token = v.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    def _endpoint(self, path: str) -> str:
        if path in self.known_paths():
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{model_id}"
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        status = [500]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            if self.key is not None and path not in PUBLIC_PATHS and scope["method"] != "OPTIONS" \
                    and not self._authorized(scope):
                body = json.dumps(error_body(path, 401, "invalid or missing API key (Authorization: Bearer KEY)",
                                             "authentication_error", None, "invalid_api_key")).encode()
                await send_({"type": "http.response.start", "status": 401,
                             "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode()),
                                         (b"www-authenticate", b"Bearer")]})
                await send_({"type": "http.response.body", "body": body})
                return
            if scope["method"] in ("POST", "PUT", "DELETE"):
                size = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"0")
                if size.isdigit() and int(size) > MAX_BODY:
                    return await _too_large(path, send_)
                # read the body here, whatever the transfer encoding (chunked uploads carry no
                # Content-Length): never more than MAX_BODY bytes are held, the rest is not read
                body, n, gone = [], 0, False
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        gone = True
                        break
                    chunk = msg.get("body", b"")
                    n += len(chunk)
                    if n > MAX_BODY:
                        return await _too_large(path, send_)
                    body.append(chunk)
                    if not msg.get("more_body", False):
                        break
                route = self.direct.get(path) if scope["method"] == "POST" and not gone else None
                if route is not None and await self._direct(route, scope, b"".join(body), receive, send_):
                    return
                receive = _replay(b"".join(body), receive, gone)
                # curl -d '{...}' (ollama's own examples) sends application/x-www-form-urlencoded
                headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
                ctype = next((v for k, v in scope.get("headers", ()) if k == b"content-type"), b"")
                if not ctype.startswith(b"application/json") and b"multipart" not in ctype:
                    scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
            await self.app(scope, receive, send_)
        finally:
            self.state.metrics.record_request(self._endpoint(path), status[0], time.perf_counter() - t0)


    async def _direct(self, route, scope, body: bytes, receive, send) -> bool:
        """Run a direct route (see the class); False if the body does not validate (the app answers)."""
        from pydantic import ValidationError
        from starlette.requests import Request
        model, endpoint = route
        try:
            req = model.model_validate(json.loads(body))
        except (ValueError, ValidationError):        # (json's JSONDecodeError and UnicodeDecodeError too)
            return False
        request = Request(dict(scope, app=self.fastapi_app), receive)
        try:
            response = await endpoint(req, request)
        except ApiError as e:
            response = error_response(scope["path"], e)
        except Exception as e:
            response = error_response(scope["path"], to_api_error(e))
        sock = _corked(receive)
        try:
            await response(scope, receive, send)
        finally:
            if sock is not None:
                _cork(sock, 0)
        return True


def _corked(receive):
    """The connection's socket, corked (Linux TCP_CORK), when the ASGI server is uvicorn (its ``receive``
    is a bound method of the request cycle, which holds the transport); else None. A response goes out
    as two writes (uvicorn writes the status line and headers at ``http.response.start``, the body at
    ``http.response.body``; uvloop sends each at once): two TCP segments, and the client wakes for the
    headers, then again for the body. Corked, the headers wait in the socket for the body and both leave
    in one segment when it is uncorked. (A one-sentence embedding: ~20% of the event loop's samples
    were the headers' write; measured in benchmarks/RESULTS.md, "Embeddings".)"""
    if _TCP_CORK is None:
        return None
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    try:
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        _cork(sock, 1)
        return sock
    except (OSError, AttributeError, ValueError):
        return None


def _cork(sock, on: int) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, on)
    except (OSError, ValueError):        # (the client has gone: nothing to send any more)
        pass


_TCP_CORK = getattr(socket, "TCP_CORK", None)


async def _too_large(path, send) -> None:
    body = json.dumps(error_body(path, 413, f"request body over {MAX_BODY >> 20} MiB", "invalid_request_error")
                      ).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive, gone: bool):
    """An ASGI receive that hands the already-read body over once, then waits on the real one
    (so a disconnect is still seen while the request runs)."""
    sent = [False]

    async def receive_():
        if not sent[0]:
            sent[0] = True
            if gone:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return receive_


def _validation_message(exc: RequestValidationError):
    """'field: problem' for each problem, and the first field's name (OpenAI's ``param``)."""
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        # drop pydantic's union-branch names (e.g. 'str', 'list[int]') from the location
        loc = [x for x in loc if not (x.startswith(("list[", "dict[", "literal[", "function-")) or x[:1].isupper()
                                      or x in ("str", "int", "float", "bool", "constrained-str"))]
        field = ".".join(loc) or "body"
        param = param or field
        msg = err.get("msg", "invalid")
        if (field == "model" and err.get("type") in ("missing", "string_too_short")) or "model is required" in msg:
            parts.append("model is required")       # ollama's words
            param = "model"
            continue
        if "input" in err and err.get("type") != "missing" and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        parts.append(f"{field}: {msg}")
    seen, uniq = set(), []
    for p in parts:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return "; ".join(uniq) or "invalid request", param


def create_app(config: ServerConfig, engine_factory: Optional[Callable[[], Any]] = None,
               load_in_background: bool = True) -> FastAPI:
    """The application for ``config``; ``engine_factory()`` makes one engine per slot.

    ``app.state.models`` is the :class:`~tinyinfer.server.models.ModelManager`; ``app.state.tinyinfer`` the
    one model's state in one-model mode (``-m`` alone), else None."""
    from .models import ModelManager
    mgr = ModelManager(config, engine_factory, models_dir=config.models_dir, multi=config.multi,
                       keep_alive=config.keep_alive, max_models=config.max_models, max_memory=config.max_memory,
                       sleep_idle_seconds=config.sleep_idle_seconds)
    state = mgr.default

    @asynccontextmanager
    async def lifespan(app):
        import asyncio
        reaper = None
        if state is not None:
            if load_in_background:
                threading.Thread(target=state.load, name="tinyinfer-load", daemon=True).start()
            else:
                state.load()
        else:
            reaper = asyncio.ensure_future(mgr.reaper())
            asyncio.ensure_future(mgr.start())
        yield
        if reaper is not None:
            reaper.cancel()
        if state is not None:
            state.pool.stop(timeout=2.0)
        else:
            await mgr.stop_all()

    app = FastAPI(title="tinyinfer", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.tinyinfer = state
    app.state.models = mgr

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return JSONResponse(error_body(request.url.path, 400, msg, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = f"not found: {request.method} {request.url.path}"
        typ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(request.url.path, exc.status_code, msg, typ), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(request.url.path, to_api_error(exc))

    @app.get("/", include_in_schema=False)
    async def root():
        """The chat page (tinyinfer/server/chat_page.py): streams through /v1/chat/completions."""
        from .chat_page import PAGE
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-cache"})

    @app.head("/", include_in_schema=False)
    async def root_head():
        return Response(status_code=200)

    @app.get("/health", tags=["operations"], summary="loading / ok (503 until the model is loaded)")
    async def health():
        if state is None:      # many models: the server is up; models load on demand
            if mgr.states and all(s.pool.draining for s in mgr.states.values()):
                return JSONResponse({"status": "shutting down"}, status_code=503)
            return {"status": "ok", "models_loaded": len(mgr.loaded()),
                    "slots_idle": sum(s.pool.n_slots - s.pool.n_processing for s in mgr.loaded()),
                    "slots_processing": sum(s.pool.n_processing for s in mgr.loaded()),
                    "requests_deferred": sum(s.pool.n_waiting for s in mgr.loaded()) + mgr.n_room_waiting}
        if state.status == "ok" and state.pool.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if state.status == "ok":
            return {"status": "ok", "slots_idle": state.pool.n_slots - state.pool.n_processing,
                    "slots_processing": state.pool.n_processing, "requests_deferred": state.pool.n_waiting}
        if state.status == "loading":
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=500)

    @app.head("/health", include_in_schema=False)
    async def health_head():
        if state is None:
            return Response(status_code=200)
        ok = state.status == "ok" and not state.pool.draining
        return Response(status_code=200 if ok else (503 if state.status != "error" else 500))

    def _loaded(model: Optional[str]) -> list:
        """The states a ``?model=`` query names: that model (404 unless loaded), or all loaded ones."""
        if state is not None:
            return [state]
        if model:
            st = mgr.find(model)
            if st is None or st.status != "ok":
                if mgr.lookup(model) is None:
                    raise mgr.not_found(model)
                raise ApiError(404, f'model "{model}" is not loaded', "not_found_error", param="model",
                               code="model_not_loaded")
            return [st]
        return mgr.loaded()

    @app.get("/slots", tags=["operations"], summary="the slots and what each is doing (llama-server's shape)")
    async def slots(model: Optional[str] = None):
        if state is not None:
            return state.slots_info()
        return [{**s, "model": st.model_name} for st in _loaded(model) for s in st.slots_info()]

    @app.get("/props", tags=["operations"], summary="server properties (llama-server's shape)")
    async def props(model: Optional[str] = None):
        if state is not None:
            return state.props()
        if model:
            return _loaded(model)[0].props()
        from .. import __version__ as v
        return {"role": "router", "build_info": f"tinyinfer {v}", "max_models": mgr.max_models,
                "max_memory": mgr.max_memory, "n_loads": mgr.n_loads, "n_loads_abandoned": mgr.n_abandoned,
                "n_evictions": mgr.swaps, "n_waiting_for_room": mgr.n_room_waiting,
                "models": [{"id": e.name, "path": e.path, "status": (
                    mgr.states[e.name].status if e.name in mgr.states else "unloaded")} for e in mgr.entries()]}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics (text format)")
    async def metrics(model: Optional[str] = None):
        if state is not None:
            text = state.render_metrics()
        else:
            parts = [] if model else [mgr.metrics.render(0, mgr.n_room_waiting, 0, 0.0, 0)]
            parts += [_labelled(st.render_metrics(), st.model_name) for st in _loaded(model)]
            text = _merge_metrics(parts)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    from .ollama_api import router as ollama_router
    from .openai_api import router as openai_router
    app.include_router(openai_router)
    app.include_router(ollama_router)
    from .rerank_api import router as rerank_router
    app.include_router(rerank_router)
    from .store_api import router as store_router
    app.include_router(store_router)

    if config.cors:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    from .openapi import install

    def served():
        """What the OpenAPI document depends on (tinyinfer/server/openapi.py); None while loading."""
        if state is None:
            return {}
        if state.status != "ok":
            return None
        return {"n_vocab": state.tokenizer.n_vocab,
                "absent": ["/models/unload"] + ([] if state.can_rerank else ["/v1/rerank"])}
    install(app, PUBLIC_PATHS, is_ollama_path, served)
    known = []

    def known_paths() -> frozenset:
        if not known:
            paths = set()

            def walk(routes):
                for r in routes:
                    if isinstance(getattr(r, "path", None), str):
                        paths.add(r.path)
                    sub = getattr(r, "original_router", None)      # FastAPI's included routers
                    if sub is not None:
                        walk(sub.routes)
            walk(app.routes)
            walk(openai_router.routes)
            walk(ollama_router.routes)
            walk(store_router.routes)
            known.append(frozenset(p for p in paths if "{" not in p))
        return known[0]

    from . import ollama_api, openai_api
    from .schemas import EmbeddingRequest, OllamaEmbeddingsRequest, OllamaEmbedRequest
    direct = {} if config.cors else {"/v1/embeddings": (EmbeddingRequest, openai_api.embeddings),
                                     "/api/embed": (OllamaEmbedRequest, ollama_api.embed),
                                     "/api/embeddings": (OllamaEmbeddingsRequest, ollama_api.embeddings)}
    app.add_middleware(_Gate, state=mgr, known_paths=known_paths, direct=direct, fastapi_app=app)
    return app


def _labelled(text: str, model: str) -> str:
    """A model's metrics with a ``model`` label on every sample (its HELP / TYPE lines as they are)."""
    lab = 'model="' + model.replace("\\", "\\\\").replace('"', '\\"') + '"'
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition(" ")
            if "{" in name:
                name = name.replace("{", "{" + lab + ",", 1)
            else:
                name = name + "{" + lab + "}"
            line = name + " " + rest
        out.append(line)
    return "\n".join(out) + "\n"


def _merge_metrics(texts) -> str:
    """Several renders as one exposition: each family's HELP / TYPE once, then all its samples."""
    families: dict = {}
    for text in texts:
        fam = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                fam = line.split(" ")[2]
                f = families.setdefault(fam, ([], []))
                if line not in f[0]:
                    f[0].append(line)
            elif line and fam is not None:
                families[fam][1].append(line)
    return "".join("\n".join(h + s) + "\n" for h, s in families.values())
