"""Server settings (no third-party imports: ``--help`` works without fastapi installed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class ServerConfig:
    model_path: Optional[str] = None     # -m; None: no preloaded model (many-model mode)
    alias: Optional[str] = None
    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: Optional[int] = None
    parallel: int = 1
    max_queue: int = 16
    api_key: Optional[str] = None
    chat_template: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8080
    shutdown_timeout: float = 30.0
    cors: bool = False
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    context_shift: bool = False      # off by default, as in llama-server
    n_keep: int = 0
    split: int = 1              # the model's layers over this many Ray actors (tinyinfer/models/split.py)
    batch_invariant: bool = False   # KernelConfig.batch_invariant for every weight (--batch-invariant)
    pooling: Optional[str] = None    # embeddings' pooling (none, mean, cls, last, rank); None: the file's
    speculative: Any = None     # the parsed speculative flags (cli.add_spec_args), None: plain decoding
    # many models (tinyinfer/server/models.py): on with --models-dir or without -m
    multi: bool = False
    models_dir: Optional[str] = None
    keep_alive: float = 300.0        # seconds an idle model stays loaded (ollama's 5m); < 0: forever
    max_models: int = 3              # ollama's OLLAMA_MAX_LOADED_MODELS on a CPU
    max_memory: Optional[int] = None     # bytes; None: the available memory at start
    sleep_idle_seconds: Optional[float] = None
    default_model: Optional[str] = None      # serve without -m: the default model's file, by its fetch name
