"""EmbeddingGemma (``gemma-embedding``): Gemma 3's layers run bidirectionally, then pooling and two dense
projections (llama.cpp's src/models/gemma-embedding.cpp and build_dense_out)::

    x = tok_embd[ids] * sqrt(n_embd)
    for each layer (every 6th global, the others a symmetric sliding window: |i - j| <= window / 2):
        h = rmsnorm(x) · attn_norm
        q, k = rope_neox(rmsnorm_heads(q) · q_norm), rope_neox(rmsnorm_heads(k) · k_norm)
                                                  # local layers rope.freq_base_swa, global rope.freq_base
        h = softmax(q k^T / sqrt(head_dim), within the sequence, no causal mask) v @ Wo
        x = x + rmsnorm(h) · attn_post_norm
        h = down(gelu_tanh(gate(rmsnorm(x) · ffn_norm)) * up(...))
        x = x + rmsnorm(h) · ffn_post_norm
    hidden = rmsnorm(x) · output_norm
    embedding = dense_3(dense_2(pool(hidden)))    # pooling and the projections: tinyinfer/embedding.py

Norm weights are stored as (1 + w) by the converter, as for gemma3. ``output.weight`` (the tied LM head)
is not part of an embedding.
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels import ops
from .encoder import Encoder, Linear, Packed, fused_linear
from .hparams import ModelError, Weights, meta


class _Layer:
    def __init__(self, w: Weights, il: int, m: "GemmaEmbeddingModel"):
        b, d = f"blk.{il}.", m.n_embd
        self.attn_norm = w.vector(b + "attn_norm.weight", d)
        self.wqkv = fused_linear(w.tensor(b + "attn_q.weight", d, m.n_head * m.head_dim),
                                 w.tensor(b + "attn_k.weight", d, m.n_kv * m.head_dim),
                                 w.tensor(b + "attn_v.weight", d, m.n_kv * m.head_dim))
        self.q_norm = w.vector(b + "attn_q_norm.weight", m.head_dim)
        self.k_norm = w.vector(b + "attn_k_norm.weight", m.head_dim)
        self.wo = Linear(w.tensor(b + "attn_output.weight", m.n_head * m.head_dim, d))
        self.post_attn_norm = w.vector(b + "post_attention_norm.weight", d)
        self.ffn_norm = w.vector(b + "ffn_norm.weight", d)
        self.gate_up = fused_linear(w.tensor(b + "ffn_gate.weight", d, m.n_ff), w.tensor(b + "ffn_up.weight", d, m.n_ff))
        self.down = Linear(w.tensor(b + "ffn_down.weight", m.n_ff, d))
        self.post_ffn_norm = w.vector(b + "post_ffw_norm.weight", d)
        self.swa = m.is_swa(il)


class GemmaEmbeddingModel(Encoder):
    arch = "gemma-embedding"

    def __init__(self, g, layers=None):
        self.read_common(g, layers)
        a = self.arch
        self.n_kv = int(meta(g, a, "attention.head_count_kv", self.n_head))
        self.head_dim = int(meta(g, a, "attention.key_length", self.n_embd // self.n_head))
        if int(meta(g, a, "attention.value_length", self.head_dim)) != self.head_dim:
            raise ModelError(f"{g.path}: {a}.attention.value_length differs from key_length: not supported")
        if self.n_kv <= 0 or self.n_head % self.n_kv:
            raise ModelError(f"{g.path}: {a}.attention.head_count ({self.n_head}) is not a multiple of "
                             f"head_count_kv ({self.n_kv})")
        self.n_rot = int(meta(g, a, "rope.dimension_count", self.head_dim))
        if self.n_rot <= 0 or self.n_rot % 2 or self.n_rot > self.head_dim:
            raise ModelError(f"{g.path}: {a}.rope.dimension_count ({self.n_rot}) must be even and at most the head dim")
        self.eps32 = np.float32(meta(g, a, "attention.layer_norm_rms_epsilon"))
        self.window = int(meta(g, a, "attention.sliding_window"))
        pattern = meta(g, a, "attention.sliding_window_pattern", 6)
        if isinstance(pattern, (list, tuple, np.ndarray)):
            if len(pattern) != self.n_layer:
                raise ModelError(f"{g.path}: {a}.attention.sliding_window_pattern has {len(pattern)} entries "
                                 f"for {self.n_layer} layers")
            self._swa = [bool(x) for x in pattern]
        else:
            p = int(pattern)
            self._swa = [p == 0 or il % p < p - 1 for il in range(self.n_layer)]
        self.rope_base = float(meta(g, a, "rope.freq_base", 10000.0))
        self.rope_base_swa = float(meta(g, a, "rope.freq_base_swa", 10000.0))
        if g.get(f"{a}.rope.scaling.type") not in (None, "none") or g.get(f"{a}.rope.scaling.factor") not in (None, 1.0):
            raise ModelError(f"{g.path}: {a}: rope scaling is not supported")
        w = Weights(g, a)
        self.tok_embd = w.tensor("token_embd.weight", self.n_embd, None)
        self.n_vocab = self.tok_embd.n_elements // self.n_embd
        self.output_norm = w.vector("output_norm.weight", self.n_embd)
        w.optional("output.weight", self.n_embd, self.n_vocab)      # the LM head: no part of an embedding
        self.layers = [_Layer(w, il, self) for il in range(self.n_layer)]
        self.load_heads(w)
        w.check_all_used()

    def is_swa(self, il: int) -> bool:
        return self._swa[il] and self.window > 0

    def encode(self, seqs: list) -> list:
        lens = self.check_lengths(seqs)
        pk = Packed(lens)
        x = self._rows(self.tok_embd, self.token_ids(seqs))
        x *= np.float32(math.sqrt(self.n_embd))
        ropes = {b: ops.rope_cache(pk.pos, self.n_rot, b, 1.0) for b in {self.rope_base, self.rope_base_swa}}
        H, K, hd, eps = self.n_head, self.n_kv, self.head_dim, self.eps32
        n = x.shape[0]
        h = np.empty_like(x)
        for L in self.layers:
            ops.rmsnorm(x, L.attn_norm, eps, h)
            qkv = L.wqkv(h)
            q = np.ascontiguousarray(qkv[:, :H * hd]).reshape(n, H, hd)
            k = np.ascontiguousarray(qkv[:, H * hd:(H + K) * hd]).reshape(n, K, hd)
            cos, sin = ropes[self.rope_base_swa if L.swa else self.rope_base]
            ops.rmsnorm_heads(q, L.q_norm, eps)
            ops.rmsnorm_heads(k, L.k_norm, eps)
            ops.rope(q, cos, sin, True)
            ops.rope(k, cos, sin, True)
            o = pk.attention(q.reshape(n, -1), k.reshape(n, -1), qkv[:, (H + K) * hd:], H, K, hd,
                             1.0 / math.sqrt(hd), self.window if L.swa else 0)
            a = L.wo(o)
            x += ops.rmsnorm(a, L.post_attn_norm, eps, a)
            ops.rmsnorm(x, L.ffn_norm, eps, h)
            gu = L.gate_up(h)
            g = np.empty((n, gu.shape[1] // 2), np.float32)
            ops.gelu_mul_split(gu, g)
            f = L.down(g)
            x += ops.rmsnorm(f, L.post_ffn_norm, eps, f)
        out = ops.rmsnorm(x, self.output_norm, eps, np.empty_like(x))
        return pk.split(out)
