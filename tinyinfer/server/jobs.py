"""Running a request's job on the slot pool: submit it, wait for its first item or all of them while
watching for the client leaving (a client that leaves cancels its job and frees its slot), and the
streamed responses (SSE for the OpenAI dialect, NDJSON for ollama's)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable, Iterator, List, Optional, Tuple

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .core import ApiError, ServerState, to_api_error
from .slots import END, Job, QueueFull, ShuttingDown


async def wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so receive() waits for that)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _race(request: Request, aw) -> Tuple[Any, bool]:
    """Await ``aw`` unless the client disconnects first: (result, disconnected)."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result(), False
    task.cancel()
    return None, True


def submit(request: Request, state: ServerState, fn: Callable[[Any, Job], Iterator[Any]]) -> Job:
    if state.status != "ok":
        if state.status == "loading":
            raise ApiError(503, "the model is still loading", "unavailable_error", headers={"Retry-After": "2"})
        raise ApiError(503, f"the model failed to load: {state.load_error}", "unavailable_error")
    try:
        return state.pool.submit(fn, asyncio.get_running_loop())
    except QueueFull as e:
        state.metrics.record_rejected()
        raise to_api_error(e) from None
    except ShuttingDown as e:
        raise to_api_error(e) from None


async def first_item(request: Request, job: Job) -> Tuple[Any, bool]:
    """Wait (in the queue, then through prompt processing) for the job's first item.

    An exception from the job is raised as an ApiError (so a prompt that does not fit is a
    400 before any byte of a stream is sent); a client that leaves cancels the job.
    """
    item, gone = await _race(request, job.next())
    if gone:
        job.cancel()
        return None, True
    if isinstance(item, BaseException):
        job.cancel()
        raise to_api_error(item)
    return item, False


async def run_to_end(request: Request, job: Job) -> Tuple[Optional[List[Any]], bool]:
    """All the job's items (non-streaming requests); (None, True) if the client left first."""
    async def drain():
        items = []
        while True:
            item = await job.next()
            if item is END:
                return items
            if isinstance(item, BaseException):
                raise to_api_error(item)
            items.append(item)

    try:
        items, gone = await _race(request, drain())
    finally:
        job.cancel()     # no-op when finished; frees the slot when the client left or we were cancelled
    return items, gone


def gone_response() -> Response:
    return Response(status_code=499)     # nobody reads it; nginx's "client closed request"


async def stream_items(job: Job, first: Any) -> AsyncIterator[Any]:
    """The job's items, first included; exceptions come out as ApiError items. Cancels on exit."""
    try:
        if first is not END:
            yield first
            while True:
                item = await job.next()
                if item is END:
                    break
                if isinstance(item, BaseException):
                    yield to_api_error(item)
                    break
                yield item
    finally:
        job.cancel()


def sse_response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def ndjson_response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def floats_json(v) -> str:
    """A float32 vector (or rows of them: pooling none) as JSON array text, each number with 9 significant
    digits (``%.9g``), enough for every float32 to read back exactly, written by one jitted pass
    (kernels/jsonfloats.py: ~15x cheaper than json's repr per float, which a short sentence's response
    spent most of its encoding time on); a whole number as json writes it ("1.0", "-0.0"); NaN / inf
    refused (ValueError) as JSONResponse does."""
    from ..kernels.jsonfloats import floats_json_bytes
    a = np.asarray(v, np.float32)
    if a.ndim > 1:
        return "[" + ",".join(floats_json(r) for r in a) + "]"
    return floats_json_bytes(a).decode("ascii")


def json_response(body: str) -> Response:
    """A response whose JSON text is already made (embeddings: :func:`floats_json` pieces)."""
    return Response(body.encode("utf-8"), media_type="application/json")
