"""The KV cache: per-layer key/value rows for one or more sequences, in f16, q8_0 or q4_0.

Layout: for each layer, K and V are a :class:`KVStore` each, holding ``n_seq`` sequences of
``rows`` cells; a cell is one position's vectors for all KV heads. A layer with full
attention has ``n_ctx`` cells per sequence; a sliding-window layer only ``window + n_batch``,
used as a ring (position p lives in cell p % rows), enough for every query of a batch to see
its whole window.

Types, as llama.cpp's ``--cache-type-k/-v`` (``-ctk/-ctv``):

* ``f16`` (the default, as llama.cpp): IEEE half floats, kept as their uint16 bits because numba
  has no float16 arithmetic on the CPU; the kernels convert (one instruction: ``vcvtph2ps`` on
  x86 with F16C, ``fcvtl`` on ARM).
* ``q8_0``: per 32 values of a head, an f16 scale and 32 int8 (ggml's block_q8_0: 8.5 bits a value).
* ``q4_0``: per 32 values, an f16 scale and 32 4-bit values (ggml's block_q4_0: 4.5 bits).

Quants and scales are stored in two arrays (``q`` and ``d``) rather than interleaved blocks:
the same bytes, simpler kernels. A head's size must be a multiple of 32 for the quantized types.

A batch of tokens from several sequences is described by :class:`Batch` (each token's position
and sequence); the attention kernels take those arrays, so one forward pass can decode a token
for each of several sequences (continuous batching) or prefill one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

# type name -> (kernel kind, bytes per value (for reports), block size)
CACHE_TYPES = {"f16": (0, 2.0, 1), "q8_0": (1, 34 / 32, 32), "q4_0": (2, 18 / 32, 32)}
QK = 32


def cache_type(name: str) -> str:
    n = str(name).lower()
    if n not in CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {name!r}; supported: {', '.join(CACHE_TYPES)}")
    return n


class KVStore:
    """K or V of one layer: ``q`` (n_seq, rows, n_kv, hd | hd/2) and scales ``d`` (n_seq, rows, n_kv, hd/32)."""

    def __init__(self, typ: str, n_seq: int, rows: int, n_kv: int, hd: int):
        self.type = cache_type(typ)
        self.kind, _, blk = CACHE_TYPES[self.type]
        if hd % blk:
            raise ValueError(f"KV cache type {self.type} needs a head size that is a multiple of {blk}, got {hd}")
        self.hd = hd
        # quantized cells hold Hadamard-rotated vectors (as llama.cpp since 2026-03): a rotation leaves
        # the attention's dot products as they are and spreads outliers over the block, so the block's
        # scale fits the other values better (SmolLM2 q4_0 KV: PPL +17% -> see RESULTS.md)
        self.rot = self.type != "f16" and hd & (hd - 1) == 0
        if self.type == "f16":
            self.q = np.zeros((n_seq, rows, n_kv, hd), np.uint16)
            self.d = np.zeros((n_seq, rows, n_kv, 0), np.uint16)
        elif self.type == "q8_0":
            self.q = np.zeros((n_seq, rows, n_kv, hd), np.int8)
            self.d = np.zeros((n_seq, rows, n_kv, hd // QK), np.uint16)
        else:
            self.q = np.zeros((n_seq, rows, n_kv, hd // 2), np.uint8)
            self.d = np.zeros((n_seq, rows, n_kv, hd // QK), np.uint16)

        self.arrays = (self.q, self.d, self.kind, self.rot)     # the kernels' ``kv`` record (kernels/ops.py)

    @property
    def rows(self) -> int:
        return self.q.shape[1]

    @property
    def shape(self) -> tuple:
        """(cells, n_kv, head size) of one sequence."""
        return (self.q.shape[1], self.q.shape[2], self.hd)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes

    def to_float(self, seq: int, lo: int, hi: int) -> np.ndarray:
        """Cells lo..hi-1 of sequence ``seq`` as float32 (n, n_kv, hd) (tests, state files)."""
        from .kernels import ops
        q, d = self.q[seq:seq + 1, lo:hi], self.d[seq:seq + 1, lo:hi]
        out = np.empty(q.shape[1:3] + (self.hd,), np.float32)
        ops.kv_load_rows(q, d, self.kind, self.rot, out)
        return out


@dataclass
class Batch:
    """Where each token of a forward pass goes: its position and its sequence (int64 arrays)."""
    pos: np.ndarray
    seq: np.ndarray

    @staticmethod
    def of(pos0, n: int) -> "Batch":
        """A Batch as it is (several sequences), or n consecutive positions from pos0 in sequence 0."""
        if isinstance(pos0, Batch):
            return pos0
        return Batch(np.arange(int(pos0), int(pos0) + n, dtype=np.int64), np.zeros(n, np.int64))

    @staticmethod
    def one_each(seqs, positions) -> "Batch":
        return Batch(np.asarray(positions, np.int64), np.asarray(seqs, np.int64))

    @staticmethod
    def run(seq: int, pos0: int, n: int) -> "Batch":
        return Batch(np.arange(pos0, pos0 + n, dtype=np.int64), np.full(n, seq, np.int64))


class KVCache:
    """K and V stores for every layer (see the module's docstring).

    ``first_layer``: the model layer the first store belongs to (a cache for layers lo..hi-1 of a
    model split across processes holds ``hi - lo`` of them and ``first_layer = lo``)."""

    def __init__(self, n_layer, n_ctx, n_kv_head, head_dim_k, head_dim_v, windows=None, n_batch=512,
                 first_layer: int = 0, n_seq: int = 1, type_k: str = "f16", type_v: str = "f16"):
        self.n_ctx = n_ctx
        self.first_layer = first_layer
        self.n_seq = n_seq
        self.type_k, self.type_v = cache_type(type_k), cache_type(type_v)
        self.windows = list(windows) if windows else [0] * n_layer
        self.k: List[KVStore] = []
        self.v: List[KVStore] = []
        for il in range(n_layer):
            w = self.windows[il]
            rows = min(n_ctx, w + n_batch) if w > 0 else n_ctx
            self.k.append(KVStore(self.type_k, n_seq, rows, n_kv_head, head_dim_k))
            self.v.append(KVStore(self.type_v, n_seq, rows, n_kv_head, head_dim_v))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    @property
    def ring(self) -> bool:
        """True when some layer keeps fewer cells than the context (a sliding-window ring)."""
        return any(s.rows < self.n_ctx for s in self.k)

    def fingerprint(self) -> dict:
        """The layout a saved state must match (see tinyinfer/state.py)."""
        return {"n_layer": len(self.k), "type_k": self.type_k, "type_v": self.type_v,
                "cells": [[list(st.q.shape[2:]), str(st.q.dtype)] for st in self.k[:1] + self.v[:1]]}

    def state_sizes(self, n: int) -> tuple:
        """Bytes :meth:`save` writes for ``n`` cells: (K part, V part)."""
        def size(stores):
            return sum(n * (st.q[0, 0].nbytes + st.d[0, 0].nbytes) for st in stores)
        return size(self.k), size(self.v)

    def save(self, seq: int, n: int) -> tuple:
        """Cells 0..n-1 of sequence ``seq``: (K bytes of every layer, V bytes of every layer)."""
        if self.ring and n > min(st.rows for st in self.k):
            raise ValueError("saving the state of a sliding-window cache longer than its ring is not supported")

        def part(stores):
            return b"".join(np.ascontiguousarray(a[seq, :n]).tobytes() for st in stores for a in (st.q, st.d))
        return part(self.k), part(self.v)

    def load(self, seq: int, n: int, data: bytes) -> None:
        """The inverse of :meth:`save` (its two parts joined); ValueError if ``data`` has the wrong size."""
        want = sum(self.state_sizes(n))
        if len(data) != want:
            raise ValueError(f"{len(data)} bytes of KV cells, expected {want} for {n} tokens")
        off = 0
        for st in self.k + self.v:
            for a in (st.q, st.d):
                shape = (n,) + a.shape[2:]
                cnt = int(np.prod(shape))
                a[seq, :n] = np.frombuffer(data, a.dtype, cnt, off).reshape(shape)
                off += cnt * a.dtype.itemsize

    def copy_seq(self, src: int, dst: int, n: int) -> None:
        """Cells 0..n-1 of sequence src into sequence dst (a shared prompt prefix)."""
        if src == dst or n <= 0:
            return
        for st in self.k + self.v:
            m = min(n, st.rows)
            st.q[dst, :m] = st.q[src, :m]
            st.d[dst, :m] = st.d[src, :m]


def shift(model, cache: KVCache, seq: int, n_keep: int, n_discard: int, n_past: int) -> None:
    """Drop cells n_keep..n_keep+n_discard-1 of sequence ``seq`` (which holds n_past cells): the later
    cells move down by n_discard and their keys are rotated back by n_discard positions (RoPE is a
    rotation by position, so rotating by -n_discard is the same as having stored them there)."""
    from .kernels import ops
    if cache.ring:
        raise ValueError("context shift is not supported with a sliding-window KV cache smaller than the context")
    back = np.array([-n_discard], np.int64)
    tables = {}
    for i, (k, v) in enumerate(zip(cache.k, cache.v)):
        r = model.layers[cache.first_layer + i].attn.rope
        if r.key not in tables:        # a pure rotation: no attention factor (it is in the stored keys already)
            if r.n_rot == 0:
                tables[r.key] = (np.zeros((1, 0), np.float32), np.zeros((1, 0), np.float32))
            else:
                ff = model.rope_factors(cache.n_ctx) if r.factors else None
                tables[r.key] = ops.rope_cache(back, r.n_rot, r.base, r.scale, ff, 1.0)
        cos, sin = tables[r.key]
        ops.kv_shift(k.q, k.d, k.kind, k.rot, seq, n_keep, n_discard, n_past, cos[0], sin[0], r.neox, True)
        ops.kv_shift(v.q, v.d, v.kind, v.rot, seq, n_keep, n_discard, n_past, cos[0], sin[0], r.neox, False)
