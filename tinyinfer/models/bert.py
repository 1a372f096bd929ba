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

Matrices run through the shared quantized matmul (:class:`~.base.Linear`); layer norms, GELU (ggml's
tanh form) and the attention of the short sequences are numpy. Sequences are padded to a common
length per pass and masked, so many short inputs are one batched forward.
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels import ops, quants
from .base import Linear, fused_linear
from .hparams import ModelError, Weights, meta

POOLING_TYPES = ("none", "mean", "cls", "last", "rank")     # llama_pooling_type 0..4


def layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: np.float32) -> np.ndarray:
    mu = x.mean(axis=1, keepdims=True)
    d = x - mu
    var = np.mean(d * d, axis=1, keepdims=True)
    d *= 1.0 / np.sqrt(var + eps)
    d *= w
    d += b
    return d


_GELU_C = np.float32(math.sqrt(2.0 / math.pi))


def gelu(x: np.ndarray) -> np.ndarray:
    """ggml_gelu: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in place."""
    t = x * x
    t *= np.float32(0.044715)
    t += np.float32(1.0)
    t *= x
    t *= _GELU_C
    np.tanh(t, out=t)
    t += np.float32(1.0)
    x *= t
    x *= np.float32(0.5)
    return x


class NoCache:
    """What an encoder has instead of a KV cache: nothing kept between passes (its context size only)."""

    def __init__(self, n_ctx: int, n_seq: int = 1):
        self.n_ctx, self.n_seq, self.first_layer = n_ctx, n_seq, 0


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
        u = self.up(x)
        if self.b_up is not None:
            u += self.b_up
        h = self.down(gelu(u))
        if self.b_down is not None:
            h += self.b_down
        return h


class BertModel:
    arch = "bert"
    encoder_only = True           # no generation, no KV cache: tinyinfer/embedding.py drives it

    def __init__(self, g, layers=None):
        if layers is not None:
            raise ModelError(f"{g.path}: a {self.arch} model cannot be split by layers")
        a = self.arch
        self.path = g.path
        self.n_embd = n_embd = int(meta(g, a, "embedding_length"))
        self.n_layer = int(meta(g, a, "block_count"))
        self.n_ff = int(meta(g, a, "feed_forward_length"))
        self.n_head = int(meta(g, a, "attention.head_count"))
        self.n_ctx_train = int(meta(g, a, "context_length"))
        self.eps = float(meta(g, a, "attention.layer_norm_epsilon"))
        if self.n_head <= 0 or n_embd % self.n_head or self.n_layer <= 0 or self.n_ff <= 0:
            raise ModelError(f"{g.path}: {a}.embedding_length ({n_embd}) must be a positive multiple of "
                             f"attention.head_count ({self.n_head}), block_count and feed_forward_length positive")
        if bool(meta(g, a, "attention.causal", False)):
            raise ModelError(f"{g.path}: {a}.attention.causal is true: a causal bert is not supported")
        pt = int(meta(g, a, "pooling_type", 0))
        if not 0 <= pt < len(POOLING_TYPES):
            raise ModelError(f"{g.path}: {a}.pooling_type {pt} is not one of 0..4 ({', '.join(POOLING_TYPES)})")
        self.pooling_type = POOLING_TYPES[pt]
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
        # classification head (cross-encoder rerankers): cls (+ tanh) and cls.output
        cls = w.optional("cls.weight", n_embd, n_embd)
        self.cls = None if cls is None else Linear(cls)
        self.cls_b = w.vector("cls.bias", n_embd, required=False)
        out = w.optional("cls.output.weight", n_embd, None)
        self.cls_out = None if out is None else Linear(out)
        self.n_cls_out = 0 if out is None else out.n_elements // n_embd
        self.cls_out_b = w.vector("cls.output.bias", max(self.n_cls_out, 1), required=False)
        self.labels = list(g.metadata.get(f"{a}.classifier.output_labels") or [])
        w.check_all_used()

    # -- hooks an encoder architecture overrides (nomic_bert.py) ---------------------------------
    rope = None                   # (n_rot, freq_base) for rotary q/k, None: learned absolute positions

    def load_positions(self, g, w: Weights) -> None:
        self.pos_embd = w.tensor("position_embd.weight", self.n_embd, self.n_ctx_train)

    def load_ffn(self, w: Weights, il: int):
        return GeluFFN(w, il, self.n_embd, self.n_ff)

    @property
    def has_rank_head(self) -> bool:
        return self.cls is not None or self.cls_out is not None

    def _rows(self, t, ids) -> np.ndarray:
        return quants.dequantize(t.data[np.asarray(ids, np.int64)], t.ggml_type, self.n_embd)

    def new_cache(self, n_ctx: int, n_batch: int = 512, n_seq: int = 1, **_kv_types) -> NoCache:
        """No KV cache: every pass starts afresh (the KV type options do not apply to an encoder)."""
        return NoCache(n_ctx, n_seq)

    def forward(self, ids, pos0, cache, n_out: int = 1, embeddings: bool = False):
        raise ModelError(f"{self.path}: {self.arch} is an embedding model: it does not generate text "
                         f"(use embeddings: /v1/embeddings, Llama(embedding=True).embed, tinyinfer embedding)")

    def warmup(self) -> None:
        self.encode([np.array([0, 0], np.int64)])

    # -- the encoder ----------------------------------------------------------------------------
    def encode(self, seqs: list) -> list:
        """Hidden states (len_i, n_embd) float32 of each token-id sequence, in one padded pass."""
        lens = [int(len(s)) for s in seqs]
        for s, n in zip(seqs, lens):
            if n == 0:
                raise ModelError("nothing to embed: an empty token sequence")
            if n > self.n_ctx_train:
                raise ModelError(f"a sequence of {n} tokens is longer than the model's {self.n_ctx_train} positions")
        ids = np.concatenate([np.asarray(s, np.int64).reshape(-1) for s in seqs])
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise ModelError(f"token id {bad} is out of range for a vocabulary of {self.n_vocab}")
        pos = np.concatenate([np.arange(n) for n in lens])
        x = self._rows(self.tok_embd, ids)
        if self.rope is None:
            x += self._rows(self.pos_embd, pos)
        else:
            cos, sin = ops.rope_cache(pos, self.rope[0], self.rope[1], 1.0)
        if self.type0 is not None:
            x += self.type0
        x = layernorm(x, *self.tok_norm, self.eps32)
        B, T = len(lens), max(lens)
        # token i of sequence b sits at row off[b] + i of x; padded layout (B, T) gathers them
        off = np.concatenate([[0], np.cumsum(lens)[:-1]])
        gather = np.full((B, T), -1, np.int64)
        for b, n in enumerate(lens):
            gather[b, :n] = off[b] + np.arange(n)
        valid = gather >= 0
        mask = np.where(valid, np.float32(0), np.float32(-np.inf))[:, None, None, :]     # keys only
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
            pad = np.zeros((B, T, 3 * self.n_embd), np.float32)
            pad[valid] = qkv
            q = pad[..., :self.n_embd].reshape(B, T, H, hd).transpose(0, 2, 1, 3)
            k = pad[..., self.n_embd:2 * self.n_embd].reshape(B, T, H, hd).transpose(0, 2, 3, 1)
            v = pad[..., 2 * self.n_embd:].reshape(B, T, H, hd).transpose(0, 2, 1, 3)
            s = np.matmul(q, k)
            s *= scale
            s += mask
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            o = np.matmul(s, v).transpose(0, 2, 1, 3).reshape(B, T, self.n_embd)
            h = L.wo(np.ascontiguousarray(o[valid]))
            if L.bo is not None:
                h += L.bo
            x = layernorm(x + h, *L.ln1, self.eps32)
            x = layernorm(x + L.ffn(x), *L.ln2, self.eps32)
        return [x[o:o + n] for o, n in zip(off, lens)]

    def rank(self, pooled: np.ndarray) -> np.ndarray:
        """The classification head on pooled rows (n, n_embd) -> (n, n_cls_out) (llama.cpp's rank pooling)."""
        if not self.has_rank_head:
            raise ModelError(f"{self.path}: the model has no classification head (cls / cls.output): it cannot rerank")
        cur = np.ascontiguousarray(pooled, np.float32)
        if self.cls is not None:
            cur = self.cls(cur)
            if self.cls_b is not None:
                cur += self.cls_b
            np.tanh(cur, out=cur)
        if self.cls_out is not None:
            cur = self.cls_out(np.ascontiguousarray(cur))
            if self.cls_out_b is not None:
                cur += self.cls_out_b
        return cur
