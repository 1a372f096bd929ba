"""``python -m tinyinfer convert MODEL_DIR --outfile OUT.gguf --outtype f32|f16|bf16|q8_0``.

A Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json) to a GGUF file with
llama.cpp's names, as ``convert_hf_to_gguf.py`` writes it, with numpy only (no torch, no
transformers): safetensors files are read here (a JSON header and raw little-endian arrays, BF16
included), tensor names are mapped by the ``gguf`` package's own table (``TensorNameMap``), and
F16 / BF16 / Q8_0 come from tinyinfer's one table of formats (kernels/quants.py).

Covered: ``BertModel`` / ``BertForSequenceClassification`` (WordPiece tokenizer.json; pooling from
the sentence-transformers modules.json), ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``
with a byte-level BPE tokenizer.json (llama-bpe, qwen2, smollm, gpt-2 pre-tokenizers), and
``Gemma3ForCausalLM`` with its SentencePiece tokenizer.model, ``Gemma3TextModel`` (EmbeddingGemma, its
Dense modules with ``--sentence-transformers-dense-modules``). Anything else is refused with one line.

Type rules as convert_hf_to_gguf.py: 1-D tensors, norms, biases, position and token-type
embeddings stay F32; a matrix whose rows do not fit the Q8_0 block falls back to F16.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path
from typing import Optional

import numpy as np


class ConvertError(ValueError):
    """The checkpoint cannot be converted (unknown architecture or tokenizer, missing file)."""


# -- safetensors ---------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path) -> dict:
    """name -> float32 (or integer) numpy array of one ``.safetensors`` file (memory-mapped; BF16 widened)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConvertError(f"{path}: not a safetensors file (shorter than its header length)")
        n = struct.unpack("<Q", head)[0]
        if n > 100 << 20:
            raise ConvertError(f"{path}: safetensors header of {n} bytes is not plausible")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConvertError(f"{path}: safetensors header is not JSON ({e})") from None
    raw = np.memmap(path, np.uint8, mode="r")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info.get("dtype"))
        if dt is None:
            raise ConvertError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, not supported")
        a, b = info["data_offsets"]
        if not 0 <= a <= b <= raw.size - base:
            raise ConvertError(f"{path}: tensor {name!r} lies outside the file")
        arr = raw[base + a:base + b].view(dt).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out


def write_safetensors(path, tensors: dict) -> None:
    """Write float32 arrays as a ``.safetensors`` file (synthetic checkpoints for tests)."""
    header, off, blobs = {}, 0, []
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(a)), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def read_checkpoint(d: Path) -> dict:
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{d}: no *.safetensors files (pytorch .bin checkpoints are not read: that needs torch)")
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(f))
    return tensors


def _special_lookup(cfg: dict, t2i: dict, hp: Optional[dict] = None):
    """``special(key, id_key=None)``: the id of tokenizer_config.json's special token ``key`` (a string or
    ``{content}``), else config.json's ``id_key`` (SpecialVocab's fallback), else None."""
    def special(key, id_key=None):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str) and v in t2i:
            return t2i[v]
        v = (hp or {}).get(id_key) if id_key else None
        return v if isinstance(v, int) else None
    return special


def _tokenizer_json(d: Path, kind: str, missing: str, only: str):
    """tokenizer.json of checkpoint ``d`` and its ``model`` object, which must be of type ``kind``."""
    tok = _json(d / "tokenizer.json", required=False)
    if tok is None:
        raise ConvertError(f"{d}: no tokenizer.json ({missing})")
    model = tok.get("model") or {}
    if model.get("type") != kind:
        raise ConvertError(f"{d}/tokenizer.json: tokenizer model {model.get('type')!r} is not supported {only}")
    return tok, model


def _json(path: Path, required: bool = True):
    if not path.is_file():
        if required:
            raise ConvertError(f"{path}: missing")
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -- tokenizers ----------------------------------------------------------------------------------

def wordpiece_vocab(d: Path) -> dict:
    """BERT's WordPiece vocabulary from tokenizer.json in llama.cpp's phantom-space form and the
    tokenizer metadata convert_hf_to_gguf.py writes for it."""
    import gguf
    tok, model = _tokenizer_json(d, "WordPiece", "a vocab.txt-only BERT tokenizer is not read",
                                 "for a BERT model (only WordPiece)")
    vocab = model["vocab"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for a in tok.get("added_tokens", []):
        i = a["id"]
        if i >= n:
            tokens += [f"[PAD{j}]" for j in range(n, i + 1)]
            types += [gguf.TokenType.UNUSED] * (i + 1 - n)
            n = i + 1
        tokens[i] = a["content"]
        types[i] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED

    def phantom(t, typ):
        if typ == gguf.TokenType.CONTROL:
            return t
        return t[2:] if t.startswith("##") else "\u2581" + t
    tokens = [phantom(t, y) for t, y in zip(tokens, types)]

    cfg = _json(d / "tokenizer_config.json", required=False) or {}
    t2i = {t: i for i, t in enumerate(tokens)}
    special = _special_lookup(cfg, t2i)
    ids = {"unk": special("unk_token"), "sep": special("sep_token"), "pad": special("pad_token"),
           "cls": special("cls_token"), "mask": special("mask_token"),
           "bos": special("bos_token"), "eos": special("eos_token")}
    if ids["bos"] is None:               # as gguf's SpecialVocab: BOS falls back to CLS, EOS to SEP
        ids["bos"] = ids["cls"]
    if ids["eos"] is None:
        ids["eos"] = ids["sep"]
    meta = {"model": "bert", "pre": "bert-bge", "tokens": tokens, "types": [int(t) for t in types], "ids": ids,
            "add_bos": None, "add_eos": None, "add_sep": None, "lowercase": None, "strip_accents": None}
    norm = tok.get("normalizer") or {}
    for nm in ([norm] + list(norm.get("normalizers") or [])):
        if nm.get("type") == "BertNormalizer":
            meta["lowercase"] = nm.get("lowercase")
            meta["strip_accents"] = nm.get("strip_accents")
        elif nm.get("type") == "Lowercase":
            meta["lowercase"] = True
        elif nm.get("type") == "StripAccents":
            meta["strip_accents"] = True
    post = tok.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":     # [CLS] $A [SEP] / [CLS] $A [SEP] $B [SEP]
        single = post.get("single") or []
        first = (single[0].get("SpecialToken") or {}).get("id") if single else None
        last = (single[-1].get("SpecialToken") or {}).get("id") if len(single) > 1 else None
        meta["add_bos"] = first is not None and t2i.get(first) in (ids["bos"], ids["cls"])
        meta["add_eos"] = last is not None and t2i.get(last) == ids["eos"]
        pair = post.get("pair") or []
        inner = [p for p in pair[1:-1] if "SpecialToken" in p]
        meta["add_sep"] = bool(inner)
    return meta


# tokenizer.ggml.pre of a byte-level BPE tokenizer.json: convert_hf_to_gguf.py hashes the ids of its test text
# (below) and looks the hash up; these are the entries for the pre-tokenizers tinyinfer's bpe.py implements
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
           '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_PRE_BY_HASH = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",       # Qwen1.5 / Qwen2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",       # Qwen3-Embedding
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",       # GPT-2
}


def _looks_special(t: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special: added tokens that are control tokens by their look."""
    return (t in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (t.startswith("<|") and t.endswith("|>"))
            or (t.startswith("<｜") and t.endswith("｜>")) or (t.startswith("<unused") and t.endswith(">")))


def bpe_vocab(d: Path, vocab_size: int) -> dict:
    """A byte-level BPE tokenizer.json as llama.cpp's ``gpt2`` vocabulary: tokens padded to the model's
    vocab_size with [PADi], added tokens as CONTROL (special, or looking special) or USER_DEFINED,
    merges, and the pre-tokenizer named by the hash of the test text's ids."""
    import hashlib

    import gguf
    from tokenizers import Tokenizer as HFTokenizer
    path = d / "tokenizer.json"
    tok, model = _tokenizer_json(d, "BPE", "tokenizer.model / SentencePiece checkpoints are not converted yet",
                                 "for this architecture (byte-level BPE only)")
    ids = HFTokenizer.from_file(str(path)).encode(_CHKTXT).ids
    pre = _PRE_BY_HASH.get(hashlib.sha256(str(ids).encode()).hexdigest())
    if pre is None:
        raise ConvertError(f"{path}: unknown BPE pre-tokenizer (the test text's ids hash to no known one; tinyinfer "
                           f"knows {', '.join(sorted(set(_PRE_BY_HASH.values())))})")
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    n = max(vocab_size, max(vocab.values()) + 1)
    rev = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        t = rev.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            if added[t].get("special") or _looks_special(t):
                types.append(gguf.TokenType.CONTROL)
            else:
                t = t.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(t)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg = _json(d / "tokenizer_config.json", required=False) or {}
    hp = _json(d / "config.json")
    t2i = {t: i for i, t in enumerate(tokens)}
    special = _special_lookup(cfg, t2i, hp)
    ids_ = {"bos": special("bos_token", "bos_token_id"), "eos": special("eos_token", "eos_token_id"),
            "unk": special("unk_token", "unk_token_id"), "pad": special("pad_token", "pad_token_id")}
    add_bos = cfg.get("add_bos_token")
    post = tok.get("post_processor") or {}
    for proc in post.get("processors") or [post]:      # a leading special token in the template adds BOS
        single = proc.get("single") or [] if proc.get("type") == "TemplateProcessing" else []
        first = (single[0].get("SpecialToken") or {}).get("id") if single else None
        if add_bos is None and first is not None:
            add_bos = t2i.get(first) == ids_["bos"]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": [int(x) for x in types], "ids": ids_,
            "merges": merges, "add_bos": add_bos, "add_eos": cfg.get("add_eos_token"),
            "add_sep": None, "lowercase": None, "strip_accents": None, "chat_template": cfg.get("chat_template")}


def spm_vocab(d: Path, vocab_size: int) -> dict:
    """A SentencePiece ``tokenizer.model`` as llama.cpp's ``llama`` vocabulary (convert_hf_to_gguf.py's
    _create_vocab_sentencepiece): pieces, scores and types from the model, added_tokens.json as
    USER_DEFINED, tokenizer_config.json's added_tokens_decoder as CONTROL (special, or looking special)
    or USER_DEFINED, [PADi] up to the model's vocab_size."""
    import gguf
    from sentencepiece import SentencePieceProcessor
    path = d / "tokenizer.model"
    if not path.is_file():
        raise ConvertError(f"{d}: no tokenizer.model (a SentencePiece model is needed for this architecture)")
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"{path}: not a SentencePiece model ({e})") from None
    n = vocab_size or sp.vocab_size()
    TT = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [TT.UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (TT.UNKNOWN if sp.IsUnknown(i) else TT.CONTROL if sp.IsControl(i) else
                    TT.UNUSED if sp.IsUnused(i) else TT.BYTE if sp.IsByte(i) else TT.NORMAL)
    for t, i in (_json(d / "added_tokens.json", required=False) or {}).items():
        if i < n:
            tokens[i], scores[i], types[i] = t, -1000.0, TT.USER_DEFINED
    cfg = _json(d / "tokenizer_config.json", required=False) or {}
    for i, a in (cfg.get("added_tokens_decoder") or {}).items():
        i, t = int(i), a["content"]
        if i >= n:
            continue
        if a.get("special") or _looks_special(t):
            types[i] = TT.CONTROL
        else:
            t, types[i] = t.replace("\u2581", " "), TT.USER_DEFINED
        tokens[i] = t
    t2i = {t: i for i, t in enumerate(tokens)}
    special = _special_lookup(cfg, t2i)
    ids_ = {"bos": special("bos_token"), "eos": special("eos_token"), "unk": special("unk_token"),
            "pad": special("pad_token")}
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": [int(x) for x in types],
            "ids": ids_, "add_bos": cfg.get("add_bos_token"), "add_eos": cfg.get("add_eos_token"), "add_sep": None,
            "lowercase": None, "strip_accents": None, "chat_template": cfg.get("chat_template")}


# -- architectures -------------------------------------------------------------------------------

def _pooling_type(d: Path):
    """sentence-transformers' pooling mode (modules.json -> */config.json) as a gguf.PoolingType."""
    import gguf
    modules = _json(d / "modules.json", required=False) or []
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            cfg = _json(d / m.get("path", "") / "config.json")
            if cfg.get("pooling_mode_mean_tokens"):
                return gguf.PoolingType.MEAN
            if cfg.get("pooling_mode_cls_token"):
                return gguf.PoolingType.CLS
            if cfg.get("pooling_mode_lasttoken"):
                return gguf.PoolingType.LAST
            mode = cfg.get("pooling_mode")
            table = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}
            if mode in table:
                return table[mode]
            raise ConvertError(f"{d}/{m.get('path')}/config.json: only mean, cls and last-token pooling are supported")
    return None


class BertConverter:
    """BertModel / BertForSequenceClassification -> ``bert`` (llama.cpp's conversion/bert.py)."""

    arch = "bert"

    def __init__(self, d: Path, hp: dict, hf_arch: str = ""):
        self.d, self.hp = d, hp
        labels = hp.get("id2label")
        if labels and len(labels) == 2 and labels.get("0", labels.get(0)) == "LABEL_0":
            labels = None                 # AutoConfig's dummy labels
        self.labels = labels

    def vocab(self):
        return wordpiece_vocab(self.d)

    def metadata(self, w, vocab) -> None:
        hp = self.hp
        w.add_context_length(int(hp["max_position_embeddings"]))
        w.add_embedding_length(int(hp["hidden_size"]))
        w.add_feed_forward_length(int(hp["intermediate_size"]))
        w.add_block_count(int(hp["num_hidden_layers"]))
        w.add_head_count(int(hp["num_attention_heads"]))
        w.add_layer_norm_eps(float(hp.get("layer_norm_eps", 1e-12)))
        w.add_causal_attention(False)
        pooling = _pooling_type(self.d)
        if pooling is not None:
            w.add_pooling_type(pooling)
        if self.labels:      # rank pooling is asked for at run time (llama-server --rerank), as llama.cpp
            w.add_array(f"{self.arch}.classifier.output_labels",
                        [v for k, v in sorted(self.labels.items(), key=lambda kv: int(kv[0]))])
        w.add_token_type_count(int(hp.get("type_vocab_size", 1)))

    def tensors(self, st: dict):
        import gguf
        n_layer = int(self.hp["num_hidden_layers"])
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
        skip = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
        for name, arr in st.items():
            n = name[5:] if name.startswith("bert.") else name
            if n.endswith(".gamma"):
                n = n[:-6] + ".weight"
            if n.endswith(".beta"):
                n = n[:-5] + ".bias"
            if n in skip or n.startswith("cls.predictions") or n.startswith("cls.seq_relationship"):
                continue
            if self.labels and n in ("classifier.weight", "classifier.bias"):
                n = "classifier.out_proj." + n.split(".")[-1]
            new = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ConvertError(f"{self.d}: tensor {name!r} has no GGUF name for the bert architecture")
            yield new, arr


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary layout of q/k rows (halves) -> llama.cpp's (pairs), for ``llama`` files."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class DecoderConverter:
    """LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM -> ``llama`` / ``qwen2`` / ``qwen3``
    (byte-level BPE tokenizers; llama's q/k rows permuted to ggml's rotation, as convert_hf_to_gguf.py)."""

    ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}

    def __init__(self, d: Path, hp: dict, hf_arch: str):
        self.d, self.hp = d, hp
        self.arch = self.ARCHS[hf_arch]
        rs = hp.get("rope_scaling") or {}
        self.rope_kind = rs.get("rope_type", rs.get("type"))
        if self.rope_kind not in (None, "default", "linear") and not (self.rope_kind == "llama3" and self.arch == "llama"):
            raise ConvertError(f"{d}/config.json: rope_scaling {self.rope_kind!r} is not converted yet "
                               f"(none, linear, and llama3 for llama)")
        self.n_head = int(hp["num_attention_heads"])
        self.n_kv = int(hp.get("num_key_value_heads", self.n_head))
        self.head_dim = int(hp.get("head_dim") or int(hp["hidden_size"]) // self.n_head)

    def vocab(self):
        return bpe_vocab(self.d, int(self.hp.get("vocab_size", 0)))

    def metadata(self, w, vocab) -> None:
        hp = self.hp
        w.add_context_length(int(hp["max_position_embeddings"]))
        w.add_embedding_length(int(hp["hidden_size"]))
        w.add_feed_forward_length(int(hp["intermediate_size"]))
        w.add_block_count(int(hp["num_hidden_layers"]))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_kv)
        w.add_rope_freq_base(float(hp.get("rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-6)))
        head_dim = self.head_dim
        if hp.get("head_dim") is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        rs = hp.get("rope_scaling") or {}
        if rs.get("rope_type", rs.get("type")) == "linear":
            w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rs["factor"]))

    def tensors(self, st: dict):
        import gguf
        tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, self.arch.upper()), int(self.hp["num_hidden_layers"]))
        for name, arr in st.items():
            if name.endswith(".rotary_emb.inv_freq"):
                continue
            new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ConvertError(f"{self.d}: tensor {name!r} has no GGUF name for the {self.arch} architecture")
            if self.arch == "llama" and new.endswith(("attn_q.weight", "attn_q.bias")):
                arr = _permute(np.asarray(arr), self.n_head)
            elif self.arch == "llama" and new.endswith(("attn_k.weight", "attn_k.bias")):
                arr = _permute(np.asarray(arr), self.n_kv)
            if new == "output.weight" and self.hp.get("tie_word_embeddings") and "model.embed_tokens.weight" in st \
                    and np.array_equal(np.asarray(arr), np.asarray(st["model.embed_tokens.weight"])):
                continue                          # tied: llama.cpp reads token_embd
            yield new, arr
        if self.rope_kind == "llama3":
            yield "rope_freqs.weight", self.llama3_rope_freqs()

    def llama3_rope_freqs(self) -> np.ndarray:
        """Llama 3.1's frequency scaling as a divisor per rotary frequency (``rope_freqs.weight``)."""
        rs, base, dim = self.hp["rope_scaling"], float(self.hp.get("rope_theta", 10000.0)), self.head_dim
        factor, low, high = float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        orig = float(rs.get("original_max_position_embeddings", 8192))
        out = []
        for i in range(0, dim, 2):
            wavelen = 2 * math.pi * base ** (i / dim)
            if wavelen < orig / high:
                out.append(1.0)
            elif wavelen > orig / low:
                out.append(factor)
            else:
                smooth = (orig / wavelen - low) / (high - low)
                out.append(1.0 / ((1 - smooth) / factor + smooth))
        return np.array(out, np.float32)


class Gemma3Converter:
    """Gemma3ForCausalLM -> ``gemma3`` (convert_hf_to_gguf.py's Gemma3Model): SentencePiece vocabulary,
    norm weights stored as (1 + w), token_embd cut to the vocabulary, the tied LM head not written."""

    arch = "gemma3"

    def __init__(self, d: Path, hp: dict, hf_arch: str = ""):
        self.d, self.hp = d, hp
        if hp.get("attn_logit_softcapping") is not None:
            raise ConvertError(f"{d}/config.json: attn_logit_softcapping is not part of gemma3")
        rs = hp.get("rope_scaling") or {}
        self.rope_kind = rs.get("rope_type", rs.get("type"))
        if self.rope_kind not in (None, "default", "linear"):
            raise ConvertError(f"{d}/config.json: rope_scaling {self.rope_kind!r} is not converted yet (none, linear)")
        self.n_vocab = None

    def vocab(self):
        v = spm_vocab(self.d, int(self.hp.get("vocab_size", 0)))
        self.n_vocab = len(v["tokens"])
        v["add_space_prefix"] = False
        return v

    def metadata(self, w, vocab) -> None:
        hp = self.hp
        w.add_context_length(int(hp.get("max_position_embeddings", 131072)))
        w.add_embedding_length(int(hp["hidden_size"]))
        w.add_feed_forward_length(int(hp["intermediate_size"]))
        w.add_block_count(int(hp["num_hidden_layers"]))
        w.add_head_count(int(hp.get("num_attention_heads", 8)))
        w.add_head_count_kv(int(hp.get("num_key_value_heads", 4)))
        w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps", 1e-6)))
        w.add_key_length(int(hp.get("head_dim", 256)))
        w.add_value_length(int(hp.get("head_dim", 256)))
        w.add_rope_freq_base(float(hp.get("rope_theta", 1_000_000.0)))
        if hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
        if (hp.get("sliding_window_pattern") != 1 or self.arch == "gemma-embedding") and hp.get("sliding_window"):
            w.add_sliding_window(int(hp["sliding_window"]))
        if self.rope_kind == "linear":
            w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(hp["rope_scaling"]["factor"]))

    def tensors(self, st: dict):
        import gguf
        tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, self.arch.upper().replace("-", "_")),
                                        int(self.hp["num_hidden_layers"]))
        for name, arr in st.items():
            new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ConvertError(f"{self.d}: tensor {name!r} has no GGUF name for the {self.arch} architecture")
            if new == "output.weight" and any(k.endswith("embed_tokens.weight") for k in st):
                continue                          # Gemma ties its LM head to the embeddings
            arr = np.asarray(arr, np.float32)
            if name.endswith("norm.weight"):
                arr = arr + np.float32(1.0)        # Gemma3RMSNorm multiplies by (1 + w)
            if new == "token_embd.weight" and self.n_vocab:
                arr = arr[:self.n_vocab]
            yield new, arr


class EmbeddingGemmaConverter(Gemma3Converter):
    """Gemma3TextModel -> ``gemma-embedding`` (EmbeddingGemma): gemma3's layers, the sentence-transformers
    pooling, and with ``dense_modules`` (--sentence-transformers-dense-modules) its 2_Dense / 3_Dense
    projections as ``dense_2`` / ``dense_3`` with their feature sizes."""

    arch = "gemma-embedding"
    dense_modules = False

    def _dense(self):
        """(prefix, folder, in, out) of each sentence-transformers Dense module with weights."""
        out = []
        for m in _json(self.d / "modules.json", required=False) or []:
            if not str(m.get("type", "")).endswith("Dense"):
                continue
            folder = self.d / m.get("path", "")
            if (folder / "model.safetensors").is_file():
                cfg = _json(folder / "config.json")
                out.append(("dense_2" if m.get("path") == "2_Dense" else "dense_3", folder,
                            int(cfg["in_features"]), int(cfg["out_features"])))
        return out

    def metadata(self, w, vocab) -> None:
        super().metadata(w, vocab)
        pooling = _pooling_type(self.d)
        if pooling is not None:
            w.add_pooling_type(pooling)
        if self.dense_modules:
            for prefix, _, fin, fout in self._dense():
                w.add_uint32(f"{self.arch}.{prefix}_feat_in", fin)
                w.add_uint32(f"{self.arch}.{prefix}_feat_out", fout)

    def tensors(self, st: dict):
        yield from super().tensors(st)
        if self.dense_modules:
            for prefix, folder, _, _ in self._dense():
                for name, arr in read_safetensors(folder / "model.safetensors").items():
                    if name.endswith(".weight"):
                        yield f"{prefix}.weight", arr


CONVERTERS = {"Gemma3ForCausalLM": Gemma3Converter, "Gemma3TextModel": EmbeddingGemmaConverter, "BertModel": BertConverter, "BertForSequenceClassification": BertConverter,
              "BertForMaskedLM": BertConverter, **{k: DecoderConverter for k in DecoderConverter.ARCHS}}

_KEEP_F32 = ("position_embd.weight", "token_types.weight")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _tensor_type(name: str, arr: np.ndarray, outtype: str):
    from gguf import GGMLQuantizationType as GT
    if arr.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or name in _KEEP_F32:
        return GT.F32
    return {"f32": GT.F32, "f16": GT.F16, "bf16": GT.BF16, "q8_0": GT.Q8_0}[outtype]


def convert(model_dir, outfile, outtype: str = "f16", verbose: bool = False,
            sentence_transformers_dense_modules: bool = False) -> Path:
    """Convert the checkpoint folder ``model_dir`` into ``outfile``; returns its path.
    ``sentence_transformers_dense_modules``: include sentence-transformers' Dense projections (EmbeddingGemma)."""
    import gguf
    from gguf import GGMLQuantizationType as GT

    from ..kernels import quants as Q
    d = Path(model_dir)
    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype {outtype!r} is not supported (choose from {', '.join(OUTTYPES)})")
    if not d.is_dir():
        raise ConvertError(f"{d}: not a folder")
    hp = _json(d / "config.json")
    archs = hp.get("architectures") or []
    arch = next((a for a in archs if a in CONVERTERS), None)
    if arch is None:
        raise ConvertError(f"{d}/config.json: architecture {', '.join(archs) or hp.get('model_type')!r} is not "
                           f"supported by tinyinfer convert (supported: {', '.join(sorted(CONVERTERS))})")
    conv = CONVERTERS[arch](d, hp, arch)
    conv.dense_modules = sentence_transformers_dense_modules
    vocab = conv.vocab()
    st = read_checkpoint(d)
    outfile = Path(outfile)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w = gguf.GGUFWriter(outfile, conv.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(hp.get("_name_or_path", d.name).split("/")[-1] or d.name)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    conv.metadata(w, vocab)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab.get("scores") is not None:
        w.add_token_scores(vocab["scores"])
    if vocab.get("add_space_prefix") is not None:
        w.add_add_space_prefix(bool(vocab["add_space_prefix"]))
    if vocab.get("merges"):
        w.add_token_merges(vocab["merges"])
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
            "pad": "padding_token_id", "cls": "cls_token_id", "mask": "mask_token_id"}    # llama.cpp's spelling
    for k, key in keys.items():
        if vocab["ids"].get(k) is not None:
            w.add_uint32(f"tokenizer.ggml.{key}", int(vocab["ids"][k]))
    for k in ("add_bos", "add_eos", "add_sep"):
        if vocab[k] is not None:
            w.add_bool(f"tokenizer.ggml.{k}_token", bool(vocab[k]))
    for k in ("lowercase", "strip_accents"):
        if vocab[k] is not None:
            w.add_bool(f"tokenizer.ggml.normalizer.{k}", bool(vocab[k]))
    if vocab.get("chat_template"):
        w.add_chat_template(vocab["chat_template"])
    for name, arr in conv.tensors(st):
        x = np.ascontiguousarray(arr, dtype=np.float32)
        typ = _tensor_type(name, x, outtype)
        if typ == GT.F32:
            data = x
        else:
            k = x.shape[-1]
            if k % Q.type_info(typ).block_size:
                typ = GT.F16                       # convert_hf_to_gguf.py's fallback
            data = Q.quantize(x.reshape(-1, k), typ).reshape(*x.shape[:-1], -1)
        if verbose:
            print(f"{name:<32} {'x'.join(map(str, x.shape)):>14} -> {typ.name}", file=sys.stderr)
        w.add_tensor(name, data, raw_dtype=None if typ == GT.F32 else typ)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return outfile


def main(argv=None) -> int:
    class _Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, no usage dump
            print(f"tinyinfer convert: error: {message}", file=sys.stderr)
            sys.exit(2)

    ap = _Parser(prog="tinyinfer convert",
                 description="convert a Hugging Face checkpoint folder (safetensors + tokenizer.json) to GGUF")
    ap.add_argument("model", help="folder holding config.json, *.safetensors and tokenizer.json")
    ap.add_argument("--outfile", help="output path (default: MODEL/<name>-<outtype>.gguf)")
    ap.add_argument("--outtype", default="f16", choices=OUTTYPES, help="output format (default: f16)")
    ap.add_argument("--verbose", action="store_true", help="one line per tensor")
    ap.add_argument("--sentence-transformers-dense-modules", action="store_true",
                    help="include sentence-transformers' Dense modules (2_Dense, 3_Dense) of an EmbeddingGemma folder")
    a = ap.parse_args(argv)
    out = a.outfile or str(Path(a.model) / f"{Path(a.model).resolve().name}-{a.outtype}.gguf")
    try:
        p = convert(a.model, out, a.outtype, verbose=a.verbose,
                    sentence_transformers_dense_modules=a.sentence_transformers_dense_modules)
    except (ConvertError, OSError) as e:
        print(f"tinyinfer convert: error: {e}", file=sys.stderr)
        return 1
    print(f"tinyinfer convert: wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
