"""Qwen2 / Qwen2.5 (``qwen2``): llama with biases on q, k and v and NEOX RoPE.

    x = embed(tokens)
    for each layer:
        x = x + attn(rmsnorm(x) · w_attn_norm)      # q/k/v = W x + b; RoPE NEOX, GQA
        x = x + mlp(rmsnorm(x) · w_ffn_norm)        # SwiGLU
    logits = output(rmsnorm(x) · w_output_norm)     # output tied to embed if absent
"""

from __future__ import annotations

import numpy as np

from .base import Transformer


class Qwen2Model(Transformer):
    arch = "qwen2"
    rope_neox = True
    hparam_defaults = dict(n_ctx_train=32768, eps=1e-6, rope_base=1e6)

    def load_attention(self, w, il):
        hp, b = self.hp, f"blk.{il}."
        bias = np.concatenate([w.vector(b + "attn_q.bias", hp.n_embd_q), w.vector(b + "attn_k.bias", hp.n_embd_k),
                               w.vector(b + "attn_v.bias", hp.n_embd_v)])
        return super().load_attention(w, il, bqkv=bias)
