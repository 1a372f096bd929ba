"""``python -m tinyinfer inspect FILE.gguf [-c N] [-b N] [--json]``: what a GGUF file holds
and whether it fits in this machine's memory.

Prints the architecture and name, the hyper-parameters (the ``<arch>.*`` keys), the
tokenizer (kind, pre-tokenizer, vocabulary size), the tensors by ggml type (count,
parameters, bytes), the total parameter count and bits per weight, and the memory
the model needs at context ``-c`` (default: the file's context length, at most 4096;
``-c 0``: the file's context length, as llama.cpp reads it):

- weights: the file's tensor bytes (mmapped: the OS pages them in on use);
- KV cache: K and V for every layer, ``n_ctx × n_head_kv × (key_length × size(-ctk) +
  value_length × size(-ctv))`` bytes per layer, in the cache types given (f16: 2 bytes a value,
  the default, as llama.cpp; q8_0: 34 bytes per 32; q4_0: 18 per 32); sliding-window layers (Gemma
  2/3, Cohere 2, or the file's ``<arch>.attention.sliding_window_pattern``) keep a ring of
  window + batch cells;
- working buffers (an estimate): the logits of one token (``n_vocab × 4``), a batch of
  ``-b`` (512) tokens' activations (a few ``n_embd`` / ``n_ff`` / q / k / v rows of
  f32) and one layer's attention scores for that batch (``n_batch × n_head × n_ctx``
  f32);

set against ``psutil.virtual_memory().available``, with a verdict: fits / does not fit.
``--json`` prints all of it as one JSON object. A missing or malformed file prints one
line ``error: ...`` on stderr and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NamedTuple

import numpy as np

from tinyinfer.gguf import GGUFError, GGUFFile

DEFAULT_CTX_CAP = 4096
DEFAULT_BATCH = 512
KV_BYTES = 2  # the default f16 cache (see tinyinfer/kvcache.py)


def kv_type_bytes(typ: str, n: int) -> int:
    """Bytes of n values (a multiple of 32 for the quantized types) in KV cache type typ."""
    return {"f16": 2 * n, "q8_0": n // 32 * 34, "q4_0": n // 32 * 18}[typ]


MAX_LAYERS = 1 << 16  # a block_count beyond this is treated as invalid

# architectures whose sliding-window layers follow a fixed pattern: every N-th layer
# (il + 1) % N == 0 is global, the others see the window (llama.cpp's set_swa_pattern(N))
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4}
# architectures whose sliding-window key llama.cpp ignores (it runs every layer with full attention)
SWA_IGNORED = {"phi3"}

TOKENIZER_KINDS = {
    "gpt2": "BPE (GPT-2 style byte-level)",
    "llama": "SentencePiece",
    "bert": "WordPiece",
    "t5": "Unigram (T5)",
    "rwkv": "RWKV",
    "plamo2": "PLaMo-2",
    "none": "none",
}

# (label, key suffix) of the hyper-parameters worth naming, in print order
HPARAMS = [
    ("context length", "context_length"),
    ("embedding length", "embedding_length"),
    ("block count", "block_count"),
    ("feed forward length", "feed_forward_length"),
    ("attention heads", "attention.head_count"),
    ("attention KV heads", "attention.head_count_kv"),
    ("key length (head dim)", "attention.key_length"),
    ("value length", "attention.value_length"),
    ("rope dimension count", "rope.dimension_count"),
    ("rope freq base", "rope.freq_base"),
    ("rope scaling", "rope.scaling.type"),
    ("rope scaling factor", "rope.scaling.factor"),
    ("rms norm epsilon", "attention.layer_norm_rms_epsilon"),
    ("layer norm epsilon", "attention.layer_norm_epsilon"),
    ("sliding window", "attention.sliding_window"),
    ("sliding window pattern", "attention.sliding_window_pattern"),
    ("experts", "expert_count"),
    ("experts used", "expert_used_count"),
    ("vocab size", "vocab_size"),
]


class InspectError(Exception):
    pass


# -- small helpers ---------------------------------------------------------------------------


def _runnable(ggml_type) -> bool:
    """Whether the format registry says tinyinfer's kernels run this tensor type."""
    from ..kernels import quants
    try:
        return quants.type_info(ggml_type).runnable
    except quants.UnsupportedTypeError:
        return False

def _jsonable(v):
    """Plain JSON values (NaN and infinities as strings: strict JSON has none)."""
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if np.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _int(v):
    """A non-negative int from a metadata value, or None (wrong type, bool, negative)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        return None
    v = int(v)
    return v if v >= 0 else None


def _per_layer(v, n_layer):
    """A per-layer list of ints from a scalar or an array value (llama.cpp allows both for
    head counts and n_ff), or None."""
    if n_layer is None:
        return None
    if isinstance(v, np.ndarray) and v.dtype.kind in "iu" and v.ndim == 1:
        if len(v) != n_layer or (v < 0).any():
            return None
        return [int(x) for x in v]
    x = _int(v)
    return None if x is None else [x] * n_layer


def _text(s) -> str:
    """Printable text: keeps what the file says, escapes what the terminal cannot show."""
    return str(s).encode("utf-8", "backslashreplace").decode("utf-8")


def _short(v, limit=60) -> str:
    if isinstance(v, np.ndarray):
        head = ", ".join(str(x) for x in v[:4].tolist())
        return f"[{head}{', ...' if len(v) > 4 else ''}] ({len(v)} × {v.dtype})"
    if isinstance(v, list):
        head = ", ".join(_text(repr(x))[:20] for x in v[:3])
        return f"[{head}{', ...' if len(v) > 3 else ''}] ({len(v)} items)"
    s = _text(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def fmt_count(n) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _file_type_name(ft):
    ft = _int(ft)
    if ft is None:
        return None
    try:
        from gguf import LlamaFileType
        return LlamaFileType(ft).name
    except (ImportError, ValueError):
        return f"file type {ft}"


# -- the analysis ----------------------------------------------------------------------------

def analyze(f: GGUFFile, n_ctx=None, n_batch=DEFAULT_BATCH, available=None, type_k="f16", type_v="f16") -> dict:
    md = f.metadata
    arch = md.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    prefix = f"{arch}." if arch else None

    def hp(suffix):
        return md.get(prefix + suffix) if prefix else None

    out: dict = {
        "file": {
            "path": f.path, "size": f.size, "gguf_version": f.version, "alignment": f.alignment,
            "n_kv": len(md), "n_tensors": len(f.tensors), "data_offset": f.data_offset,
        },
        "general": {
            "architecture": arch,
            "name": md.get("general.name"),
            "basename": md.get("general.basename"),
            "size_label": md.get("general.size_label"),
            "organization": md.get("general.organization"),
            "finetune": md.get("general.finetune"),
            "license": md.get("general.license"),
            "file_type": _file_type_name(md.get("general.file_type")),
            "quantization_version": md.get("general.quantization_version"),
        },
    }

    # hyper-parameters: the named ones, then every <arch>.* key as the file has it
    named = {}
    for label, suffix in HPARAMS:
        v = hp(suffix)
        if v is not None:
            named[suffix] = v
    arch_keys = {k: v for k, v in md.items() if prefix and k.startswith(prefix)}
    n_layer = _int(hp("block_count"))
    if n_layer is not None and n_layer > MAX_LAYERS:  # per-layer lists below: stay bounded
        n_layer = None
    n_embd = _int(hp("embedding_length"))
    heads = _per_layer(hp("attention.head_count"), n_layer)
    heads_kv = _per_layer(hp("attention.head_count_kv"), n_layer) or heads  # default: no GQA
    n_ff = _per_layer(hp("feed_forward_length"), n_layer)
    n_head_max = max(heads) if heads else None
    head_dim = (n_embd // n_head_max) if (n_embd and n_head_max) else None
    k_len = _int(hp("attention.key_length")) or head_dim
    v_len = _int(hp("attention.value_length")) or head_dim
    n_ctx_train = _int(hp("context_length"))
    window = _int(hp("attention.sliding_window"))
    derived = {
        "n_ctx_train": n_ctx_train, "n_embd": n_embd, "n_layer": n_layer,
        "n_head": heads[0] if heads and len(set(heads)) == 1 else heads,
        "n_head_kv": heads_kv[0] if heads_kv and len(set(heads_kv)) == 1 else heads_kv,
        "n_embd_head_k": k_len, "n_embd_head_v": v_len,
        "n_ff": n_ff[0] if n_ff and len(set(n_ff)) == 1 else n_ff,
        "n_gqa": (heads[0] // heads_kv[0]) if heads and heads_kv and heads_kv[0] and len(set(heads)) == 1
        and len(set(heads_kv)) == 1 else None,
        "rope_freq_base": hp("rope.freq_base"), "n_swa": window,
    }
    out["hparams"] = {"named": named, "derived": derived, "arch_keys": arch_keys}

    # tokenizer
    tokens = md.get("tokenizer.ggml.tokens")
    merges = md.get("tokenizer.ggml.merges")
    tok_model = md.get("tokenizer.ggml.model")
    n_vocab = len(tokens) if isinstance(tokens, (list, np.ndarray)) else _int(hp("vocab_size"))
    out["tokenizer"] = {
        "model": tok_model,
        "kind": TOKENIZER_KINDS.get(tok_model, "unknown") if isinstance(tok_model, str) else None,
        "pre": md.get("tokenizer.ggml.pre"),
        "vocab_size": n_vocab,
        "n_merges": len(merges) if isinstance(merges, list) else None,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": md.get("tokenizer.ggml.add_bos_token"),
        "chat_template": isinstance(md.get("tokenizer.chat_template"), str),
    }

    # tensors
    by_type: dict = {}
    n_params = n_bytes = 0
    for t in f.tensors.values():
        e = by_type.setdefault(t.type_name, {"count": 0, "params": 0, "bytes": 0,
                                             "runnable": _runnable(t.ggml_type)})
        e["count"] += 1
        e["params"] += t.n_elements
        e["bytes"] += t.nbytes
        n_params += t.n_elements
        n_bytes += t.nbytes
    by_type = dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"]))
    out["tensors"] = {
        "count": len(f.tensors), "params": n_params, "bytes": n_bytes,
        "bits_per_weight": round(8 * n_bytes / n_params, 3) if n_params else None,
        "by_type": by_type,
    }
    moe = moe_usage(f, arch)
    if moe:
        out["tensors"]["moe"] = moe

    shape = ModelShape(arch, n_layer, n_embd, heads, heads_kv, k_len, v_len, n_ff, n_vocab, n_ctx_train, window, hp)
    out["memory"] = memory(shape, n_ctx, n_batch, n_bytes, available, type_k, type_v)
    return out


def moe_usage(f: GGUFFile, arch: str) -> dict | None:
    """A mixture of experts' per-token use: each ``*_exps`` tensor counts expert_used_count / expert_count
    of its parameters and bytes; the embedding table one row (all of it when it is also the output)."""
    n_expert = _int(f.metadata.get(f"{arch}.expert_count"))
    n_used = _int(f.metadata.get(f"{arch}.expert_used_count"))
    if not n_expert or not n_used:
        return None
    params = nbytes = 0
    tied = "output.weight" not in f.tensors
    for t in f.tensors.values():
        if "_exps." in t.name:
            params += t.n_elements * n_used // n_expert
            nbytes += t.nbytes * n_used // n_expert
        else:
            params += t.n_elements
            nbytes += t.nbytes if t.name != "token_embd.weight" or tied else t.nbytes // max(1, t.shape[-1])
    return {"n_expert": n_expert, "n_expert_used": n_used, "active_params": params, "bytes_per_token": nbytes}


def swa_layers(arch, n_layer, window, pattern_value):
    """Per-layer True where the layer attends over the sliding window only; note on how known."""
    if not window or not n_layer:
        return [False] * (n_layer or 0), None
    if arch in SWA_IGNORED:
        return [False] * n_layer, f"{arch}: the sliding window is ignored, every layer attends the full context (as llama.cpp)"
    if isinstance(pattern_value, np.ndarray) and pattern_value.ndim == 1 and len(pattern_value) == n_layer:
        return [bool(x) for x in pattern_value.tolist()], "from <arch>.attention.sliding_window_pattern"
    n = _int(pattern_value)
    if n:
        return [(il + 1) % n != 0 for il in range(n_layer)], f"every {n}th layer global (file's pattern)"
    n = SWA_PATTERN.get(arch)
    if n:
        return [(il + 1) % n != 0 for il in range(n_layer)], f"every {n}th layer global ({arch})"
    return [False] * n_layer, f"sliding-window pattern of {arch!r} unknown: every layer counted at full context"


class ModelShape(NamedTuple):
    """What the memory estimate needs of a file (``hp``: its ``<arch>.`` key reader)."""
    arch: Any
    n_layer: int
    n_embd: int
    heads: list
    heads_kv: list
    k_len: int
    v_len: int
    n_ff: list
    n_vocab: Any
    n_ctx_train: Any
    window: int
    hp: Any


def memory(shape: ModelShape, n_ctx, n_batch, weights, available, type_k="f16", type_v="f16") -> dict:
    arch, n_layer, n_embd, heads, heads_kv, k_len, v_len, n_ff, n_vocab, n_ctx_train, window, hp = shape
    if n_ctx == 0:  # llama.cpp's -c 0: the trained context length
        if n_ctx_train:
            n_ctx, src = n_ctx_train, "-c 0: the file's context length"
        else:
            n_ctx, src = DEFAULT_CTX_CAP, f"-c 0 but no context length in the file: {DEFAULT_CTX_CAP}"
    elif n_ctx is None:
        if n_ctx_train:
            n_ctx = min(n_ctx_train, DEFAULT_CTX_CAP)
            src = (f"the file's context length {n_ctx_train} capped at {DEFAULT_CTX_CAP}"
                   if n_ctx_train > DEFAULT_CTX_CAP else f"the file's context length {n_ctx_train}")
        else:
            n_ctx, src = DEFAULT_CTX_CAP, f"no context length in the file: {DEFAULT_CTX_CAP}"
    else:
        src = "-c"
        if n_ctx_train and n_ctx > n_ctx_train:
            src += f" (beyond the trained context length {n_ctx_train})"
    mem = {"n_ctx": n_ctx, "n_ctx_source": src, "n_batch": n_batch, "weights_bytes": weights,
           "weights_note": "mmapped tensor data"}
    missing = [name for name, v in (("block_count", n_layer), ("embedding_length", n_embd),
                                    ("attention.head_count", heads), ("key/value length", k_len and v_len))
               if not v]
    if missing:
        mem.update(kv_bytes=None, work_bytes=None, total_bytes=None,
                   note=f"KV cache and buffers unknown: missing or invalid {', '.join(missing)}")
    else:
        swa, swa_note = swa_layers(arch, n_layer, window, hp("attention.sliding_window_pattern"))
        k_swa = _int(hp("attention.key_length_swa")) or k_len
        v_swa = _int(hp("attention.value_length_swa")) or v_len
        kv = 0
        from ..models.encoder import ENCODER_ARCHS
        encoder = arch in ENCODER_ARCHS
        for il in range(0 if encoder else n_layer):        # an encoder keeps no KV cache
            cells = min(n_ctx, window + n_batch) if swa[il] else n_ctx  # a ring, as models/base.py KVCache
            kl, vl = (k_swa, v_swa) if swa[il] else (k_len, v_len)
            kv += cells * heads_kv[il] * (kv_type_bytes(type_k, kl) + kv_type_bytes(type_v, vl))
        if encoder:
            swa_note = "none: an embedding model (encoder) keeps nothing between passes"
        n_head = max(heads)
        ff = max(n_ff) if n_ff else 4 * n_embd
        q_dim, kv_dim = n_head * k_len, max(heads_kv) * (k_len + v_len)
        logits = 0 if encoder else (n_vocab or 0) * 4
        acts = n_batch * (4 * n_embd + 2 * ff + q_dim + kv_dim) * 4
        scores = n_batch * n_head * (n_batch if encoder else n_ctx) * 4     # an encoder attends within its batch
        work = logits + acts + scores
        mem.update(
            kv_bytes=kv,
            kv={"type": f"K {type_k}, V {type_v}", "type_k": type_k, "type_v": type_v, "layers": n_layer, "sliding_layers": sum(swa), "global_layers": n_layer - sum(swa),
                "window": window if any(swa) else None, "note": swa_note},
            work_bytes=work,
            work={"logits": logits, "activations": acts, "attention_scores": scores,
                  "note": f"estimate: 1 token's logits, a batch of {n_batch} tokens' activations and one "
                          f"layer's attention scores, f32"},
            total_bytes=weights + kv + work,
        )
    if available is None:
        try:
            import psutil
            available = psutil.virtual_memory().available
        except Exception:  # psutil missing or no /proc: say so rather than guess
            available = None
    mem["available_bytes"] = available
    if mem["total_bytes"] is None or available is None:
        mem["fits"], mem["verdict"] = None, "unknown"
    else:
        mem["fits"] = mem["total_bytes"] <= available
        mem["verdict"] = "fits" if mem["fits"] else "does not fit"
    return mem


# -- output ----------------------------------------------------------------------------------

def render(info: dict) -> str:
    L = []
    fi, g, h, tok, ts, mem = (info[k] for k in ("file", "general", "hparams", "tokenizer", "tensors", "memory"))
    L.append(f"file          {_text(fi['path'])}")
    L.append(f"              GGUF v{fi['gguf_version']}, {fmt_bytes(fi['size'])}, {fi['n_kv']} key/values, "
             f"{fi['n_tensors']} tensors, alignment {fi['alignment']}, data at offset {fi['data_offset']}")
    L.append(f"architecture  {_text(g['architecture']) if g['architecture'] else '(none: general.architecture missing)'}")
    name = " · ".join(_text(g[k]) for k in ("name", "size_label", "organization", "license") if isinstance(g[k], str))
    if name:
        L.append(f"name          {name}")
    if g["file_type"]:
        L.append(f"file type     {g['file_type']}")

    L.append("")
    L.append("hyper-parameters")
    labels = dict((suffix, label) for label, suffix in HPARAMS)
    for suffix, v in h["named"].items():
        L.append(f"  {labels[suffix]:<26}{_short(v)}")
    d = h["derived"]
    if d["n_embd_head_k"] and "attention.key_length" not in h["named"]:
        L.append(f"  {'head dim (n_embd / heads)':<26}{d['n_embd_head_k']}")
    if d["n_gqa"]:
        L.append(f"  {'GQA ratio':<26}{d['n_gqa']}")
    rest = [k for k in h["arch_keys"] if k.split(".", 1)[1] not in h["named"]]
    for k in rest:
        L.append(f"  {_text(k):<26}{_short(h['arch_keys'][k])}")
    if not h["arch_keys"]:
        L.append("  (no <arch>.* keys)")

    L.append("")
    if tok["model"] is not None or tok["vocab_size"]:
        s = f"tokenizer     {_text(tok['model'])}"
        if tok["kind"]:
            s += f" — {tok['kind']}"
        if isinstance(tok["pre"], str):
            s += f", pre-tokenizer {_text(tok['pre'])}"
        L.append(s)
        extra = [f"{tok['vocab_size']} tokens" if tok["vocab_size"] is not None else "vocabulary size unknown"]
        if tok["n_merges"] is not None:
            extra.append(f"{tok['n_merges']} merges")
        for k, lab in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
            if _int(tok[k]) is not None:
                extra.append(f"{lab} {tok[k]}")
        extra.append("chat template" if tok["chat_template"] else "no chat template")
        L.append("              " + ", ".join(extra))
    else:
        L.append("tokenizer     (none in the file)")

    L.append("")
    L.append(f"tensors       {'type':<8}{'count':>6}{'parameters':>14}{'bytes':>14}{'bpw':>8}")
    for tname, e in ts["by_type"].items():
        bpw = 8 * e["bytes"] / e["params"] if e["params"] else 0
        L.append(f"              {tname:<8}{e['count']:>6}{fmt_count(e['params']):>14}{fmt_bytes(e['bytes']):>14}"
                 f"{bpw:>8.2f}" + ("" if e.get("runnable", True) else "  (tinyinfer cannot run this type)"))
    bpw = f"{ts['bits_per_weight']:>8.2f}" if ts["bits_per_weight"] else f"{'-':>8}"
    L.append(f"              {'total':<8}{ts['count']:>6}{fmt_count(ts['params']):>14}{fmt_bytes(ts['bytes']):>14}"
             f"{bpw}")
    L.append(f"              {ts['params']:,} parameters, {ts['bits_per_weight'] or 0:.2f} bits per weight")
    if ts.get("moe"):
        m = ts["moe"]
        L.append(f"              mixture of experts: {m['n_expert_used']} of {m['n_expert']} experts per token, "
                 f"{fmt_count(m['active_params'])} active of {fmt_count(ts['params'])} parameters, "
                 f"{fmt_bytes(m['bytes_per_token'])} of weights read per token")

    L.append("")
    L.append(f"memory at context {mem['n_ctx']} ({mem['n_ctx_source']}; -c to change), batch {mem['n_batch']}")
    L.append(f"  {'weights (mmapped)':<26}{fmt_bytes(mem['weights_bytes']):>12}")
    if mem["kv_bytes"] is not None:
        kv = mem["kv"]
        det = f"{kv['layers']} layers, {kv['type']}" if mem["kv_bytes"] else ""
        if kv["sliding_layers"]:
            det += f"; {kv['sliding_layers']} sliding (window {kv['window']}) + {kv['global_layers']} global"
        if kv["note"] and not kv["sliding_layers"]:
            det += f"; {kv['note']}" if det else kv["note"]
        L.append(f"  {'KV cache':<26}{fmt_bytes(mem['kv_bytes']):>12}   {det}")
        w = mem["work"]
        L.append(f"  {'working buffers (est.)':<26}{fmt_bytes(mem['work_bytes']):>12}   logits {fmt_bytes(w['logits'])}, "
                 f"activations {fmt_bytes(w['activations'])}, attention scores {fmt_bytes(w['attention_scores'])}")
        L.append(f"  {'total':<26}{fmt_bytes(mem['total_bytes']):>12}")
    else:
        L.append(f"  {mem['note']}")
    L.append(f"  {'available on this machine':<26}{fmt_bytes(mem['available_bytes']):>12}")
    verdict = mem["verdict"]
    if mem["fits"] is not None and mem["available_bytes"]:
        verdict += f" ({100 * mem['total_bytes'] / mem['available_bytes']:.1f}% of available memory)"
    L.append(f"  {'verdict':<26}{verdict}")
    return "\n".join(L)


def _count(minimum: int):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}: {v}")
        return v
    return conv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tinyinfer inspect",
                                 description="show what a GGUF file holds and whether it fits in memory")
    ap.add_argument("file", help="a .gguf file")
    ap.add_argument("-c", "--ctx-size", type=_count(0), default=None,
                    help=f"context length for the memory estimate (default: the file's, at most {DEFAULT_CTX_CAP}; "
                         f"0: the file's, uncapped)")
    ap.add_argument("-b", "--batch-size", type=_count(1), default=DEFAULT_BATCH,
                    help=f"tokens per batch for the working-buffer estimate (default {DEFAULT_BATCH})")
    ap.add_argument("-ctk", "--cache-type-k", default="f16", choices=("f16", "q8_0", "q4_0"),
                    help="KV cache type for K (default f16)")
    ap.add_argument("-ctv", "--cache-type-v", default="f16", choices=("f16", "q8_0", "q4_0"),
                    help="KV cache type for V (default f16)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # usage errors and --help: argparse printed them
        return e.code if isinstance(e.code, int) else 2
    try:
        with GGUFFile(args.file) as f:
            info = analyze(f, n_ctx=args.ctx_size, n_batch=args.batch_size, type_k=args.cache_type_k,
                           type_v=args.cache_type_v)
    except GGUFError as e:
        print(f"error: {_text(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 — a CLI prints one line, not a traceback
        print(f"error: internal error inspecting {_text(args.file)}: {type(e).__name__}: {_text(e)}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_jsonable(info)))
    else:
        print(render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
