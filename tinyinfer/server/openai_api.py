"""The OpenAI dialect: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from typing import Any, List

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from ..completions import (GenStats, chat_chunks, completion_chunks, merge_chat, merge_completion, prepare_chat,
                           tool_chat_chunks)
from ..grammar import grammar_for_response_format
from .core import ApiError, ServerState, check_prompt, encode_prompt, gen_options, to_api_error
from .jobs import (_race, dumps, first_item, floats_json, gone_response, json_response, run_to_end, sse_response,
                   stream_items, submit)
from .models import manager
from .slots import END
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, RouterModelRequest

router = APIRouter(tags=["OpenAI"])


async def _state(request: Request, name) -> ServerState:
    """The model ``name``'s state, loaded on demand (one-model mode: the model, whatever the name)."""
    return await manager(request).get(name, "openai", request=request)


def _model_entry(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": int(state.file_mtime), "owned_by": "tinyinfer",
            "meta": {"n_ctx": state.n_ctx, "size": state.file_size,
                     "n_vocab": state.tokenizer.n_vocab if state.tokenizer is not None else None,
                     "chat_template": state.formatter.name if state.formatter is not None else None,
                     "path": state.config.model_path}}


def _entry(mgr, e) -> dict:
    """A servable model with llama-server's router ``status``: loaded, loading or unloaded (+ failed)."""
    st = mgr.states.get(e.name)
    if st is not None and st.status == "ok":
        return {**_model_entry(st), "status": {"value": "loaded"}}
    try:
        created = int(os.path.getmtime(e.path))
    except OSError:
        created = 0
    status = {"value": "loading" if st is not None else "unloaded"}
    if st is None and e.failed is not None:
        status.update(failed=True, error=e.failed[1])
    return {"id": e.name, "object": "model", "created": created, "owned_by": "tinyinfer",
            "status": status, "meta": {"path": e.path}}


@router.get("/v1/models", summary="The models this server can serve")
async def list_models(request: Request):
    mgr = manager(request)
    if not mgr.multi:
        return {"object": "list", "data": [_model_entry(mgr.default)]}
    return {"object": "list", "data": [_entry(mgr, e) for e in mgr.entries()]}


@router.get("/models", summary="The models this server can serve (llama-server's router)")
async def router_models(request: Request):
    return await list_models(request)


@router.post("/models/load", summary="Load a model now (llama-server's router)")
async def router_load(req: RouterModelRequest, request: Request):
    mgr = manager(request)
    st = await mgr.get(req.model, "ollama" if not mgr.multi else "openai", request=request)
    if st.status != "ok":
        submit(request, st, None)              # one-model mode still loading: the right 503
    return {"success": True}


@router.post("/models/unload", summary="Unload a model once it serves nothing (llama-server's router)")
async def router_unload(req: RouterModelRequest, request: Request):
    mgr = manager(request)
    if not mgr.multi:          # llama-server registers the router's routes in router mode only: 404 without one
        raise ApiError(404, "not found: POST /models/unload (this server serves one model, -m; start it with "
                            "--models-dir to load and unload models)", "not_found_error")
    if mgr.lookup(req.model) is None:
        raise mgr.not_found(req.model)
    mgr.request_unload(req.model)
    return {"success": True}


@router.get("/v1/models/{model_id:path}", summary="One model")
async def get_model(model_id: str, request: Request):
    mgr = manager(request)
    if mgr.multi:
        e = mgr.lookup(model_id)
        if e is None:
            raise mgr.not_found(model_id)
        return _entry(mgr, e)
    state = mgr.default
    if model_id not in (state.model_name, state.config.model_path):
        raise ApiError(404, f"model {model_id!r} not found; this server serves {state.model_name!r}",
                       code="model_not_found")
    return _model_entry(state)


async def _respond(request: Request, state: ServerState, fn, stream: bool, include_usage: bool, merge):
    job = submit(request, state, fn)
    if not stream:
        items, gone = await run_to_end(request, job)
        if gone:
            return gone_response()
        return JSONResponse({**merge(items, job.stats.usage(details=True)), "timings": job.stats.timings()})
    first, gone = await first_item(request, job)
    if gone:
        return gone_response()

    async def body():
        last = None
        async for item in stream_items(job, first):
            if isinstance(item, ApiError):
                yield f"data: {dumps({'error': {'message': item.message, 'type': item.type, 'code': item.code}})}\n\n"
                return
            last = item
            if any(c.get("finish_reason") for c in item.get("choices", ())):
                item = {**item, "timings": job.stats.timings()}        # llama-server's, on the last chunk
            yield f"data: {dumps(item)}\n\n"
        if include_usage and last is not None:
            usage = job.stats.usage(details=True)
            yield f"data: {dumps({**{k: last[k] for k in ('id', 'object', 'created', 'model')}, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return sse_response(body())


def request_grammar(make, param: str):
    """Build a request's grammar before it is queued: a bad grammar or schema is a 400 naming it."""
    from ..grammar import GrammarError
    try:
        return make()
    except GrammarError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None


@router.post("/v1/completions", summary="Text completion (llama-cpp-python's fields and defaults)")
async def completions(req: CompletionRequest, request: Request):
    state = await _state(request, req.model)
    name = state.model_name
    cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
    if isinstance(req.prompt, list) and isinstance(req.prompt[0], str):
        req.prompt = req.prompt[0]            # OpenAI's list of prompts: one per request here
    state.precheck_text(req.prompt)

    grammar = request_grammar(lambda: _completion_grammar(req), "grammar" if req.grammar else
                              "json_schema" if req.json_schema is not None else "response_format")
    fields = req.model_dump(exclude_unset=True)
    gen_options("openai", fields)     # a bad value: 400 before the request is queued

    def work(engine, job):
        tok = engine.tokenizer
        if isinstance(req.prompt, list):
            ids = [int(t) for t in req.prompt]
            text = tok.decode(ids) if req.echo else None
        else:
            ids = encode_prompt(tok, req.prompt)
            text = req.prompt
        check_prompt(ids, engine.n_ctx, tok.n_vocab)
        opts = gen_options("openai", fields, tok.n_vocab, grammar=grammar)
        job.stats = GenStats()
        yield from completion_chunks(engine, ids, opts, model=name, echo_text=text if req.echo else None,
                                     suffix=req.suffix, stats=job.stats, cid=cid, created=created)

    include = bool(req.stream_options and req.stream_options.include_usage)
    return await _respond(request, state, work, req.stream, include, merge_completion)


@router.post("/v1/chat/completions", summary="Chat completion with the model's chat template")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = await _state(request, req.model)
    name = state.model_name
    cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    state.precheck_text(*(p.text if hasattr(p, "text") else p for m in req.messages
                          for p in ([m.content] if isinstance(m.content, str) else (m.content or []))))
    grammar = request_grammar(lambda: grammar_for_response_format(req.response_format), "response_format")
    toolset = request_tools(req.tools, req.tool_choice, state.formatter, messages)
    fields = req.model_dump(exclude_unset=True)
    if fields.get("max_completion_tokens") is not None:     # the newer name wins
        fields.pop("max_tokens", None)
    else:
        fields.pop("max_completion_tokens", None)
    gen_options("openai_chat", fields)

    def work(engine, job):
        tok = engine.tokenizer
        ids, g, _ = prepare_chat(state.formatter, tok, messages, response_format=grammar, toolset=toolset)
        check_prompt(ids, engine.n_ctx, tok.n_vocab)
        opts = gen_options("openai_chat", fields, tok.n_vocab, grammar=g)
        job.stats = GenStats()
        yield from tool_chat_chunks(chat_chunks(completion_chunks(
            engine, ids, opts, model=name, stats=job.stats, cid=cid, created=created)), toolset)

    include = bool(req.stream_options and req.stream_options.include_usage)
    return await _respond(request, state, work, req.stream, include, merge_chat)


def request_tools(tools, tool_choice, formatter, messages):
    """Check a request's tools / tool_choice / tool messages before it is queued (400 naming the field)."""
    from ..toolcall import ToolError, ToolSet
    plain = getattr(tool_choice, "model_dump", None)
    tool_choice = plain(exclude_none=True) if plain else tool_choice
    tools = None if tools is None else [t.model_dump(exclude_none=True) if hasattr(t, "model_dump") else t
                                        for t in tools]
    try:
        ts = ToolSet(tools, tool_choice, getattr(formatter, "source", "") if formatter is not None else "")
        ts.messages(messages)
        ts.call_grammar()
    except ToolError as e:
        msg = str(e)
        param = "tool_choice" if msg.startswith("tool_choice") else "messages" if msg.startswith("tool call") \
            else "tools"
        raise ApiError(400, msg, param=param) from None
    return ts


def _completion_grammar(req):
    """llama-server's /completion fields: ``grammar`` (GBNF), ``json_schema``, or ``response_format``."""
    from ..grammar import Grammar
    if req.grammar:
        return Grammar.from_string(req.grammar)
    if req.json_schema is not None:
        return Grammar.from_json_schema(req.json_schema)
    return grammar_for_response_format(req.response_format)


def embed_coalescer(state: ServerState):
    """The model's :class:`~tinyinfer.embedding.Coalescer` (concurrent embedding requests in one pass)."""
    co = getattr(state, "embed_coalescer", None)
    if co is None:
        from ..embedding import Coalescer
        co = state.embed_coalescer = Coalescer()
    return co


_watchers: set = set()       # the tasks watching queued pass jobs (a task nobody references may be collected)


async def run_embedding(request: Request, state: ServerState, prepare, key, truncate: bool = False):
    """Embed a request's inputs on the slot pool: ``prepare(engine)`` -> token sequences (run on the slot's
    thread), evaluated with the inputs of the requests waiting with it in packed passes
    (tinyinfer/embedding.py's Coalescer). A request queues a job only if none of its key is queued
    (``claim``): that job serves every request waiting when it runs, and each learns that its vectors
    are there from the model's thread (``notify``), a whole pass at once. Returns (tokens, vectors, when
    its pass started (perf_counter), gone): ``gone`` when the client left first."""
    from ..embedding import embed
    co = embed_coalescer(state)
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    mine = co.add(prepare, key, notify=lambda: loop.call_soon_threadsafe(_settle, ready))
    if co.claim(key):
        def work(engine, job):
            t0 = time.perf_counter()
            served = co.serve(engine, key, lambda e, seqs: embed(e, seqs, pooling=state.config.pooling,
                                                                 truncate=truncate))
            job.stats = {"embed_tokens": sum(min(len(s), engine.n_ctx) for x in served if x.vecs is not None
                                             for s in x.seqs), "embed_s": time.perf_counter() - t0}
            return
            yield

        try:
            job = submit(request, state, work)
        except BaseException:               # (queue full, shutting down: nothing else saw the claim)
            co.discard(mine)
            co.release(key)
            raise
        w = asyncio.ensure_future(_watch(job, co, key))
        _watchers.add(w)
        w.add_done_callback(_watchers.discard)
    try:
        _, gone = await _race(request, ready)
    finally:
        co.discard(mine)                    # still waiting: its client left
    if gone:
        return 0, None, None, True
    if mine.error is not None:
        raise to_api_error(mine.error)
    return sum(min(len(s), state.n_ctx) for s in mine.seqs), mine.vecs, mine.t_start, False


def _settle(fut) -> None:
    if not fut.done():
        fut.set_result(None)


async def _watch(job, co, key) -> None:
    """Until a pass job ends: if it fails without running (queue full, shutting down), the requests that
    waited for it get its error."""
    while True:
        item = await job.next()
        if item is END:
            return
        if isinstance(item, BaseException):
            co.fail_waiting(key, item)
            return


@router.post("/v1/embeddings", summary="Embeddings (pooled as the model says, L2-normalized)")
async def embeddings(req: EmbeddingRequest, request: Request):
    state = await _state(request, req.model)
    inputs: List[Any] = [req.input] if isinstance(req.input, str) else list(req.input)
    if inputs and isinstance(inputs[0], int):
        inputs = [inputs]
    if not inputs:
        raise ApiError(400, "input is empty", param="input")
    state.precheck_text(*inputs)

    def prepare(engine):
        tok = engine.tokenizer
        seqs = []
        for x in inputs:
            ids = [int(t) for t in x] if isinstance(x, list) else tok.encode(x, add_bos=tok.add_bos, special=False)
            check_prompt(ids, engine.n_ctx + 1, tok.n_vocab)
            seqs.append(ids)
        return seqs

    n, vecs, _, gone = await run_embedding(request, state, prepare, ("openai", state.config.pooling))
    if gone:
        return gone_response()
    b64 = req.encoding_format == "base64"
    data = ",".join('{"object":"embedding","embedding":%s,"index":%d}'
                    % ('"' + base64.b64encode(np.asarray(v, "<f4").tobytes()).decode() + '"' if b64
                       else floats_json(v), i) for i, v in enumerate(vecs))
    # the JSON text made here: thousands of floats skip FastAPI's jsonable_encoder walk and json's repr
    return json_response('{"object":"list","data":[%s],"model":%s,"usage":{"prompt_tokens":%d,"total_tokens":%d}}'
                         % (data, dumps(state.model_name), n, n))
