"""The OpenAPI document as the server really answers: what FastAPI generates from the routes and the
request models, completed with what it cannot see.

* Every status an operation can answer: 400 for a bad body (the server turns pydantic's 422 into 400,
  as llama-server and ollama do), 401 without the API key (unless the path is public), 404, 405, 413
  for a body over the limit, 503 while loading, draining or with a full queue (``Retry-After``).
* The error bodies of each dialect: ollama's ``{"error": "..."}``, OpenAI's ``{"error": {"message",
  "type", "param", "code"}}``.
* Token ids bounded by the vocabulary (one-model mode); only the operations this server has (no router's
  /models/unload with one model, no /v1/rerank for a model that cannot rerank).
* The content types of streams (``text/event-stream`` for OpenAI's ``stream: true``,
  ``application/x-ndjson`` for ollama's) and of /metrics (Prometheus' text format).
"""

from __future__ import annotations

from typing import Callable, Optional

_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_OLLAMA_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}

_WHY = {400: "a bad request body or value (the message names the field)", 401: "missing or wrong API key",
        404: "unknown model or path", 405: "method not allowed", 413: "request body too large",
        500: "the model failed to load", 503: "loading, shutting down, or the queue is full (Retry-After)"}

#: streamed replies by path: the media type of ``stream: true``
_STREAMS = {"/v1/completions": "text/event-stream", "/v1/chat/completions": "text/event-stream",
            "/api/generate": "application/x-ndjson", "/api/chat": "application/x-ndjson",
            "/api/pull": "application/x-ndjson"}
_TEXT = {"/metrics": "text/plain; version=0.0.4; charset=utf-8"}
#: one Server-Sent Event (OpenAPI 3.1: a text/event-stream ``schema`` describes each event)
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chunk; the last event's is [DONE]"},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


#: bounds pydantic leaves in its own words where a validator wraps the type (schemas.Int): JSON Schema's
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _token_ids(node, n_vocab: Optional[int]) -> None:
    """Each token id (``x-token-id``, tinyinfer/server/schemas.py) gets ``maximum`` n_vocab - 1 where the
    vocabulary is known; where not (many models), its description says what is past it. Bounds of integers
    as JSON Schema names them."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for k in [k for k in node if k in _BOUNDS and isinstance(node[k], (int, float))]:
                node[_BOUNDS[k]] = node.pop(k)
        if node.pop("x-token-id", False):
            if n_vocab is not None:
                node["maximum"] = n_vocab - 1
            else:
                node["description"] = "a token id below the model's vocabulary size (past it: 400)"
        for v in node.values():
            _token_ids(v, n_vocab)
    elif isinstance(node, list):
        for v in node:
            _token_ids(v, n_vocab)


def install(app, public_paths, is_ollama_path: Callable[[str], bool],
            served: Callable[[], Optional[dict]] = lambda: {}) -> None:
    """Make ``app.openapi()`` return the completed document, built once ``served()`` says what is served:
    None while the one model loads (the document is then built but not kept), else a dict with ``n_vocab``
    (the vocabulary's size, absent with many models) and ``absent`` (paths this server does not have:
    the router's /models/unload with one model, /v1/rerank for a model without a classification head)."""
    make = app.openapi

    def openapi():
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = make()
        app.openapi_schema = None            # FastAPI caches what make() built; the completed one is cached below
        info = served()
        for p in (info or {}).get("absent", ()):
            doc.get("paths", {}).pop(p, None)
        vocab = (info or {}).get("n_vocab")
        _token_ids(doc, vocab)
        for path, ops in doc.get("paths", {}).items():
            error = _OLLAMA_ERROR if is_ollama_path(path) else _OPENAI_ERROR
            for method, op in ops.items():
                if not isinstance(op, dict) or "responses" not in op:
                    continue
                res = op["responses"]
                res.pop("422", None)
                codes = [404, 405, 503]
                if method in ("post", "put", "delete"):
                    codes += [400, 413]
                if path not in public_paths:
                    codes.append(401)
                if path == "/health":
                    codes = [500, 503]
                for c in codes:
                    res.setdefault(str(c), {"description": _WHY[c],
                                            "content": {"application/json": {"schema": error}}})
                ok = res.get("200")
                if ok is not None and path in _STREAMS:
                    media = _STREAMS[path]
                    ok.setdefault("content", {})[media] = {
                        "schema": _SSE_EVENT if media == "text/event-stream" else {"type": "string"}}
                if ok is not None and path in _TEXT:
                    ok["content"] = {_TEXT[path]: {"schema": {"type": "string"}}}
        if info is not None:
            app.openapi_schema = doc
        return doc

    app.openapi = openapi
