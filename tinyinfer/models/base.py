"""Pieces every architecture shares: weights, attention and MLP blocks (the KV cache: ../kvcache.py).

An architecture file (llama.py, gemma3.py, ...) reads its hyper-parameters from
GGUF metadata, picks its weights by tensor name, and writes its forward pass
with these blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..gguf import GGUFError, GGUFFile, TensorInfo, release_pages
from ..kernels import ops
from ..kernels import matmul as mm
from ..kernels import quants
from ..kvcache import Batch, KVCache  # noqa: F401  (KVCache: the models build theirs from here)


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
    """A weight matrix W (rows = out features, k = in features) computing x @ W.T.

    Given several tensors of the same ggml type and input size (q/k/v, gate/up), their rows are
    concatenated once at load time (a copy of those tensors) so one call quantizes the
    activations once and yields all outputs side by side: (n, sum of rows).
    """

    def __init__(self, *ts: TensorInfo):
        t = ts[0]
        quants.type_info(t.ggml_type)  # clear error for unsupported types
        self.name = "+".join(x.name for x in ts)
        self.k = t.shape[0]
        self.ggml_type = t.ggml_type
        self.splits = [x.n_elements // self.k for x in ts]
        self.rows = sum(self.splits)
        self.nbytes = sum(x.nbytes for x in ts)
        data = t.data if len(ts) == 1 else np.concatenate([x.data for x in ts], axis=0)
        self.w = mm.prepare(data, t.ggml_type, self.k)
        # the file's pages of what was copied (fused tensors) or repacked are not read again: out of RSS
        if len(ts) > 1:
            for x in ts:
                release_pages(x.data)
        elif getattr(self.w, "packed", None) is not None:
            n_packed = self.w.rows - len(self.w.tail)
            release_pages(np.asarray(t.data).reshape(-1)[:n_packed * self.w.w.shape[1]])

    def __call__(self, x: np.ndarray, out=None) -> np.ndarray:
        return mm.matmul(self.w, x, out)


class FusedLinear:
    """x @ [W1; W2; ...].T as few matmul calls as the tensors' types allow (one when they all match)."""

    def __init__(self, *ts: TensorInfo):
        ks = {t.shape[0] for t in ts}
        if len(ks) != 1:
            raise ModelError(f"{', '.join(t.name for t in ts)}: input sizes differ {sorted(ks)}")
        self.parts = []
        run = [ts[0]]
        for t in ts[1:]:
            if t.ggml_type == run[-1].ggml_type:
                run.append(t)
            else:
                self.parts.append(Linear(*run))
                run = [t]
        self.parts.append(Linear(*run))
        self.rows = sum(p.rows for p in self.parts)
        self.single = self.parts[0] if len(self.parts) == 1 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.single is not None:
            return self.single(x)
        return np.concatenate([p(x) for p in self.parts], axis=1)


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


def get(g: GGUFFile, name: str) -> TensorInfo:
    t = g.tensors.get(name)
    if t is None:
        raise ModelError(f"{g.path}: missing tensor {name!r} ({g.architecture} architecture)")
    return t


def norm_weight(g: GGUFFile, name: str, dim: int) -> np.ndarray:
    t = get(g, name)
    w = quants.dequantize(t.data, t.ggml_type, t.shape[0]).reshape(-1)
    if w.shape[0] != dim:
        raise ModelError(f"{name}: expected {dim} values, found {w.shape[0]}")
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
    """Self-attention with RoPE, GQA and an optional per-head q/k RMSNorm.

    wqkv: the q, k and v projections as one :class:`FusedLinear`. ``rope`` = the (cos, sin) tables
    of this forward pass's positions (see :func:`rope_tables`), computed once per pass, not per layer.
    """

    def __init__(self, p: AttnParams, wqkv, wo, q_norm=None, k_norm=None):
        self.p = p
        self.wqkv, self.wo = wqkv, wo
        self.q_norm = q_norm if q_norm is not None else np.zeros(0, np.float32)
        self.k_norm = k_norm if k_norm is not None else np.zeros(0, np.float32)
        self.scale = np.float32(p.scale)
        self.softcap = np.float32(p.softcap)
        self.eps = np.float32(p.eps)

    @property
    def rope_key(self):
        return (self.p.n_rot, self.p.rope_base, self.p.rope_scale)

    def __call__(self, h, k_cache, v_cache, pos0, rope):
        """k_cache, v_cache: this layer's KV stores; pos0: the first position (sequence 0) or a
        :class:`Batch` (each token's position and sequence)."""
        p = self.p
        n = h.shape[0]
        b = Batch.of(pos0, n)
        qkv = self.wqkv(h)
        q = np.empty((n, p.n_head, p.head_dim_k), np.float32)
        ops.qkv_store(qkv, p.n_head, p.n_kv_head, p.head_dim_k, p.head_dim_v, self.q_norm, self.k_norm,
                      self.eps, rope[0], rope[1], p.rope_neox, k_cache.q, k_cache.d, k_cache.kind,
                      v_cache.q, v_cache.d, v_cache.kind, b.pos, b.seq, q)
        out = np.empty((n, p.n_head, p.head_dim_v), np.float32)
        ops.attention(q, k_cache, v_cache, b.pos, b.seq, self.scale, p.window, self.softcap, out)
        return self.wo(out.reshape(n, p.n_head * p.head_dim_v))


def rope_tables(attns, pos0, n: int) -> dict:
    """(cos, sin) per distinct rope setting of the layers ``attns``, for positions pos0..pos0+n-1
    (or a :class:`Batch`'s positions)."""
    positions = Batch.of(pos0, n).pos
    tables = {}
    for a in attns:
        key = a.rope_key
        if key not in tables:
            tables[key] = ops.rope_cache(positions, key[0], key[1], key[2])
    return tables


class GatedMLP:
    """down(act(gate(x)) * up(x)) with act = SiLU (llama) or GELU-tanh (gemma); gate/up fused into one matmul."""

    def __init__(self, gate_up, down, act: str = "silu"):
        self.gate_up, self.down = gate_up, down
        self.n_ff = gate_up.rows // 2
        self.act = ops.silu_mul_split if act == "silu" else ops.gelu_mul_split

    def __call__(self, h):
        gu = self.gate_up(h)
        g = np.empty((h.shape[0], self.n_ff), np.float32)
        self.act(gu, g)
        return self.down(g)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return ops.rmsnorm(x, w, np.float32(eps), np.empty_like(x))


def add_rmsnorm(x: np.ndarray, h: np.ndarray, w: np.ndarray, eps, out: np.ndarray) -> np.ndarray:
    """x += h; return rmsnorm(x) * w (written to out): a residual add and the next block's norm in one pass."""
    return ops.add_rmsnorm(x, h, w, eps, out)


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
