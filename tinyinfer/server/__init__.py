"""``python -m tinyinfer serve``: an HTTP server speaking OpenAI's and ollama's APIs.

    python -m tinyinfer serve -m MODEL.gguf [--host 127.0.0.1] [--port 8080] [-c N] [-t N]
                              [--parallel N] [--max-queue N] [--api-key KEY] [--alias NAME]
    python -m tinyinfer serve [--models-dir DIR] [-m MODEL] [--keep-alive 5m] [--max-models 3]
                              [--max-memory 2G] [--sleep-idle-seconds S]

With ``-m`` alone: one model, loaded at start. Without ``-m``, or with ``--models-dir``: every GGUF of
DIR (by file stem) and every pulled store name (without either: also the default model, as
``smollm2``), loaded when a request names it (``models``).

Built on FastAPI + uvicorn (OpenAPI docs at /docs). Modules:

* ``app``        the application: common routes, errors, API key, request metrics
* ``openai_api`` /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings
* ``ollama_api`` /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version, /api/embed
* ``config``     ServerConfig
* ``core``       server state, errors, running a request's job and streaming its output
* ``slots``      engines, one worker thread per slot, the bounded queue
* ``models``     many models: load on demand, keep_alive, LRU eviction under --max-models / --max-memory
* ``metrics``    Prometheus text format (llama-server's metric names)
* ``schemas``    validated request bodies

Structured output (``response_format``, ``format``, ``grammar``) is constrained decoding by
:mod:`tinyinfer.grammar`, inside the same sampler chain as the CLI's and ``Llama``'s.

Every generation goes through :meth:`tinyinfer.engine.Engine.generate`, the loop the CLI and
the ``Llama`` class use, and the OpenAI chunks are built by the same functions as ``Llama``'s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ServerConfig

__all__ = ["main", "create_app", "ServerConfig", "build_parser"]


def create_app(*args, **kwargs):
    from .app import create_app as _create
    return _create(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from ..cli import _positive, add_model_args, add_spec_args, add_split_arg
    ap = argparse.ArgumentParser(
        prog="python -m tinyinfer serve",
        description="Serve a GGUF model over HTTP: OpenAI API (/v1/...), ollama API (/api/...), "
                    "/health, /metrics (Prometheus), docs at /docs.")
    add_model_args(ap)
    add_split_arg(ap)
    add_spec_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    ap.add_argument("--port", type=_positive("--port"), default=8080, help="port (default 8080)")
    ap.add_argument("-np", "--parallel", type=int, default=1,
                    help="slots: requests generated at the same time, decoded together in one batch, each "
                         "with its own sequence in the KV cache (default 1)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="a sequence's logits do not depend on the others decoded with it under --parallel "
                         "(KernelConfig.batch_invariant: one kernel and float order per row for any batch)")
    ap.add_argument("--context-shift", action="store_true",
                    help="when a generation fills a slot's context, drop its oldest tokens (after n_keep) and "
                         "go on (off by default, as in llama-server)")
    ap.add_argument("--keep", type=int, default=0,
                    help="default n_keep of a context shift (-1 = the whole prompt; BOS always kept)")
    ap.add_argument("--max-queue", type=_positive("--max-queue"), default=16,
                    help="requests that may wait for a slot; beyond that: 503 + Retry-After (default 16)")
    ap.add_argument("--api-key", default=os.environ.get("TINYINFER_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (or set TINYINFER_API_KEY)")
    ap.add_argument("-a", "--alias", default=None, help="model name shown to clients (default: the file name)")
    ap.add_argument("--chat-template", default=None,
                    help="built-in template instead of the file's: chatml, llama-2, llama-3, zephyr, gemma")
    ap.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="on SIGTERM, seconds in-flight requests get to finish (default 30)")
    ap.add_argument("--cors", action="store_true", help="allow cross-origin requests from browsers (any origin)")
    ap.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    mm = ap.add_argument_group("many models (ollama's scheduler, llama-server's router; tinyinfer/server/models.py)")
    mm.add_argument("--models-dir", default=None, metavar="DIR",
                    help="serve every GGUF file of DIR by its file stem (and the store's pulled models), each "
                         "loaded when a request names it; with -m, that model is preloaded. Without -m this "
                         "mode is on, serving the store's models")
    mm.add_argument("--keep-alive", default="5m",
                    help="how long an idle model stays loaded (ollama's keep_alive: 5m, 30s, 1h, 0 = unload when "
                         "idle, negative = forever; a request's keep_alive overrides it; default 5m)")
    mm.add_argument("--max-models", "--models-max", type=_positive("--max-models"), default=3,
                    help="models loaded at once; the least recently used idle one is unloaded to make room "
                         "(ollama's OLLAMA_MAX_LOADED_MODELS; default 3)")
    mm.add_argument("--max-memory", default=None, metavar="SIZE",
                    help="memory budget of the loaded models (4G, 1500M, bytes), each counted as inspect "
                         "estimates it: weights + KV cache of -c per slot + buffers (default: the memory "
                         "available at start)")
    mm.add_argument("--sleep-idle-seconds", type=float, default=None, metavar="S",
                    help="unload every model after S seconds without a request (llama-server's)")
    ray = ap.add_argument_group("replicas on Ray Serve (pip install 'tinyinfer[ray]'; tinyinfer/ray_serve.py)")
    ray.add_argument("--ray", action="store_true", help="serve N replicas of this server on Ray Serve, one endpoint")
    ray.add_argument("--replicas", type=_positive("--replicas"), default=1, help="with --ray: replicas (default 1)")
    ray.add_argument("--autoscale", metavar="MIN:MAX", default=None,
                     help="with --ray: autoscale between MIN and MAX replicas on ongoing requests")
    ray.add_argument("--ray-address", default=None, help="with --ray: join this Ray cluster instead of starting one")
    ap.add_argument("--no-access-log", action="store_true", help="don't log every request")
    emb = ap.add_argument_group("embeddings and reranking (tinyinfer/embedding.py)")
    emb.add_argument("--pooling", choices=("none", "mean", "cls", "last", "rank"), default=None,
                     help="pooling of /v1/embeddings and /api/embed (default: the model's)")
    emb.add_argument("--embedding", "--embeddings", action="store_true",
                     help="accepted for llama-server compatibility (embeddings are always served)")
    emb.add_argument("--rerank", "--reranking", action="store_true",
                     help="as llama-server: rank pooling (/v1/rerank works without it on a model with a rank head)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {a.parallel}")
    from ..cli import spec_wanted
    spec = spec_wanted(a)
    if spec is not None and a.ray:
        raise ValueError("speculative decoding (-md / --spec-type) is not served with --ray: drop one of them")
    if a.chat_template:
        from ..chat import BUILTIN
        if a.chat_template not in BUILTIN and a.chat_template not in ("auto", "gguf"):
            raise ValueError(f"unknown --chat-template {a.chat_template!r}; known: {', '.join(BUILTIN)}")
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ImportError:
        raise RuntimeError("the server needs fastapi and uvicorn: pip install 'tinyinfer[server]'") from None
    from ..cli import resolve_model
    from ..store import is_store_name
    multi = a.models_dir is not None or not a.model
    path = None
    if a.model:
        path = str(resolve_model(a.model))
        if a.alias is None and is_store_name(a.model):
            a.alias = a.model                    # serve -m qwen2.5-coder:0.5b answers as that name
        if not os.path.isfile(path):
            raise ValueError(f"model file not found: {path}")
    default_model = None
    if not a.model and a.models_dir is None:
        default_model = str(resolve_model(None))    # served as "smollm2" beside the store's models
    if a.models_dir is not None and not os.path.isdir(a.models_dir):
        raise ValueError(f"--models-dir: not a folder: {a.models_dir}")
    from .models import parse_duration, parse_size
    from .core import ApiError
    try:
        keep_alive = parse_duration(a.keep_alive, "--keep-alive")
    except ApiError as e:
        raise ValueError(e.message) from None
    max_memory = parse_size(a.max_memory) if a.max_memory is not None else None
    if multi and (a.ray or a.split > 1):
        raise ValueError("--ray and --split serve one model: give -m without --models-dir")
    if multi and spec is not None:
        raise ValueError("speculative decoding (-md / --spec-type) serves one model: give -m without --models-dir")
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", stream=sys.stderr)
    if a.ray:
        if a.split > 1 or a.cors:
            raise ValueError("--ray runs whole-model replicas: --split and --cors are not supported with it")
        from ..ray_serve import RayServeOptions, run
        opts = RayServeOptions.from_args(dict(model=path, alias=a.alias, ctx_size=a.ctx_size, batch_size=a.batch_size,
                                              threads=a.threads or 1, parallel=a.parallel, max_queue=a.max_queue,
                                              api_key=a.api_key or None, chat_template=a.chat_template,
                                              replicas=a.replicas, autoscale=a.autoscale))
        return run(opts, host=a.host, port=a.port, address=a.ray_address)
    config = ServerConfig(model_path=path, alias=a.alias, n_ctx=a.ctx_size, n_batch=a.batch_size,
                          n_threads=a.threads, parallel=a.parallel, max_queue=a.max_queue, api_key=a.api_key or None,
                          chat_template=a.chat_template, host=a.host, port=a.port,
                          shutdown_timeout=a.shutdown_timeout, cors=a.cors, split=a.split,
                          cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v,
                          context_shift=a.context_shift, n_keep=a.keep,
                          pooling="rank" if a.rerank else a.pooling, batch_invariant=a.batch_invariant,
                          speculative=spec, multi=multi, models_dir=a.models_dir,
                          keep_alive=keep_alive, max_models=a.max_models, max_memory=max_memory,
                          sleep_idle_seconds=a.sleep_idle_seconds, default_model=default_model)
    return serve(config, log_level=a.log_level, access_log=not a.no_access_log)


def serve(config: ServerConfig, log_level: str = "info", access_log: bool = True, engine_factory=None) -> int:
    """Run the server until SIGTERM / SIGINT; 1 if the model could not be loaded."""
    import uvicorn
    from .app import create_app as _create

    app = _create(config, engine_factory)
    state = app.state.tinyinfer           # the model in one-model mode, else None
    mgr = app.state.models

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # SIGTERM: stop taking jobs (waiting ones are told 503), let running ones finish
            # within --shutdown-timeout, then uvicorn closes the connections
            mgr.drain()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                   access_log=access_log, timeout_graceful_shutdown=config.shutdown_timeout,
                                   lifespan="on"))

    def fatal():
        server.should_exit = True

    if state is not None:
        state.on_fatal = fatal
    server.run()
    if state is not None and state.load_error:
        print(f"error: could not load the model: {state.load_error}", file=sys.stderr)
        return 1
    return 0
