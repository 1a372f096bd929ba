"""Small synthetic encoder GGUF files (random weights, deterministic), for architectures with no small real
file here: ``nomic-bert`` (rotary, SwiGLU, fused attn_qkv). The WordPiece vocabulary is llama.cpp's
ggml-vocab-bert-bge.gguf (tests/data/embeddings). llama.cpp's llama-embedding outputs on these files are
in tests/data/embeddings (README.md there).

    python tests/make_encoder_models.py OUT_DIR [nomic-bert]
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


MAKERS = {"nomic-bert": make_nomic_bert}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for arch in sys.argv[2:] or list(MAKERS):
        print(MAKERS[arch](out / f"synthetic-{arch}-F16.gguf"))
