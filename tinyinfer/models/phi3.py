"""Phi-3 / Phi-3.5 / Phi-4-mini (``phi3``): llama with fused projections and LongRoPE factors.

    x = embed(tokens)
    for each layer:
        q, k, v = split(W_qkv x)                    # one fused attn_qkv tensor
        x = x + attn(rmsnorm(x) · w_attn_norm)      # RoPE NEOX on the first rope.dimension_count dims,
                                                    # frequencies divided by rope_factors_short or _long
        gate, up = split(W_up x)                    # one fused ffn_up: gate rows, then up rows
        x = x + W_down (silu(gate) * up)            # over rmsnorm(x) · w_ffn_norm
    logits = output(rmsnorm(x) · w_output_norm)

As llama.cpp: the long factors when the context asked for exceeds rope.scaling.original_context_length,
else the short ones; rope.scaling.attn_factor scales cos and sin. A sliding window in the file is
ignored, as llama.cpp does (its Phi SWA is disabled).
"""

from __future__ import annotations

from dataclasses import replace

from .base import GatedMLP, Linear, ModelError, Transformer


class Phi3Model(Transformer):
    arch = "phi3"
    rope_neox = True
    hparam_defaults = dict(n_ctx_train=4096, eps=1e-5)

    def load_extra(self, w):
        n = self.hp.n_rot // 2
        self.factors_short = w.vector("rope_factors_short.weight", n, required=False)
        self.factors_long = w.vector("rope_factors_long.weight", n, required=False)
        if (self.factors_short is None) != (self.factors_long is None):
            raise ModelError(f"{self.path}: a phi3 file needs both rope_factors_short and rope_factors_long, or neither")

    def rope(self, il):
        return replace(super().rope(il), factors=self.factors_short is not None)

    def rope_factors(self, n_ctx):
        return self.factors_long if n_ctx > self.hp.n_ctx_orig else self.factors_short

    def load_qkv(self, w, il):
        hp = self.hp
        return Linear(w.tensor(f"blk.{il}.attn_qkv.weight", hp.n_embd, hp.n_embd_q + hp.n_embd_k + hp.n_embd_v))

    def load_mlp(self, w, il):
        hp, b = self.hp, f"blk.{il}."
        return GatedMLP(Linear(w.tensor(b + "ffn_up.weight", hp.n_embd, 2 * hp.n_ff)),
                        Linear(w.tensor(b + "ffn_down.weight", hp.n_ff, hp.n_embd)), act=self.act)
