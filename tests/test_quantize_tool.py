"""``python -m tinyinfer quantize``: llama-quantize's tensor choices and bytes, metadata
carried over, outputs readable by our reader and gguf.GGUFReader, clear errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

from tinyinfer.gguf import GGUFFile
from tinyinfer.kernels import quants as Q
from tinyinfer.tools.quantize import (Options, QuantizeError, ensure_requantized, main,
                                      plan_quantization)
from conftest import ROOT, cache_lock, need_reference

FTYPE = {"Q4_0": 2, "Q8_0": 7, "F16": 1}


def sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def file_sha(p) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def run(argv):
    """main(argv) -> (rc, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def reference():
    return json.loads(need_reference("smollm2", "requant_sha256.json").read_text())


@pytest.fixture(scope="module")
def requantized(smollm2_path, tmp_path_factory):
    """SmolLM2 Q4_1 quantized by the tool to Q4_0, Q8_0, F16: {type: (path, stdout, stderr)}."""
    d = tmp_path_factory.mktemp("requant")
    res = {}
    for typ in FTYPE:
        p = d / f"SmolLM2.{typ}.gguf"
        rc, out, err = run([str(smollm2_path), str(p), typ, "--allow-requantize"])
        assert rc == 0, err
        res[typ] = (p, out, err)
    return res


# -- SmolLM2 requantized equals llama-quantize's output ----------------------------------

@pytest.mark.parametrize("typ", list(FTYPE))
def test_tool_reproduces_llama_quantize_tensors(requantized, reference, typ):
    p = requantized[typ][0]
    g = GGUFFile(p)
    ref = reference[typ]
    assert list(g.tensors) == list(ref)            # llama.cpp's write order too
    for name, (tname, digest) in ref.items():
        t = g.tensors[name]
        assert t.type_name == tname, name
        assert sha(t.data) == digest, (typ, name)
    kept = {n: t for n, (t, _) in ref.items() if "blk" not in n}
    assert kept["token_embd.weight"] == ("F16" if typ == "F16" else "Q8_0")
    assert kept["output_norm.weight"] == "F32"


@pytest.mark.parametrize("typ", list(FTYPE))
def test_metadata_carried_over(requantized, smollm2_path, typ):
    src, dst = GGUFFile(smollm2_path), GGUFFile(requantized[typ][0])
    assert set(dst.metadata) == set(src.metadata)
    for k, v in src.metadata.items():
        assert dst.field_types[k] == src.field_types[k], k
        if k == "general.file_type":
            assert dst.metadata[k] == FTYPE[typ]
        elif isinstance(v, np.ndarray):
            assert dst.metadata[k].dtype == v.dtype and np.array_equal(dst.metadata[k], v), k
        else:
            assert dst.metadata[k] == v, k
    assert dst.metadata["general.quantization_version"] == 2
    assert dst.alignment == src.alignment


@pytest.mark.parametrize("typ", ["Q4_0", "F16"])   # GGUFReader takes seconds on a 49k vocabulary
def test_gguf_reader_opens_output(requantized, typ):
    p = requantized[typ][0]
    r = gguf.GGUFReader(p)
    ours = GGUFFile(p)
    assert len(r.tensors) == len(ours.tensors) == 272
    assert int(r.fields["general.file_type"].parts[-1][0]) == FTYPE[typ]
    assert r.fields["general.architecture"].contents() == "llama"
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    assert toks == ours.metadata["tokenizer.ggml.tokens"]
    for rt in r.tensors:
        t = ours.tensors[rt.name]
        assert int(rt.tensor_type) == t.ggml_type
        assert [int(d) for d in rt.shape] == list(t.shape)
        assert rt.data.view(np.uint8).tobytes() == t.data.tobytes(), rt.name


def test_summary_like_llama_quantize(requantized):
    _, out, _ = requantized["Q4_0"]
    assert "model size  =      92.10 MiB (5.74 BPW)" in out
    assert "quant size  =      85.77 MiB (5.35 BPW)" in out
    assert "210 converted, 62 copied" in out and "general.file_type = 2" in out
    _, out, _ = requantized["F16"]
    assert "(16.00 BPW)" in out


def test_ensure_requantized_caches_the_same_bytes(requantized, smollm2_path):
    from tinyinfer.fetch import cache_dir

    with cache_lock():           # no other test process writes the cache meanwhile
        p = ensure_requantized("Q4_0")
        assert p == cache_dir() / "SmolLM2-135M-Instruct.Q4_0.gguf"
        assert file_sha(p) == file_sha(requantized["Q4_0"][0])     # same bytes as the tool's output
        mtime = p.stat().st_mtime_ns
        assert ensure_requantized("q4_0") == p                    # reused, not rewritten
        assert p.stat().st_mtime_ns == mtime
        assert ensure_requantized("Q4_1") == smollm2_path          # already that type
        with pytest.raises(QuantizeError, match="unknown type"):
            ensure_requantized("Q4_9")


# -- llama-quantize's choices ---------------------------------------------------------------

def test_plan_reproduces_gemma3_q4_k_m_layout(gemma3_path):
    """Our Q4_K_M choices give exactly the types (and order) of llama.cpp's Gemma 3 file:
    Q4_K -> Q5_0 / Q6_K -> Q8_0 fallbacks for 640-wide rows, use_more_bits layers."""
    g = GGUFFile(gemma3_path)
    plans = plan_quantization(g, "Q4_K_M", Options(allow_requantize=True))
    assert [p.name for p in plans] == list(g.tensors)
    assert {p.name: GT(p.dst_type).name for p in plans} == {n: t.type_name for n, t in g.tensors.items()}
    assert not any(p.convert for p in plans)      # nothing to do: it is already Q4_K_M
    with pytest.raises(QuantizeError, match="already quantized.*--allow-requantize"):
        plan_quantization(g, "Q8_0")


def test_plan_options_on_smollm2(smollm2_path):
    g = GGUFFile(smollm2_path)
    types = lambda plans: {p.name: GT(p.dst_type).name for p in plans}  # noqa: E731
    o = Options(allow_requantize=True)
    base = types(plan_quantization(g, "Q4_0", o))
    assert base["token_embd.weight"] == "Q8_0" and base["blk.0.attn_q.weight"] == "Q4_0"
    pure = types(plan_quantization(g, "Q4_0", Options(allow_requantize=True, pure=True)))
    assert pure["token_embd.weight"] == "Q4_0" and pure["blk.0.attn_norm.weight"] == "F32"
    te = types(plan_quantization(g, "Q4_0", Options(allow_requantize=True, token_embedding_type=GT.Q5_1)))
    assert te["token_embd.weight"] == "Q5_1"
    km = types(plan_quantization(g, "Q4_K_M", o))
    # 576-wide rows fall back (Q4_K -> Q5_0, Q6_K -> Q8_0); ffn_down rows are 1536 = 6 * 256
    assert km["blk.0.attn_q.weight"] == "Q5_0" and km["blk.0.attn_v.weight"] == "Q8_0"
    assert km["blk.1.attn_v.weight"] == "Q8_0" and km["blk.4.attn_v.weight"] == "Q5_0"
    downs = [km[f"blk.{i}.ffn_down.weight"] for i in range(30)]
    more = [i for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2]
    assert downs == ["Q6_K" if i in more else "Q4_K" for i in range(30)]
    # 256-block types that do not divide 576: llama.cpp's tensor_type_fallback (Aug 2026)
    k3 = types(plan_quantization(g, "Q3_K_M", o))
    assert k3["blk.0.attn_q.weight"] == "Q4_0" and k3["blk.0.attn_v.weight"] == "Q5_1"
    xs = types(plan_quantization(g, "IQ4_XS", o))
    assert xs["blk.0.attn_q.weight"] == "IQ4_NL" and xs["blk.0.ffn_down.weight"] == "Q5_K"
    assert xs["blk.5.ffn_down.weight"] == "IQ4_XS" and xs["blk.0.attn_v.weight"] == "IQ4_NL"   # n_gqa 3
    assert xs["token_embd.weight"] == "Q8_0"


# -- a synthetic F32 model: K mixtures, fallbacks, options ----------------------------------

N_EMBD, N_FF, N_LAYER, VOCAB = 256, 288, 8, 96


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny llama-shaped F32 model with an untied output and a 288-wide FFN."""
    p = tmp_path_factory.mktemp("synth") / "tiny-f32.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(p, "llama")
    w.add_block_count(N_LAYER)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_embedding_length(N_EMBD)
    w.add_file_type(0)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    w.add_array("tokenizer.ggml.scores", np.zeros(VOCAB, np.float32).tolist())
    w.add_array("general.empty_list", [0])
    weights = {}

    def add(name, *np_shape):
        a = (rng.standard_normal(np_shape) * 0.05).astype(np.float32)
        weights[name] = a
        w.add_tensor(name, a)

    add("token_embd.weight", VOCAB, N_EMBD)
    add("output.weight", VOCAB, N_EMBD)
    add("output_norm.weight", N_EMBD)
    for i in range(N_LAYER):
        add(f"blk.{i}.attn_norm.weight", N_EMBD)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{i}.{n}.weight", N_EMBD, N_EMBD)
        add(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        add(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        add(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
        add(f"blk.{i}.ffn_norm.weight", N_EMBD)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p, weights


def _types(p):
    return {n: t.type_name for n, t in GGUFFile(p).tensors.items()}


def test_q4_k_m_mixture_on_f32_model(synthetic, tmp_path):
    src, weights = synthetic
    out = tmp_path / "tiny-q4km.gguf"
    rc, stdout, err = run([str(src), str(out), "Q4_K_M", "-q"])   # F32 input: no --allow-requantize
    assert rc == 0, err
    ty = _types(out)
    more = [i for i in range(N_LAYER) if i < 1 or i >= 7 or (i - 1) % 3 == 2]   # use_more_bits(i, 8)
    assert ty["output.weight"] == "Q6_K" and ty["token_embd.weight"] == "Q4_K"
    assert ty["output_norm.weight"] == "F32"
    for i in range(N_LAYER):
        assert ty[f"blk.{i}.attn_v.weight"] == ("Q6_K" if i in more else "Q4_K")
        assert ty[f"blk.{i}.ffn_down.weight"] == ("Q8_0" if i in more else "Q5_0")   # 288 % 256: fallback
        assert ty[f"blk.{i}.attn_q.weight"] == ty[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert ty[f"blk.{i}.ffn_norm.weight"] == "F32"
    assert "fallbacks" in stdout and "general.file_type = 15" in stdout
    g = GGUFFile(out)
    assert g.metadata["general.file_type"] == 15
    assert g.metadata["general.empty_list"].tolist() == [0]
    for name, a in weights.items():
        t = g.tensors[name]
        y = Q.dequantize(t.data, t.ggml_type, t.shape[0]).reshape(a.shape)
        assert np.sqrt(np.mean((y - a) ** 2)) < 0.12 * np.sqrt(np.mean(a ** 2)), name
        if t.ggml_type == GT.Q4_K:   # bytes of our quantizer on the F32 weights, no detour
            assert np.array_equal(t.data, Q.quantize(a.reshape(-1, t.shape[0]), GT.Q4_K)), name
    gguf.GGUFReader(out)


def test_output_options(synthetic, tmp_path):
    src, _ = synthetic
    a = tmp_path / "a.gguf"
    assert run([str(src), str(a), "Q8_0", "--leave-output-tensor", "-q"])[0] == 0
    ta = _types(a)
    assert ta["output.weight"] == "F32" and ta["token_embd.weight"] == "Q8_0"
    b = tmp_path / "b.gguf"
    assert run([str(src), str(b), "q4_k", "--pure", "--output-tensor-type", "q8_0",
                "--token-embedding-type", "F16", "-q"])[0] == 0      # --pure Q4_K: 288-wide rows fall back
    assert _types(b)["blk.0.ffn_down.weight"] == "Q5_0" and _types(b)["blk.0.attn_v.weight"] == "Q4_K"
    assert run([str(src), str(b), "Q4_0", "--pure", "--output-tensor-type", "q8_0",
                "--token-embedding-type", "F16", "-q"])[0] == 0
    tb = _types(b)
    assert tb["output.weight"] == "Q8_0" and tb["token_embd.weight"] == "F16"
    assert tb["blk.0.ffn_down.weight"] == "Q4_0"
    c = tmp_path / "c.gguf"
    rc, out, _ = run([str(src), str(c), "BF16", "-q", "--override-kv", "general.name=str:tiny",
                      "--override-kv", "tiny.flag=bool:true"])
    assert rc == 0
    g = GGUFFile(c)
    assert g.metadata["general.name"] == "tiny" and g.metadata["tiny.flag"] is True
    assert g.metadata["general.file_type"] == 32
    assert _types(c)["blk.3.attn_k.weight"] == "BF16" and _types(c)["blk.3.ffn_norm.weight"] == "F32"


def test_dry_run_copy_and_default_output_name(synthetic, tmp_path):
    src, _ = synthetic
    d = tmp_path / "dry.gguf"
    rc, out, err = run([str(src), str(d), "Q5_1", "--dry-run", "-v"])
    assert rc == 0 and not d.exists()
    assert "converting to q5_1" in err and "quant size" in out
    cp = tmp_path / "copy.gguf"
    assert run([str(src), str(cp), "COPY", "-q"])[0] == 0
    assert {n: t.data.tobytes() for n, t in GGUFFile(cp).tensors.items()} == \
        {n: t.data.tobytes() for n, t in GGUFFile(src).tensors.items()}
    # llama-quantize's IN TYPE [NTHREADS] form: output next to the input
    import shutil
    src2 = tmp_path / "in.gguf"
    shutil.copy(src, src2)
    assert run([str(src2), "Q8_0", "2", "-q"])[0] == 0
    assert (tmp_path / "ggml-model-Q8_0.gguf").exists()


# -- errors: one clear line, non-zero exit, no traceback, nothing written -------------------

@pytest.mark.parametrize("case", ["missing", "badtype", "requant", "noargs", "imatrix", "threads"])
def test_errors_are_one_line(case, smollm2_path, tmp_path):
    out = tmp_path / "out.gguf"
    argv = {
        "missing": [str(tmp_path / "nope.gguf"), str(out), "Q4_0"],
        "badtype": [str(smollm2_path), str(out), "Q4_9"],
        "requant": [str(smollm2_path), str(out), "Q4_0"],
        "noargs": [],
        "imatrix": [str(smollm2_path), str(out), "Q4_0", "--imatrix", "x.dat"],
        "threads": [str(smollm2_path), str(out), "Q4_0", "zero"],
    }[case]
    rc, stdout, err = run(argv)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyinfer quantize: error: "), err
    assert "Traceback" not in err and not out.exists()
    want = {"missing": "nope.gguf", "badtype": "unknown type 'Q4_9'", "requant": "--allow-requantize",
            "noargs": "expected IN.gguf", "imatrix": "not supported", "threads": "'zero'"}[case]
    assert want in lines[0]
    assert not list(tmp_path.glob(".out.gguf.tmp-*"))


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinyinfer.tools.quantize", str(tmp_path / "x.gguf"),
                        str(tmp_path / "y.gguf"), "Q8_0"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "cannot open" in r.stderr and "Traceback" not in r.stderr
    assert main(["--help"]) == 0
