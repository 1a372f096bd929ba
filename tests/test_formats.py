"""Walk the format registry: every type ``quantize`` can write loads and generates.

A tiny llama model (benchmarks/make_synthetic.py "tiny": d 256, so every matrix takes the
K / IQ type itself; SmolLM2's vocabulary, tied output) in F16 is quantized to each
llama-quantize type name the tool accepts. Each file must load, contain only runnable
types, generate greedily, and give first-step logits close to the F16 model's (a broken
kernel gives unrelated logits: cosine ~0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

from tinyinfer.engine import Engine
from tinyinfer.gguf import GGUFFile
from tinyinfer.kernels import quants
from tinyinfer.sampler import SamplerParams
from tinyinfer.tools.quantize import FTYPES, QuantizeError, main, plan_quantization

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import make_synthetic  # noqa: E402

PROMPT = [1, 504, 3458, 314, 260, 1615, 30, 378]
# centered-logit cosine vs F16 (random weights: the bits of the weakest tensors decide)
MIN_COS = {"Q2_K": 0.80, "Q2_K_S": 0.80, "Q3_K_S": 0.85, "Q3_K_M": 0.90, "Q3_K_L": 0.90}
# the default run: every ggml type the tool writes appears in one of these files
# (Q2_K: Q2_K/Q3_K/Q4_K, Q5_K_M: Q5_K/Q6_K, ...); the other names with -m slow
DEFAULT = ["Q2_K", "Q3_K_M", "Q5_K_M", "IQ4_NL", "IQ4_XS", "Q4_1", "Q5_0", "Q8_0", "BF16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    d = tmp_path_factory.mktemp("tiny")
    f16 = make_synthetic.write_model("tiny", d / "tiny.F16.gguf")
    eng = Engine(f16, n_ctx=64, n_threads=1)
    return d, f16, eng.ingest_prompt(PROMPT).copy()


def cosine(a, b):
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.mark.parametrize("typ", [t if t in DEFAULT else pytest.param(t, marks=pytest.mark.slow)
                                 for t in FTYPES if t != "F16"])
def test_every_writable_type_loads_and_generates(tiny, typ):
    d, f16, ref = tiny
    out = d / f"tiny.{typ}.gguf"
    assert main([str(f16), str(out), typ, "-q"]) == 0
    g = GGUFFile(out)
    used = {t.type_name for t in g.tensors.values()}
    assert all(quants.type_info(t).runnable for t in used), used
    default = FTYPES[typ][1]
    assert default.name in used or typ == "Q2_K_S", (typ, used)   # the file really holds its type
    g.close()
    eng = Engine(out, n_ctx=64, n_threads=1)
    logits = eng.ingest_prompt(PROMPT)
    assert np.all(np.isfinite(logits))
    assert cosine(logits, ref) >= MIN_COS.get(typ, 0.95), (typ, cosine(logits, ref))
    eng.reset()
    toks = [s.token for s in eng.generate(PROMPT, SamplerParams(temperature=0.0), max_tokens=4)]
    assert len(toks) == 4 and all(0 <= t < eng.n_vocab for t in toks)


def test_every_registry_type_is_writable_or_said(tiny):
    """Each runnable registry type can be asked for as a tensor type; unknown names list what works."""
    d, f16, _ = tiny
    g = GGUFFile(f16)
    for e in quants.TYPES.values():
        assert e.runnable and e.quantize_rows is not None, e.name
    with pytest.raises(QuantizeError, match="known: .*IQ4_XS"):
        plan_quantization(g, "IQ2_XXS")
    g.close()
    assert {FTYPES[t][1] for t in FTYPES} <= set(quants.TYPES)
    assert GT.IQ4_NL in {FTYPES[t][1] for t in FTYPES}


def test_ggml_type_table_matches_the_gguf_package():
    """tinyinfer/ggml_types.py (read when loading a model, so that no load imports the gguf package)
    has every type of gguf-py with the same id, name and block shape."""
    import gguf
    from tinyinfer.ggml_types import QUANT_SIZES, GGMLType
    for t in gguf.GGMLQuantizationType:
        assert GGMLType(t.value).name == t.name
        assert QUANT_SIZES[GGMLType(t.value)] == gguf.GGML_QUANT_SIZES[t], t.name
    assert len(QUANT_SIZES) == len(GGMLType)
