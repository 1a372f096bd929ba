"""What both dialects share: server state, errors, prompt checks and options (running a request's job
and streaming: jobs.py)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from starlette.responses import JSONResponse

from ..toolcall import template_caps
from .config import ServerConfig
from .metrics import Metrics
from .slots import Job, QueueFull, ShuttingDown, SlotPool

log = logging.getLogger("tinyinfer.server")


class ApiError(Exception):
    """An error answered to the client, in the OpenAI or ollama shape by path."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_body(path: str, status: int, message: str, type_: str = "invalid_request_error",
               param: Optional[str] = None, code: Optional[str] = None) -> dict:
    if is_ollama_path(path):
        return {"error": message}
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(path: str, e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(path, e.status, e.message, e.type, e.param, e.code), status_code=e.status,
                        headers=e.headers)


def to_api_error(e: BaseException) -> ApiError:
    """Exceptions raised while running a job -> what the client is told."""
    from ..chat import ChatTemplateError
    if isinstance(e, ApiError):
        return e
    name = type(e).__name__
    if name == "ContextError":
        return ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, ChatTemplateError):
        return ApiError(400, str(e), code="chat_template_error")
    if isinstance(e, QueueFull):
        return ApiError(503, str(e), "server_busy", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, ShuttingDown):
        return ApiError(503, str(e), "unavailable_error", headers={"Retry-After": "5"})
    if isinstance(e, (ValueError, TypeError)):    # bad parameter values found by the sampler, tokenizer ...
        return ApiError(400, str(e))
    log.exception("internal error", exc_info=e)
    return ApiError(500, f"internal error: {name}: {e}", "server_error")


class ServerState:
    def __init__(self, config: ServerConfig, engine_factory: Callable[[], Any]):
        self.config = config
        self.engine_factory = engine_factory
        self.metrics = Metrics()
        self.pool = SlotPool(config.parallel, config.max_queue, on_done=self._job_done)
        self.status = "loading"            # loading | ok | error
        self.load_error: Optional[str] = None
        self.formatter = None
        self.metadata: Dict[str, Any] = {}
        self.tokenizer = None
        self.can_rerank = False          # the model has a classification head (/v1/rerank)
        self.n_ctx = config.n_ctx
        self.n_batch = config.n_batch
        self.t_loaded: Optional[float] = None
        self.load_s = 0.0
        self.on_fatal: Optional[Callable[[], None]] = None
        self._max_token_bytes: Optional[int] = None
        self.n_params: Optional[int] = None            # the file's parameter count (describe)
        # the model manager's bookkeeping (tinyinfer/server/models.py)
        self.entry_name = config.alias
        self.keep_alive: Optional[float] = -1.0       # seconds an idle model stays loaded; < 0: forever
        self.t_used = time.time()                     # last request that asked for this model
        self.t_done = 0.0                             # last job that finished
        self.pending = 0                              # requests given this state, job not yet submitted
        self.estimate = 0                             # bytes, inspect's estimate (weights + KV + buffers)
        p = config.model_path
        self.model_name = config.alias or os.path.basename(str(p))
        try:
            st = os.stat(p)
            self.file_size, self.file_mtime = st.st_size, st.st_mtime
        except OSError:
            self.file_size, self.file_mtime = 0, time.time()

    # -- loading -------------------------------------------------------------------------
    def load(self) -> None:
        """Load one engine per slot (run in a background thread; /health says loading meanwhile)."""
        t0 = time.perf_counter()
        try:
            engines = [self.engine_factory() for _ in range(self.config.parallel)]
            eng = engines[0]
            self.describe(eng)
            self.n_ctx = eng.n_ctx
            self.max_token_bytes()
            # slots call the engines from their own threads: under numba's workqueue layer (no libgomp)
            # every parallel kernel call takes kernels/parallel.py's lock, so no lock is needed here
            self.pool.start(engines)
            self.load_s = time.perf_counter() - t0
            self.t_loaded = time.time()
            self.status = "ok"
            log.info("model %s loaded in %.1f s (%d slot%s, n_ctx %d, chat template %s)", self.config.model_path,
                     self.load_s, self.config.parallel, "s" if self.config.parallel > 1 else "", self.n_ctx,
                     self.formatter.name)
        except Exception as e:   # a bad file must stop the server, loudly
            self.status = "error"
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load %s: %s", self.config.model_path, self.load_error)
            if self.on_fatal:
                self.on_fatal()

    def describe(self, eng) -> None:
        """What the server tells of its model (/api/show, /props, /v1/models), from an engine with or
        without weights (Engine.vocab_only): the file's metadata, tokenizer, chat template, parameters."""
        from ..chat import ChatFormatter
        self.metadata = eng.gguf.metadata
        self.tokenizer = eng.tokenizer
        self.formatter = ChatFormatter.for_tokenizer(self.metadata, eng.tokenizer, self.config.chat_template)
        self.n_params = sum(t.n_elements for t in eng.gguf.tensors.values())
        self.can_rerank = bool(getattr(eng.model, "has_rank_head", False))   # (no weights: False)

    def describe_file(self) -> None:
        """:meth:`describe` from the file alone, no weights loaded (status stays as it is)."""
        from ..engine import Engine
        self.describe(Engine.vocab_only(self.config.model_path, n_ctx=self.config.n_ctx))

    # -- bookkeeping ---------------------------------------------------------------------
    def _job_done(self, job: Job, outcome: str) -> None:
        self.t_done = time.time()
        self.metrics.record_job(outcome)
        st = job.stats
        if st is None:
            return
        if hasattr(st, "completion_tokens"):
            self.metrics.record_generation(st, self.n_batch)
        elif isinstance(st, dict) and "embed_tokens" in st:
            self.metrics.record_embedding(st["embed_tokens"], st["embed_s"])

    def kv_usage(self) -> Tuple[int, float]:
        n = sum(len(getattr(e, "tokens", [])) for e in self.pool.engines)
        cap = max(1, self.n_ctx * max(1, len(self.pool.engines)))
        return n, n / cap

    def render_metrics(self) -> str:
        n, ratio = self.kv_usage()
        return self.metrics.render(self.pool.n_processing, self.pool.n_waiting, n, ratio, self.pool.n_slots)

    # -- model names -----------------------------------------------------------------------
    def model_names(self) -> set:
        """Names that mean the loaded model: its alias, its file name (with or without .gguf, a
        ``:latest`` tag or not) and its path."""
        path = str(self.config.model_path)
        base = os.path.basename(path)
        names = {self.model_name, base, path}
        if base.endswith(".gguf"):
            names.add(base[:-5])
        return names | {n + ":latest" for n in names}

    def check_ollama_model(self, name: Optional[str]) -> None:
        """ollama's answer to a model it does not have: 404 'model "x" not found' (an empty name means
        the loaded model, as this server has only one)."""
        if name and name not in self.model_names():
            raise ApiError(404, f'model "{name}" not found, try pulling it first', "not_found_error",
                           code="model_not_found")

    # -- early checks ------------------------------------------------------------------------
    def max_token_bytes(self) -> int:
        """The longest text one token stands for (special tokens included): a prompt of B bytes has
        at least B / max_token_bytes tokens, so a megabyte prompt is refused without tokenizing it."""
        if self._max_token_bytes is None:
            tok = self.tokenizer
            m = 1
            for i in range(tok.n_vocab):
                try:
                    m = max(m, len(tok.token_to_bytes(i)), len(tok.token_text(i).encode("utf-8")))
                except Exception:
                    pass
            self._max_token_bytes = m
        return self._max_token_bytes

    def precheck_text(self, *texts) -> None:
        """Refuse at once (400) text that cannot fit the context whatever its tokenization."""
        if self.tokenizer is None:
            return
        n_bytes = sum(len(t.encode("utf-8", errors="replace")) for t in texts if isinstance(t, str))
        at_least = -(-n_bytes // self.max_token_bytes())
        if at_least > self.n_ctx:
            from ..engine import ContextError
            raise to_api_error(ContextError(
                f"the prompt has at least {at_least} tokens ({n_bytes} bytes), which does not leave room to "
                f"generate in the context of {self.n_ctx} tokens (shorten it, or start the server with a larger -c)"))

    # -- /slots and /props (llama-server's shapes) ---------------------------------------------
    def slots_info(self) -> list:
        out = []
        for i, eng in enumerate(self.pool.engines):
            job = self.pool.current[i] if i < len(self.pool.current) else None
            gen = getattr(eng, "gen", None) if job is not None else None
            st = getattr(job, "stats", None)
            n_decoded = getattr(st, "completion_tokens", 0) if st is not None else 0
            params = {}
            if gen is not None:
                params = {"n_predict": gen.max_tokens, **_sampler_fields(gen.sampler), "stop": list(gen.stop),
                          "n_keep": gen.n_keep}
            n_remain = -1
            if gen is not None and gen.max_tokens >= 0:
                n_remain = max(0, gen.max_tokens - n_decoded)
            out.append({"id": i, "id_task": job.id if job is not None else -1, "n_ctx": eng.n_ctx,
                        "speculative": False, "is_processing": job is not None,
                        "n_past": len(getattr(eng, "tokens", [])), "params": params,
                        "next_token": {"has_next_token": job is not None, "has_new_line": False,
                                       "n_remain": n_remain, "n_decoded": n_decoded, "stopping_word": ""}})
        return out

    def props(self) -> dict:
        from .. import __version__
        eng = self.pool.engines[0] if self.pool.engines else None
        d = gen_options("openai", {})
        return {"default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": self.n_ctx,
                                                "speculative": False, "is_processing": False,
                                                "params": {"n_predict": d.max_tokens, **_sampler_fields(d.sampler)}},
                "total_slots": self.config.parallel, "model_path": str(self.config.model_path),
                "model_alias": self.model_name,
                "chat_template": self.formatter.source if self.formatter is not None else "",
                "modalities": {"vision": False, "audio": False}, "build_info": f"tinyinfer {__version__}",
                "n_ctx": self.n_ctx, "cache_type_k": getattr(eng, "cache_type_k", None),
                "cache_type_v": getattr(eng, "cache_type_v", None), "status": self.status,
                "chat_template_caps": template_caps(self.formatter.source if self.formatter is not None else ""),
                **self._special_texts()}

    def _special_texts(self) -> dict:
        tok = self.tokenizer
        if tok is None:
            return {"bos_token": "", "eos_token": ""}
        eos = tok.eos_id if tok.eos_id is not None else min(tok.eog_ids, default=None)
        return {"bos_token": tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
                "eos_token": tok.token_text(eos) if eos is not None else ""}

    def capabilities(self) -> list:
        """ollama's ``capabilities`` of the served model: from its chat template and its architecture."""
        md = self.metadata
        arch = md.get("general.architecture", "")
        if md.get(f"{arch}.pooling_type") is not None and not md.get(f"{arch}.attention.causal", True):
            return ["embedding"]                  # an encoder: embeddings only
        caps = template_caps(self.formatter.source if self.formatter is not None else "")
        return ["completion"] + (["tools"] if caps["supports_tools"] else []) + \
            (["thinking"] if caps["supports_thinking"] else []) + ["embedding"]

    # -- model description ---------------------------------------------------------------
    def model_details(self) -> dict:
        md = self.metadata
        arch = md.get("general.architecture", "")
        return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch] if arch else None,
                "parameter_size": md.get("general.size_label") or _param_size(self), "quantization_level":
                    _file_type_name(md.get("general.file_type"))}

    def digest(self) -> str:
        import hashlib
        h = hashlib.sha256(f"{os.path.abspath(self.config.model_path)}:{self.file_size}:{self.file_mtime}".encode())
        return h.hexdigest()


def _sampler_fields(p) -> dict:
    """A SamplerParams as llama-server's /slots and /props show it (seed -1: random)."""
    return {**{k: v for k, v in vars(p).items() if k not in ("logit_bias", "min_keep")},
            "seed": -1 if p.seed is None else p.seed}


def _param_size(state: ServerState) -> str:
    n = state.n_params
    if not n:
        return ""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}".replace(".0", "")
    return str(n)


def _file_type_name(ft) -> str:
    if ft is None:
        return "unknown"
    from ..tools.quantize import file_type_name
    return file_type_name(int(ft))


def check_prompt(ids: List[int], n_ctx: int, n_vocab: int) -> None:
    from ..engine import ContextError
    if not ids:
        raise ContextError("the prompt is empty (no tokens to evaluate)")
    if len(ids) >= n_ctx:
        raise ContextError(f"the prompt has {len(ids)} tokens, which does not leave room to generate in "
                           f"the context of {n_ctx} tokens (shorten it, or start the server with a larger -c)")
    bad = [t for t in ids if not 0 <= int(t) < n_vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is out of range [0, {n_vocab})", param="prompt")


def gen_options(dialect: str, body, n_vocab: Optional[int] = None, **given):
    """A request's generation options (tinyinfer/options.py, ``dialect``) from its body (a dict, or a pydantic
    model: the fields the client sent, unknown ones included): fields the dialect does not know are ignored,
    as llama-server and ollama do, and so are ``logit_bias`` ids past the vocabulary (llama-server's); a bad
    value is a 400 naming the field. ``given``: options the route built."""
    from ..options import GenOptions, build
    body = body.model_dump(exclude_unset=True) if hasattr(body, "model_dump") else dict(body or {})
    if body.get("logit_bias") and n_vocab is not None:      # ids past the vocabulary are ignored (llama-server's)
        body["logit_bias"] = {k: v for k, v in body["logit_bias"].items() if 0 <= int(k) < n_vocab}
    try:
        return GenOptions.of(build(dialect, body, strict=False), **given)
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e), param=getattr(e, "field", None)) from None


def encode_prompt(tok, text: str) -> List[int]:
    """Plain-text prompt -> ids: special tokens parsed (as llama-cpp-python does), BOS as the file says."""
    ids = tok.encode(text, add_bos=tok.add_bos, special=True)
    if not ids and tok.bos_id is not None:
        ids = [tok.bos_id]
    return ids
