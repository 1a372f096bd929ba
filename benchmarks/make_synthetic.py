"""Write synthetic llama-architecture GGUF models of real shapes with random weights.

    python benchmarks/make_synthetic.py tinyllama Q4_0 [-o DIR]
    python benchmarks/make_synthetic.py smollm2 Q8_0
    types: F16 and every type ``python -m tinyinfer quantize`` writes (Q2_K, Q3_K_M, Q4_K_M,
    Q5_K_M, Q6_K, IQ4_NL, IQ4_XS, Q4_0, Q8_0, ...)

For speed work in the memory-bound regime: the weights are N(0, 0.02) noise in F16,
norms are ones, and the vocabulary is borrowed from a vocabulary-only GGUF (the LLaMA
SentencePiece one for 32000-token shapes) so the files load and run like real ones.
Quantized files are made from the F16 one by the quantize tool, with llama-quantize's
per-tensor type choices (as llama.cpp's reference files in ../shared/reference/speed.md).
The "tiny" shape (d 256, every matrix row a multiple of 256) is the tests' model for
walking the format registry.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {
    # name: n_embd, n_layer, n_head, n_kv_head, n_ff, n_vocab, rope_base, ctx
    "tinyllama": dict(n_embd=2048, n_layer=22, n_head=32, n_kv=4, n_ff=5632, n_vocab=32000, rope=10000.0, ctx=2048),
    "smollm2": dict(n_embd=576, n_layer=30, n_head=9, n_kv=3, n_ff=1536, n_vocab=49152, rope=100000.0, ctx=8192,
                    tied=True),
    # TinyLlama's 22 layers with narrow matrices and a byte vocabulary (259 tokens: a negligible output
    # head): the per-token cost that does not grow with the weights, fitted over two FFN widths whose
    # weights all stay in the L3 cache (benchmarks/dispatch_overhead.py)
    "narrow22": dict(n_embd=256, n_layer=22, n_head=4, n_kv=1, n_ff=256, n_vocab=259, rope=10000.0, ctx=2048),
    "narrow22ff768": dict(n_embd=256, n_layer=22, n_head=4, n_kv=1, n_ff=768, n_vocab=259, rope=10000.0,
                          ctx=2048),
    "tiny": dict(n_embd=256, n_layer=2, n_head=4, n_kv=1, n_ff=512, n_vocab=49152, rope=10000.0, ctx=512,
                 tied=True),
}


def _vocab_source(n_vocab: int) -> dict:
    """tokenizer.* metadata of a real vocabulary of this size (padded/truncated if needed)."""
    from tinyinfer.gguf import GGUFFile
    root = Path(__file__).resolve().parent.parent
    if n_vocab == 259:          # SentencePiece-style byte vocabulary: <unk> <s> </s> <0x00>..<0xFF>
        toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        return {"tokenizer.ggml.model": ("llama", 8), "tokenizer.ggml.tokens": (toks, 9),
                "tokenizer.ggml.scores": ([0.0] * 259, 9), "tokenizer.ggml.token_type": ([2, 3, 3] + [6] * 256, 9),
                "tokenizer.ggml.bos_token_id": (1, 4), "tokenizer.ggml.eos_token_id": (2, 4),
                "tokenizer.ggml.unknown_token_id": (0, 4)}
    if n_vocab == 32000:
        g = GGUFFile(root.parent / "shared" / "reference" / "vocab" / "ggml-vocab-llama-spm.gguf")
    else:
        from tinyinfer.fetch import fetch
        g = GGUFFile(fetch("smollm2"))
    return {k: (v, g.field_types[k]) for k, v in g.metadata.items() if k.startswith("tokenizer.")}


def write_model(shape: str, out: Path, seed: int = 0) -> Path:
    """The F16 model of ``shape`` (random weights, norms of ones) at ``out``."""
    import gguf

    s = SHAPES[shape]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"synthetic {shape}")
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_kv"])
    w.add_rope_dimension_count(s["n_embd"] // s["n_head"])
    w.add_rope_freq_base(s["rope"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)
    w.add_vocab_size(s["n_vocab"])
    VT = gguf.GGUFValueType
    for k, (v, vt) in _vocab_source(s["n_vocab"]).items():
        if vt == 9:  # array
            if isinstance(v, list):
                w.add_array(k, v)
            else:
                w.add_array(k, [x.item() for x in v])
        elif vt == 8:
            w.add_string(k, v)
        elif vt == 7:
            w.add_bool(k, bool(v))
        else:
            w.add_key_value(k, v, VT(vt))

    E, F, L = s["n_embd"], s["n_ff"], s["n_layer"]
    hd = E // s["n_head"]
    tensors = [("token_embd.weight", -1, (s["n_vocab"], E))]
    for i in range(L):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", i, (E,)), (b + "attn_q.weight", i, (E, E)),
                    (b + "attn_k.weight", i, (s["n_kv"] * hd, E)), (b + "attn_v.weight", i, (s["n_kv"] * hd, E)),
                    (b + "attn_output.weight", i, (E, E)), (b + "ffn_norm.weight", i, (E,)),
                    (b + "ffn_gate.weight", i, (F, E)), (b + "ffn_up.weight", i, (F, E)),
                    (b + "ffn_down.weight", i, (E, F))]
    tensors += [("output_norm.weight", -1, (E,))]
    if not s.get("tied"):
        tensors += [("output.weight", -1, (s["n_vocab"], E))]
    for name, layer, shp in tensors:
        if len(shp) == 1:
            w.add_tensor(name, np.ones(shp, np.float32))
            continue
        w.add_tensor(name, (rng.standard_normal(shp, dtype=np.float32) * 0.02).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return out


def ensure(shape: str, ftype: str, directory=None, pure: bool = False) -> Path:
    """The file of ``shape`` in ``ftype`` (made on first use); ``pure``: every matrix in the type's
    base type (llama-quantize --pure: no Q6_K output or attn_v of the K mixes)."""
    from tinyinfer.fetch import cache_dir
    d = Path(directory) if directory else cache_dir() / "synthetic"
    d.mkdir(parents=True, exist_ok=True)
    from tinyinfer.tools.quantize import Options, parse_ftype, quantize_file
    name = parse_ftype(ftype)
    if name is None or name == "COPY":
        raise SystemExit(f"unknown type {ftype!r}")
    p = d / f"{shape}-synthetic.{name}{'.pure' if pure and name != 'F16' else ''}.gguf"
    if not p.exists():
        tmp = p.with_suffix(".tmp")
        if name == "F16":
            write_model(shape, tmp)
        else:
            quantize_file(ensure(shape, "F16", d), tmp, name, Options(pure=pure), progress=False)
        tmp.rename(p)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("types", nargs="+", help="F16 or a quantize type name")
    ap.add_argument("-o", "--out-dir", default=None, help="default: <cache>/synthetic")
    a = ap.parse_args(argv)
    for t in a.types:
        t0 = time.perf_counter()
        p = ensure(a.shape, t, a.out_dir)
        print(f"{p}  ({p.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
