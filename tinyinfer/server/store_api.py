"""ollama's model-management endpoints over the local store (tinyinfer/store.py).

* ``POST /api/pull``   ``{"model": "qwen2.5-coder:0.5b", "stream": true}``: NDJSON progress lines
  as ollama sends them (``{"status": "pulling manifest"}``, ``{"status": "downloading ...",
  "digest": "sha256:...", "total": N, "completed": M}``, ..., ``{"status": "success"}``); an
  error is a last line ``{"error": "..."}``. ``stream: false``: one ``{"status": "success"}``.
* ``DELETE /api/delete`` ``{"model": NAME}``: removes a pulled name (not the one being served).

``/api/tags`` (in ollama_api) lists the served model and every pulled name. The server keeps
serving the model it was started with; a pulled model is for ``serve -m NAME`` or the CLI.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse, Response

from .. import store
from .core import ApiError
from .jobs import dumps, ndjson_response

router = APIRouter(tags=["ollama"])


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    name: Optional[str] = None        # ollama's older field
    stream: bool = True
    insecure: bool = False


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    name: Optional[str] = None


def _name(req) -> str:
    name = (req.model or req.name or "").strip()
    if not name:
        raise ApiError(400, "model is required", param="model")
    try:
        store.parse_name(name)
    except store.StoreError as e:
        raise ApiError(404 if "unknown" in str(e) else 400, str(e), param="model") from None
    return name


def store_tags() -> list:
    """ollama's /api/tags entries for every pulled name."""
    out = []
    for m in store.installed():
        out.append({"name": m["name"], "model": m["name"], "modified_at": m["modified_at"], "size": m["size"],
                    "digest": m["sha256"], "details": m.get("details") or {"format": "gguf"}})
    return out


@router.post("/api/pull", summary="Pull a model into the local store (ollama)")
async def pull(req: PullRequest, request: Request):
    name = _name(req)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    digest = {}

    def progress(status, completed, total):
        line = {"status": status}
        if total and status.startswith(("downloading", "downloaded")):
            line = {"status": status, "digest": digest.get("d", ""), "total": int(total), "completed": int(completed)}
        loop.call_soon_threadsafe(queue.put_nowait, line)

    def work():
        try:
            m = store.pull(name, progress)
            loop.call_soon_threadsafe(queue.put_nowait, {"_done": m})
        except Exception as e:  # noqa: BLE001 - becomes the stream's error line
            loop.call_soon_threadsafe(queue.put_nowait, {"_error": str(e)})

    threading.Thread(target=work, name="tinyinfer-pull", daemon=True).start()

    if not req.stream:
        while True:
            item = await queue.get()
            if "_error" in item:
                raise ApiError(500, item["_error"])
            if "_done" in item:
                return {"status": "success"}

    async def body():
        while True:
            item = await queue.get()
            if "_error" in item:
                yield (dumps({"error": item["_error"]}) + "\n").encode()
                return
            if "_done" in item:
                return                       # pull() reported "success" already
            yield (dumps(item) + "\n").encode()
    return ndjson_response(body())


@router.delete("/api/delete", summary="Remove a pulled model (ollama)")
async def delete(req: DeleteRequest, request: Request):
    name = _name(req)
    from .models import manager
    mgr = manager(request)
    model, tag = store.parse_name(name)
    m = store._read_manifest(model, tag)
    if m is None:
        return JSONResponse({"error": f"model '{name}' not found"}, status_code=404)
    for state in list(mgr.states.values()):
        if os.path.abspath(m["file"]) == os.path.abspath(state.config.model_path):
            if not mgr.multi or mgr.busy(state):
                raise ApiError(400, f"model '{name}' is the one this server is serving")
            await mgr.unload(state, why="deleted")
    store.remove(name)
    return Response(status_code=200)
