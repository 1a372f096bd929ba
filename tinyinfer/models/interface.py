"""The model interface the engine drives: :class:`Model` (and the opaque cache it makes).

Two implementations: :class:`tinyinfer.models.base.Transformer` (every architecture, in this
process) and :class:`tinyinfer.models.split.SplitModel` (layer ranges over Ray actors). The
engine calls only these methods; it never reads a cache's fields. A backend that cannot do one
of them refuses it when the engine is built, in one line.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Model(Protocol):
    n_vocab: int
    n_embd: int
    n_ctx_train: int

    def new_cache(self, n_ctx: int, n_batch: int = 512, **kw) -> Any:
        """A KV cache for ``n_ctx`` positions; ``kw``: n_seq, type_k, type_v."""

    def forward(self, ids: np.ndarray, pos0, cache: Any, n_out: int = 1, embeddings: bool = False) -> np.ndarray:
        """Evaluate ``ids`` at ``pos0`` (a first position, or a kvcache.Batch): the last ``n_out`` logits rows
        (or final hidden states with ``embeddings``)."""

    def cache_shift(self, cache: Any, seq: int, n_keep: int, n_discard: int, n_past: int) -> None:
        """Drop cells n_keep..n_keep+n_discard-1 of ``seq``; later cells move down (keys re-rotated)."""

    def cache_save(self, cache: Any, seq: int, n: int) -> bytes:
        """Cells 0..n-1 of ``seq`` as bytes (ValueError if they cannot be saved)."""

    def cache_load(self, cache: Any, seq: int, n: int, data: bytes) -> None:
        """The inverse of cache_save (ValueError if ``data`` does not fit)."""

    def cache_copy(self, cache: Any, src: int, dst: int, n: int) -> None:
        """Cells 0..n-1 of sequence src into sequence dst."""

    def cache_fingerprint(self, cache: Any) -> dict:
        """The cache's layout, which a saved state must match."""

    def close(self) -> None:
        """Release what the model holds beyond memory (processes, placement)."""
