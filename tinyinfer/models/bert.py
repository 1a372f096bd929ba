"""BERT (``bert``): the bidirectional encoder of all-MiniLM, bge and the cross-encoder rerankers.

Forward pass of a batch of sequences (llama.cpp's src/models/bert.cpp), every sequence attending to
all of its own tokens and to no other sequence's (no causal mask, no KV cache)::

    x = tok_embd[ids] + token_types[0] + position_embd[pos]      # pos restarts at 0 per sequence
    x = layernorm(x, token_embd_norm)
    for each layer:
        q, k, v = x @ Wq + bq, x @ Wk + bk, x @ Wv + bv
        h = softmax(q k^T / sqrt(head_dim), within the sequence) v @ Wo + bo
        x = layernorm(x + h, attn_output_norm)
        h = gelu(x @ W_up + b_up) @ W_down + b_down
        x = layernorm(x + h, layer_output_norm)
    hidden = x                                                     # pooled by tinyinfer/embedding.py
    rank head (rerankers): score = cls_out(tanh(cls(hidden[first token])))

Matrices run through BLAS on a packed batch and through the shared quantized matmul on a few rows
(:class:`~.encoder.Linear`); layer norms, GELU (ggml's tanh form) and the attention of the short
sequences are numpy. Sequences are padded to a common
length per pass and masked, so many short inputs are one batched forward.
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels import ops
from .encoder import Encoder, Linear, Packed, add_layernorm, fused_linear, gelu, layernorm
from .hparams import ModelError, Weights, meta


class EncoderLayer:
    """One post-norm encoder layer's weights: fused q/k/v (one ``attn_qkv`` tensor or three), optional
    biases, the output projection, two layer norms and the feed-forward block (``ffn``)."""

    def __init__(self, w: Weights, il: int, n_embd: int, ffn):
        b = f"blk.{il}."
        qkv = w.optional(b + "attn_qkv.weight", n_embd, 3 * n_embd)
        if qkv is not None:
            self.wqkv = Linear(qkv)
            self.bqkv = w.vector(b + "attn_qkv.bias", 3 * n_embd, required=False)
        else:
            self.wqkv = fused_linear(w.tensor(b + "attn_q.weight", n_embd, n_embd),
                                     w.tensor(b + "attn_k.weight", n_embd, n_embd),
                                     w.tensor(b + "attn_v.weight", n_embd, n_embd))
            bs = [w.vector(b + f"attn_{x}.bias", n_embd, required=False) for x in "qkv"]
            self.bqkv = None if all(x is None for x in bs) else \
                np.concatenate([np.zeros(n_embd, np.float32) if x is None else x for x in bs])
        self.wo = Linear(w.tensor(b + "attn_output.weight", n_embd, n_embd))
        self.bo = w.vector(b + "attn_output.bias", n_embd, required=False)
        self.ln1 = (w.vector(b + "attn_output_norm.weight", n_embd), w.vector(b + "attn_output_norm.bias", n_embd))
        self.ffn = ffn
        self.ln2 = (w.vector(b + "layer_output_norm.weight", n_embd), w.vector(b + "layer_output_norm.bias", n_embd))


class GeluFFN:
    """bert's feed-forward block: down(gelu(up(x) + b_up)) + b_down (biases optional)."""

    def __init__(self, w: Weights, il: int, n_embd: int, n_ff: int):
        b = f"blk.{il}."
        self.up = Linear(w.tensor(b + "ffn_up.weight", n_embd, n_ff))
        self.b_up = w.vector(b + "ffn_up.bias", n_ff, required=False)
        self.down = Linear(w.tensor(b + "ffn_down.weight", n_ff, n_embd))
        self.b_down = w.vector(b + "ffn_down.bias", n_embd, required=False)

    def __call__(self, x):
        h = self.unbiased(x)
        if self.b_down is not None:
            h += self.b_down
        return h

    def unbiased(self, x):
        """down(gelu(up(x) + b_up)) without b_down (added with the residual: models/encoder.add_layernorm)."""
        return self.down(gelu(self.up(x), self.b_up))


class BertModel(Encoder):
    arch = "bert"

    def __init__(self, g, layers=None):
        self.read_common(g, layers)
        a, n_embd = self.arch, self.n_embd
        if n_embd % self.n_head:
            raise ModelError(f"{g.path}: {a}.embedding_length ({n_embd}) is not a multiple of "
                             f"attention.head_count ({self.n_head})")
        self.eps = float(meta(g, a, "attention.layer_norm_epsilon"))
        self.head_dim = n_embd // self.n_head
        self.eps32 = np.float32(self.eps)
        w = Weights(g, a)
        self.tok_embd = w.tensor("token_embd.weight", n_embd, None)
        self.n_vocab = self.tok_embd.n_elements // n_embd
        n_types = int(g.metadata.get("tokenizer.ggml.token_type_count", 0) or 0)
        t = w.optional("token_types.weight", n_embd, None)
        self.type0 = None if t is None else self._rows(t, [0])[0]
        if t is not None and n_types and t.n_elements // n_embd != n_types:
            raise ModelError(f"{g.path}: token_types.weight has {t.n_elements // n_embd} rows, "
                             f"tokenizer.ggml.token_type_count says {n_types}")
        self.load_positions(g, w)
        self.tok_norm = (w.vector("token_embd_norm.weight", n_embd), w.vector("token_embd_norm.bias", n_embd))
        self.layers = [EncoderLayer(w, il, n_embd, self.load_ffn(w, il)) for il in range(self.n_layer)]
        self.load_heads(w)       # rerankers: cls (+ tanh) and cls.output
        w.check_all_used()

    # -- hooks an encoder architecture overrides (nomic_bert.py) ---------------------------------
    rope = None                   # (n_rot, freq_base) for rotary q/k, None: learned absolute positions

    def load_positions(self, g, w: Weights) -> None:
        self.pos_embd = w.tensor("position_embd.weight", self.n_embd, self.n_ctx_train)

    def load_ffn(self, w: Weights, il: int):
        return GeluFFN(w, il, self.n_embd, self.n_ff)

    # -- the encoder ----------------------------------------------------------------------------
    def encode(self, seqs: list) -> list:
        """Hidden states (len_i, n_embd) float32 of each token-id sequence, in one padded pass."""
        lens = self.check_lengths(seqs)
        ids = self.token_ids(seqs)
        pk = Packed(lens)
        x = self._rows(self.tok_embd, ids)
        if self.rope is None:
            x += self._rows(self.pos_embd, pk.pos)
        else:
            cos, sin = ops.rope_cache(pk.pos, self.rope[0], self.rope[1], 1.0)
        if self.type0 is not None:
            x += self.type0
        x = layernorm(x, *self.tok_norm, self.eps32)
        H, hd, E = self.n_head, self.head_dim, self.n_embd
        scale = np.float32(1.0 / math.sqrt(hd))
        for L in self.layers:
            qkv = L.wqkv(x)
            if L.bqkv is not None:
                qkv += L.bqkv
            if self.rope is not None:                       # ggml NEOX rotation of q and k
                for part in (slice(0, E), slice(E, 2 * E)):
                    r = np.ascontiguousarray(qkv[:, part]).reshape(-1, H, hd)
                    ops.rope(r, cos, sin, True)
                    qkv[:, part] = r.reshape(-1, E)
            h = L.wo(pk.attention(qkv[:, :E], qkv[:, E:2 * E], qkv[:, 2 * E:], H, H, hd, scale))
            x = add_layernorm(x, h, L.bo, *L.ln1, self.eps32)
            if isinstance(L.ffn, GeluFFN):
                x = add_layernorm(x, L.ffn.unbiased(x), L.ffn.b_down, *L.ln2, self.eps32)
            else:
                x = add_layernorm(x, L.ffn(x), None, *L.ln2, self.eps32)
        return pk.split(x)
