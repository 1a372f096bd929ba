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

from .base import Transformer

SWA_PATTERN = 6           # layers il with (il + 1) % 6 == 0 use global attention
LOCAL_ROPE_BASE = 10000.0


class Gemma3Model(Transformer):
    arch = "gemma3"
    rope_neox = True
    act = "gelu"
    hparam_defaults = dict(n_ctx_train=8192, eps=1e-6, rope_base=1e6)

    def __init__(self, g, **kw):
        super().__init__(g, **kw)
        self.embd_scale = math.sqrt(self.n_embd)

    def is_global(self, il):
        return self.hp.sliding_window <= 0 or (il + 1) % SWA_PATTERN == 0

    def rope(self, il):
        r = super().rope(il)
        return r if self.is_global(il) else replace(r, base=LOCAL_ROPE_BASE, scale=1.0)

    def load_attention(self, w, il):
        b, hd = f"blk.{il}.", self.hp.head_dim_k
        return super().load_attention(w, il, q_norm=w.vector(b + "attn_q_norm.weight", hd),
                                      k_norm=w.vector(b + "attn_k_norm.weight", hd),
                                      window=0 if self.is_global(il) else self.hp.sliding_window)

    def load_block(self, w, il):
        b = f"blk.{il}."
        return super().load_block(w, il, post_attn_norm=w.vector(b + "post_attention_norm.weight", self.n_embd),
                                  post_ffw_norm=w.vector(b + "post_ffw_norm.weight", self.n_embd))
