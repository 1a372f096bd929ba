"""``tinyinfer convert`` on decoders: a round trip from the synthetic qwen3 / llama3 GGUF files (real Qwen2 and
Llama 3 vocabularies, ../shared/tools/make_arch_models.py) to a Hugging Face folder (safetensors, config.json,
tokenizer.json written here) and back must give the same tensors, vocabulary, pre-tokenizer and logits.
(BERT is converted from the real all-MiniLM-L6-v2 checkpoint in test_embeddings.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REFERENCE, cache_lock, need_reference

HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# the byte-level pre-tokenizer regexes of the two families (their tokenizer.json files)
SPLIT = {"qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
         "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"}


def _synthetic(arch: str) -> Path:
    from tinyinfer.fetch import _sha256, cache_dir
    want = dict(reversed(line.split()) for line in need_reference("arch", "sha256.txt").read_text().splitlines()
                if line.strip())[f"synthetic-{arch}-F16.gguf"]
    f = cache_dir() / "synthetic" / f"synthetic-{arch}-F16.gguf"
    with cache_lock():
        if not f.exists() or _sha256(f) != want:
            tool = need_reference("..", "tools", "make_arch_models.py")
            subprocess.run([sys.executable, str(tool), str(REFERENCE / "vocab"), str(f.parent), arch], check=True,
                           stdout=subprocess.DEVNULL)
            assert _sha256(f) == want
    return f


def _unpermute(w, n_head):
    """ggml's q/k row order -> Hugging Face's (the inverse of convert's permutation)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_hf(src: Path, out: Path, hf_arch: str) -> Path:
    """Write a GGUF decoder as a Hugging Face checkpoint folder."""
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.kernels import quants
    from tinyinfer.tools.convert import write_safetensors
    g = GGUFFile(src)
    m, a = g.metadata, g.architecture
    out.mkdir(parents=True, exist_ok=True)
    n_head, n_kv = m[f"{a}.attention.head_count"], m[f"{a}.attention.head_count_kv"]
    tensors = {}
    for name, t in g.tensors.items():
        if name == "rope_freqs.weight":        # Llama 3.1 scaling: the converter computes it from rope_scaling
            continue
        parts = name.split(".")
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.{parts[3]}"
            base = parts[2]
        else:
            hf, base = f"{HF_NAMES[parts[0]]}.{parts[1]}", parts[0]
        k = t.shape[0]
        x = quants.dequantize(t.data, t.ggml_type, k).reshape(*reversed(t.shape))
        if a == "llama" and base in ("attn_q", "attn_k"):
            x = _unpermute(x, n_head if base == "attn_q" else n_kv)
        tensors[hf] = x
    write_safetensors(out / "model.safetensors", tensors)
    tokens, types = m["tokenizer.ggml.tokens"], [int(x) for x in m["tokenizer.ggml.token_type"]]
    cfg = {"architectures": [hf_arch], "hidden_size": m[f"{a}.embedding_length"],
           "intermediate_size": m[f"{a}.feed_forward_length"], "num_hidden_layers": m[f"{a}.block_count"],
           "num_attention_heads": n_head, "num_key_value_heads": n_kv,
           "max_position_embeddings": m[f"{a}.context_length"], "rope_theta": m[f"{a}.rope.freq_base"],
           "rms_norm_eps": m[f"{a}.attention.layer_norm_rms_epsilon"], "vocab_size": len(tokens),
           "tie_word_embeddings": "output.weight" not in g.tensors,
           "bos_token_id": m.get("tokenizer.ggml.bos_token_id"), "eos_token_id": m.get("tokenizer.ggml.eos_token_id")}
    if a == "qwen3":
        cfg["head_dim"] = m[f"{a}.attention.key_length"]
    if "rope_freqs.weight" in g.tensors:      # the parameters make_arch_models.py baked in
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    (out / "config.json").write_text(json.dumps(cfg))
    pre = m["tokenizer.ggml.pre"]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == 3} for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": {"type": "NFC"} if pre == "qwen2" else None,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": SPLIT[pre]}, "behavior": "Isolated", "invert": False},
              byte_level]},
          "post_processor": byte_level, "decoder": byte_level,
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                    "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                    "ignore_merges": pre == "llama-bpe",
                    "vocab": {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1},
                    "merges": list(m["tokenizer.ggml.merges"])}}
    if m.get("tokenizer.ggml.add_bos_token"):      # Llama 3: BOS through the template, as its tokenizer.json
        bos = tokens[m["tokenizer.ggml.bos_token_id"]]
        tj["post_processor"] = {"type": "Sequence", "processors": [byte_level, {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [m["tokenizer.ggml.bos_token_id"]], "tokens": [bos]}}}]}
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    tc = {}
    for k, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        if m.get(f"tokenizer.ggml.{key}") is not None:
            tc[k] = tokens[m[f"tokenizer.ggml.{key}"]]
    if m.get("tokenizer.chat_template"):
        tc["chat_template"] = m["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    return out


@pytest.mark.parametrize("arch,hf_arch", [("qwen3", "Qwen3ForCausalLM"), ("llama3", "LlamaForCausalLM")])
def test_decoder_round_trip(arch, hf_arch, tmp_path):
    from tinyinfer.engine import Engine
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.kvcache import Batch
    from tinyinfer.tools.convert import convert
    src = _synthetic(arch)
    out = convert(to_hf(src, tmp_path / "hf", hf_arch), tmp_path / "back.gguf", "f16")
    a, b = GGUFFile(src), GGUFFile(out)
    assert b.architecture == a.architecture
    assert set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        assert b.tensors[name].ggml_type == t.ggml_type and np.array_equal(b.tensors[name].data, t.data), name
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                *(k for k in a.metadata if k.startswith(a.architecture + "."))):
        va, vb = a.metadata.get(key), b.metadata.get(key)
        if isinstance(va, float):
            assert vb == pytest.approx(va, rel=1e-6), key
        else:
            assert np.array_equal(np.asarray(va), np.asarray(vb)) if hasattr(va, "__len__") and not isinstance(va, str) \
                else va == vb, key
    assert list(a.metadata["tokenizer.ggml.token_type"]) == list(b.metadata["tokenizer.ggml.token_type"])
    ea, eb = Engine(src, n_ctx=64, n_threads=1), Engine(out, n_ctx=64, n_threads=1)
    text = "Hello world, 12345 — the quick brown fox"
    ids = ea.tokenizer.encode(text)
    assert eb.tokenizer.encode(text) == ids
    la = ea.model.forward(np.array(ids), Batch.run(0, 0, len(ids)), ea.cache)
    lb = eb.model.forward(np.array(ids), Batch.run(0, 0, len(ids)), eb.cache)
    assert np.array_equal(la, lb)


def test_convert_refuses_unknown_pretokenizer(tmp_path):
    from tinyinfer.tools.convert import ConvertError, convert
    d = to_hf(_synthetic("qwen3"), tmp_path / "hf", "Qwen3ForCausalLM")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    with pytest.raises(ConvertError, match="pre-tokenizer"):
        convert(d, tmp_path / "x.gguf", "f16")


# -- gemma3: SentencePiece tokenizer.model, (1 + w) norms ---------------------------------------------

GEMMA_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _gemma3_gguf(path: Path) -> Path:
    """A small gemma3 decoder (6 layers: 5 sliding-window, 1 global) on llama.cpp's llama-spm vocabulary."""
    import gguf
    from make_encoder_models import _copy_tokenizer, _mat, _t
    a, d, nl, nh, nkv, hd, ff = "gemma3", 128, 6, 4, 2, 32, 256
    w = gguf.GGUFWriter(path, a)
    w.add_name("synthetic-gemma3")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(2048)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_block_count(nl)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(1000000.0)
    w.add_sliding_window(8)
    n_vocab = _copy_tokenizer(w, need_reference("vocab", "ggml-vocab-llama-spm.gguf"))
    w.add_add_space_prefix(False)                     # as every gemma3 file (convert_hf_to_gguf.py)
    w.add_tensor("token_embd.weight", _t("g3.token_embd", (n_vocab, d), 0.05).astype(np.float16))
    w.add_tensor("output_norm.weight", _t("g3.output_norm", (d,), 0.1, 1.0))
    for i in range(nl):
        b = f"blk.{i}."
        for n, shape in (("attn_norm", (d,)), ("post_attention_norm", (d,)), ("ffn_norm", (d,)),
                         ("post_ffw_norm", (d,)), ("attn_q_norm", (hd,)), ("attn_k_norm", (hd,))):
            w.add_tensor(b + n + ".weight", _t("g3." + b + n, shape, 0.1, 1.0))
        for n, rows, cols in (("attn_q", nh * hd, d), ("attn_k", nkv * hd, d), ("attn_v", nkv * hd, d),
                              ("attn_output", d, nh * hd), ("ffn_gate", ff, d), ("ffn_up", ff, d), ("ffn_down", d, ff)):
            w.add_tensor(b + n + ".weight", _mat("g3." + b + n, rows, cols))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gemma3_to_hf(src: Path, out: Path) -> Path:
    """A gemma3 (or gemma-embedding) GGUF as a Hugging Face folder: safetensors (norms back to w), config.json,
    a SentencePiece tokenizer.model built from the GGUF vocabulary (sentencepiece's protobuf),
    tokenizer_config.json; for gemma-embedding the sentence-transformers modules (mean pooling, 2_Dense, 3_Dense)."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    from tinyinfer.gguf import GGUFFile
    from tinyinfer.kernels import quants
    from tinyinfer.tools.convert import write_safetensors
    g = GGUFFile(src)
    m, a = g.metadata, g.architecture
    emb = a == "gemma-embedding"
    prefix = "" if emb else "model."              # Gemma3TextModel's names have no "model." prefix
    out.mkdir(parents=True, exist_ok=True)
    tensors, dense = {}, {}
    for name, t in g.tensors.items():
        parts = name.split(".")
        x = quants.dequantize(t.data, t.ggml_type, t.shape[0]).reshape(*reversed(t.shape))
        if parts[0] in ("dense_2", "dense_3"):
            dense[parts[0]] = x
            continue
        hf = (f"{prefix}layers.{parts[1]}.{GEMMA_HF[parts[2]]}.weight" if parts[0] == "blk"
              else f"{prefix}{GEMMA_HF[parts[0]].removeprefix('model.')}.weight")
        tensors[hf] = x - np.float32(1.0) if name.endswith("norm.weight") else x
    write_safetensors(out / "model.safetensors", tensors)
    tokens = m["tokenizer.ggml.tokens"]
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3TextModel" if emb else "Gemma3ForCausalLM"], "hidden_size": m[f"{a}.embedding_length"],
        "intermediate_size": m[f"{a}.feed_forward_length"], "num_hidden_layers": m[f"{a}.block_count"],
        "num_attention_heads": m[f"{a}.attention.head_count"], "num_key_value_heads": m[f"{a}.attention.head_count_kv"],
        "head_dim": m[f"{a}.attention.key_length"], "max_position_embeddings": m[f"{a}.context_length"],
        "rms_norm_eps": m[f"{a}.attention.layer_norm_rms_epsilon"], "rope_theta": m[f"{a}.rope.freq_base"],
        "sliding_window": m[f"{a}.attention.sliding_window"], "vocab_size": len(tokens)}))
    if emb:
        mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
        for i, k in ((2, "dense_2"), (3, "dense_3")):
            folder = out / f"{i}_Dense"
            folder.mkdir(exist_ok=True)
            write_safetensors(folder / "model.safetensors", {"linear.weight": dense[k]})
            (folder / "config.json").write_text(json.dumps({"in_features": dense[k].shape[1],
                                                            "out_features": dense[k].shape[0], "bias": False}))
            mods.append({"idx": i, "name": str(i), "path": f"{i}_Dense", "type": "sentence_transformers.models.Dense"})
        (out / "modules.json").write_text(json.dumps(mods))
    mp = spm.ModelProto()
    kinds = {1: spm.ModelProto.SentencePiece.NORMAL, 2: spm.ModelProto.SentencePiece.UNKNOWN,
             3: spm.ModelProto.SentencePiece.CONTROL, 4: spm.ModelProto.SentencePiece.USER_DEFINED,
             5: spm.ModelProto.SentencePiece.UNUSED, 6: spm.ModelProto.SentencePiece.BYTE}
    for t, sc, ty in zip(tokens, m["tokenizer.ggml.scores"], m["tokenizer.ggml.token_type"]):
        p = mp.pieces.add()
        p.piece, p.score, p.type = t, float(sc), kinds[int(ty)]
    mp.trainer_spec.model_type = spm.TrainerSpec.BPE
    mp.trainer_spec.vocab_size = len(tokens)
    mp.trainer_spec.byte_fallback = True
    mp.normalizer_spec.name = "identity"
    mp.normalizer_spec.add_dummy_prefix = False
    (out / "tokenizer.model").write_bytes(mp.SerializeToString())
    tc = {"add_bos_token": bool(m.get("tokenizer.ggml.add_bos_token")),
          "add_eos_token": bool(m.get("tokenizer.ggml.add_eos_token"))}
    for k, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                   ("pad_token", "padding_token_id")):
        if m.get(f"tokenizer.ggml.{key}") is not None:
            tc[k] = tokens[m[f"tokenizer.ggml.{key}"]]
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    return out


def test_gemma3_round_trip(tmp_path):
    from tinyinfer.engine import Engine
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.kvcache import Batch
    from tinyinfer.tools.convert import convert
    src = _gemma3_gguf(tmp_path / "synthetic-gemma3-F16.gguf")
    out = convert(gemma3_to_hf(src, tmp_path / "hf"), tmp_path / "back.gguf", "f16")
    a, b = GGUFFile(src), GGUFFile(out)
    assert b.architecture == "gemma3" and set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        assert b.tensors[name].ggml_type == t.ggml_type and np.array_equal(b.tensors[name].data, t.data), name
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                *(k for k in a.metadata if k.startswith("gemma3."))):
        va, vb = a.metadata.get(key), b.metadata.get(key)
        assert (vb == pytest.approx(va, rel=1e-6)) if isinstance(va, float) else va == vb, key
    assert np.array_equal(np.asarray(a.metadata["tokenizer.ggml.scores"], np.float32),
                          np.asarray(b.metadata["tokenizer.ggml.scores"], np.float32))
    assert list(a.metadata["tokenizer.ggml.token_type"]) == list(b.metadata["tokenizer.ggml.token_type"])
    assert b.metadata["tokenizer.ggml.add_space_prefix"] is False
    ea, eb = Engine(src, n_ctx=64, n_threads=1), Engine(out, n_ctx=64, n_threads=1)
    text = "Hello world, 12345 — the quick brown fox"
    ids = ea.tokenizer.encode(text)
    assert eb.tokenizer.encode(text) == ids
    la = ea.model.forward(np.array(ids), Batch.run(0, 0, len(ids)), ea.cache)
    lb = eb.model.forward(np.array(ids), Batch.run(0, 0, len(ids)), eb.cache)
    assert np.array_equal(la, lb)


def test_embeddinggemma_round_trip(tmp_path):
    """Gemma3TextModel + sentence-transformers' Pooling and Dense modules -> gemma-embedding: the tensors of the
    synthetic file (tests/make_encoder_models.py) come back, and so do its embeddings."""
    from make_encoder_models import make_gemma_embedding

    from tinyinfer.embedding import embed
    from tinyinfer.engine import Engine
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.tools.convert import convert
    src = make_gemma_embedding(tmp_path / "synthetic-gemma-embedding-F16.gguf",
                               need_reference("vocab", "ggml-vocab-llama-spm.gguf"))
    hf = gemma3_to_hf(src, tmp_path / "hf")
    out = convert(hf, tmp_path / "back.gguf", "f16", sentence_transformers_dense_modules=True)
    a, b = GGUFFile(src), GGUFFile(out)
    assert b.architecture == "gemma-embedding" and set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        assert b.tensors[name].ggml_type == t.ggml_type and np.array_equal(b.tensors[name].data, t.data), name
    # rope.freq_base_swa: convert_hf_to_gguf.py does not write it either (llama.cpp and tinyinfer default: 10000)
    for key in (k for k in a.metadata if k.startswith("gemma-embedding.") and k != "gemma-embedding.rope.freq_base_swa"):
        va, vb = a.metadata.get(key), b.metadata.get(key)
        assert (vb == pytest.approx(va, rel=1e-6)) if isinstance(va, float) else va == vb, key
    ids = [[1, 450, 4996, 17354, 1701, 29916], [1, 15043, 3186]]
    ea, eb = Engine(src, n_ctx=64, n_threads=1), Engine(out, n_ctx=64, n_threads=1)
    assert np.array_equal(np.stack(embed(ea, ids)), np.stack(embed(eb, ids)))
    # without the flag, as llama.cpp, no Dense modules: a file that pools and stops
    plain = GGUFFile(convert(hf, tmp_path / "plain.gguf", "f16"))
    assert "dense_2.weight" not in plain.tensors and "gemma-embedding.dense_2_feat_out" not in plain.metadata
