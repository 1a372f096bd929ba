"""Pieces every architecture shares: weights, KV cache, attention and MLP blocks.

An architecture file (llama.py, gemma3.py, ...) reads its hyper-parameters from
GGUF metadata, picks its weights by tensor name, and writes its forward pass
with these blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..gguf import GGUFError, GGUFFile, TensorInfo
from ..kernels import ops
from ..kernels import matmul as mm
from ..kernels import quants


class ModelError(ValueError):
    """The model file cannot be run: unknown architecture, missing tensor, bad shapes."""


def meta(g: GGUFFile, arch: str, key: str, default=None, required=True):
    full = f"{arch}.{key}"
    if full in g.metadata:
        return g.metadata[full]
    if default is not None or not required:
        return default
    raise ModelError(f"{g.path}: missing metadata key {full!r}")


class Linear:
    """A weight matrix W (rows = out features, k = in features) computing x @ W.T."""

    def __init__(self, t: TensorInfo):
        quants.type_info(t.ggml_type)  # clear error for unsupported types
        self.name = t.name
        self.k = t.shape[0]
        self.rows = t.n_elements // self.k
        self.ggml_type = t.ggml_type
        self.nbytes = t.nbytes
        self.w = mm.prepare(t.data, t.ggml_type, self.k)

    def __call__(self, x: np.ndarray, out=None) -> np.ndarray:
        return mm.matmul(self.w, x, out)


class Embedding:
    """Token embedding table of any supported type; rows dequantized on lookup."""

    def __init__(self, t: TensorInfo):
        quants.type_info(t.ggml_type)
        self.t = t
        self.dim = t.shape[0]
        self.n_vocab = t.n_elements // self.dim

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise ModelError(f"token id {bad} is out of range for a vocabulary of {self.n_vocab}")
        return quants.dequantize(self.t.data[ids], self.t.ggml_type, self.dim)


class KVCache:
    """Per-layer key/value buffers.

    A layer with full attention holds ``n_ctx`` positions; a sliding-window layer only
    ``window + n_batch`` of them, used as a ring (position p lives in row p % rows), which is
    enough for every query of a batch to see its whole window.

    Values are rounded to f16 on store, as llama.cpp's default f16 cache holds them, but kept
    in float32 arrays because numba has no float16 arithmetic on the CPU (2x the memory).
    """

    def __init__(self, n_layer, n_ctx, n_kv_head, head_dim_k, head_dim_v, windows=None, n_batch=512):
        self.n_ctx = n_ctx
        self.k = []
        self.v = []
        for il in range(n_layer):
            w = windows[il] if windows else 0
            rows = min(n_ctx, w + n_batch) if w > 0 else n_ctx
            self.k.append(np.zeros((rows, n_kv_head, head_dim_k), np.float32))
            self.v.append(np.zeros((rows, n_kv_head, head_dim_v), np.float32))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


def get(g: GGUFFile, name: str) -> TensorInfo:
    t = g.tensors.get(name)
    if t is None:
        raise ModelError(f"{g.path}: missing tensor {name!r} ({g.architecture} architecture)")
    return t


def norm_weight(g: GGUFFile, name: str, dim: int, add_one: bool = False) -> np.ndarray:
    t = get(g, name)
    w = quants.dequantize(t.data, t.ggml_type, t.shape[0]).reshape(-1)
    if w.shape[0] != dim:
        raise ModelError(f"{name}: expected {dim} values, found {w.shape[0]}")
    if add_one:
        w = w + 1.0
    return np.ascontiguousarray(w, dtype=np.float32)


@dataclass
class AttnParams:
    n_head: int
    n_kv_head: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    rope_base: float
    rope_scale: float   # 1 / linear scaling factor
    rope_neox: bool
    scale: float
    eps: float
    window: int = 0
    softcap: float = 0.0


class Attention:
    """Self-attention with RoPE, GQA and an optional per-head q/k RMSNorm."""

    def __init__(self, p: AttnParams, wq, wk, wv, wo, q_norm=None, k_norm=None):
        self.p = p
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo
        self.q_norm, self.k_norm = q_norm, k_norm

    def __call__(self, h, k_cache, v_cache, pos0):
        p = self.p
        n = h.shape[0]
        q = self.wq(h).reshape(n, p.n_head, p.head_dim_k)
        k = self.wk(h).reshape(n, p.n_kv_head, p.head_dim_k)
        v = self.wv(h).reshape(n, p.n_kv_head, p.head_dim_v)
        if self.q_norm is not None:
            ops.rmsnorm_heads(q, self.q_norm, p.eps)
            ops.rmsnorm_heads(k, self.k_norm, p.eps)
        positions = np.arange(pos0, pos0 + n, dtype=np.int64)
        cos, sin = ops.rope_cache(positions, p.n_rot, p.rope_base, p.rope_scale)
        ops.rope(q, cos, sin, p.rope_neox)
        ops.rope(k, cos, sin, p.rope_neox)
        rows = np.arange(pos0, pos0 + n) % k_cache.shape[0]
        k_cache[rows] = k.astype(np.float16)
        v_cache[rows] = v.astype(np.float16)
        out = np.empty((n, p.n_head, p.head_dim_v), np.float32)
        ops.attention(q, k_cache, v_cache, pos0, np.float32(p.scale), p.window, np.float32(p.softcap), out)
        return self.wo(out.reshape(n, p.n_head * p.head_dim_v))


class GatedMLP:
    """down(act(gate(x)) * up(x)) with act = SiLU (llama) or GELU-tanh (gemma)."""

    def __init__(self, gate, up, down, act: str = "silu"):
        self.gate, self.up, self.down = gate, up, down
        self.act = ops.silu_mul if act == "silu" else ops.gelu_mul

    def __call__(self, h):
        g = self.gate(h)
        u = self.up(h)
        self.act(g, u)
        return self.down(g)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return ops.rmsnorm(x, w, np.float32(eps), np.empty_like(x))


def rope_scale_from(g: GGUFFile, arch: str) -> float:
    """freq_scale = 1/factor for linear rope scaling, 1 otherwise."""
    typ = g.get(f"{arch}.rope.scaling.type")
    factor = g.get(f"{arch}.rope.scaling.factor")
    if factor is None:
        factor = g.get(f"{arch}.rope.scale_linear")
    if typ in (None, "none") and factor is None:
        return 1.0
    if typ not in (None, "linear"):
        raise ModelError(f"{g.path}: rope scaling type {typ!r} is not supported (only linear)")
    return 1.0 / float(factor) if factor else 1.0


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
