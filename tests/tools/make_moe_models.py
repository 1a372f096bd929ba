"""Write the small synthetic granitemoe and qwen2moe GGUF files (random F16 weights, real vocabularies) that
tests/test_moe.py compares with llama.cpp's outputs (tests/data/moe/). The qwen3moe and olmoe ones come from
../shared/tools/make_arch_models.py; this script writes the two families it does not, the same way.

Deterministic: the same vocabulary files and this script give the same bytes (tests/data/moe/sha256.txt).

    python tests/tools/make_moe_models.py VOCAB_DIR OUT_DIR [granitemoe] [qwen2moe] [granitemoe_shexp]

granitemoe (Granite 3.x 1B-A400M's layout): embedding / attention / residual / logit multipliers, NORM RoPE,
top-k weights renormalised (output gain 12: logits / logit_scale spread like a real model's).
granitemoe_shexp: the same with llama.cpp's "Granite MoE Shared" expert (expert_shared_feed_forward_length,
ffn_{gate,up,down}_shexp: an ungated MLP added to the experts' sum); arch granitemoe.
qwen2moe (Qwen1.5-MoE-A2.7B's layout): q/k/v
biases, NEOX RoPE, no renormalisation, a shared expert scaled by sigmoid(ffn_gate_inp_shexp · x), untied output.
"""
import math
import os
import sys
import zlib

import gguf
import numpy as np
from gguf import GGUFValueType as VT

D, N_LAYER, N_HEAD, N_HEAD_KV, HEAD_DIM = 256, 4, 4, 2, 64
N_EXPERT, N_EXPERT_USED, N_FF_EXP, N_FF_SHEXP = 8, 2, 256, 384
VOCAB = {"granitemoe": "ggml-vocab-llama-bpe.gguf", "qwen2moe": "ggml-vocab-qwen2.gguf",
         "granitemoe_shexp": "ggml-vocab-llama-bpe.gguf"}


def tensor(name, shape, std, offset=0.0):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(offset)


def mat(name, shape, gain=1.0):
    return tensor(name, shape, gain / math.sqrt(shape[-1])).astype(np.float16)


def copy_tokenizer(w, path):
    r = gguf.GGUFReader(path)
    for name, f in r.fields.items():
        if not name.startswith("tokenizer."):
            continue
        t = f.types[0]
        if t == VT.ARRAY:
            sub = f.types[-1]
            vals = [bytes(f.parts[i]) for i in f.data] if sub == VT.STRING else [f.parts[i][0].item() for i in f.data]
            w.add_key_value(name, vals, VT.ARRAY, sub)
        elif t == VT.STRING:
            w.add_key_value(name, bytes(f.parts[f.data[0]]), VT.STRING)
        else:
            w.add_key_value(name, f.parts[f.data[0]][0].item(), t)
    return len(r.fields["tokenizer.ggml.tokens"].data)


def build(kind, vocab_dir, out_path):
    arch = kind.removesuffix("_shexp")
    shexp = kind != arch or arch == "qwen2moe"
    w = gguf.GGUFWriter(out_path, arch)
    n_vocab = copy_tokenizer(w, os.path.join(vocab_dir, VOCAB[kind]))
    w.add_name(f"synthetic-{kind}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_block_count(N_LAYER)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_expert_count(N_EXPERT)
    w.add_expert_used_count(N_EXPERT_USED)
    if arch == "granitemoe":
        w.add_feed_forward_length(N_FF_EXP)          # granitemoe sizes its experts by n_ff
        w.add_rope_freq_base(1e4)
        w.add_float32("granitemoe.embedding_scale", 12.0)
        w.add_float32("granitemoe.residual_scale", 0.22)
        w.add_float32("granitemoe.attention.scale", 0.015625)
        w.add_float32("granitemoe.logit_scale", 6.0)
        if shexp:
            w.add_expert_shared_feed_forward_length(N_FF_SHEXP)
    else:
        w.add_feed_forward_length(4 * D)
        w.add_rope_freq_base(1e6)
        w.add_expert_feed_forward_length(N_FF_EXP)
        w.add_expert_shared_feed_forward_length(N_FF_SHEXP)
    dq, dkv = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    w.add_tensor("token_embd.weight", tensor("token_embd.weight", (n_vocab, D), 0.2
                                             ).astype(np.float16))
    w.add_tensor("output_norm.weight", tensor("output_norm.weight", (D,), 0.1, 1.0))
    w.add_tensor("output.weight", mat("output.weight", (n_vocab, D), 3.0 if arch == "qwen2moe" else 12.0))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", tensor(p + "attn_norm.weight", (D,), 0.1, 1.0))
        for t, rows, gain in (("q", dq, 2.0), ("k", dkv, 2.0), ("v", dkv, 1.0)):
            w.add_tensor(p + f"attn_{t}.weight", mat(p + f"attn_{t}.weight", (rows, D), gain))
            if arch == "qwen2moe":
                w.add_tensor(p + f"attn_{t}.bias", tensor(p + f"attn_{t}.bias", (rows,), 0.5))
        w.add_tensor(p + "attn_output.weight", mat(p + "attn_output.weight", (D, dq)))
        w.add_tensor(p + "ffn_norm.weight", tensor(p + "ffn_norm.weight", (D,), 0.1, 1.0))
        w.add_tensor(p + "ffn_gate_inp.weight", mat(p + "ffn_gate_inp.weight", (N_EXPERT, D), 4.0).astype(np.float32))
        for t, shape in (("gate", (N_EXPERT, N_FF_EXP, D)), ("up", (N_EXPERT, N_FF_EXP, D)),
                         ("down", (N_EXPERT, D, N_FF_EXP))):
            w.add_tensor(p + f"ffn_{t}_exps.weight", mat(p + f"ffn_{t}_exps.weight", shape))
        if arch == "qwen2moe":
            n = p + "ffn_gate_inp_shexp.weight"
            w.add_tensor(n, tensor(n, (D,), 2.0 / math.sqrt(D)))
        if shexp:
            w.add_tensor(p + "ffn_gate_shexp.weight", mat(p + "ffn_gate_shexp.weight", (N_FF_SHEXP, D)))
            w.add_tensor(p + "ffn_up_shexp.weight", mat(p + "ffn_up_shexp.weight", (N_FF_SHEXP, D)))
            w.add_tensor(p + "ffn_down_shexp.weight", mat(p + "ffn_down_shexp.weight", (D, N_FF_SHEXP)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(vocab_dir, out_dir, *archs):
    os.makedirs(out_dir, exist_ok=True)
    for arch in archs or VOCAB:
        out = os.path.join(out_dir, f"synthetic-{arch}-F16.gguf")
        build(arch, vocab_dir, out)
        print(out)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
