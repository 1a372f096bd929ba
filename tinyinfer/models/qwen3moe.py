"""Qwen3 mixture of experts (``qwen3moe``: Qwen3-30B-A3B, Qwen3-Coder-30B-A3B): qwen3's attention, a MoE
feed-forward block whose top-k weights are renormalised.

    x = embed(tokens)
    for each layer:
        q, k, v = W_q x, W_k x, W_v x               # head dim = key_length
        q, k = rmsnorm_per_head(q) · w_q_norm, rmsnorm_per_head(k) · w_k_norm
        x = x + attn(rope_neox(q), rope_neox(k), v) # over rmsnorm(x) · w_attn_norm, GQA
        h = rmsnorm(x) · w_ffn_norm
        p = softmax(W_gate_inp h); chosen = top_k(p, expert_used_count); w = p[chosen] / sum(p[chosen])
        x = x + sum over e in chosen of w_e · down_e(silu(gate_e h) * up_e h)
    logits = output(rmsnorm(x) · w_output_norm)     # output tied to embed if absent
"""

from __future__ import annotations

from .moe import ExpertParams, load_moe
from .qwen3 import Qwen3Model


class Qwen3MoeModel(Qwen3Model):
    arch = "qwen3moe"

    def load_extra(self, w):
        self.experts = ExpertParams.from_gguf(w.g, self.arch, self.hp.n_ff)

    def load_mlp(self, w, il):
        return load_moe(w, il, self.n_embd, self.experts, norm_w=True)
