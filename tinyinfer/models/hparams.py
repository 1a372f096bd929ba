"""Hyper-parameters and weights of a GGUF model, read the way llama.cpp's loader reads them.

:class:`HParams` holds every number the shared transformer needs, from the ``<arch>.*`` metadata
keys (llama.cpp's ``llama_model::load_hparams``). :class:`Weights` hands out tensors by GGUF name
with their expected shapes checked, and at the end refuses a file holding a tensor nobody used
(llama.cpp's "wrong number of tensors"): a weight that changes the math must not be ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gguf import GGUFFile, TensorInfo
from ..kernels import quants


class ModelError(ValueError):
    """The model file cannot be run: unknown architecture, missing tensor or key, bad shapes."""


_MISSING = object()


def meta(g: GGUFFile, arch: str, key: str, default=_MISSING):
    """``<arch>.<key>`` from the metadata; without a default a missing key is a one-line error."""
    full = f"{arch}.{key}"
    v = g.metadata.get(full)
    if v is not None:
        return v
    if default is _MISSING:
        raise ModelError(f"{g.path}: missing metadata key {full!r} (required by the {arch} architecture)")
    return default


@dataclass
class HParams:
    arch: str
    n_embd: int
    n_layer: int
    n_ff: int
    n_ctx_train: int
    n_head: int
    n_kv_head: int
    head_dim_k: int            # attention.key_length, n_embd / n_head when absent
    head_dim_v: int            # attention.value_length, head_dim_k when absent
    eps: float                 # RMSNorm epsilon
    n_rot: int                 # rope.dimension_count: the rotated dims of each head (partial rotary when < head_dim_k)
    rope_base: float
    rope_scale: float          # 1 / linear scaling factor
    rope_attn_factor: float    # rope.scaling.attn_factor: multiplies cos and sin (LongRoPE)
    n_ctx_orig: int            # rope.scaling.original_context_length (phi3 picks its long factors beyond it)
    sliding_window: int

    @classmethod
    def from_gguf(cls, g: GGUFFile, arch: str, n_ctx_train: int = 2048, eps: float = 1e-5,
                  rope_base: float = 10000.0) -> "HParams":
        """Read the hyper-parameters; the keyword arguments are the defaults of keys a file may omit."""
        def m(key, default=_MISSING):
            return meta(g, arch, key, default)

        n_embd = int(m("embedding_length"))
        n_head = int(m("attention.head_count"))
        if n_head <= 0 or n_embd <= 0:
            raise ModelError(f"{g.path}: {arch}.embedding_length and attention.head_count must be positive")
        hd_k = int(m("attention.key_length", n_embd // n_head))
        n_ctx_train = int(m("context_length", n_ctx_train))
        hp = cls(
            arch=arch, n_embd=n_embd, n_layer=int(m("block_count")), n_ff=int(m("feed_forward_length")),
            n_ctx_train=n_ctx_train, n_head=n_head, n_kv_head=int(m("attention.head_count_kv", n_head)),
            head_dim_k=hd_k, head_dim_v=int(m("attention.value_length", hd_k)),
            eps=float(m("attention.layer_norm_rms_epsilon", eps)),
            n_rot=int(m("rope.dimension_count", hd_k)), rope_base=float(m("rope.freq_base", rope_base)),
            rope_scale=_rope_scale(g, arch), rope_attn_factor=float(m("rope.scaling.attn_factor", 1.0)),
            n_ctx_orig=int(m("rope.scaling.original_context_length", n_ctx_train)),
            sliding_window=int(m("attention.sliding_window", 0)))
        hp.check(g.path)
        return hp

    def check(self, path) -> None:
        """Values the kernels index by: out of range they would read past arrays, so refuse them here."""
        a = self.arch
        bad = None
        if self.n_layer <= 0 or self.n_ff <= 0 or self.head_dim_k <= 0 or self.head_dim_v <= 0:
            bad = f"{a}.block_count, feed_forward_length and the head dims must be positive"
        elif self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
            bad = f"{a}.attention.head_count ({self.n_head}) is not a multiple of head_count_kv ({self.n_kv_head})"
        elif self.n_rot < 0 or self.n_rot % 2 or self.n_rot > self.head_dim_k:
            bad = (f"{a}.rope.dimension_count ({self.n_rot}) must be even and at most the head dim "
                   f"({self.head_dim_k})")
        if bad:
            raise ModelError(f"{path}: {bad}")

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim_k

    @property
    def n_embd_k(self) -> int:
        return self.n_kv_head * self.head_dim_k

    @property
    def n_embd_v(self) -> int:
        return self.n_kv_head * self.head_dim_v


def _rope_scale(g: GGUFFile, arch: str) -> float:
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


class Weights:
    """Tensors of one file by GGUF name, shape-checked (ggml order: input size first), use recorded."""

    def __init__(self, g: GGUFFile, arch: str):
        self.g, self.arch = g, arch
        self.used: set = set()

    def optional(self, name: str, *shape) -> TensorInfo | None:
        """The tensor ``name`` or None; ``shape`` in ggml order, None for any size along that axis."""
        t = self.g.tensors.get(name)
        if t is None:
            return None
        if shape and (len(t.shape) != len(shape) or any(e is not None and e != s for e, s in zip(shape, t.shape))):
            want = "x".join("*" if e is None else str(e) for e in shape)
            raise ModelError(f"{self.g.path}: tensor {name!r} has shape {'x'.join(map(str, t.shape))}, "
                             f"the {self.arch} architecture expects {want}")
        quants.type_info(t.ggml_type)     # a clear error for an unsupported type
        self.used.add(name)
        return t

    def tensor(self, name: str, *shape) -> TensorInfo:
        t = self.optional(name, *shape)
        if t is None:
            raise ModelError(f"{self.g.path}: missing tensor {name!r} (required by the {self.arch} architecture)")
        return t

    def vector(self, name: str, n: int, required: bool = True) -> np.ndarray | None:
        """A 1-D weight (norm, bias, rope factors) as float32 (n,)."""
        t = self.tensor(name, n) if required else self.optional(name, n)
        if t is None:
            return None
        return np.ascontiguousarray(quants.dequantize(t.data, t.ggml_type, n).reshape(-1), dtype=np.float32)

    def check_all_used(self) -> None:
        unused = sorted(set(self.g.tensors) - self.used)
        if unused:
            more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
            raise ModelError(f"{self.g.path}: tensor {unused[0]!r}{more} is not used by the {self.arch} architecture; "
                             f"running without it would compute something else")
