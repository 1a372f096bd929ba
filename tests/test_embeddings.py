"""Embeddings and reranking (issue 21): WordPiece, the converter, the bert encoder, pooling and the faces.

Oracles: the ``tokenizers`` library on the checkpoint's tokenizer.json and llama.cpp's bert-bge vocab
vectors (tokens); sentence-transformers' own embeddings and llama.cpp's llama-embedding on our
converted files (tests/data/embeddings, see its README); llama-server's /v1/rerank on the synthetic
reranker (tests/make_reranker.py).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, serve_process

DATA = Path(__file__).parent / "data" / "embeddings"
SENTENCES = (DATA / "sentences.txt").read_text(encoding="utf-8").splitlines()


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from tinyinfer.fetch import checkpoint_dir
    return checkpoint_dir("all-minilm")


@pytest.fixture(scope="session")
def minilm_f32() -> Path:
    from tinyinfer.fetch import fetch
    return fetch("all-minilm")           # converted by tinyinfer convert --outtype f32 (fetch.py)


@pytest.fixture(scope="session")
def converted(minilm_dir, tmp_path_factory):
    from tinyinfer.tools.convert import convert
    d = tmp_path_factory.mktemp("minilm")
    cache = {}

    def get(outtype):
        if outtype not in cache:
            cache[outtype] = convert(minilm_dir, d / f"minilm-{outtype}.gguf", outtype)
        return cache[outtype]
    return get


@pytest.fixture(scope="session")
def reranker(tmp_path_factory) -> Path:
    from make_reranker import make
    from tinyinfer.tools.convert import convert
    d = tmp_path_factory.mktemp("reranker")
    return convert(make(d / "hf"), d / "reranker-f16.gguf", "f16")


@pytest.fixture(scope="session")
def engine(minilm_f32):
    from tinyinfer.engine import Engine
    return Engine(minilm_f32, n_ctx=512, n_threads=1)


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _llama_embedding(name):
    return np.array([d["embedding"] for d in json.loads((DATA / name).read_text())["data"]])


def _embed_file(path, texts, **kw):
    from tinyinfer.embedding import embed
    from tinyinfer.engine import Engine
    e = Engine(path, n_ctx=512, n_threads=1)
    tok = e.tokenizer
    return np.stack(embed(e, [tok.encode(t, special=True) for t in texts], **kw))


# -- WordPiece ---------------------------------------------------------------------------------------

def _varied_sentences(n=300):
    rng = np.random.default_rng(21)
    words = ("the quick brown fox jumps over lazy dog Hello WORLD don't isn't we'll "
             "café naïve résumé Zürich São Paulo façade coöperate Ångström Øresund ĳssel İstanbul straße "
             "北京 欢迎你 東京 日本語 한국어 中文字符 ﾃｽﾄ "
             "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis "
             "supercalifragilisticexpialidocious floccinaucinihilipilification unbelievably "
             "12.5% $1,299.99 2026-12-06 3:45pm #hashtag @user e-mail C++ a_b x^2 ~tilde |pipe| <tag> "
             "(parens) [brackets] {braces} «guillemets» „quotes“ — – … ¿qué? ¡sí! 😀 🚀 ✓ ™ © "
             "Ελληνικά русский язык العربية עברית हिन्दी ไทย").split()
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 12))
        seps = rng.choice([" ", " ", " ", "  ", "\t", "\n", ", ", "-", ""], size=k)
        out.append("".join(str(w) + str(s) for w, s in zip(rng.choice(words, size=k), seps)))
    return out


def test_wordpiece_matches_tokenizers_library(minilm_dir, minilm_f32):
    from tokenizers import Tokenizer as HF

    from tinyinfer.tokenizer import Tokenizer
    hf = HF.from_file(str(minilm_dir / "tokenizer.json"))
    hf.no_truncation()
    hf.no_padding()
    tok = Tokenizer.from_file(minilm_f32)
    assert tok.vocab_type == "wpm"
    texts = SENTENCES + _varied_sentences()
    # where llama.cpp and the tokenizers library differ, tinyinfer is llama.cpp (test below): llama.cpp keeps
    # only the first code point of each character's NFD (a Hangul syllable -> its first Jamo) and drops
    # every accent mark (\p{M}, spacing Mc too); the library keeps all Jamo and drops only Mn. Given the text
    # with those two differences applied, the library must agree on every sentence.
    import unicodedata
    as_llama = lambda t: "".join(unicodedata.normalize("NFD", c)[0] for c in t  # noqa: E731
                                 if unicodedata.category(c) != "Mc")
    bad = [(t, tok.encode(t), hf.encode(t).ids) for t in texts if tok.encode(t) != hf.encode(as_llama(t)).ids]
    assert not bad, f"{len(bad)}/{len(texts)} differ, first: {bad[0]}"
    same = sum(tok.encode(t) == hf.encode(t).ids for t in texts)
    assert len(texts) >= 300 and same >= len(texts) - 40, same
    # pieces: "##" continuations and [CLS] ... [SEP]
    ids = tok.encode("unbelievably antidisestablishmentarianism")
    assert ids[0] == 101 and ids[-1] == 102 and len(ids) > 4
    assert tok.decode(tok.encode("Hello, World!")) == " hello , world !"     # token_to_piece, as base.py


def test_wordpiece_matches_llama_tokenize(minilm_f32):
    """llama.cpp's llama-tokenize on the same converted file, the same 336 texts (wpm_llama_tokenize.jsonl)."""
    from tinyinfer.tokenizer import Tokenizer
    tok = Tokenizer.from_file(minilm_f32)
    rows = [json.loads(line) for line in (DATA / "wpm_llama_tokenize.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == SENTENCES + _varied_sentences()
    bad = [(r["text"], tok.encode(r["text"]), r["ids"]) for r in rows if tok.encode(r["text"]) != r["ids"]]
    assert not bad, f"{len(bad)}/{len(rows)} differ, first: {bad[0]}"


def test_wordpiece_matches_llama_cpp_bert_bge_vocab():
    """llama.cpp's own vocab test vectors (models/ggml-vocab-bert-bge.gguf.inp/.out, no special tokens)."""
    from tinyinfer.tokenizer import Tokenizer
    sep = "\n__ggml_vocab_test__\n"
    texts = (DATA / "ggml-vocab-bert-bge.gguf.inp").read_text(encoding="utf-8").split(sep)[:-1]
    out = (DATA / "ggml-vocab-bert-bge.gguf.out").read_text(encoding="utf-8").split("\n")[:len(texts)]
    tok = Tokenizer.from_file(DATA / "ggml-vocab-bert-bge.gguf")
    got = [tok.encode(t, add_bos=False) for t in texts]
    want = [[int(x) for x in line.split()] for line in out]
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not bad, f"{len(bad)}/{len(texts)} differ, first: {bad[0]}"


# -- converter + encoder ---------------------------------------------------------------------------

def test_minilm_matches_sentence_transformers(engine):
    """Converted F32 all-MiniLM-L6-v2 vs sentence-transformers' own embeddings (st_minilm.npy)."""
    from tinyinfer.embedding import embed
    tok = engine.tokenizer
    ours = np.stack(embed(engine, [tok.encode(s) for s in SENTENCES]))
    st = np.load(DATA / "st_minilm.npy")
    c = _cos(ours, st)
    assert c.mean() >= 0.999 and c.min() >= 0.995, (c.mean(), c.min())
    assert abs(float(ours[0] @ ours[1]) - 0.755) < 0.002        # the published similarity of the pair
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("outtype,ref,floor", [("f32", "llama_embedding_minilm_f32.json", 0.9999),
                                                ("f16", "llama_embedding_minilm_f16.json", 0.9999),
                                                ("q8_0", "llama_embedding_minilm_q8_0.json", 0.999)])
def test_matches_llama_embedding(converted, outtype, ref, floor):
    ours = _embed_file(converted(outtype), SENTENCES)
    c = _cos(ours, _llama_embedding(ref))
    assert c.min() >= floor, (outtype, c.min())
    st = _cos(ours, np.load(DATA / "st_minilm.npy"))
    assert st.min() >= 0.99, (outtype, st.min())


def test_converter_output_is_deterministic_and_typed(converted, minilm_f32):
    from gguf import GGMLQuantizationType as GT

    from tinyinfer.gguf import GGUFFile
    assert converted("f32").read_bytes() == Path(minilm_f32).read_bytes()
    g = GGUFFile(converted("q8_0"))
    assert g.architecture == "bert" and g.metadata["bert.pooling_type"] == 1
    assert g.metadata["tokenizer.ggml.model"] == "bert" and g.metadata["bert.attention.causal"] is False
    t = g.tensors
    assert t["blk.0.attn_q.weight"].ggml_type == GT.Q8_0 and t["token_embd.weight"].ggml_type == GT.Q8_0
    for name in ("position_embd.weight", "token_types.weight", "blk.0.attn_q.bias", "token_embd_norm.weight"):
        assert t[name].ggml_type == GT.F32, name


def test_inspect_shows_no_kv_cache_for_an_encoder(minilm_f32):
    r = subprocess.run([sys.executable, "-m", "tinyinfer", "inspect", str(minilm_f32)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    kv = next(line for line in r.stdout.splitlines() if line.strip().startswith("KV cache"))
    assert " 0 B" in kv and "encoder" in kv and "tokenizer     bert" in r.stdout


def test_converter_refuses_unknown_architecture_and_tokenizer(minilm_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(minilm_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["MambaForCausalLM"]}))
    r = subprocess.run([sys.executable, "-m", "tinyinfer", "convert", str(d), "--outfile", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "MambaForCausalLM" in r.stderr and "not supported" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.gguf").exists()
    (d / "config.json").write_text(json.dumps(cfg))
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["model"]["type"] = "Unigram"
    (d / "tokenizer.json").write_text(json.dumps(tj))
    r = subprocess.run([sys.executable, "-m", "tinyinfer", "convert", str(d), "--outfile", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "Unigram" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- other architectures: synthetic files vs llama-embedding ------------------------------------------

def test_nomic_bert_matches_llama_embedding(tmp_path):
    """Rotary positions, SwiGLU and a fused attn_qkv (tests/make_encoder_models.py; sha256 pinned)."""
    from make_encoder_models import make_nomic_bert

    from tinyinfer.fetch import _sha256
    f = make_nomic_bert(tmp_path / "synthetic-nomic-bert-F16.gguf")
    assert _sha256(f) == "1d3c11b0d049dfac467ab181de75956c500d8cedb8c326c7d8c9d8ca378ef342"
    ours = _embed_file(f, SENTENCES[:8])
    c = _cos(ours, _llama_embedding("llama_embedding_synthetic_nomic_bert.json"))
    assert c.min() >= 0.9999, c.min()


def test_gemma_embedding_matches_llama_embedding(tmp_path):
    """EmbeddingGemma's layout: bidirectional gemma3 layers, symmetric sliding window, GQA, dense_2/dense_3
    after mean pooling (tests/make_encoder_models.py on llama.cpp's llama-spm vocabulary)."""
    from conftest import need_reference
    from make_encoder_models import make_gemma_embedding

    from tinyinfer.fetch import _sha256
    f = make_gemma_embedding(tmp_path / "synthetic-gemma-embedding-F16.gguf",
                             need_reference("vocab", "ggml-vocab-llama-spm.gguf"))
    assert _sha256(f) == "bcd8e350aa92d58b5d711a1ff014ca7e49c81546f87211efd44efb951130407d"
    ours = _embed_file(f, SENTENCES[:8])
    c = _cos(ours, _llama_embedding("llama_embedding_synthetic_gemma_embedding.json"))
    assert c.min() >= 0.9999, c.min()


def _synthetic_qwen3():
    """The synthetic qwen3 F16 file of ../shared/tools/make_arch_models.py (sha256 pinned in the reference)."""
    from conftest import REFERENCE, cache_lock, need_reference

    from tinyinfer.fetch import _sha256, cache_dir
    want = dict(reversed(line.split()) for line in need_reference("arch", "sha256.txt").read_text().splitlines()
                if line.strip())["synthetic-qwen3-F16.gguf"]
    f = cache_dir() / "synthetic" / "synthetic-qwen3-F16.gguf"
    with cache_lock():
        if not f.exists() or _sha256(f) != want:
            tool = need_reference("..", "tools", "make_arch_models.py")
            subprocess.run([sys.executable, str(tool), str(REFERENCE / "vocab"), str(f.parent), "qwen3"],
                           check=True, stdout=subprocess.DEVNULL)
            assert _sha256(f) == want
    return f


def test_qwen3_last_token_pooling_matches_llama_embedding(tmp_path):
    """A decoder (the synthetic qwen3 of ../shared/tools/make_arch_models.py) pooled on its last token,
    as Qwen3-Embedding: llama-embedding --pooling last on the same file."""
    f = _synthetic_qwen3()
    ours = _embed_file(f, SENTENCES[:8], pooling="last")
    c = _cos(ours, _llama_embedding("llama_embedding_synthetic_qwen3_last.json"))
    assert c.min() >= 0.9999, c.min()
    # the file's own qwen3.pooling_type (Qwen3-Embedding's GGUF says "last") is what an embedding uses
    from tinyinfer.tools.quantize import quantize_file
    g = tmp_path / "qwen3-last.gguf"
    quantize_file(f, g, "COPY", overrides=["qwen3.pooling_type=int:3"], progress=False)
    assert np.array_equal(_embed_file(g, SENTENCES[:8]), ours)


# -- pooling, normalization, batching --------------------------------------------------------------

def test_pooling_and_normalize_modes(engine):
    from tinyinfer.embedding import embed
    ids = engine.tokenizer.encode("A man is eating food.")
    tokens = embed(engine, [ids], pooling="none", normalize_mode=-1)[0]
    assert tokens.shape == (len(ids), 384)
    assert np.allclose(embed(engine, [ids], pooling="mean", normalize_mode=-1)[0], tokens.mean(0), atol=1e-6)
    assert np.allclose(embed(engine, [ids], pooling="cls", normalize_mode=-1)[0], tokens[0], atol=1e-6)
    assert np.allclose(embed(engine, [ids], pooling="last", normalize_mode=-1)[0], tokens[-1], atol=1e-6)
    m = tokens.mean(0)
    assert np.isclose(np.abs(embed(engine, [ids], normalize_mode=1)[0]).sum(), 1, atol=1e-5)
    assert np.isclose(np.abs(embed(engine, [ids], normalize_mode=0)[0]).max(), 32760, rtol=1e-6)
    p3 = embed(engine, [ids], normalize_mode=3)[0]
    assert np.allclose(p3, m / (np.abs(m.astype(np.float64)) ** 3).sum() ** (1 / 3), atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        embed(engine, [ids], pooling="max")
    with pytest.raises(ValueError, match="rerank|classification"):
        embed(engine, [ids], pooling="rank")


@pytest.mark.parametrize("scores_max", [1 << 23, 1000])      # whole sequences / query rows in small blocks
@pytest.mark.parametrize("lens", [[300, 5, 77], [40], [33, 33, 33],   # padded + masked / strided views
                                  [5, 12, 1], [7]])                     # short: the jitted loop
def test_packed_attention_against_numpy(scores_max, lens, monkeypatch):
    """Bidirectional attention within each packed sequence, grouped-query heads, llama.cpp's symmetric window;
    q, k and v column slices of one fused qkv output, as the models pass them."""
    from tinyinfer.models.encoder import Packed
    monkeypatch.setattr(Packed, "SCORES_MAX", scores_max)
    rng = np.random.default_rng(0)
    H, K, hd, window = 4, 2, 32, 16
    n = sum(lens)
    qkv = rng.standard_normal((n, (H + 2 * K) * hd), dtype=np.float32)
    q, k, v = qkv[:, :H * hd], qkv[:, H * hd:(H + K) * hd], qkv[:, (H + K) * hd:]
    got = Packed(lens).attention(q, k, v, H, K, hd, 0.17, window=window)
    want, off = [], 0
    for L in lens:
        o = np.zeros((L, H, hd))
        for h in range(H):
            kk, vv = k[off:off + L, (h // 2) * hd:(h // 2 + 1) * hd], v[off:off + L, (h // 2) * hd:(h // 2 + 1) * hd]
            s = q[off:off + L, h * hd:(h + 1) * hd].astype(np.float64) @ kk.T * 0.17
            s[np.abs(np.arange(L)[:, None] - np.arange(L)[None, :]) > window // 2] = -np.inf
            p = np.exp(s - s.max(1, keepdims=True))
            o[:, h] = (p / p.sum(1, keepdims=True)) @ vv
        want.append(o.reshape(L, -1))
        off += L
    assert got.shape == (n, H * hd) and got.flags.c_contiguous      # the next matmul's input
    assert np.abs(got - np.concatenate(want)).max() < 1e-5
    no_window = Packed(lens).attention(q, k, v, H, K, hd, 0.17)
    p = Packed(lens)
    p.same_length, p.LOOP_MAX = False, 0        # the padded, masked path on the same input
    assert np.abs(no_window - p.attention(q, k, v, H, K, hd, 0.17)).max() < 1e-6


def test_layernorm_against_float64():
    """models/encoder.layernorm (the jitted rows of kernels/packed.py) against numpy in float64."""
    from tinyinfer.models.encoder import layernorm
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((41, 384)) * 3 + 1).astype(np.float32)
    w, b = rng.standard_normal(384).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-12) * w + b
    got = layernorm(x, w, b, np.float32(1e-12))
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-5
    assert np.array_equal(layernorm(x[3:4], w, b, np.float32(1e-12)), got[3:4])    # a row alone: the same floats


def test_fused_gelu_and_residual_layernorm_are_the_numpy_floats():
    """models/encoder.gelu (bias + GELU: two jitted loops around numpy's tanh) and add_layernorm (residual +
    bias adds inside the jitted layer norm) give bit for bit the floats of the numpy expressions they
    replace, with and without a bias."""
    from tinyinfer.models.encoder import _GELU_C, add_layernorm, gelu, layernorm
    rng = np.random.default_rng(2)
    u = (rng.standard_normal((41, 1536)) * 4).astype(np.float32)
    bias = rng.standard_normal(1536).astype(np.float32)
    for b in (bias, None):
        x = u + b if b is not None else u.copy()
        t = x * x
        t *= np.float32(0.044715)
        t += np.float32(1.0)
        t *= x
        t *= _GELU_C
        np.tanh(t, out=t)
        t += np.float32(1.0)
        want = x * t
        want *= np.float32(0.5)
        assert np.array_equal(gelu(u.copy(), b), want)
    x, h = (rng.standard_normal((41, 384)) * 3).astype(np.float32), rng.standard_normal((41, 384)).astype(np.float32)
    hb, w, b = (rng.standard_normal(384).astype(np.float32) for _ in range(3))
    eps = np.float32(1e-12)
    assert np.array_equal(add_layernorm(x, h, hb, w, b, eps), layernorm(x + (h + hb), w, b, eps))
    assert np.array_equal(add_layernorm(x, h, None, w, b, eps), layernorm(x + h, w, b, eps))


def test_floats_json_reads_back_every_float32_exactly():
    """The embedding responses' float text (server/jobs.floats_json): 9 significant digits give every float32
    back bit for bit (json's repr of the float64 value is ~3x slower); rows of rows; non-finite refused."""
    from tinyinfer.server.jobs import floats_json
    rng = np.random.default_rng(3)
    v = np.concatenate([(rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)).astype(np.float32),
                        np.array([0.0, -0.0, 1e-45, 3.4028235e38, -1.1754944e-38], np.float32)])
    for x in (v[:2000], v):                     # the %.9g text; with whole numbers (0, -0) json's
        got = json.loads(floats_json(x))
        assert all(type(f) is float for f in got)
        assert np.array_equal(np.array(got, np.float32).view(np.uint32), x.view(np.uint32))
    m = v[:12].reshape(3, 4)
    assert np.array_equal(np.array(json.loads(floats_json(m)), np.float32), m)
    assert floats_json(np.zeros(0, np.float32)) == "[]"
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError):
            floats_json(np.array([1.0, bad], np.float32))


def test_batched_pass_equals_one_at_a_time(engine):
    """Sequences of different lengths in one padded, masked pass give each sequence's own vector."""
    from tinyinfer.embedding import embed
    tok = engine.tokenizer
    seqs = [tok.encode(s) for s in SENTENCES[:12]]
    together = np.stack(embed(engine, seqs))
    alone = np.stack([embed(engine, [s])[0] for s in seqs])
    assert np.abs(together - alone).max() < 1e-5
    engine.n_batch, keep = 64, engine.n_batch          # several micro-batches (--ubatch-size)
    try:
        assert np.abs(np.stack(embed(engine, seqs)) - alone).max() < 1e-5
    finally:
        engine.n_batch = keep


def test_too_long_input_is_refused_or_truncated(engine):
    from tinyinfer.embedding import embed
    ids = [101] + [7592] * 600 + [102]
    with pytest.raises(ValueError, match="600|602|context"):
        embed(engine, [ids])
    assert embed(engine, [ids], truncate=True)[0].shape == (384,)


# -- library face ----------------------------------------------------------------------------------

def test_llama_embed_and_create_embedding(minilm_f32):
    from tinyinfer import Llama
    llm = Llama(str(minilm_f32), embedding=True, verbose=False, n_threads=1)
    one = llm.embed("A man is eating food.")
    assert isinstance(one, list) and len(one) == 384
    two = llm.embed(["A man is eating food.", "A man is eating a piece of bread."], normalize=True)
    assert np.isclose(np.dot(two[0], two[1]), 0.755, atol=0.002)
    assert np.allclose(np.array(one) / np.linalg.norm(one), two[0], atol=1e-6)
    r = llm.create_embedding(["hello", "world"])
    assert r["object"] == "list" and [d["index"] for d in r["data"]] == [0, 1] and r["usage"]["prompt_tokens"] == 6
    toks = Llama(str(minilm_f32), embedding=True, pooling_type=0, verbose=False, n_threads=1).embed("hello world")
    assert np.array(toks).shape == (4, 384)
    with pytest.raises(RuntimeError, match="embedding=True"):
        Llama(str(minilm_f32), verbose=False, n_threads=1).embed("x")
    with pytest.raises(ValueError, match="embedding model"):
        llm.create_completion("hello", max_tokens=2)


# -- CLI tool ----------------------------------------------------------------------------------------

def test_embedding_tool_json_array_and_text(minilm_f32, tmp_path, engine):
    from tinyinfer.embedding import embed
    f = tmp_path / "in.txt"
    f.write_text("A man is eating food.\nA man is eating a piece of bread.\n", encoding="utf-8")
    run = lambda *a: subprocess.run([sys.executable, "-m", "tinyinfer", "embedding", "-m", str(minilm_f32), *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT, env={"NUMBA_NUM_THREADS": "1",
                                                                                    "PATH": "/usr/bin:/bin",
                                                                                    "HOME": str(Path.home())})
    r = run("-f", str(f), "--embd-output-format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)["data"]
    tok = engine.tokenizer
    want = embed(engine, [tok.encode(s) for s in f.read_text().splitlines()])
    assert np.allclose([d["embedding"] for d in data], want, atol=1e-6)
    r = run("-p", "hello\nworld", "--embd-output-format", "array", "--pooling", "cls", "--embd-normalize", "-1")
    arr = json.loads(r.stdout)
    assert len(arr) == 2 and np.allclose(arr[0], embed(engine, [tok.encode("hello")], pooling="cls",
                                                       normalize_mode=-1)[0], atol=1e-6)
    r = run("-f", str(f))
    assert "cosine similarity matrix" in r.stdout and "0.76" in r.stdout
    r = run("-p", "x", "--pooling", "rank")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "classification head" in r.stderr


# -- reranking ---------------------------------------------------------------------------------------

QUERY = "A man is eating food."
DOCS = ["A man is eating pasta.", "The girl is carrying a baby.", "A man is eating a piece of bread.",
        "Quantum computers use qubits.", "Paris is the capital of France.", "A man is riding a horse."]


def test_rerank_matches_llama_server(reranker):
    """Scores and order of llama-server --rerank on the same synthetic file (rerank_llama_server.json)."""
    from tinyinfer.embedding import rerank
    from tinyinfer.engine import Engine
    ref = json.loads((DATA / "rerank_llama_server.json").read_text())
    assert ref["query"] == QUERY and ref["documents"] == DOCS
    scores, n = rerank(Engine(reranker, n_ctx=512, n_threads=1), QUERY, DOCS)
    want = {r["index"]: r["relevance_score"] for r in ref["response"]["results"]}
    assert [r["index"] for r in ref["response"]["results"]] == sorted(range(len(DOCS)), key=lambda i: -scores[i])
    assert np.allclose([scores[i] for i in range(len(DOCS))], [want[i] for i in range(len(DOCS))], atol=1e-2)   # llama-server itself moves by ~2e-3 between runs
    assert n == ref["response"]["usage"]["prompt_tokens"]


def test_qwen3_reranker_matches_llama_server(tmp_path):
    """Qwen3-Reranker's yes/no scoring (rank pooling on the last token, softmax over cls.output = the head's
    "yes" and "no" rows, the file's rerank template): llama-server --rerank on the same synthetic file
    (tests/make_qwen3_reranker.py; rerank_qwen3_llama_server.json)."""
    from make_qwen3_reranker import make

    from tinyinfer.embedding import embed, rerank
    from tinyinfer.engine import Engine
    f = tmp_path / "synthetic-qwen3-reranker-F16.gguf"
    make(_synthetic_qwen3(), f)
    ref = json.loads((DATA / "rerank_qwen3_llama_server.json").read_text())
    assert ref["query"] == QUERY and ref["documents"] == DOCS
    e = Engine(f, n_ctx=512, n_threads=1)
    scores, n = rerank(e, QUERY, DOCS)
    want = {r["index"]: r["relevance_score"] for r in ref["response"]["results"]}
    assert [r["index"] for r in ref["response"]["results"]] == sorted(range(len(DOCS)), key=lambda i: -scores[i])
    assert np.allclose(scores, [want[i] for i in range(len(DOCS))], atol=3e-3)
    assert n == ref["response"]["usage"]["prompt_tokens"]
    # rank pooling gives both classes' probabilities: P(yes) + P(no) = 1
    p = embed(e, [e.tokenizer.encode(QUERY)], pooling="rank", normalize_mode=-1)[0]
    assert p.shape == (2,) and abs(float(p.sum()) - 1) < 1e-6


# -- server faces ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_server(minilm_f32):
    yield from serve_process(minilm_f32, "-c", "512", "-t", "1", "--alias", "minilm")


@pytest.fixture(scope="module")
def rerank_server(reranker):
    yield from serve_process(reranker, "-c", "512", "-t", "1", "--pooling", "cls")


def test_openai_and_ollama_clients_get_the_library_vectors(minilm_server, engine):
    import httpx
    import ollama
    import openai

    from tinyinfer.embedding import embed
    tok = engine.tokenizer
    texts = SENTENCES[:5]
    want = np.stack(embed(engine, [tok.encode(t) for t in texts]))
    client = openai.OpenAI(base_url=minilm_server + "/v1", api_key="x")
    out = client.embeddings.create(model="minilm", input=texts)         # base64 on the wire
    assert np.allclose([d.embedding for d in out.data], want, atol=1e-6)
    assert out.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    raw = httpx.post(minilm_server + "/v1/embeddings", json={"input": texts[0], "encoding_format": "float"}).json()
    assert np.allclose(raw["data"][0]["embedding"], want[0], atol=1e-6)
    b64 = httpx.post(minilm_server + "/v1/embeddings", json={"input": [tok.encode(texts[1])],
                                                             "encoding_format": "base64"}).json()
    v = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4")
    assert np.allclose(v, want[1], atol=1e-6)
    oc = ollama.Client(host=minilm_server)
    e = oc.embed(model="minilm", input=texts)
    assert np.allclose(e.embeddings, want, atol=1e-6)
    legacy = oc.embeddings(model="minilm", prompt=texts[0])
    assert np.allclose(legacy.embedding, want[0], atol=1e-6)
    r = httpx.post(minilm_server + "/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert r.status_code == 400 and "classification head" in r.text
    assert "/v1/rerank" not in httpx.get(minilm_server + "/openapi.json").json()["paths"]   # not this server's


def test_keep_alive_embedding_requests_are_not_held_back(minilm_server):
    """A direct route's response corks its socket while the headers and the body are written (one TCP
    segment; server/app._corked) and uncorks it after: a socket left corked would hold every later
    response on the connection back for Linux's 200 ms, so a run of one-sentence requests on one keep-alive
    connection answers each well within that."""
    import httpx
    with httpx.Client(timeout=60) as c:
        c.post(minilm_server + "/v1/embeddings", json={"input": "warm up"}).raise_for_status()
        ts = []
        for i in range(15):
            t0 = time.perf_counter()
            r = c.post(minilm_server + ("/v1/embeddings", "/api/embed")[i % 2],
                       json={"input": SENTENCES[i % len(SENTENCES)], "model": "minilm"})
            ts.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            assert len(r.json().get("data", r.json().get("embeddings"))) == 1
    assert sorted(ts)[len(ts) // 2] < 0.18, ts


def test_concurrent_requests_are_packed_and_keep_their_own_vectors_and_errors(minilm_server, engine):
    """Requests arriving while the model is busy are evaluated together (embedding.Coalescer, as
    llama-server's slots pack concurrent sequences): each gets its own vectors, in its order, and a bad
    request its own 400 without failing the others."""
    import concurrent.futures as cf

    import httpx

    from tinyinfer.embedding import Coalescer, embed
    tok = engine.tokenizer
    groups = [SENTENCES[i:i + 1 + i % 3] for i in range(12)]
    want = [np.stack(embed(engine, [tok.encode(t) for t in g])) for g in groups]

    def post(i):
        body = {"input": groups[i]} if i != 5 else {"input": [[1, 2, 10 ** 7]]}      # an out-of-range id
        return httpx.post(minilm_server + "/v1/embeddings", json=body, timeout=120)
    with cf.ThreadPoolExecutor(12) as ex:
        rs = list(ex.map(post, range(12)))
    for i, r in enumerate(rs):
        if i == 5:
            assert r.status_code == 400 and "out of range" in r.text
            continue
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])])
        assert np.allclose(got, want[i], atol=1e-5), i
    # the packing itself: one embed call for the three requests waiting, each its own slice of it
    co, calls = Coalescer(), []
    ws = [co.add(lambda e, n=n: [[n] * (n + 1)] * n) for n in (1, 2, 3)]
    bad = co.add(lambda e: 1 / 0)

    def fn(e, seqs):
        calls.append(len(seqs))
        return [s[0] for s in seqs]
    assert co.result(None, ws[1], fn) == [2, 2]
    assert calls == [6] and co.result(None, ws[0], fn) == [1] and co.result(None, ws[2], fn) == [3, 3, 3]
    with pytest.raises(ZeroDivisionError):
        co.result(None, bad, fn)
    assert calls == [6]


def test_coalescer_waits_for_the_clients_just_answered(engine):
    """Four clients sending one sentence at a time, each a moment after its last answer (an HTTP round
    trip), through one model thread: passes wait (``window``) for the clients just answered, so most
    passes take all four instead of settling at two; a lone client's passes never wait. Each request
    still gets its own vectors."""
    import threading

    from tinyinfer.embedding import Coalescer, embed
    tok = engine.tokenizer
    seqs = [tok.encode(t) for t in SENTENCES[:4]]
    want = [embed(engine, [q])[0] for q in seqs]
    co, sizes, model_thread = Coalescer(window=0.05), [], threading.Lock()

    def fn(e, qs):
        sizes.append(len(qs))
        return embed(e, qs)

    def client(i, errors):
        for _ in range(8):
            w = co.add(lambda e: [seqs[i]])
            with model_thread:                  # the server runs every job on the model's one thread
                got = co.result(engine, w, fn)
            if not np.allclose(got[0], want[i], atol=1e-5):
                errors.append(i)
            time.sleep(0.002)                   # the client reads the answer and sends its next request
    errors = []
    ts = [threading.Thread(target=client, args=(i, errors)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and sum(sizes) == 32
    assert sum(k == 4 for k in sizes) >= len(sizes) // 2, sizes
    lone, sizes[:] = Coalescer(window=10.0), []
    t0 = time.perf_counter()
    for q in seqs:
        assert np.allclose(lone.result(engine, lone.add(lambda e, q=q: [q]), fn)[0], embed(engine, [q])[0], atol=1e-5)
    assert sizes == [1, 1, 1, 1] and time.perf_counter() - t0 < 5.0     # a 10 s window never waited


def test_coalescer_pass_jobs():
    """The server's way (openai_api.run_embedding): only a request that finds no job of its key queued
    queues one (claim); that job's serve() takes every request waiting, in one embed call, and each
    request is notified once; a job that cannot run fails the requests waiting for it; a job that finds
    nobody (its client left) frees the claim."""
    from tinyinfer.embedding import Coalescer
    co, calls, told = Coalescer(window=0.0), [], []

    def fn(e, seqs):
        calls.append(len(seqs))
        return [s[0] for s in seqs]
    ws = [co.add(lambda e, n=n: [[n] * 3] * n, "k", notify=lambda n=n: told.append(n)) for n in (1, 2, 3)]
    other = co.add(lambda e: [[9]], "other", notify=lambda: told.append(9))
    assert [co.claim("k"), co.claim("k"), co.claim("other")] == [True, False, True]
    served = co.serve(None, "k", fn)
    assert served == ws and calls == [6] and sorted(told) == [1, 2, 3]
    assert [w.vecs for w in ws] == [[1], [2, 2], [3, 3, 3]] and all(w.done.is_set() for w in ws)
    assert not other.done.is_set() and co.claim("k")             # the claim went with the take
    assert co.serve(None, "k", fn) == [] and co.claim("k")       # nobody waiting: the claim is freed
    co.fail_waiting("other", RuntimeError("shutting down"))
    assert isinstance(other.error, RuntimeError) and told[-1] == 9 and co.claim("other")
    lone = co.add(lambda e: [[4]], "k")
    co.discard(lone)                                             # its client left before the job ran
    assert co.serve(None, "k", fn) == [] and calls == [6] and co.claim("k")


def test_coalescer_requests_arriving_during_a_pass_join_its_job():
    """A request arriving while a pass job runs queues no job of its own (claim is False until that job
    ends): the running job serves it in its next round. (Had each queued one, under four clients sending a
    sentence at a time the jobs, which found nothing left when they ran, filled the slot queue: 503
    'server busy' at --max-queue 16, 28 of 256 requests.)"""
    from tinyinfer.embedding import Coalescer
    co, late, claims = Coalescer(window=0.0), [], []

    def fn(e, seqs):
        if len(late) < 3:                                        # one more arrives during each pass
            late.append(co.add(lambda e: [[7]], "k"))
            claims.append(co.claim("k"))
        return [s[0] for s in seqs]
    first = co.add(lambda e: [[1]], "k")
    assert co.claim("k")
    assert co.serve(None, "k", fn) == [first] + late
    assert claims == [False, False, False] and [w.vecs for w in late] == [[7]] * 3
    assert co.claim("k")                                         # freed when the job ended


@pytest.mark.parametrize("cors", [False, True])
def test_embedding_routes_answer_from_the_gate(minilm_f32, engine, cors):
    """The embedding routes skip FastAPI (server/app._Gate's direct routes: a one-sentence request's
    routing, middleware and dependency solving cost as much CPU as its forward): a valid body is answered
    without reaching the app's router, with the library's vectors, counted in /metrics; an invalid one
    goes the app's way and gets its 400; with --cors everything goes the app's way (its CORS headers)."""
    from starlette.testclient import TestClient

    from tinyinfer.embedding import embed
    from tinyinfer.server.app import create_app
    from tinyinfer.server.config import ServerConfig

    class Spy:                                  # the app's router, noting the paths it is asked for
        def __init__(self, inner):
            self.inner, self.paths = inner, []

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                self.paths.append(scope["path"])
            await self.inner(scope, receive, send)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    app = create_app(ServerConfig(model_path=str(minilm_f32), alias="minilm", n_ctx=512, n_threads=1, cors=cors),
                     load_in_background=False)
    app.router = spy = Spy(app.router)
    tok = engine.tokenizer
    want = np.stack(embed(engine, [tok.encode(t) for t in SENTENCES[:2]]))
    with TestClient(app) as c:
        r = c.post("/v1/embeddings", json={"input": SENTENCES[:2]}, headers={"Origin": "http://x.test"})
        assert r.status_code == 200
        assert np.allclose([d["embedding"] for d in r.json()["data"]], want, atol=1e-6)
        assert r.json()["usage"]["prompt_tokens"] == sum(len(tok.encode(t)) for t in SENTENCES[:2])
        assert ("access-control-allow-origin" in r.headers) == cors
        e = c.post("/api/embed", json={"model": "minilm", "input": SENTENCES[:2]})
        assert e.status_code == 200 and np.allclose(e.json()["embeddings"], want, atol=1e-6)
        assert e.json()["prompt_eval_count"] == r.json()["usage"]["prompt_tokens"]
        legacy = c.post("/api/embeddings", json={"model": "minilm", "prompt": SENTENCES[0]})
        assert legacy.status_code == 200 and np.allclose(legacy.json()["embedding"], want[0], atol=1e-6)
        answered = list(spy.paths)
        bad = c.post("/v1/embeddings", json={"input": 5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
        broken = c.post("/v1/embeddings", content=b'{"input": ', headers={"content-type": "application/json"})
        assert broken.status_code == 400 and "malformed JSON" in broken.json()["error"]["message"]
        no_model = c.post("/api/embed", json={"input": "hi"})
        assert no_model.status_code == 400 and no_model.json() == {"error": "model is required"}
        metrics = c.get("/metrics").text
    assert answered == ([] if not cors else ["/v1/embeddings", "/api/embed", "/api/embeddings"])
    assert spy.paths[len(answered):len(answered) + 3] == ["/v1/embeddings", "/v1/embeddings", "/api/embed"]
    assert 'tinyinfer_requests_total{endpoint="/v1/embeddings",code="200"} 1' in metrics


def test_rerank_endpoint_shape_and_order(rerank_server, reranker):
    import httpx

    from tinyinfer.embedding import rerank
    from tinyinfer.engine import Engine
    scores, n = rerank(Engine(reranker, n_ctx=512, n_threads=1), QUERY, DOCS)
    order = sorted(range(len(DOCS)), key=lambda i: -scores[i])
    for path in ("/v1/rerank", "/rerank"):
        r = httpx.post(rerank_server + path, json={"query": QUERY, "documents": DOCS, "top_n": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["usage"]["prompt_tokens"] == n
        assert [x["index"] for x in body["results"]] == order[:3]
        assert np.allclose([x["relevance_score"] for x in body["results"]], [scores[i] for i in order[:3]], atol=1e-6)
    r = httpx.post(rerank_server + "/v1/rerank", json={"query": QUERY, "documents": []})
    assert r.status_code == 400
    spec = httpx.get(rerank_server + "/openapi.json").json()     # documented here, the empty list excluded
    docs = spec["components"]["schemas"]["RerankRequest"]["properties"]["documents"]["anyOf"][0]
    assert "/v1/rerank" in spec["paths"] and docs["minItems"] == 1
    # --pooling cls: /v1/embeddings pools the first token (the file itself has no pooling type)
    from tinyinfer.embedding import embed
    e = Engine(reranker, n_ctx=512, n_threads=1)
    want = embed(e, [e.tokenizer.encode(QUERY)], pooling="cls")[0]
    got = httpx.post(rerank_server + "/v1/embeddings", json={"input": QUERY, "encoding_format": "float"}).json()
    assert np.allclose(got["data"][0]["embedding"], want, atol=1e-6)
