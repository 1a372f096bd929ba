"""LLaMA (1/2/3), TinyLlama, SmolLM2, Mistral-style files that say ``llama``.

    x = embed(tokens)
    for each layer:
        x = x + attn(rmsnorm(x) · w_attn_norm)      # RoPE (NORM mode), GQA
        x = x + mlp(rmsnorm(x) · w_ffn_norm)        # SwiGLU
    logits = output(rmsnorm(x) · w_output_norm)     # output tied to embed if absent
"""

from __future__ import annotations

import numpy as np

from .base import (Attention, AttnParams, Embedding, FusedLinear, GatedMLP, KVCache, Linear, add_rmsnorm,
                   default_scale, get, meta, norm_weight, rmsnorm, rope_scale_from, rope_tables)


class LlamaModel:
    arch = "llama"

    def __init__(self, g):
        a = self.arch
        self.n_embd = n_embd = int(meta(g, a, "embedding_length"))
        self.n_layer = int(meta(g, a, "block_count"))
        self.n_ctx_train = int(meta(g, a, "context_length", 2048))
        n_head = int(meta(g, a, "attention.head_count"))
        n_kv = int(meta(g, a, "attention.head_count_kv", n_head))
        head_dim = int(meta(g, a, "attention.key_length", n_embd // n_head))
        head_dim_v = int(meta(g, a, "attention.value_length", head_dim))
        self.eps = float(meta(g, a, "attention.layer_norm_rms_epsilon", 1e-5))
        self.attn_params = AttnParams(
            n_head=n_head, n_kv_head=n_kv, head_dim_k=head_dim, head_dim_v=head_dim_v,
            n_rot=int(meta(g, a, "rope.dimension_count", head_dim)),
            rope_base=float(meta(g, a, "rope.freq_base", 10000.0)),
            rope_scale=rope_scale_from(g, a), rope_neox=False,
            scale=default_scale(head_dim), eps=self.eps)

        self.tok_embd = Embedding(get(g, "token_embd.weight"))
        self.n_vocab = self.tok_embd.n_vocab
        self.layers = []
        for il in range(self.n_layer):
            b = f"blk.{il}."
            attn = Attention(self.attn_params, FusedLinear(*(get(g, b + f"attn_{x}.weight") for x in "qkv")),
                             Linear(get(g, b + "attn_output.weight")))
            mlp = GatedMLP(FusedLinear(get(g, b + "ffn_gate.weight"), get(g, b + "ffn_up.weight")),
                           Linear(get(g, b + "ffn_down.weight")), act="silu")
            self.layers.append((norm_weight(g, b + "attn_norm.weight", n_embd), attn,
                                norm_weight(g, b + "ffn_norm.weight", n_embd), mlp))
        self.output_norm = norm_weight(g, "output_norm.weight", n_embd)
        out = g.tensors.get("output.weight") or get(g, "token_embd.weight")
        self.output = Linear(out)
        self.eps32 = np.float32(self.eps)

    def new_cache(self, n_ctx: int, n_batch: int = 512, **kw) -> KVCache:
        """kw: n_seq, type_k, type_v (see tinyinfer/kvcache.py)."""
        p = self.attn_params
        return KVCache(self.n_layer, n_ctx, p.n_kv_head, p.head_dim_k, p.head_dim_v, **kw)

    def forward(self, ids: np.ndarray, pos0: int, cache: KVCache, n_out: int = 1,
                embeddings: bool = False) -> np.ndarray:
        """Run tokens ``ids`` at positions pos0.. and return the logits of the last ``n_out`` (n_out, n_vocab)
        (with ``embeddings``, their final normalized hidden states (n_out, n_embd) instead)."""
        x = self.tok_embd(ids)
        eps = self.eps32
        rope = rope_tables([self.layers[0][1]], pos0, x.shape[0])[self.layers[0][1].rope_key]
        xn = rmsnorm(x, self.layers[0][0], eps)
        for il, (_, attn, ffn_norm, mlp) in enumerate(self.layers):
            add_rmsnorm(x, attn(xn, cache.k[il], cache.v[il], pos0, rope), ffn_norm, eps, xn)
            nxt = self.layers[il + 1][0] if il + 1 < self.n_layer else self.output_norm
            add_rmsnorm(x, mlp(xn), nxt, eps, xn)     # x += mlp; xn = the next norm of x
        xn = xn[-n_out:]
        if embeddings:
            return np.ascontiguousarray(xn)
        return self.output(xn)
