"""Granite 3.x mixture of experts (``granitemoe``: granite-3.0/3.1 1B-A400M, 3B-A800M): llama with four
multipliers from the metadata and a MoE feed-forward block whose top-k weights are renormalised.

    x = embed(tokens) * embedding_scale
    for each layer:
        x = x + residual_scale * attn(rmsnorm(x) · w_attn_norm)   # RoPE NORM, GQA, scores q·k * attention.scale
        h = rmsnorm(x) · w_ffn_norm
        p = softmax(W_gate_inp h); chosen = top_k(p, expert_used_count); w = p[chosen] / sum(p[chosen])
        y = sum over e in chosen of w_e · down_e(silu(gate_e h) * up_e h)     # n_ff wide
        [y = y + down_s(silu(gate_s h) * up_s h)]     # "Granite MoE Shared": expert_shared_feed_forward_length > 0
        x = x + residual_scale * y
    logits = output(rmsnorm(x) · w_output_norm) / logit_scale   # output tied to embed if absent

A multiplier key that is absent (or 0) leaves its step out, as in llama.cpp; ``logit_scale`` is required.
"""

from __future__ import annotations

import numpy as np

from .base import Transformer
from .hparams import meta
from .moe import ExpertParams, load_moe, load_shared_expert


class Scaled:
    """An MLP-like callable (or projection) whose output is multiplied by ``s`` (the residual multiplier)."""

    def __init__(self, f, s):
        self.f, self.s = f, np.float32(s)
        self.rows = getattr(f, "rows", None)

    def __call__(self, x):
        y = self.f(x)
        y *= self.s
        return y


class GraniteMoeModel(Transformer):
    arch = "granitemoe"
    hparam_defaults = dict(n_ctx_train=4096, eps=1e-6)

    def load_extra(self, w):
        g, a = w.g, self.arch
        self.experts = ExpertParams.from_gguf(g, a, self.hp.n_ff, expert_width_key=False)
        self.embd_scale = float(meta(g, a, "embedding_scale", 0.0)) or None
        self.residual_scale = float(meta(g, a, "residual_scale", 0.0))
        self.attention_scale = float(meta(g, a, "attention.scale", 0.0)) or None
        self.logit_scale = float(meta(g, a, "logit_scale"))

    def _residual(self, f):
        return Scaled(f, self.residual_scale) if self.residual_scale else f

    def load_attention(self, w, il):
        attn = super().load_attention(w, il, scale=self.attention_scale)
        attn.wo = self._residual(attn.wo)
        return attn

    def load_mlp(self, w, il):
        # a shared expert (ungated, added to the experts' sum) when expert_shared_feed_forward_length > 0,
        # as llama.cpp's granite graph builds it
        f = self.experts.n_ff_shexp
        shared = load_shared_expert(w, il, self.n_embd, f) if f > 0 else None
        return self._residual(load_moe(w, il, self.n_embd, self.experts, norm_w=True, shared=shared))

    def head(self, x, n_out=1, embeddings=False):
        y = super().head(x, n_out, embeddings)
        if not embeddings:
            y *= np.float32(1.0 / self.logit_scale)
        return y
