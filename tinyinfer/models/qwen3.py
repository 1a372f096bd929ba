"""Qwen3 dense (``qwen3``): llama with a per-head RMSNorm of q and k before a NEOX RoPE.

    x = embed(tokens)
    for each layer:
        q, k, v = W_q x, W_k x, W_v x               # head dim = key_length (not n_embd / n_head)
        q, k = rmsnorm_per_head(q) · w_q_norm, rmsnorm_per_head(k) · w_k_norm
        x = x + attn(rope_neox(q), rope_neox(k), v) # over rmsnorm(x) · w_attn_norm, GQA
        x = x + mlp(rmsnorm(x) · w_ffn_norm)        # SwiGLU
    logits = output(rmsnorm(x) · w_output_norm)     # output tied to embed if absent
"""

from __future__ import annotations

from .base import Transformer


class Qwen3Model(Transformer):
    arch = "qwen3"
    rope_neox = True
    hparam_defaults = dict(n_ctx_train=32768, eps=1e-6, rope_base=1e6)

    def load_attention(self, w, il):
        b, hd = f"blk.{il}.", self.hp.head_dim_k
        return super().load_attention(w, il, q_norm=w.vector(b + "attn_q_norm.weight", hd),
                                      k_norm=w.vector(b + "attn_k_norm.weight", hd))
