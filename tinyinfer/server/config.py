"""Server settings (no third-party imports: ``--help`` works without fastapi installed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class ServerConfig:
    model_path: str
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
