"""Qwen3 dense (``qwen3``): llama with a per-head RMSNorm of q and k before a NEOX RoPE.

    x = embed(tokens)
    for each layer:
        q, k, v = W_q x, W_k x, W_v x               # head dim = key_length (not n_embd / n_head)
        q, k = rmsnorm_per_head(q) · w_q_norm, rmsnorm_per_head(k) · w_k_norm
        x = x + attn(rope_neox(q), rope_neox(k), v) # over rmsnorm(x) · w_attn_norm, GQA
        x = x + mlp(rmsnorm(x) · w_ffn_norm)        # SwiGLU
    logits = output(rmsnorm(x) · w_output_norm)     # output tied to embed if absent

Qwen3-Reranker (llama.cpp's convert_hf_to_gguf: ``qwen3.pooling_type`` rank, classifier labels yes/no,
``cls.output.weight`` = the lm_head rows of "yes" and "no"): the rank head on the last token's final
hidden state (the model is causal), softmax over the two, the score is P(yes)::

    scores = softmax(cls_output(rmsnorm(x[last]) · w_output_norm))
"""

from __future__ import annotations

import numpy as np

from .base import Linear, Transformer


class Qwen3Model(Transformer):
    arch = "qwen3"
    rope_neox = True
    hparam_defaults = dict(n_ctx_train=32768, eps=1e-6, rope_base=1e6)

    def load_attention(self, w, il):
        b, hd = f"blk.{il}.", self.hp.head_dim_k
        return super().load_attention(w, il, q_norm=w.vector(b + "attn_q_norm.weight", hd),
                                      k_norm=w.vector(b + "attn_k_norm.weight", hd))

    cls_out = None                    # Qwen3-Reranker's yes/no rows of the output head

    def load_extra(self, w):
        super().load_extra(w)
        out = w.optional("cls.output.weight", self.n_embd, None)
        self.cls_out = None if out is None else Linear(out)

    @property
    def has_rank_head(self) -> bool:
        return self.cls_out is not None

    def rank(self, pooled: np.ndarray) -> np.ndarray:
        """llama.cpp's rank pooling for qwen3: softmax(cls_output(hidden of the last token)), rows (n, n_embd)."""
        s = self.cls_out(np.ascontiguousarray(pooled, np.float32))
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return s
