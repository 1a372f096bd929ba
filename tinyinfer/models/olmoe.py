"""OLMoE (``olmoe``): RMSNorm of q and k over the whole projection (not per head), NEOX RoPE, a MoE
feed-forward block whose top-k weights are not renormalised; untied output.

    x = embed(tokens)
    for each layer:
        q, k, v = W_q x, W_k x, W_v x               # over rmsnorm(x) · w_attn_norm
        q, k = rmsnorm(q) · w_q_norm, rmsnorm(k) · w_k_norm    # over all heads at once (n_embd, n_embd_kv)
        x = x + attn(rope_neox(q), rope_neox(k), v)
        h = rmsnorm(x) · w_ffn_norm
        p = softmax(W_gate_inp h); chosen = top_k(p, expert_used_count)
        x = x + sum over e in chosen of p_e · down_e(silu(gate_e h) * up_e h)    # experts n_ff wide
    logits = output(rmsnorm(x) · w_output_norm)
"""

from __future__ import annotations

import numpy as np

from ..kernels import ops
from .base import Transformer
from .moe import ExpertParams, load_moe


class NormedQKV:
    """The fused q/k/v projection followed by an RMSNorm of the whole q and of the whole k (in place)."""

    def __init__(self, qkv, q_norm, k_norm, eps):
        self.qkv, self.q_norm, self.k_norm, self.eps = qkv, q_norm, k_norm, np.float32(eps)
        self.rows = qkv.rows

    def __call__(self, h):
        out = self.qkv(h)
        nq, nk = self.q_norm.size, self.k_norm.size
        for lo, wn in ((0, self.q_norm), (nq, self.k_norm)):
            part = np.ascontiguousarray(out[:, lo:lo + wn.size])
            out[:, lo:lo + wn.size] = ops.rmsnorm(part, wn, self.eps, part)
        return out


class OlmoeModel(Transformer):
    arch = "olmoe"
    rope_neox = True
    hparam_defaults = dict(n_ctx_train=4096, eps=1e-5)

    def load_extra(self, w):
        self.experts = ExpertParams.from_gguf(w.g, self.arch, self.hp.n_ff, expert_width_key=False)

    def load_qkv(self, w, il):
        hp, b = self.hp, f"blk.{il}."
        return NormedQKV(super().load_qkv(w, il), w.vector(b + "attn_q_norm.weight", hp.n_embd_q),
                         w.vector(b + "attn_k_norm.weight", hp.n_embd_k), hp.eps)

    def load_mlp(self, w, il):
        return load_moe(w, il, self.n_embd, self.experts, norm_w=False)
