"""Many models behind one server: load on demand, keep_alive, eviction under a memory budget.

ollama's scheduler and llama-server's router mode, on one event loop:

* the servable models are the GGUF files of ``--models-dir`` (by file stem) and the store's pulled
  names (tinyinfer/store.py), plus ``-m`` (preloaded); a request names one (ollama ``model``, OpenAI
  ``model``) and :meth:`ModelManager.get` answers its :class:`~tinyinfer.server.core.ServerState`,
  loading it first if needed. Each loaded model has its own slots (``--parallel``), KV cache and metrics.
* a load in progress is one task shared by every request waiting for it; a file that fails to load is
  an error to those requests, remembered until the file changes (size or mtime), and the other models
  keep serving. A client that leaves while its request waits for room evicts nothing; when every
  request waiting for a load has left, the load is abandoned: it cannot be stopped inside the engine's
  constructor, so it still counts as loading until its thread returns, and is then unloaded at once.
* ollama's /api/show of a model not loaded reads its file (metadata, tokenizer, chat template; no
  weights): nothing is loaded, counted or evicted.
* room: at most ``--max-models`` loaded, and the estimated memory of the loaded ones (inspect's weights +
  KV cache of ``-c`` per slot + work buffers, tinyinfer/tools/inspect.py, with the weights counted twice:
  mapped file pages and the kernels' repacked copies) within ``--max-memory``. To make
  room the least recently used model that serves nothing (no job running or queued) is unloaded; when
  every loaded model is busy the request waits, and beyond ``--max-queue`` waiting requests it is a 503
  with Retry-After. A model that alone exceeds the budget is an error, never an out-of-memory kill.
* ``keep_alive`` (ollama's: a duration string or seconds; 0 = unload when idle, negative = forever) is
  set by each request (default ``--keep-alive``, 5m); a model unloads once idle past it. ``--sleep-idle-
  seconds`` unloads everything after that long without a request.

Every decision runs on the event loop (loads and unloads run in a worker thread), so between
:meth:`get` returning a state and the route submitting its job, nothing can evict it; ``pending``
also covers that window explicitly.

With only ``-m`` (no ``--models-dir``) the server is today's one-model server: its model is loaded at
start, never unloaded, and OpenAI requests of any name are served by it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional

from .core import ApiError, ServerState
from .jobs import wait_disconnect

log = logging.getLogger("tinyinfer.server")

DEFAULT_KEEP_ALIVE = 300.0          # ollama's 5m
DEFAULT_MAX_MODELS = 3              # ollama's OLLAMA_MAX_LOADED_MODELS on a CPU
REAP_INTERVAL = 0.2                 # seconds between keep_alive checks


def parse_duration(v, field: str = "keep_alive") -> Optional[float]:
    """ollama's keep_alive: seconds (a number or numeric string) or a Go duration ("5m", "0s", "1h30m",
    "-1m"). None: not given. Negative: forever. A bad value is an ApiError(400) naming ``field``."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise ApiError(400, f"{field}: invalid duration {v!r}", param=field)
    if isinstance(v, (int, float)):
        return float(v)
    text = str(v).strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = re.findall(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|h|m|s)", body)    # schemas.DURATION_PATTERN
    if not parts or "".join(a + b for a, b in parts) != body:
        raise ApiError(400, f"{field}: invalid duration {v!r} (e.g. \"5m\", \"30s\", \"1h\", 0, -1)", param=field)
    unit = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sign * sum(float(a) * unit[b] for a, b in parts)


def parse_size(s: str) -> int:
    """'4G', '1500M', '512MiB', '1e9' -> bytes (--max-memory)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b)?\s*", str(s).lower())
    if not m:
        raise ValueError(f"--max-memory: not a size: {s!r} (e.g. 4G, 1500M, 800000000)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def _signature(path: str):
    try:
        st = os.stat(path)
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return None


def _trim() -> None:
    """Give freed heap memory back to the system. Without it glibc keeps an unloaded model's arrays
    (allocated by the slot threads, in their arenas) as the process's RSS: measured 600 of 840 MiB
    kept after unloading Qwen2.5-0.5B, 185 with it (benchmarks/RESULTS.md)."""
    try:
        import ctypes
        import ctypes.util
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc (macOS, musl): nothing to do
        pass


def default_engine_factory(config) -> Callable[[], Any]:
    """``make()`` for one model's slots: the first call loads the model (in ``config``'s kernel config),
    the next ones fork it (a sequence each of the shared cache, a speculative proposer each)."""
    first = []

    def make():
        # the first slot loads the model and a KV cache of one sequence per slot; the others share
        # the weights and the cache (a sequence each), and their decode steps run as one batch
        if first:
            other = first[0].fork(seq=len(first[0].batcher.engines) if first[0].batcher else None)
            spec = first[0].defaults.draft_model
            if spec is not None:     # speculative decoding: this slot's proposer (a draft: its own cache)
                other.defaults = dataclasses.replace(other.defaults, draft_model=spec.fork())
            return other
        from ..engine import Engine
        from ..kernels.matmul import KernelConfig, using_config
        from ..options import GenOptions
        with using_config(KernelConfig(batch_invariant=True) if config.batch_invariant else None):
            first.append(Engine(config.model_path, n_ctx=config.n_ctx, n_batch=config.n_batch,
                                n_threads=config.n_threads, verbose=True, split=config.split,
                                n_seq=config.parallel, type_k=config.cache_type_k, type_v=config.cache_type_v,
                                defaults=GenOptions(context_shift=config.context_shift, n_keep=config.n_keep)))
        if config.speculative is not None:      # speculative decoding: the first slot's proposer
            from ..cli import attach_spec
            attach_spec(first[0], config.speculative)
        return first[0]
    return make


@dataclasses.dataclass
class Entry:
    """A servable model: its name, its file, and what is known of it without loading it."""
    name: str
    path: str
    source: str                                  # "dir", "store" or "-m"
    failed: Optional[tuple] = None               # (file signature, error text) of the last failed load
    _estimate: Optional[tuple] = None            # (file signature, bytes)
    _details: Optional[tuple] = None

    def details(self) -> dict:
        sig = _signature(self.path)
        if self._details is None or self._details[0] != sig:
            from ..store import details
            try:
                d = details(self.path)
            except Exception:
                d = {"format": "gguf"}
            self._details = (sig, d)
        return self._details[1]


class ModelManager:
    def __init__(self, config, engine_factory=None, models_dir: Optional[str] = None, multi: bool = False,
                 keep_alive: float = DEFAULT_KEEP_ALIVE, max_models: int = DEFAULT_MAX_MODELS,
                 max_memory: Optional[int] = None, sleep_idle_seconds: Optional[float] = None):
        from .metrics import Metrics
        self.config = config
        self.multi = multi
        self.models_dir = models_dir
        self.default_keep_alive = keep_alive
        self.max_models = max(1, int(max_models))
        self.sleep_idle_seconds = sleep_idle_seconds
        self._factory = engine_factory
        self._default_factory = default_engine_factory
        self.states: Dict[str, ServerState] = {}          # loaded or loading, by entry name
        self._loads: Dict[str, asyncio.Task] = {}
        self._waiters: Dict[str, int] = {}                 # requests awaiting a model's load
        self._describing = asyncio.Lock()                  # /api/show of models not loaded: one at a time
        self._entries: Dict[str, Entry] = {}
        self._aliases: Dict[str, str] = {}
        self.n_room_waiting = 0
        self.t_last_request = time.time()
        self.swaps = 0                                     # models unloaded to make room
        self.n_loads = 0                                   # loads started (a shared load counts once)
        self.n_abandoned = 0                               # loads finished after every waiter had left
        self.preload: Optional[str] = None
        self.fallback: Optional[str] = None                # an OpenAI request without a model: this one
        self.default: Optional[ServerState] = None         # the -m model's state (one-model mode: the model)
        if config.model_path:
            self.preload = self.fallback = self._add(
                config.alias or os.path.basename(str(config.model_path)).removesuffix(".gguf"),
                str(config.model_path), "-m").name
        if config.default_model:                          # serve without -m: the default model, on demand too
            from ..fetch import DEFAULT_MODEL
            self._add(DEFAULT_MODEL, str(config.default_model), "-m")
            self.fallback = DEFAULT_MODEL
        if not multi:
            st = self._new_state(self._entries[self.preload])
            self.states[self.preload] = st
            self.default = st
            self.metrics = st.metrics
        else:
            self.metrics = Metrics()                       # request metrics of the whole server
        self.max_memory = max_memory if max_memory is not None else self._available()
        self.rescan()

    # -- the servable models ---------------------------------------------------------------------
    @staticmethod
    def _available() -> Optional[int]:
        try:
            import psutil
            return int(psutil.virtual_memory().available)
        except Exception:
            return None

    def _add(self, name: str, path: str, source: str) -> Entry:
        e = self._entries.get(name)
        if e is None or e.path != path:
            e = self._entries[name] = Entry(name, path, source)
        for alias in {name, name + ":latest", os.path.basename(path), path}:
            self._aliases.setdefault(alias, name)
        return e

    def rescan(self) -> None:
        """The models of --models-dir and the store (new files appear, removed ones go)."""
        if not self.multi:
            return
        keep = {n: e for n, e in self._entries.items() if e.source == "-m" or n in self.states}
        self._entries, self._aliases = {}, {}
        for n, e in keep.items():
            self._entries[n] = e
            self._add(n, e.path, e.source)
        if self.models_dir:
            try:
                names = sorted(os.listdir(self.models_dir))
            except OSError as exc:
                log.warning("--models-dir %s: %s", self.models_dir, exc)
                names = []
            for f in names:
                p = os.path.join(self.models_dir, f)
                if f.endswith(".gguf") and os.path.isfile(p):
                    self._add(f[:-5], p, "dir")
        try:
            from ..store import installed
            for m in installed():
                if os.path.isfile(m.get("file", "")):
                    self._add(m["name"], m["file"], "store")
        except Exception as exc:          # a broken store never stops the server
            log.warning("model store: %s", exc)

    def entries(self) -> List[Entry]:
        if self.multi:
            self.rescan()
        return list(self._entries.values())

    def lookup(self, name: Optional[str]) -> Optional[Entry]:
        if not name:
            return None
        n = self._aliases.get(name)
        if n is None and self.multi:
            self.rescan()
            n = self._aliases.get(name)
        return self._entries.get(n) if n is not None else None

    def not_found(self, name: Optional[str]) -> ApiError:
        known = ", ".join(sorted(self._entries)) or "none"
        return ApiError(404, f'model "{name}" not found, try pulling it first (models here: {known})',
                        "invalid_request_error", param="model", code="model_not_found")

    # -- states ----------------------------------------------------------------------------------
    def _new_state(self, entry: Entry) -> ServerState:
        cfg = dataclasses.replace(self.config, model_path=entry.path, alias=entry.name)
        st = ServerState(cfg, self._factory or self._default_factory(cfg))
        st.entry_name = entry.name
        st.keep_alive = self.default_keep_alive if self.multi else -1.0
        st.t_used = time.time()
        st.pending = 0
        st.estimate = self.estimate(entry)
        return st

    def estimate(self, entry: Entry) -> int:
        """Bytes a loaded model takes: inspect's weights + KV cache (-c, per slot) + work buffers."""
        sig = _signature(entry.path)
        if entry._estimate is not None and entry._estimate[0] == sig:
            return entry._estimate[1]
        c = self.config
        try:
            from ..gguf import GGUFFile
            from ..tools.inspect import analyze
            g = GGUFFile(entry.path)
            try:
                mem = analyze(g, n_ctx=c.n_ctx, n_batch=c.n_batch, available=0, type_k=c.cache_type_k,
                              type_v=c.cache_type_v)["memory"]
            finally:
                getattr(g, "close", lambda: None)()
            # the weights twice: the file's mapped pages and the kernels' in-memory copies (repacked
            # rows, fused q/k/v and gate/up: kernels/matmul.prepare); measured, Qwen2.5-0.5B Q4_K_M holds
            # about 1.7x its weights at the peak of a load (benchmarks/RESULTS.md)
            total = 2 * mem["weights_bytes"] + (mem.get("kv_bytes") or 0) * max(1, c.parallel) + \
                (mem.get("work_bytes") or 0)
        except Exception as e:      # not a readable GGUF: the load would fail the same way
            entry.failed = (sig, f"{type(e).__name__}: {e}")
            total = sig[0] if sig else 0
        entry._estimate = (sig, int(total))
        return int(total)

    def loaded(self) -> List[ServerState]:
        return [s for s in self.states.values() if s.status == "ok"]

    def busy(self, st: ServerState) -> bool:
        return st.pending > 0 or st.pool.n_processing > 0 or st.pool.n_waiting > 0 or \
            self._waiters.get(st.entry_name, 0) > 0

    def expires_at(self, st: ServerState) -> Optional[float]:
        """When an idle model unloads (None: never)."""
        if st.keep_alive is None or st.keep_alive < 0:
            return None
        return max(st.t_used, getattr(st, "t_done", 0.0)) + st.keep_alive

    def find(self, name: Optional[str]) -> Optional[ServerState]:
        """The loaded (or loading) state of ``name``, without loading it."""
        if not self.multi:
            return self.default
        e = self.lookup(name)
        return self.states.get(e.name) if e is not None else None

    async def describe(self, name: Optional[str], answer: Callable[[ServerState], Any]):
        """``answer(state)`` for ollama's /api/show: the loaded model's state, or, when it is not loaded,
        a state holding only the file's metadata, tokenizer and chat template (Engine.vocab_only, no
        weights) that the manager does not keep: it counts against neither --max-models nor --max-memory,
        evicts nothing, and does not touch the loaded models' keep_alive. One description at a time, in a
        worker thread (Qwen2.5's 151k-token vocabulary: ~0.5 s); its memory is given back after."""
        entry = self.lookup(name)
        if entry is None:
            raise self.not_found(name)
        st = self.states.get(entry.name)
        if st is not None and st.status == "ok":
            return answer(st)
        async with self._describing:
            sig = _signature(entry.path)
            if entry.failed is not None and entry.failed[0] == sig:
                raise self._load_failed(entry, entry.failed[1])

            def run():
                d = ServerState(dataclasses.replace(self.config, model_path=entry.path, alias=entry.name), None)
                try:
                    d.describe_file()
                    return answer(d)
                except Exception as e:      # a file that cannot be read: remembered as a failed load
                    entry.failed = (sig, f"{type(e).__name__}: {e}")
                    return None
                finally:
                    d.metadata = d.tokenizer = d.formatter = None
                    _trim()                 # (the vocabulary's memory back to the system)
            out = await asyncio.get_running_loop().run_in_executor(None, run)
        if out is None:
            raise self._load_failed(entry, entry.failed[1])
        return out

    # -- getting a model for a request ---------------------------------------------------------------
    async def get(self, name: Optional[str], dialect: str = "ollama", keep_alive=None,
                  request=None) -> ServerState:
        """The loaded state of the model ``name`` (loading it, and making room, first if needed).

        ``keep_alive``: the request's (already parsed: seconds, None = the server's default).
        ``request``: the HTTP request asking; if its client leaves while it waits for room or for the
        load, it stops waiting (an ApiError 499) without evicting anything further, and a load that no
        request waits for any more is abandoned (:meth:`_load`)."""
        self.t_last_request = time.time()
        if not self.multi:
            st = self.default
            if dialect == "ollama":
                st.check_ollama_model(name)
            st.t_used = time.time()
            return st
        if not name and dialect == "openai":
            name = self.fallback                     # OpenAI requests without a model: -m's, or the default
        entry = self.lookup(name)
        if entry is None:
            if not name:
                raise ApiError(400, "model is required", param="model")
            raise self.not_found(name)
        gone: Optional[asyncio.Future] = None        # done once the client has disconnected
        try:
            while True:
                st = self.states.get(entry.name)
                if st is not None and st.status == "ok":
                    self._use(st, keep_alive)
                    return st
                if gone is None and request is not None:
                    gone = asyncio.ensure_future(wait_disconnect(request))
                task = self._loads.get(entry.name)
                if task is None:
                    sig = _signature(entry.path)
                    self.estimate(entry)              # (a file that cannot be read fails here, evicting nothing)
                    if entry.failed is not None and entry.failed[0] == sig:
                        raise self._load_failed(entry, entry.failed[1])
                    await self._make_room(entry, gone)
                    if entry.name in self._loads or entry.name in self.states:
                        continue                      # loaded by another request while this one waited
                    task = self._loads[entry.name] = asyncio.ensure_future(self._load(entry))
                    task.add_done_callback(_retrieve)
                # waiters keep the model from being chosen for eviction between the load's end and their
                # turn; when the last of them leaves before the end, the load is abandoned (_load)
                self._waiters[entry.name] = self._waiters.get(entry.name, 0) + 1
                try:
                    await asyncio.wait({task} if gone is None else {task, gone},
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self._waiters[entry.name] -= 1
                if task.done():
                    task.result()                     # a failed load: its error to every waiter
                    continue
                if not self._waiters[entry.name]:
                    log.info("abandoning the load of model %s: every request waiting for it has gone "
                             "(the memory is given back once the loading thread returns)", entry.name)
                raise _client_gone()
        finally:
            if gone is not None:
                gone.cancel()

    def _use(self, st: ServerState, keep_alive) -> None:
        st.t_used = time.time()
        # as ollama: each request sets the model's keep_alive, its own or the server's default
        st.keep_alive = keep_alive if keep_alive is not None else self.default_keep_alive
        st.pending += 1                                # until the route has submitted its job
        asyncio.get_running_loop().call_soon(self._release, st)

    @staticmethod
    def _release(st: ServerState) -> None:
        st.pending = max(0, st.pending - 1)

    def _load_failed(self, entry: Entry, err: str) -> ApiError:
        return ApiError(500, f'model "{entry.name}" failed to load ({entry.path}): {err}', "server_error",
                        param="model", code="model_load_failed")

    async def _load(self, entry: Entry) -> None:
        """Load ``entry`` in a worker thread. A load cannot be stopped midway (the thread is inside the
        engine's constructor), so until it returns the model counts against --max-models / --max-memory
        as loading; if no request waits for it by then (every client left), it is unloaded at once."""
        self.n_loads += 1
        st = self._new_state(entry)
        self.states[entry.name] = st
        sig = _signature(entry.path)
        try:
            await asyncio.get_running_loop().run_in_executor(None, st.load)
        finally:
            self._loads.pop(entry.name, None)
        if st.status == "ok" and not self._waiters.get(entry.name):
            self.n_abandoned += 1
            entry.failed = None
            await self.unload(st, why="every request waiting for its load has gone")
            return
        if st.status != "ok":
            self.states.pop(entry.name, None)
            entry.failed = (sig, st.load_error)
            await self._stop(st)
            raise self._load_failed(entry, st.load_error)
        entry.failed = None
        st.t_used = time.time()

    # -- room --------------------------------------------------------------------------------------
    def _used(self) -> int:
        return sum(s.estimate for s in self.states.values())

    def _fits(self, need: int) -> bool:
        if len(self.states) + 1 > self.max_models:
            return False
        return self.max_memory is None or self._used() + need <= self.max_memory

    async def _make_room(self, entry: Entry, gone: Optional[asyncio.Future] = None) -> None:
        need = self.estimate(entry)
        if self.max_memory is not None and need > self.max_memory:
            raise ApiError(500, f'model "{entry.name}" needs about {need / 2**20:.0f} MiB (weights + KV cache '
                                f'for -c {self.config.n_ctx} x {self.config.parallel} slot(s)), more than the '
                                f'memory budget of {self.max_memory / 2**20:.0f} MiB (--max-memory)',
                           "server_error", param="model", code="insufficient_memory")
        waited = False
        try:
            while not self._fits(need):
                if entry.name in self.states or entry.name in self._loads:
                    return                 # another request loaded it (or is loading it) meanwhile
                if gone is not None and gone.done():
                    raise _client_gone()   # the client left while waiting: evict nothing for it
                victim = self._lru_idle(exclude=entry.name)
                if victim is not None:
                    self.swaps += 1
                    await self.unload(victim, why="to make room for " + entry.name)
                    continue
                if not waited:
                    if self.n_room_waiting >= self.config.max_queue:
                        self.metrics.record_rejected()
                        raise ApiError(503, "every loaded model is busy and the queue for room is full; retry "
                                            "later", "server_busy", headers={"Retry-After": "5"})
                    self.n_room_waiting += 1
                    waited = True
                await asyncio.sleep(0.05)
            if gone is not None and gone.done():
                raise _client_gone()       # (room made, but nobody to load the model for)
        finally:
            if waited:
                self.n_room_waiting -= 1

    def _lru_idle(self, exclude: str) -> Optional[ServerState]:
        idle = [s for n, s in self.states.items() if n != exclude and s.status == "ok" and not self.busy(s)]
        return min(idle, key=lambda s: max(s.t_used, getattr(s, "t_done", 0.0)), default=None)

    async def unload(self, st: ServerState, why: str = "") -> None:
        name = st.entry_name
        if self.states.get(name) is st:
            del self.states[name]
        log.info("unloading model %s%s", name, f" ({why})" if why else "")
        await self._stop(st)

    async def _stop(self, st: ServerState) -> None:
        def stop():
            st.pool.stop(timeout=5.0)
            # drop every reference to the engines (the factory keeps the first one) before trimming
            st.pool.engines, st.pool.current = [], []
            st.engine_factory = st.tokenizer = st.formatter = None
            st.metadata = {}
            st.status = "unloaded"
            gc.collect()
            _trim()
        await asyncio.get_running_loop().run_in_executor(None, stop)

    def request_unload(self, name: Optional[str]) -> bool:
        """ollama's keep_alive 0 with an empty prompt: unload ``name`` once idle. True if it was loaded."""
        st = self.find(name)
        if st is None or not self.multi:
            return st is not None
        st.keep_alive = 0.0
        st.t_done = st.t_used = time.time() - 1.0
        return True

    # -- keep_alive ----------------------------------------------------------------------------------
    async def reaper(self) -> None:
        """Unload models idle past their keep_alive; everything after --sleep-idle-seconds without requests."""
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                now = time.time()
                loaded = self.loaded()
                # idle: no request arrived, none ran, and none finished for that long
                last = max([self.t_last_request] + [max(st.t_used, st.t_done) for st in loaded])
                sleepy = self.sleep_idle_seconds is not None and self.sleep_idle_seconds >= 0 and \
                    now - last >= self.sleep_idle_seconds and not any(self.busy(st) for st in loaded)
                for st in loaded:
                    if self.busy(st):
                        continue
                    exp = self.expires_at(st)
                    if sleepy:
                        await self.unload(st, why=f"--sleep-idle-seconds {self.sleep_idle_seconds:g}")
                    elif exp is not None and now >= exp:
                        await self.unload(st, why=f"keep_alive {st.keep_alive:g} s expired")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("keep_alive check")

    async def start(self) -> None:
        """At startup: preload -m (multi-model mode; one-model mode loads in the app's lifespan)."""
        if self.multi and self.preload is not None:
            try:
                await self.get(self.preload, "openai")
            except ApiError as e:
                log.error("%s", e.message)

    async def stop_all(self) -> None:
        for st in list(self.states.values()):
            await self._stop(st)
        self.states.clear()

    def drain(self) -> None:
        for st in list(self.states.values()):
            st.pool.drain()


def _client_gone() -> ApiError:
    return ApiError(499, "the client closed the request while its model was loading", param="model",
                    code="client_closed_request")


def _retrieve(task: asyncio.Task) -> None:
    """(A load's error is raised to its waiters; when none is left, nobody else needs it.)"""
    if not task.cancelled():
        task.exception()


def manager(request) -> ModelManager:
    return request.app.state.models
