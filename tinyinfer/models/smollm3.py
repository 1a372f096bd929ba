"""SmolLM3 (``smollm3``): llama without RoPE on every 4th layer ("NoPE" layers).

    x = embed(tokens)
    for each layer il:
        x = x + attn(rmsnorm(x) · w_attn_norm)      # RoPE (NORM mode) unless (il + 1) % 4 == 0
        x = x + mlp(rmsnorm(x) · w_ffn_norm)        # SwiGLU
    logits = output(rmsnorm(x) · w_output_norm)     # output tied to embed if absent

The step 4 is not in the file: llama.cpp hard-codes it for this architecture, and so do we.
"""

from __future__ import annotations

from dataclasses import replace

from .base import Transformer

NO_ROPE_LAYER_STEP = 4


class SmolLM3Model(Transformer):
    arch = "smollm3"
    hparam_defaults = dict(n_ctx_train=65536, eps=1e-6)

    def rope(self, il):
        r = super().rope(il)
        return r if (il + 1) % NO_ROPE_LAYER_STEP != 0 else replace(r, n_rot=0)
