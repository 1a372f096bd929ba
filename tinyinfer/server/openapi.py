"""The OpenAPI document as the server really answers: what FastAPI generates from the routes and the
request models, completed with what it cannot see.

* Every status an operation can answer: 400 for a bad body (the server turns pydantic's 422 into 400,
  as llama-server and ollama do), 401 without the API key (unless the path is public), 404, 405, 413
  for a body over the limit, 503 while loading, draining or with a full queue (``Retry-After``).
* The error bodies of each dialect: ollama's ``{"error": "..."}``, OpenAI's ``{"error": {"message",
  "type", "param", "code"}}``.
* The content types of streams (``text/event-stream`` for OpenAI's ``stream: true``,
  ``application/x-ndjson`` for ollama's) and of /metrics (Prometheus' text format).
"""

from __future__ import annotations

from typing import Callable

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


def install(app, public_paths, is_ollama_path: Callable[[str], bool]) -> None:
    """Make ``app.openapi()`` return the completed document (built once)."""
    make = app.openapi

    def openapi():
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = make()
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
                    ok.setdefault("content", {})[_STREAMS[path]] = {"schema": {"type": "string"}}
                if ok is not None and path in _TEXT:
                    ok["content"] = {_TEXT[path]: {"schema": {"type": "string"}}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
