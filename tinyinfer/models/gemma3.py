"""Gemma 3 (``gemma3``), as llama.cpp runs it.

    x = embed(tokens) * sqrt(n_embd)
    for each layer (every 6th global, the others sliding-window):
        h = attn(rmsnorm(x) · w_attn_norm)       # per-head q/k RMSNorm, RoPE NEOX,
                                                # local base 10k / global rope.freq_base
        x = x + rmsnorm(h) · w_post_attention_norm
        h = mlp(rmsnorm(x) · w_ffn_norm)         # GELU-tanh gated
        x = x + rmsnorm(h) · w_post_ffw_norm
    logits = embed^T (rmsnorm(x) · w_output_norm)    # tied output

The GGUF already stores Gemma's norm weights as (1 + w), so they are used as they are.
Queries are scaled by 1/sqrt(key_length).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .base import (Attention, AttnParams, Embedding, FusedLinear, GatedMLP, KVCache, Linear, get, meta,
                   norm_weight, rmsnorm, rope_scale_from, rope_tables)
from ..kernels import ops

SWA_PATTERN = 6           # layers il with (il + 1) % 6 == 0 use global attention
LOCAL_ROPE_BASE = 10000.0


class Gemma3Model:
    arch = "gemma3"

    def __init__(self, g):
        a = self.arch
        self.n_embd = n_embd = int(meta(g, a, "embedding_length"))
        self.n_layer = int(meta(g, a, "block_count"))
        self.n_ctx_train = int(meta(g, a, "context_length", 8192))
        n_head = int(meta(g, a, "attention.head_count"))
        n_kv = int(meta(g, a, "attention.head_count_kv", n_head))
        hd_k = int(meta(g, a, "attention.key_length", n_embd // n_head))
        hd_v = int(meta(g, a, "attention.value_length", hd_k))
        self.eps = eps = float(meta(g, a, "attention.layer_norm_rms_epsilon", 1e-6))
        window = int(meta(g, a, "attention.sliding_window", 0, required=False) or 0)
        glob = AttnParams(n_head=n_head, n_kv_head=n_kv, head_dim_k=hd_k, head_dim_v=hd_v,
                          n_rot=int(meta(g, a, "rope.dimension_count", hd_k)),
                          rope_base=float(meta(g, a, "rope.freq_base", 1e6)), rope_scale=rope_scale_from(g, a),
                          rope_neox=True, scale=1.0 / math.sqrt(hd_k), eps=eps)
        local = replace(glob, rope_base=LOCAL_ROPE_BASE, rope_scale=1.0, window=window)
        self.windows = []

        self.tok_embd = Embedding(get(g, "token_embd.weight"))
        self.n_vocab = self.tok_embd.n_vocab
        self.embd_scale = np.float32(math.sqrt(n_embd))
        self.layers = []
        for il in range(self.n_layer):
            b = f"blk.{il}."
            is_global = window <= 0 or (il + 1) % SWA_PATTERN == 0
            p = glob if is_global else local
            self.windows.append(p.window)
            attn = Attention(p, FusedLinear(*(get(g, b + f"attn_{x}.weight") for x in "qkv")),
                             Linear(get(g, b + "attn_output.weight")),
                             q_norm=norm_weight(g, b + "attn_q_norm.weight", hd_k),
                             k_norm=norm_weight(g, b + "attn_k_norm.weight", hd_k))
            mlp = GatedMLP(FusedLinear(get(g, b + "ffn_gate.weight"), get(g, b + "ffn_up.weight")),
                           Linear(get(g, b + "ffn_down.weight")), act="gelu")
            norms = [norm_weight(g, b + f"{x}.weight", n_embd)
                     for x in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")]
            self.layers.append((norms, attn, mlp))
        self.output_norm = norm_weight(g, "output_norm.weight", n_embd)
        out = g.tensors.get("output.weight") or get(g, "token_embd.weight")
        self.output = Linear(out)
        self.hd = (n_kv, hd_k, hd_v)
        self.eps32 = np.float32(eps)

    def new_cache(self, n_ctx: int, n_batch: int = 512, **kw) -> KVCache:
        n_kv, hd_k, hd_v = self.hd
        return KVCache(self.n_layer, n_ctx, n_kv, hd_k, hd_v, windows=self.windows, n_batch=n_batch, **kw)

    def forward(self, ids: np.ndarray, pos0: int, cache: KVCache, n_out: int = 1,
                embeddings: bool = False) -> np.ndarray:
        eps = self.eps32
        x = self.tok_embd(ids) * self.embd_scale
        ropes = rope_tables([attn for _, attn, _ in self.layers], pos0, x.shape[0])
        xn = rmsnorm(x, self.layers[0][0][0], eps)
        for il, ((_, post_attn_norm, ffn_norm, post_ffw_norm), attn, mlp) in enumerate(self.layers):
            h = attn(xn, cache.k[il], cache.v[il], pos0, ropes[attn.rope_key])
            ops.add_normed_rmsnorm(x, h, post_attn_norm, ffn_norm, eps, xn)      # x += norm(h); xn = norm(x)
            h = mlp(xn)
            nxt = self.layers[il + 1][0][0] if il + 1 < self.n_layer else self.output_norm
            ops.add_normed_rmsnorm(x, h, post_ffw_norm, nxt, eps, xn)
        xn = xn[-n_out:]
        if embeddings:
            return np.ascontiguousarray(xn)
        return self.output(xn)
