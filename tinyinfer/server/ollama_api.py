"""The ollama dialect: /api/generate, /api/chat (NDJSON streams), /api/tags, /api/show, /api/ps,
/api/version, /api/embed, /api/embeddings.

Final objects carry ``done``, ``done_reason``, ``total_duration``, ``load_duration``,
``prompt_eval_count``, ``prompt_eval_duration``, ``eval_count`` and ``eval_duration`` in
nanoseconds, as ollama reports them: ``load_duration`` is the time from arrival until a slot
took the request (ollama's "schedule the runner"), ``prompt_eval_*`` count the prompt tokens
actually evaluated (not those reused from the KV cache), ``eval_duration`` runs from the end of
prompt processing to the last token.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import List, Optional

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from ..completions import GenStats, completion_chunks, prepare_chat
from ..chat import chat_prompt_ids
from ..grammar import grammar_for_ollama_format
from .models import manager, parse_duration
from .core import ApiError, ServerState, check_prompt, encode_prompt, gen_options
from .jobs import (dumps, first_item, floats_json, gone_response, json_response, ndjson_response, run_to_end,
                   stream_items, submit)
from ..toolcall import ToolStream
from .openai_api import request_grammar, request_tools, run_embedding
from .schemas import (OllamaChatRequest, OllamaEmbeddingsRequest, OllamaEmbedRequest, OllamaGenerateRequest,
                      OllamaOptions, OllamaShowRequest)

router = APIRouter(tags=["ollama"])

#: the level of ollama's REST API this server speaks (clients compare versions for features)
OLLAMA_API_VERSION = "0.9.0"


async def _state(request: Request, name: Optional[str], keep_alive=None) -> ServerState:
    """The model ``name``'s state, loaded on demand (tinyinfer/server/models.py)."""
    return await manager(request).get(name, "ollama", _duration_s(keep_alive), request=request)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return max(0, int(round(seconds * 1e9)))


def _options(opts: Optional[OllamaOptions], n_vocab: Optional[int] = None, **given):
    """ollama's options (ollama's defaults: tinyinfer/options.py) -> GenOptions."""
    return gen_options("ollama", opts, n_vocab, **given)


def _final(job, t_arrival: float) -> dict:
    st: GenStats = job.stats or GenStats()
    now = time.perf_counter()
    start = job.t_start if job.t_start is not None else now
    cut = {"truncated": True} if st.truncated else {}     # JSON closed early to fit num_predict
    return {**cut, "done": True, "done_reason": st.finish_reason or "stop",
            "total_duration": _ns(now - t_arrival), "load_duration": _ns(start - t_arrival),
            "prompt_eval_count": st.prompt_evaluated, "prompt_eval_duration": _ns(st.prompt_s),
            "eval_count": st.completion_tokens, "eval_duration": _ns(st.gen_s)}


def _generate_work(state: ServerState, options: Optional[OllamaOptions], fmt, build_ids):
    """A job: texts of the steps of one generation (its GenStats on the job)."""
    grammar = request_grammar(lambda: grammar_for_ollama_format(fmt), "format")
    _options(options)          # a bad value: 400 before the request is queued

    def work(engine, job):
        tok = engine.tokenizer
        ids = build_ids(tok)
        check_prompt(ids, engine.n_ctx, tok.n_vocab)
        opts = _options(options, tok.n_vocab, grammar=grammar)
        job.prompt_ids = ids
        job.stats = GenStats(prompt_tokens=len(ids))
        if opts.max_tokens == 0:
            job.stats.finish_reason = "length"
            return
        for c in completion_chunks(engine, ids, opts, stats=job.stats):
            yield c["choices"][0]["text"]
    return work


def _duration_s(v) -> Optional[float]:
    """ollama's keep_alive: a number of seconds or a Go duration string ("5m", "0s", "1h30m")."""
    return parse_duration(v)


async def _model(request: Request, req) -> ServerState:
    if not req.model:
        raise ApiError(400, "model is required", param="model")      # ollama's answer
    # (options.num_ctx: one context size per server (-c); a request cannot change it)
    return await _state(request, req.model, req.keep_alive)


async def _load_or_unload(request: Request, req) -> str:
    """An empty request loads (preloads) the model ("load"); with keep_alive 0 it unloads it once idle
    ("unload"), as ollama answers. One-model mode keeps its model loaded either way."""
    mgr = manager(request)
    if not req.model:
        raise ApiError(400, "model is required", param="model")
    if _duration_s(req.keep_alive) == 0:
        if not mgr.multi:
            mgr.default.check_ollama_model(req.model)
        elif mgr.lookup(req.model) is None:
            raise mgr.not_found(req.model)
        mgr.request_unload(req.model)
        return "unload"
    state = await _model(request, req)
    if state.status != "ok":
        submit(request, state, None)        # raises the right 503
    return "load"


async def _run(request: Request, state: ServerState, work, stream: bool, t_arrival: float, shape, finish):
    """Run ``work``; ``shape(text)`` makes one streamed object, ``finish(job, text)`` the last one."""
    job = submit(request, state, work)
    if not stream:
        items, gone = await run_to_end(request, job)
        if gone:
            return gone_response()
        return JSONResponse(finish(job, "".join(items)))
    first, gone = await first_item(request, job)
    if gone:
        return gone_response()

    async def body():
        async for item in stream_items(job, first):
            if isinstance(item, ApiError):
                yield dumps({"error": item.message}) + "\n"
                return
            obj = shape(item) if item else None
            if obj is not None:
                yield dumps(obj) + "\n"
        yield dumps(finish(job, "")) + "\n"

    return ndjson_response(body())


@router.post("/api/generate", summary="Generate (ollama)")
async def generate(req: OllamaGenerateRequest, request: Request):
    t_arrival = time.perf_counter()
    model = req.model                         # the name asked for, as ollama echoes it
    if req.images:
        raise ApiError(400, "images are not supported: this is a text-only model", param="images")
    if req.suffix:
        raise ApiError(400, "suffix (fill-in-the-middle) is not supported by this server", param="suffix")
    if req.template:
        raise ApiError(400, "template overrides (Go templates) are not supported: use raw=true with a formatted "
                            "prompt, or the model's own chat template", param="template")
    if not req.prompt and not req.context:
        reason = await _load_or_unload(request, req)
        return {"model": model, "created_at": _now(), "response": "", "done": True, "done_reason": reason}
    state = await _model(request, req)
    state.precheck_text(req.prompt, req.system)

    def build_ids(tok):
        prompt = req.prompt or ""
        if req.raw:
            ids = encode_prompt(tok, prompt) if prompt else []
        else:
            msgs = ([{"role": "system", "content": req.system}] if req.system else []) + \
                   [{"role": "user", "content": prompt}]
            ids = chat_prompt_ids(state.formatter, tok, msgs)
        if req.context:
            if ids and tok.bos_id is not None and ids[0] == tok.bos_id:
                ids = ids[1:]
            ids = [int(t) for t in req.context] + ids
        return ids

    work = _generate_work(state, req.options, req.format, build_ids)

    def shape(text):
        return {"model": model, "created_at": _now(), "response": text, "done": False}

    def finish(job, text):
        out = {"model": model, "created_at": _now(), "response": text, **_final(job, t_arrival)}
        if job.stats is not None:
            out["context"] = list(getattr(job, "prompt_ids", [])) + list(job.stats.token_ids)
        return out

    return await _run(request, state, work, req.stream, t_arrival, shape, finish)


@router.post("/api/chat", summary="Chat (ollama)")
async def chat(req: OllamaChatRequest, request: Request):
    t_arrival = time.perf_counter()
    model = req.model                         # the name asked for, as ollama echoes it
    if not req.messages:
        reason = await _load_or_unload(request, req)
        return {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": reason}
    state = await _model(request, req)
    state.precheck_text(*(m.content for m in req.messages))
    if any(m.images for m in req.messages):
        raise ApiError(400, "images are not supported: this is a text-only model", param="messages")
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    toolset = request_tools(req.tools, None, state.formatter, messages)
    held = ToolStream(toolset) if toolset.active else None     # a streamed reply that may be a call

    def build_ids(tok):
        return prepare_chat(state.formatter, tok, messages, toolset=toolset)[0]

    work = _generate_work(state, req.options, req.format, build_ids)

    def shape(text):
        if held is not None:
            text = held.feed(text)
            if not text:
                return None
        return {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": text},
                "done": False}

    def finish(job, text):
        message = {"role": "assistant", "content": text}
        if held is not None:
            content, calls = toolset.parse(text) if text else held.finish()
            message["content"] = content
            if calls:     # ollama's shape: arguments as an object
                message["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                                       "arguments": json.loads(c["function"]["arguments"])}}
                                         for c in calls]
        return {"model": model, "created_at": _now(), "message": message, **_final(job, t_arrival)}

    return await _run(request, state, work, req.stream, t_arrival, shape, finish)


async def _embed(request: Request, state: ServerState, inputs: List[str], truncate: bool = True):
    def prepare(engine):
        tok = engine.tokenizer
        seqs = [tok.encode(x, add_bos=tok.add_bos, special=False) for x in inputs]
        if not truncate:
            for ids in seqs:
                check_prompt(ids, engine.n_ctx + 1, tok.n_vocab)
        return seqs

    return await run_embedding(request, state, prepare, ("ollama", state.config.pooling, truncate), truncate)


@router.post("/api/embed", summary="Embeddings (ollama)")
async def embed(req: OllamaEmbedRequest, request: Request):
    t_arrival = time.perf_counter()
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    if not inputs:
        raise ApiError(400, "input is empty", param="input")
    state = await _state(request, req.model, req.keep_alive)
    state.precheck_text(*inputs)
    n, vecs, t_start, gone = await _embed(request, state, inputs, req.truncate)
    if gone:
        return gone_response()
    rest = dumps({"total_duration": _ns(time.perf_counter() - t_arrival),
                  "load_duration": _ns((t_start or t_arrival) - t_arrival),
                  "prompt_eval_count": n})
    # the JSON text made here: no jsonable_encoder walk, no json repr per float (jobs.floats_json)
    return json_response('{"model":%s,"embeddings":[%s],%s' % (dumps(req.model or state.model_name),
                                                               ",".join(map(floats_json, vecs)), rest[1:]))


@router.post("/api/embeddings", summary="Embedding of one prompt (ollama, legacy)")
async def embeddings(req: OllamaEmbeddingsRequest, request: Request):
    state = await _state(request, req.model, getattr(req, "keep_alive", None))
    state.precheck_text(req.prompt)
    _, vecs, _, gone = await _embed(request, state, [req.prompt])
    if gone:
        return gone_response()
    return json_response('{"embedding":%s}' % floats_json(vecs[0]))


def _tag(state: ServerState) -> dict:
    return {"name": state.model_name, "model": state.model_name, "modified_at": _iso(state.file_mtime),
            "size": state.file_size, "digest": state.digest(), "details": state.model_details()}


def _entry_tag(mgr, e) -> dict:
    """A servable model not necessarily loaded: what its file says (store.details)."""
    import hashlib
    st = mgr.states.get(e.name)
    if st is not None and st.status == "ok":
        return _tag(st)
    try:
        fs = os.stat(e.path)
        size, mtime = fs.st_size, fs.st_mtime
    except OSError:
        size, mtime = 0, 0.0
    digest = hashlib.sha256(f"{os.path.abspath(e.path)}:{size}:{mtime}".encode()).hexdigest()
    return {"name": e.name, "model": e.name, "modified_at": _iso(mtime), "size": size, "digest": digest,
            "details": e.details()}


@router.get("/api/tags", summary="Local models (ollama): every model this server can serve")
async def tags(request: Request):
    mgr = manager(request)
    from .store_api import store_tags
    state = mgr.default
    if not mgr.multi:
        served = [_tag(state)] if state.status == "ok" else []
        return {"models": served + [t for t in store_tags() if t["name"] != state.model_name]}
    return {"models": [_entry_tag(mgr, e) for e in mgr.entries()]}


@router.get("/api/ps", summary="Loaded models (ollama), with size, expires_at and context_length")
async def ps(request: Request):
    mgr = manager(request)
    out = []
    for state in (mgr.loaded() if mgr.multi else [mgr.default]):
        if state.status != "ok":
            continue
        exp = mgr.expires_at(state) if mgr.multi else None
        size = state.estimate or state.file_size
        t = {**_tag(state), "size": size, "expires_at": _iso(exp) if exp is not None else "2999-12-31T23:59:59Z",
             "size_vram": 0, "context_length": state.n_ctx}
        t.pop("modified_at")
        out.append(t)
    return {"models": out}


@router.get("/api/version", summary="API version (ollama)")
async def version():
    from .. import __version__ as tv
    return {"version": OLLAMA_API_VERSION, "tinyinfer": tv}


@router.post("/api/show", summary="Model details (ollama)")
async def show(req: OllamaShowRequest, request: Request):
    name = req.model or req.name
    if not name:
        raise ApiError(400, "model is required", param="model")
    mgr = manager(request)
    if not mgr.multi and name not in mgr.default.model_names():
        raise ApiError(404, f"model '{name}' not found", "not_found_error", code="model_not_found")
    if mgr.multi:       # the loaded model, or the file's metadata, tokenizer and template: nothing loaded
        return await mgr.describe(name, lambda state: _show(state, req.verbose))
    state = await _state(request, name)
    if state.status != "ok":
        submit(request, state, None)
    return _show(state, req.verbose)


def _show(state: ServerState, verbose) -> dict:
    md = state.metadata
    info = {}
    for k, v in md.items():
        if isinstance(v, (str, int, float, bool)):
            if k == "tokenizer.chat_template":
                continue
            info[k] = v
        elif verbose and isinstance(v, (list, tuple)) and len(v) <= 64:
            info[k] = list(v)
        else:
            info[k] = None
    fmt = state.formatter
    params = "\n".join(f"stop {s!r}" for s in _stop_tokens(state))
    return {"license": str(md.get("general.license", "")), "modelfile": f"# tinyinfer\nFROM {state.config.model_path}\n",
            "parameters": params, "template": fmt.source if fmt is not None else "",
            "details": state.model_details(), "model_info": info, "capabilities": state.capabilities(),
            "modified_at": _iso(state.file_mtime)}


def _stop_tokens(state: ServerState) -> List[str]:
    tok = state.tokenizer
    if tok is None or not hasattr(tok, "eog_ids"):
        return []
    return [tok.token_text(t) for t in sorted(tok.eog_ids)]
