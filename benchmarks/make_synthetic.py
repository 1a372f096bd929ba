"""Write synthetic llama-architecture GGUF models of real shapes with random weights.

    python benchmarks/make_synthetic.py tinyllama Q4_0 [-o DIR]
    python benchmarks/make_synthetic.py smollm2 Q8_0
    types: F16, Q4_0, Q8_0, Q4_K_M

For speed work in the memory-bound regime: the weights are N(0, 0.02) noise
quantized with our own quantizer, norms are ones, and the vocabulary is borrowed
from a vocabulary-only GGUF (the LLaMA SentencePiece one for 32000-token shapes)
so the files load and run like real ones. Q4_K_M follows llama-quantize's mix:
Q6_K for output and for attn_v / ffn_down on the "more bits" layers, Q4_K elsewhere;
Q4_0 keeps output in Q6_K as llama-quantize does when the rows fit 256-blocks.
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
}
FTYPE = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, layer: int, n_layer: int, ftype: str) -> str:
    """llama-quantize's choice: output in Q6_K for quantized types other than Q8_0."""
    if name == "output.weight" and ftype in ("Q4_0", "Q4_K_M"):
        return "Q6_K"
    if ftype != "Q4_K_M":
        return ftype
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and _more_bits(layer, n_layer):
        return "Q6_K"
    return "Q4_K"


def _vocab_source(n_vocab: int) -> dict:
    """tokenizer.* metadata of a real vocabulary of this size (padded/truncated if needed)."""
    from tinyinfer.gguf import GGUFFile
    root = Path(__file__).resolve().parent.parent
    if n_vocab == 32000:
        g = GGUFFile(root.parent / "shared" / "reference" / "vocab" / "ggml-vocab-llama-spm.gguf")
    else:
        from tinyinfer.fetch import fetch
        g = GGUFFile(fetch("smollm2"))
    return {k: (v, g.field_types[k]) for k, v in g.metadata.items() if k.startswith("tokenizer.")}


def write_model(shape: str, ftype: str, out: Path, seed: int = 0) -> Path:
    import gguf
    from tinyinfer.kernels import quants

    s = SHAPES[shape]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"synthetic {shape} {ftype}")
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_kv"])
    w.add_rope_dimension_count(s["n_embd"] // s["n_head"])
    w.add_rope_freq_base(s["rope"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(FTYPE[ftype])
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
        x = (rng.standard_normal(shp, dtype=np.float32) * 0.02).astype(np.float32)
        tname = tensor_type(name, layer, L, ftype)
        if tname == "F16":
            w.add_tensor(name, x.astype(np.float16))
            continue
        qt = quants.type_info(tname)
        raw = quants.quantize(x, qt.ggml_type)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt.ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return out


def ensure(shape: str, ftype: str, directory=None) -> Path:
    from tinyinfer.fetch import cache_dir
    d = Path(directory) if directory else cache_dir() / "synthetic"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{shape}-synthetic.{ftype}.gguf"
    if not p.exists():
        tmp = p.with_suffix(".tmp")
        write_model(shape, ftype, tmp)
        tmp.rename(p)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("types", nargs="+", choices=sorted(FTYPE))
    ap.add_argument("-o", "--out-dir", default=None, help="default: <cache>/synthetic")
    a = ap.parse_args(argv)
    for t in a.types:
        t0 = time.perf_counter()
        p = ensure(a.shape, t, a.out_dir)
        print(f"{p}  ({p.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
