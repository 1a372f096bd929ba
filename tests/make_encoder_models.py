"""Small synthetic encoder GGUF files (random weights, deterministic), for architectures with no small real
file here: ``nomic-bert`` (rotary, SwiGLU, fused attn_qkv) and ``gemma-embedding`` (EmbeddingGemma). The WordPiece vocabulary is llama.cpp's
ggml-vocab-bert-bge.gguf (tests/data/embeddings). llama.cpp's llama-embedding outputs on these files are
in tests/data/embeddings (README.md there).

    python tests/make_encoder_models.py OUT_DIR [nomic-bert] [gemma-embedding]
"""

from __future__ import annotations

import math
import sys
import zlib
from pathlib import Path

import numpy as np

VOCAB = Path(__file__).parent / "data" / "embeddings" / "ggml-vocab-bert-bge.gguf"
D, N_LAYER, N_HEAD, N_FF = 128, 2, 4, 256


def _t(name, shape, std, offset=0.0):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(offset)).astype(np.float32)


def _mat(name, rows, cols):
    return _t(name, (rows, cols), 1.0 / math.sqrt(cols)).astype(np.float16)


def _copy_vocab(w) -> int:
    from tinyinfer.gguf import GGUFFile
    g = GGUFFile(VOCAB)
    m = g.metadata
    w.add_tokenizer_model(m["tokenizer.ggml.model"])
    w.add_tokenizer_pre(m["tokenizer.ggml.pre"])
    w.add_token_list(m["tokenizer.ggml.tokens"])
    w.add_token_types([int(x) for x in m["tokenizer.ggml.token_type"]])
    for k in ("unknown_token_id", "seperator_token_id", "padding_token_id", "cls_token_id", "mask_token_id"):
        w.add_uint32(f"tokenizer.ggml.{k}", int(m[f"tokenizer.ggml.{k}"]))
    w.add_uint32("tokenizer.ggml.token_type_count", 2)
    return len(m["tokenizer.ggml.tokens"])


def make_nomic_bert(path) -> Path:
    import gguf
    path = Path(path)
    w = gguf.GGUFWriter(path, "nomic-bert")
    w.add_name("synthetic-nomic-bert")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(2048)
    w.add_embedding_length(D)
    w.add_feed_forward_length(N_FF)
    w.add_block_count(N_LAYER)
    w.add_head_count(N_HEAD)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_rope_freq_base(1000.0)
    n_vocab = _copy_vocab(w)
    w.add_tensor("token_embd.weight", _t("token_embd", (n_vocab, D), 0.5).astype(np.float16))
    w.add_tensor("token_types.weight", _t("token_types", (2, D), 0.1))
    w.add_tensor("token_embd_norm.weight", _t("token_embd_norm.weight", (D,), 0.1, 1.0))
    w.add_tensor("token_embd_norm.bias", _t("token_embd_norm.bias", (D,), 0.05))
    for i in range(N_LAYER):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_qkv.weight", _mat(b + "attn_qkv", 3 * D, D))
        w.add_tensor(b + "attn_output.weight", _mat(b + "attn_output", D, D))
        w.add_tensor(b + "attn_output_norm.weight", _t(b + "attn_output_norm.weight", (D,), 0.1, 1.0))
        w.add_tensor(b + "attn_output_norm.bias", _t(b + "attn_output_norm.bias", (D,), 0.05))
        w.add_tensor(b + "ffn_up.weight", _mat(b + "ffn_up", N_FF, D))
        w.add_tensor(b + "ffn_gate.weight", _mat(b + "ffn_gate", N_FF, D))
        w.add_tensor(b + "ffn_down.weight", _mat(b + "ffn_down", D, N_FF))
        w.add_tensor(b + "layer_output_norm.weight", _t(b + "layer_output_norm.weight", (D,), 0.1, 1.0))
        w.add_tensor(b + "layer_output_norm.bias", _t(b + "layer_output_norm.bias", (D,), 0.05))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _copy_tokenizer(w, vocab_path) -> int:
    """Every tokenizer.* key of a vocabulary GGUF, as stored."""
    from gguf import GGUFReader, GGUFValueType as VT
    r = GGUFReader(vocab_path)
    n = 0
    for name, f in r.fields.items():
        if not name.startswith("tokenizer."):
            continue
        t = f.types[0]
        if t == VT.ARRAY:
            sub = f.types[-1]
            if sub == VT.STRING:
                vals = [bytes(f.parts[i]).decode("utf-8", "surrogateescape") for i in f.data]
            else:
                vals = [f.parts[i][0].item() for i in f.data]
            w.add_array(name, vals)
            if name == "tokenizer.ggml.tokens":
                n = len(vals)
        elif t == VT.STRING:
            w.add_string(name, bytes(f.parts[f.data[0]]).decode("utf-8"))
        else:
            v = f.parts[f.data[0]][0].item()
            {VT.UINT32: w.add_uint32, VT.INT32: w.add_int32, VT.BOOL: w.add_bool, VT.FLOAT32: w.add_float32,
             VT.UINT64: w.add_uint64, VT.INT64: w.add_int64}[t](name, v)
    return n


def make_gemma_embedding(path, vocab) -> Path:
    """EmbeddingGemma's layout at toy size: 6 layers (5 sliding-window of 8, 1 global), GQA 4/2 heads,
    dense_2 (128 -> 256) and dense_3 (256 -> 128); ``vocab``: a SentencePiece vocabulary GGUF
    (../shared/reference/vocab/ggml-vocab-llama-spm.gguf)."""
    import gguf
    path = Path(path)
    a, d, nl, nh, nkv, hd, ff, dd = "gemma-embedding", 128, 6, 4, 2, 32, 256, 256
    w = gguf.GGUFWriter(path, a)
    w.add_name("synthetic-gemma-embedding")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(2048)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_block_count(nl)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{a}.attention.sliding_window", 8)
    w.add_float32(f"{a}.rope.freq_base", 1000000.0)
    w.add_float32(f"{a}.rope.freq_base_swa", 10000.0)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    for k, v in (("dense_2_feat_in", d), ("dense_2_feat_out", dd), ("dense_3_feat_in", dd), ("dense_3_feat_out", d)):
        w.add_uint32(f"{a}.{k}", v)
    n_vocab = _copy_tokenizer(w, vocab)
    w.add_tensor("token_embd.weight", _t("g.token_embd", (n_vocab, d), 0.05).astype(np.float16))
    w.add_tensor("output_norm.weight", _t("g.output_norm", (d,), 0.1, 1.0))
    w.add_tensor("dense_2.weight", _mat("g.dense_2", dd, d))
    w.add_tensor("dense_3.weight", _mat("g.dense_3", d, dd))
    for i in range(nl):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", _t("g." + b + "attn_norm", (d,), 0.1, 1.0))
        w.add_tensor(b + "attn_q.weight", _mat("g." + b + "attn_q", nh * hd, d))
        w.add_tensor(b + "attn_k.weight", _mat("g." + b + "attn_k", nkv * hd, d))
        w.add_tensor(b + "attn_v.weight", _mat("g." + b + "attn_v", nkv * hd, d))
        w.add_tensor(b + "attn_output.weight", _mat("g." + b + "attn_output", d, nh * hd))
        w.add_tensor(b + "attn_q_norm.weight", _t("g." + b + "attn_q_norm", (hd,), 0.1, 1.0))
        w.add_tensor(b + "attn_k_norm.weight", _t("g." + b + "attn_k_norm", (hd,), 0.1, 1.0))
        w.add_tensor(b + "post_attention_norm.weight", _t("g." + b + "post_attention_norm", (d,), 0.1, 1.0))
        w.add_tensor(b + "ffn_norm.weight", _t("g." + b + "ffn_norm", (d,), 0.1, 1.0))
        w.add_tensor(b + "ffn_gate.weight", _mat("g." + b + "ffn_gate", ff, d))
        w.add_tensor(b + "ffn_up.weight", _mat("g." + b + "ffn_up", ff, d))
        w.add_tensor(b + "ffn_down.weight", _mat("g." + b + "ffn_down", d, ff))
        w.add_tensor(b + "post_ffw_norm.weight", _t("g." + b + "post_ffw_norm", (d,), 0.1, 1.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


MAKERS = {"nomic-bert": make_nomic_bert, "gemma-embedding": make_gemma_embedding}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    spm = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "vocab" / "ggml-vocab-llama-spm.gguf"
    for arch in sys.argv[2:] or list(MAKERS):
        f = out / f"synthetic-{arch}-F16.gguf"
        print(make_nomic_bert(f) if arch == "nomic-bert" else make_gemma_embedding(f, spm))
