"""nomic-bert (``nomic-bert``): nomic-embed-text, a BERT with rotary positions and a SwiGLU block.

Forward pass (llama.cpp's src/models/bert.cpp, the nomic-bert branches): as bert.py, except::

    x = tok_embd[ids] + token_types[0]                      # no learned position table
    q, k = rope_neox(q, pos), rope_neox(k, pos)             # pos restarts at 0 per sequence
    h = down(silu(gate(x)) * up(x))                         # instead of the GELU block

q/k/v usually come as one ``attn_qkv`` tensor; biases are optional (nomic-embed-text has none).
"""

from __future__ import annotations

import numpy as np

from ..kernels import ops
from .bert import BertModel
from .encoder import Linear, fused_linear
from .hparams import Weights, meta


class SwiGLU:
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, w: Weights, il: int, n_embd: int, n_ff: int):
        b = f"blk.{il}."
        self.gate_up = fused_linear(w.tensor(b + "ffn_gate.weight", n_embd, n_ff),
                                    w.tensor(b + "ffn_up.weight", n_embd, n_ff))
        self.down = Linear(w.tensor(b + "ffn_down.weight", n_ff, n_embd))
        self.n_ff = n_ff

    def __call__(self, x):
        gu = self.gate_up(x)
        g = np.empty((x.shape[0], self.n_ff), np.float32)
        ops.silu_mul_split(gu, g)
        return self.down(g)


class NomicBertModel(BertModel):
    arch = "nomic-bert"

    def load_positions(self, g, w: Weights) -> None:
        self.rope = (self.head_dim, float(meta(g, self.arch, "rope.freq_base", 10000.0)))

    def load_ffn(self, w: Weights, il: int):
        return SwiGLU(w, il, self.n_embd, self.n_ff)
