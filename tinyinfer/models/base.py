"""Pieces every architecture shares: linear layers, attention, MLP, the block and the model
(the KV cache: ../kvcache.py).

:class:`Transformer` is the decoder every architecture file (llama.py, qwen2.py, gemma3.py, ...)
subclasses: hyper-parameters come from GGUF metadata (:class:`~.hparams.HParams`), weights by
tensor name through :class:`~.hparams.Weights`, and an architecture overrides only the loading
hooks where it differs (its attention, its MLP, its RoPE, its embedding scale). The forward pass
is written once, in three parts a layer split can call separately::

    x = embed(ids)                                  # (n, n_embd)
    x = forward_layers(x, pos0, cache, lo, hi)      # blocks lo..hi-1, in place
    logits = head(x, n_out)                         # output norm and projection of the last n_out rows
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from ..gguf import TensorInfo
from ..kernels import ops
from ..kernels import matmul as mm
from ..kernels import parallel as _par
from ..kernels import quants
from ..kvcache import Batch, KVCache, shift
from .hparams import HParams, ModelError, Weights  # noqa: F401  (ModelError re-exported)


class Linear:
    """A weight matrix W (rows = out features, k = in features) computing x @ W.T.

    Given several tensors of the same ggml type and input size (q/k/v, gate/up), their rows are
    concatenated once at load time (a copy of those tensors) so one call quantizes the
    activations once and yields all outputs side by side: (n, sum of rows). ``repack``: as
    :func:`~..kernels.matmul.prepare`'s; ``copy``: a single tensor's rows copied out of the mapping too.
    """

    def __init__(self, *ts: TensorInfo, repack: bool | None = None, copy: bool = False):
        t = ts[0]
        quants.type_info(t.ggml_type)  # clear error for unsupported types
        self.name = "+".join(x.name for x in ts)
        self.k = t.shape[0]
        self.ggml_type = t.ggml_type
        self.splits = [x.n_elements // self.k for x in ts]
        self.rows = sum(self.splits)
        self.nbytes = sum(x.nbytes for x in ts)
        data = t.data if len(ts) == 1 else np.concatenate([x.data for x in ts], axis=0)
        if copy and len(ts) == 1:
            data = np.array(data)
        self.w = mm.prepare(data, t.ggml_type, self.k, repack=repack)
        if len(ts) > 1 or copy:  # the copy holds the data now: the file's pages need not stay resident
            for x in ts:
                mm.drop_file_pages(x.data)

    def __call__(self, x: np.ndarray, out=None) -> np.ndarray:
        """x: float32 C-contiguous (n, k), as the forward pass makes them (no argument checks: mm.run)."""
        if out is None:
            out = np.empty((x.shape[0], self.rows), np.float32)
        return mm.run(self.w, x, out)


class OutputLinear(Linear):
    """The output projection (the tied embeddings or ``output.weight``). Where a single row runs on the
    tensor's own blocks (x86 K-quants under ``KernelConfig(gemv_x16=False)``: the kgemv kernels), the
    GEMM layout's copy (for a Q6_K
    151936-token vocabulary of 1024 inputs: 159 MiB, more than the tensor) is made on the first call with
    several rows (perplexity, ``logits_all``, a batch of sequences), not at load: a process that only
    decodes (one row of logits a step) never holds it. The blocks themselves are copied out of the
    mapping and its pages released (the same resident size: every step reads all of them): in
    anonymous memory, which numpy backs with huge pages, the GEMV runs ~12 % faster than on the file's
    4 KiB pages (x86 guest, Dec 2026: 13.2 against 15.2 ms a token for that Q6_K head). Elsewhere
    (aarch64's layouts, the x16 GEMV formats: every x16 type by default)
    the copy is the single row's layout too and is made at load
    as by :class:`Linear`."""

    def __init__(self, t: TensorInfo):
        probe = mm.prepare(t.data[:mm.GROUP], t.ggml_type, t.shape[0])       # 16 rows: what the layout does
        lazy = probe.packed is not None and mm._plan(probe, 1)[0] is False  # n = 1 reads the file's rows
        super().__init__(t, repack=False if lazy else None, copy=lazy)
        self._full = (self.w.w, probe.config) if lazy else None
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray, out=None) -> np.ndarray:
        if self._full is not None and x.shape[0] > 1:
            with self._lock:        # server threads: one copy
                if self._full is not None:
                    data, cfg = self._full
                    self.w = mm.prepare(data, self.ggml_type, self.k, config=cfg)
                    self._full = None
        return super().__call__(x, out)


def fused_linear(*ts: TensorInfo, linear=None):
    """x @ [W1; W2; ...].T in as few matmul calls as the tensors' types allow: one :class:`Linear` when
    they all match (no wrapper on the per-token path), else a :class:`FusedLinear` of the runs.
    ``linear``: the :class:`Linear` subclass to build (an encoder's, models/encoder.py)."""
    linear = linear or Linear
    ks = {t.shape[0] for t in ts}
    if len(ks) != 1:
        raise ModelError(f"{', '.join(t.name for t in ts)}: input sizes differ {sorted(ks)}")
    runs = [[ts[0]]]
    for t in ts[1:]:
        if t.ggml_type == runs[-1][-1].ggml_type:
            runs[-1].append(t)
        else:
            runs.append([t])
    return linear(*runs[0]) if len(runs) == 1 else FusedLinear([linear(*r) for r in runs])


class FusedLinear:
    """Projections of different types side by side: one matmul call per part (see :func:`fused_linear`)."""

    def __init__(self, parts):
        self.parts = parts
        self.rows = sum(p.rows for p in self.parts)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 1:     # the parts write into one row (a slice of a 1-row array is contiguous)
            out = np.empty((1, self.rows), np.float32)
            lo = 0
            for p in self.parts:
                p(x, out[:, lo:lo + p.rows])
                lo += p.rows
            return out
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


@dataclass(frozen=True)
class Rope:
    """One rotary-embedding setting. ``n_rot`` = 0: no rotation (smollm3's NoPE layers).
    ``factors``: the frequencies are divided by the model's per-frequency factors
    (``rope_freqs`` or phi3's short/long factors, see :meth:`Transformer.rope_factors`)."""
    n_rot: int
    base: float
    scale: float = 1.0
    attn_factor: float = 1.0
    neox: bool = False
    factors: bool = False

    @property
    def key(self):
        return (self.n_rot, self.base, self.scale, self.attn_factor, self.factors)

    def tables(self, positions: np.ndarray, factors) -> tuple:
        if self.n_rot == 0:
            return np.zeros((positions.size, 0), np.float32), np.zeros((positions.size, 0), np.float32)
        return ops.rope_cache(positions, self.n_rot, self.base, self.scale, factors if self.factors else None,
                              self.attn_factor)


class Attention:
    """Self-attention with RoPE, GQA, optional q/k/v biases and an optional per-head q/k RMSNorm.

    wqkv: the q, k and v projections as one matmul (:func:`fused_linear` or a fused tensor);
    ``rope_tab`` = the (cos, sin) tables of this pass's positions, computed once per pass, not per layer.
    """

    def __init__(self, hp: HParams, rope: Rope, wqkv, wo, bqkv=None, q_norm=None, k_norm=None,
                 window: int = 0, scale: float | None = None, softcap: float = 0.0):
        self.hp, self.rope = hp, rope
        self.wqkv, self.wo, self.bqkv = wqkv, wo, bqkv
        self.q_norm = q_norm if q_norm is not None else np.zeros(0, np.float32)
        self.k_norm = k_norm if k_norm is not None else np.zeros(0, np.float32)
        self.window = window
        self.scale = np.float32(1.0 / math.sqrt(hp.head_dim_k) if scale is None else scale)
        self.softcap = np.float32(softcap)
        self.eps = np.float32(hp.eps)
        # the kernels' fixed argument records (kernels/ops.py)
        self.heads = ops.heads_record(hp.n_head, hp.n_kv_head, hp.head_dim_k, hp.head_dim_v, self.q_norm,
                                      self.k_norm, self.eps)
        self.attn = ops.attn_record(self.scale, self.window, self.softcap)

    def __call__(self, h, k_cache, v_cache, pos0, rope_tab):
        """k_cache, v_cache: this layer's :class:`~tinyinfer.kvcache.KVStore`; pos0: the first position
        (sequence 0) or a :class:`~tinyinfer.kvcache.Batch` (each token's position and sequence)."""
        p = self.hp
        n = h.shape[0]
        b = Batch.of(pos0, n)
        qkv = self.wqkv(h)
        if self.bqkv is not None:
            qkv += self.bqkv
        q = np.empty((n, p.n_head, p.head_dim_k), np.float32)
        out = np.empty((n, p.n_head, p.head_dim_v), np.float32)
        args = (qkv, self.heads, (rope_tab[0], rope_tab[1], self.rope.neox), k_cache.arrays, v_cache.arrays,
                b.pos, b.seq, q)
        if n == 1:      # a decode step: store and attend in one jitted call
            ops.decode_attention(*args, self.attn, out)
        else:
            ops.qkv_store(*args)
            ops.attention(q, k_cache, v_cache, b.pos, b.seq, self.scale, self.window, self.softcap, out)
        return self.wo(out.reshape(n, p.n_head * p.head_dim_v))


_ROWS_PAR = ops.ROWS_PARALLEL_MIN     # rows from which the elementwise steps run their row-parallel builds


class GatedMLP:
    """down(act(gate(x)) * up(x)) with act = SiLU (llama) or GELU-tanh (gemma); ``gate_up`` yields
    gate then up side by side (two tensors fused at load, or phi3's one ``ffn_up``)."""

    def __init__(self, gate_up, down, act: str = "silu"):
        self.gate_up, self.down = gate_up, down
        self.n_ff = gate_up.rows // 2
        self.act = ops.silu_mul_split if act == "silu" else ops.gelu_mul_split
        self.act_rows = ops.silu_mul_split_rows if act == "silu" else ops.gelu_mul_split_rows

    def __call__(self, h):
        gu = self.gate_up(h)
        n = h.shape[0]
        g = np.empty((n, self.n_ff), np.float32)
        if n < _ROWS_PAR:
            self.act(gu, g)
        else:                       # a prompt chunk: rows across the threads (the same floats per row)
            _par.call(self.act_rows, gu, g)
        return self.down(g)


class Block:
    """One pre-norm decoder layer; with post norms (Gemma) the sublayer outputs are normalized before the add:

        x = x + [post_attn_norm](attn(attn_norm(x)))
        x = x + [post_ffw_norm](mlp(ffn_norm(x)))

    Called with ``xn`` = attn_norm(x) already computed; leaves next_norm(x) in ``xn`` (the next block's
    input norm, or the output norm), so each residual add and the following norm are one pass.
    """

    def __init__(self, attn_norm, attn, ffn_norm, mlp, post_attn_norm=None, post_ffw_norm=None):
        self.attn_norm, self.attn, self.ffn_norm, self.mlp = attn_norm, attn, ffn_norm, mlp
        self.post_attn_norm, self.post_ffw_norm = post_attn_norm, post_ffw_norm

    @staticmethod
    def _add(x, h, post_norm, next_norm, eps, xn):
        if x.shape[0] < _ROWS_PAR:
            if post_norm is None:
                ops.add_rmsnorm(x, h, next_norm, eps, xn)                      # x += h; xn = norm(x)
            else:
                ops.add_normed_rmsnorm(x, h, post_norm, next_norm, eps, xn)    # x += norm(h); xn = norm(x)
        elif post_norm is None:     # a prompt chunk: rows across the threads (the same floats per row)
            _par.call(ops.add_rmsnorm_rows, x, h, next_norm, eps, xn)
        else:
            _par.call(ops.add_normed_rmsnorm_rows, x, h, post_norm, next_norm, eps, xn)

    def __call__(self, x, xn, next_norm, k_cache, v_cache, pos0, rope_tab, eps):
        # the sublayer outputs stay temporaries: with the attention output held in a local through the
        # MLP, glibc mapped the MLP's buffers anew on each pass (a 1.1B pp128 10% slower; kernels/heap.py)
        self._add(x, self.attn(xn, k_cache, v_cache, pos0, rope_tab), self.post_attn_norm, self.ffn_norm, eps, xn)
        self._add(x, self.mlp(xn), self.post_ffw_norm, next_norm, eps, xn)


class Transformer:
    """The decoder every architecture shares; a subclass sets ``arch`` and overrides the hooks that differ.

    Hooks (each with the llama behaviour by default): :meth:`rope` (per layer), :meth:`load_qkv`, :meth:`load_attention`,
    :meth:`load_mlp`, :meth:`load_block`, :meth:`load_extra` (model-level tensors such as rope
    factors), :meth:`rope_factors`; class attributes ``rope_neox``, ``act``, ``hparam_defaults``.
    """

    arch = ""
    rope_neox = False                 # ggml's NEOX rotation (pairs j, j + n_rot/2) instead of NORM (2j, 2j+1)
    act = "silu"
    hparam_defaults: dict = {}        # defaults of keys a file of this architecture may omit
    embd_scale = None                 # multiply the embeddings by this (Gemma: sqrt(n_embd))

    def __init__(self, g, layers: tuple | None = None):
        """``layers=(lo, hi)``: load only blocks lo..hi-1, a shard of a model split by layers
        (tinyinfer/models/split.py): ``self.layers`` holds None for the others, the output
        projection is built only by the shard that ends the model; the embedding table is a view
        into the file (pages are read only by the shard that looks tokens up)."""
        self.path = g.path
        self.hp = hp = HParams.from_gguf(g, self.arch, **self.hparam_defaults)
        self.n_embd, self.n_layer, self.n_ctx_train, self.eps = hp.n_embd, hp.n_layer, hp.n_ctx_train, hp.eps
        self.eps32 = np.float32(hp.eps)
        lo, hi = (0, hp.n_layer) if layers is None else layers
        if not 0 <= lo < hi <= hp.n_layer:
            raise ModelError(f"{g.path}: layer range {lo}..{hi} is not inside the model's 0..{hp.n_layer}")
        self.layer_range = (lo, hi)
        w = Weights(g, self.arch)
        self.tok_embd = Embedding(w.tensor("token_embd.weight", hp.n_embd, None))
        self.n_vocab = self.tok_embd.n_vocab
        self.load_extra(w)
        self.layers = [self.load_block(w, il) if lo <= il < hi else None for il in range(hp.n_layer)]
        self.output_norm = w.vector("output_norm.weight", hp.n_embd)
        out = w.optional("output.weight", hp.n_embd, self.n_vocab)
        self.output = None
        if hi == hp.n_layer:
            self.output = OutputLinear(out if out is not None else self.tok_embd.t)    # tied to the embeddings if absent
        # a shard checks its own tensors; the other shards check theirs
        w.used |= {n for n in g.tensors if n.startswith("blk.") and not lo <= int(n.split(".")[1]) < hi}
        w.check_all_used()

    # -- loading hooks -------------------------------------------------------------------------
    def load_extra(self, w: Weights) -> None:
        """Model-level tensors besides embeddings and output (none for llama without rope_freqs)."""

    def rope(self, il: int) -> Rope:
        hp = self.hp
        return Rope(hp.n_rot, hp.rope_base, hp.rope_scale, hp.rope_attn_factor, self.rope_neox)

    def load_qkv(self, w: Weights, il: int):
        """The q, k, v projections as one matmul (separate tensors fused at load)."""
        hp, b = self.hp, f"blk.{il}."
        return fused_linear(w.tensor(b + "attn_q.weight", hp.n_embd, hp.n_embd_q),
                           w.tensor(b + "attn_k.weight", hp.n_embd, hp.n_embd_k),
                           w.tensor(b + "attn_v.weight", hp.n_embd, hp.n_embd_v))

    def load_attention(self, w: Weights, il: int, **kw) -> Attention:
        """``kw``: the :class:`Attention` options an architecture adds (biases, q/k norms, window)."""
        hp = self.hp
        wo = Linear(w.tensor(f"blk.{il}.attn_output.weight", hp.n_embd_q, hp.n_embd))
        return Attention(hp, self.rope(il), self.load_qkv(w, il), wo, **kw)

    def load_mlp(self, w: Weights, il: int) -> GatedMLP:
        hp, b = self.hp, f"blk.{il}."
        return GatedMLP(fused_linear(w.tensor(b + "ffn_gate.weight", hp.n_embd, hp.n_ff),
                                    w.tensor(b + "ffn_up.weight", hp.n_embd, hp.n_ff)),
                        Linear(w.tensor(b + "ffn_down.weight", hp.n_ff, hp.n_embd)), act=self.act)

    def load_block(self, w: Weights, il: int, **kw) -> Block:
        """``kw``: post norms (Gemma)."""
        b = f"blk.{il}."
        return Block(w.vector(b + "attn_norm.weight", self.n_embd), self.load_attention(w, il),
                     w.vector(b + "ffn_norm.weight", self.n_embd), self.load_mlp(w, il), **kw)

    def rope_factors(self, n_ctx: int):
        """Per-frequency divisors for layers whose :class:`Rope` has ``factors`` (None: the model has none)."""
        return None

    # -- the forward pass ----------------------------------------------------------------------
    def new_cache(self, n_ctx: int, n_batch: int = 512, lo: int = 0, hi: int | None = None, **kw) -> KVCache:
        """A KV cache for ``n_ctx`` positions of layers lo..hi-1 (all layers by default); ``kw``: n_seq,
        type_k, type_v (see tinyinfer/kvcache.py)."""
        hi = self.n_layer if hi is None else hi
        hp = self.hp
        windows = [self.layers[il].attn.window for il in range(lo, hi)]
        return KVCache(hi - lo, n_ctx, hp.n_kv_head, hp.head_dim_k, hp.head_dim_v, windows=windows,
                       n_batch=n_batch, first_layer=lo, **kw)

    # -- the cache operations of the model interface (tinyinfer/models/interface.py) -------------
    def cache_shift(self, cache: KVCache, seq: int, n_keep: int, n_discard: int, n_past: int) -> None:
        shift(self, cache, seq, n_keep, n_discard, n_past)

    def cache_save(self, cache: KVCache, seq: int, n: int) -> bytes:
        return b"".join(cache.save(seq, n))

    def cache_load(self, cache: KVCache, seq: int, n: int, data: bytes) -> None:
        cache.load(seq, n, data)

    def cache_copy(self, cache: KVCache, src: int, dst: int, n: int) -> None:
        cache.copy_seq(src, dst, n)

    def cache_fingerprint(self, cache: KVCache) -> dict:
        return cache.fingerprint()

    def cache_state_sizes(self, cache: KVCache, n: int) -> tuple:
        return cache.state_sizes(n)

    def close(self) -> None:
        """Nothing to release: the weights are views of the file's mmap."""

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids -> the residual stream x (n, n_embd) float32."""
        x = self.tok_embd(ids)
        if self.embd_scale is not None:
            x *= np.float32(self.embd_scale)
        return x

    def rope_tables(self, pos0, n: int, n_ctx: int, layers) -> dict:
        """(cos, sin) per distinct rope setting of ``layers`` for positions pos0..pos0+n-1 (or a
        :class:`~tinyinfer.kvcache.Batch`'s positions)."""
        positions = Batch.of(pos0, n).pos
        tables = {}
        for L in layers:
            r = L.attn.rope
            if r.key not in tables:
                tables[r.key] = r.tables(positions, self.rope_factors(n_ctx) if r.factors else None)
        return tables

    def forward_layers(self, x: np.ndarray, pos0: int, cache: KVCache, lo: int = 0, hi: int | None = None):
        """Run blocks lo..hi-1 on the residual stream ``x`` (n, n_embd) in place and return it.
        ``cache`` holds all layers or only some (its ``first_layer``), lo..hi-1 among them."""
        hi = self.n_layer if hi is None else hi
        layers = self.layers[lo:hi]
        if not layers:
            return x
        pos0 = Batch.of(pos0, x.shape[0])              # once per pass, not per layer
        ropes = self.rope_tables(pos0, x.shape[0], cache.n_ctx, layers)
        eps, c0 = self.eps32, cache.first_layer
        xn = ops.rmsnorm(x, layers[0].attn_norm, eps, np.empty_like(x))
        for i, L in enumerate(layers):
            il = lo + i
            nxt = layers[i + 1].attn_norm if i + 1 < len(layers) else self.output_norm
            L(x, xn, nxt, cache.k[il - c0], cache.v[il - c0], pos0, ropes[L.attn.rope.key], eps)
        return x

    def head(self, x: np.ndarray, n_out: int = 1, embeddings: bool = False) -> np.ndarray:
        """Output norm and projection of the last ``n_out`` rows of x: logits (n_out, n_vocab), or with
        ``embeddings`` the normalized hidden states (n_out, n_embd)."""
        xn = ops.rmsnorm(np.ascontiguousarray(x[-n_out:]), self.output_norm, self.eps32,
                         np.empty((min(n_out, x.shape[0]), x.shape[1]), np.float32))
        return xn if embeddings else self.output(xn)

    def forward(self, ids: np.ndarray, pos0: int, cache: KVCache, n_out: int = 1,
                embeddings: bool = False) -> np.ndarray:
        """Run tokens ``ids`` at positions pos0.. and return the logits of the last ``n_out`` (n_out, n_vocab)
        (with ``embeddings``, their final normalized hidden states (n_out, n_embd) instead)."""
        return self.head(self.forward_layers(self.embed(ids), pos0, cache), n_out, embeddings)
