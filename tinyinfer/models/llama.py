"""LLaMA 1/2/3 (Llama 3.1/3.2 with ``rope_freqs``), TinyLlama, SmolLM2, Mistral-style files that say ``llama``.

    x = embed(tokens)
    for each layer:
        x = x + attn(rmsnorm(x) · w_attn_norm)      # RoPE (NORM mode), GQA
        x = x + mlp(rmsnorm(x) · w_ffn_norm)        # SwiGLU
    logits = output(rmsnorm(x) · w_output_norm)     # output tied to embed if absent

Llama 3.1+ files carry ``rope_freqs.weight``: one divisor per RoPE frequency (the long-context
scaling baked in by the converter), applied to every layer's RoPE.
"""

from __future__ import annotations

from dataclasses import replace

from .base import Transformer


class LlamaModel(Transformer):
    arch = "llama"
    hparam_defaults = dict(n_ctx_train=2048, eps=1e-5)

    def load_extra(self, w):
        self.freq_factors = w.vector("rope_freqs.weight", self.hp.n_rot // 2, required=False)

    def rope(self, il):
        return replace(super().rope(il), factors=self.freq_factors is not None)

    def rope_factors(self, n_ctx):
        return self.freq_factors
