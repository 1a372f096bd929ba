"""Qwen2 mixture of experts (``qwen2moe``: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): qwen2's attention (q/k/v
biases, NEOX RoPE), a MoE feed-forward block without renormalisation plus a shared expert with its own gate.

    x = embed(tokens)
    for each layer:
        x = x + attn(rmsnorm(x) · w_attn_norm)      # q/k/v = W x + b; RoPE NEOX, GQA
        h = rmsnorm(x) · w_ffn_norm
        p = softmax(W_gate_inp h); chosen = top_k(p, expert_used_count)
        y = sum over e in chosen of p_e · down_e(silu(gate_e h) * up_e h)      # expert_feed_forward_length wide
        y = y + sigmoid(w_gate_inp_shexp · h) * down_s(silu(gate_s h) * up_s h)  # expert_shared_feed_forward_length
        x = x + y
    logits = output(rmsnorm(x) · w_output_norm)
"""

from __future__ import annotations

from .moe import ExpertParams, load_moe, load_shared_expert
from .qwen2 import Qwen2Model


class Qwen2MoeModel(Qwen2Model):
    arch = "qwen2moe"

    def load_extra(self, w):
        self.experts = ExpertParams.from_gguf(w.g, self.arch, self.hp.n_ff)

    def load_mlp(self, w, il):
        hp, b = self.hp, f"blk.{il}."
        shared = load_shared_expert(w, il, hp.n_embd, self.experts.n_ff_shexp or hp.n_ff)
        return load_moe(w, il, self.n_embd, self.experts, norm_w=False, shared=shared,
                        shared_gate=w.vector(b + "ffn_gate_inp_shexp.weight", hp.n_embd))
