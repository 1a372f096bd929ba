"""Tokenizers from GGUF metadata against llama.cpp.

- llama.cpp's tokenizer test vectors (../shared/reference/vocab): the LLaMA SentencePiece and
  GPT-2 vocabulary-only files, and the same cases with the real SmolLM2 (BPE, ``smollm``
  pre-tokenizer) and Gemma 3 (SentencePiece, 262k pieces) vocabularies: every case must match;
- the prompts of the greedy reference runs (BOS rules from the file, special tokens parsed)
  and the decoded reference generations;
- independent implementations on random text: HF ``tokenizers`` (pre-tokenizer regexes for
  every supported ``tokenizer.ggml.pre``, and the whole SmolLM2 BPE) and the ``sentencepiece``
  library (LLaMA SPM vocabulary);
- special-token parsing, llama.cpp's space-prefix rule, round trips, token_to_bytes,
  StreamDecoder on characters split over byte tokens, metadata defaults and errors;
- the load time of Gemma's 262k-piece vocabulary (printed; run with -s to see it).
"""

from __future__ import annotations

import json
import random
import struct
import time

import numpy as np
import pytest

from conftest import need_reference
from tinyinfer.gguf import GGUFFile
from tinyinfer.tokenizer import SPMTokenizer, StreamDecoder, Tokenizer

SEP = "\n__ggml_vocab_test__\n"


def _cases(stem: str):
    inp = need_reference("vocab", stem + ".inp").read_text(encoding="utf-8")
    out = need_reference("vocab", stem + ".out").read_text(encoding="utf-8")
    texts = inp.split(SEP)
    assert texts[-1] == "", "each case is followed by the separator line"
    texts = texts[:-1]
    expected = [[int(t) for t in line.split()] for line in out.split("\n")[:len(texts)]]
    assert len(expected) == len(texts)
    return texts, expected


def _load(path):
    t0 = time.perf_counter()
    g = GGUFFile(path)
    t1 = time.perf_counter()
    tok = Tokenizer.from_gguf(g.metadata)
    t2 = time.perf_counter()
    return g.metadata, tok, (t1 - t0, t2 - t1)


# -- fixtures: each vocabulary is read and built once ------------------------------------------

@pytest.fixture(scope="module")
def llama_spm():
    return _load(need_reference("vocab", "ggml-vocab-llama-spm.gguf"))


@pytest.fixture(scope="module")
def gpt2():
    return _load(need_reference("vocab", "ggml-vocab-gpt-2.gguf"))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return _load(smollm2_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return _load(gemma3_path)


@pytest.fixture(scope="module")
def llama_bpe():
    return _load(need_reference("vocab", "ggml-vocab-llama-bpe.gguf"))


@pytest.fixture(scope="module")
def qwen2():
    return _load(need_reference("vocab", "ggml-vocab-qwen2.gguf"))


VECTORS = [("llama_spm", "ggml-vocab-llama-spm.gguf"), ("gpt2", "ggml-vocab-gpt-2.gguf"),
           ("smollm2", "smollm2"), ("gemma3", "gemma3"), ("llama_bpe", "ggml-vocab-llama-bpe.gguf"),
           ("qwen2", "ggml-vocab-qwen2.gguf")]


# -- llama.cpp test vectors --------------------------------------------------------------------

@pytest.mark.parametrize("fixture,stem", VECTORS, ids=[v[0] for v in VECTORS])
def test_vectors(request, fixture, stem):
    _, tok, _ = request.getfixturevalue(fixture)
    texts, expected = _cases(stem)
    t0 = time.perf_counter()
    got = [tok.encode(t, add_bos=False, add_eos=False, special=False) for t in texts]
    dt = time.perf_counter() - t0
    failures = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
    print(f"\n{stem}: {len(texts) - len(failures)}/{len(texts)} cases match llama.cpp "
          f"({dt * 1e3:.1f} ms for all)")
    assert not failures, "\n".join(f"{t!r}:\n  llama.cpp {e}\n  ours      {g}" for t, e, g in failures[:5])


@pytest.mark.parametrize("fixture,stem", VECTORS, ids=[v[0] for v in VECTORS])
def test_round_trip_on_vectors(request, fixture, stem):
    _, tok, _ = request.getfixturevalue(fixture)
    texts, _ = _cases(stem)
    for t in texts:
        ids = tok.encode(t)                      # with the file's BOS/EOS defaults
        assert tok.decode(ids) == t, (t, ids)
        sd = tok.stream_decoder()
        streamed = "".join(map(sd.feed, ids)) + sd.flush()
        # streaming keeps the space the SPM tokenizer put in front of the text
        assert streamed == (" " + t if tok.add_space_prefix and t else t), (t, ids)


@pytest.mark.parametrize("name,fixture", [("smollm2", "smollm2"), ("gemma3", "gemma3")])
def test_reference_prompts_and_generations(request, name, fixture):
    _, tok, _ = request.getfixturevalue(fixture)
    for ref in sorted(need_reference(name).glob("greedy_*.jsonl")):
        for line in ref.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            assert tok.encode(r["prompt"], special=True) == r["prompt_ids"], r["prompt"]
            # llama.cpp printed the generations with special tokens rendered
            assert tok.decode(r["greedy_ids"], special=True) == r["greedy_text"]
            sd = tok.stream_decoder(special=True)
            assert "".join(map(sd.feed, r["greedy_ids"])) + sd.flush() == r["greedy_text"]


# -- independent implementations on random text ---------------------------------------------------

_ALPHABET = list("aAbZ 09'sStTrReEvVlLdDmM\n\r\t.,!?-_()[]<>|~$+=^`@#%&*\"") + [
    "  ", "   ", "the", " of", "ing", "\u00a0", "\u3000", "\u2009", "\x85", "\x1c", "\x0b", "é", "ß", "中",
    "文", "한", "²", "½", "Ⅻ", "٣", "😀", "👍🏽", "\u0301", "\u200b", "ǅ", "€", "§", "«", "¿", "\U0001D400",
    "Привет", " мир", "'re", "'LL", "\U00020000"]


def _random_texts(seed: int, n: int):
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 25))) for _ in range(n)]


# llama.cpp's pre-tokenizer regexes (llm_tokenizer_bpe), as real \p{..} regexes for HF tokenizers
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
              r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_REGEXES = {
    "gpt-2": [_GPT2_RE],
    "smollm": [r"\p{N}", _GPT2_RE],
    "llama-bpe": [_LLAMA3_RE],
    "qwen2": [_LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"],
}


@pytest.mark.parametrize("pre", list(PRE_REGEXES))
def test_pretokenizer_matches_regex_engine(smollm2, pre):
    """Our collapsed-alphabet regexes split exactly like the \\p{..} regexes in Oniguruma."""
    hf_pre = pytest.importorskip("tokenizers").pre_tokenizers
    from tokenizers import Regex
    meta, _, _ = smollm2
    tok = Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": pre})
    ref = hf_pre.Sequence([hf_pre.Split(Regex(p), behavior="isolated") for p in PRE_REGEXES[pre]])
    for s in _random_texts(1, 1500):
        assert tok._split_words(s) == [w for w, _ in ref.pre_tokenize_str(s)], s


def test_bpe_matches_hf_tokenizers(smollm2):
    tk = pytest.importorskip("tokenizers")
    meta, tok, _ = smollm2
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    hf = tk.Tokenizer(tk.models.BPE(vocab, merges))
    hf.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Digits(individual_digits=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for s in _random_texts(2, 1500):
        ids = tok.encode(s, add_bos=False)
        assert ids == hf.encode(s, add_special_tokens=False).ids, s
        assert tok.decode(ids) == s


def _spm_model_proto(meta, add_dummy_prefix: bool) -> bytes:
    """A sentencepiece ModelProto (BPE, byte fallback, identity normalizer), serialized by hand."""
    def varint(n):
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | 0x80 if n else b)
            if not n:
                return bytes(out)

    def key(field, wire):
        return varint(field << 3 | wire)

    def ld(field, payload):
        return key(field, 2) + varint(len(payload)) + payload

    pieces = b"".join(
        ld(1, ld(1, t.encode("utf-8", "surrogateescape")) + key(2, 5) + struct.pack("<f", s) + key(3, 0) + varint(ty))
        for t, s, ty in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"].tolist(),
                            meta["tokenizer.ggml.token_type"].tolist()))
    trainer = key(3, 0) + varint(2) + key(35, 0) + varint(1)             # model_type BPE, byte_fallback
    normalizer = (ld(1, b"identity") + key(3, 0) + varint(int(add_dummy_prefix)) + key(4, 0) + varint(0)
                  + key(5, 0) + varint(1))
    return pieces + ld(2, trainer) + ld(3, normalizer)


def test_spm_matches_sentencepiece(llama_spm):
    spm = pytest.importorskip("sentencepiece")
    meta, tok, _ = llama_spm
    sp = spm.SentencePieceProcessor(model_proto=_spm_model_proto(meta, tok.add_space_prefix))
    for s in _random_texts(3, 1500):
        ids = tok.encode(s, add_bos=False)
        assert ids == sp.encode(s), s
        assert tok.decode(ids) == s


@pytest.mark.parametrize("fixture", ["llama_spm", "gemma3"])
def test_spm_long_text_segmentation_is_exact(request, monkeypatch, fixture):
    """Long texts are cut at ▁ boundaries that no piece crosses; the result must equal one
    bigram-merge pass over the whole fragment."""
    _, tok, _ = request.getfixturevalue(fixture)
    text = "\n".join(_random_texts(4, 150)) + " The quick brown fox   jumps over the lazy dog. " * 20
    tok._cache.clear()
    segmented = tok.encode(text)
    tok._cache.clear()
    monkeypatch.setattr(tok, "_SEGMENT_MIN", 1 << 30)
    assert tok.encode(text) == segmented
    tok._cache.clear()
    assert len(segmented) > 500 and tok.decode(segmented) == text


# -- special tokens, space prefix ---------------------------------------------------------------

def test_chatml_special_tokens(smollm2):
    _, tok, _ = smollm2
    text = "<|im_start|>user\nHi<|im_end|>"
    ids = tok.encode(text, special=True)
    assert ids[0] == tok.token_to_id("<|im_start|>") == 1
    assert ids[-1] == tok.token_to_id("<|im_end|>") == 2
    assert tok.decode(ids[1:-1]) == "user\nHi"
    plain = tok.encode(text, special=False)
    assert 1 not in plain and 2 not in plain and len(plain) > len(ids)
    assert tok.decode(plain) == text
    assert tok.decode(ids) == "user\nHi"                     # control tokens hidden
    assert tok.decode(ids, special=True) == text


def test_llama3_turn_tokens_and_ignore_merges(llama_bpe):
    """Llama 3: <|eot_id|> ends a turn (and generation), headers are single control tokens; llama-bpe
    takes a pre-token that is itself in the vocabulary whole (ignore_merges), as llama.cpp does."""
    _, tok, _ = llama_bpe
    eot = tok.token_to_id("<|eot_id|>")
    assert tok.eot_id == eot and tok.is_eog(eot) and tok.is_eog(tok.token_to_id("<|end_of_text|>"))
    assert tok.add_bos and tok.bos_id == tok.token_to_id("<|begin_of_text|>")
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    ids = tok.encode(text, add_bos=False, special=True)
    assert ids[0] == tok.token_to_id("<|start_header_id|>") and ids[-1] == eot
    assert tok.decode(ids, special=True) == text and tok.decode(ids) == "user\n\nHi"
    assert [tok.token_text(i) for i in tok.encode("Cửa Việt", add_bos=False)] == ["C", "á»Ńa", "ĠViá»ĩt"]


def test_qwen2_chatml_tokens(qwen2):
    """Qwen2.5: no BOS, <|im_start|> / <|im_end|> single tokens, <|im_end|> and <|endoftext|> end generation."""
    _, tok, _ = qwen2
    assert tok.add_bos is False
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", special=True)
    assert ids[0] == start and ids[-1] == end and len(ids) == 5
    assert tok.is_eog(end) and tok.is_eog(tok.token_to_id("<|endoftext|>"))
    assert not tok.is_eog(start)


def test_gemma_turn_tokens(gemma3):
    _, tok, _ = gemma3
    text = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode(text, special=True)
    assert ids[:2] == [2, 105] and 106 in ids and ids.count(105) == 2
    assert tok.decode(ids, special=True) == "<bos>" + text
    plain = tok.encode(text, special=False)
    assert 105 not in plain and 106 not in plain and tok.decode(plain) == text
    # user-defined pieces (newline / space runs, HTML tags) are cut out even without special=True
    assert tok.encode("a\n\nb  c<table>", add_bos=False) == [
        tok.token_to_id("a"), 108, tok.token_to_id("b"), 138, tok.token_to_id("c"), 168]


def test_space_prefix_rule(llama_spm, gemma3):
    """llama.cpp (SPM): ' ' is prepended to the first text fragment and to every fragment that
    follows a special token, when add_space_prefix; never elsewhere."""
    _, tok, _ = llama_spm
    enc = lambda s, **kw: tok.encode(s, add_bos=False, **kw)  # noqa: E731
    assert tok.add_space_prefix and tok.token_text(enc("Hello")[0]) == "▁Hello"
    assert enc("Hi</s>there", special=True) == enc("Hi") + [2] + enc("there")
    assert tok.token_text(enc("Hi</s>there", special=True)[-1]) == "▁there"
    assert enc("</s>", special=True) == [2]                   # no text, no prefix
    assert tok.encode("Hello") == [1] + enc("Hello")
    assert tok.decode(tok.encode(" Hello")) == " Hello"       # only the added space is removed
    _, g, _ = gemma3
    assert not g.add_space_prefix
    assert g.token_text(g.encode("Hello", add_bos=False)[0]) == "Hello"
    assert g.encode("<end_of_turn>Hello", add_bos=False, special=True) == [106] + g.encode("Hello", add_bos=False)


def test_rstrip_special_tokens_for_phi3(smollm2):
    """llama.cpp gives Phi-3 vocabularies' special tokens RSTRIP: the partition then drops the
    whitespace that follows them."""
    meta, tok, _ = smollm2
    phi = Tokenizer.from_gguf({**meta, "general.name": "Phi-3 mini"})
    text = "<|im_start|>  \n user<|im_end|>"
    assert phi.encode(text, special=True) == [1] + tok.encode("user", add_bos=False) + [2]
    assert tok.encode(text, special=True) == [1] + tok.encode("  \n user", add_bos=False) + [2]


# -- bytes and streaming -----------------------------------------------------------------------

def test_token_to_bytes(llama_spm, smollm2, gemma3):
    _, spm, _ = llama_spm
    assert spm.token_to_bytes(spm.token_to_id("▁Hello")) == b" Hello"
    assert spm.token_to_bytes(spm.token_to_id("<0xE4>")) == b"\xe4"
    assert spm.token_to_bytes(1) == b"" and spm.token_to_bytes(1, special=True) == b"<s>"
    _, bpe, _ = smollm2
    assert bpe.token_to_bytes(bpe.token_to_id("ĠHello")) == b" Hello"
    assert bpe.token_to_bytes(bpe.token_to_id("Ċ")) == b"\n"
    assert bpe.token_to_bytes(2) == b"" and bpe.token_to_bytes(2, special=True) == b"<|im_end|>"
    _, g, _ = gemma3
    assert g.token_to_bytes(138) == b"  " and g.token_to_bytes(107) == b"\n"    # user-defined
    with pytest.raises(ValueError):
        g.token_to_bytes(g.n_vocab)


@pytest.mark.parametrize("fixture", ["llama_spm", "smollm2", "gemma3", "gpt2"])
def test_stream_decoder_holds_split_characters(request, fixture):
    _, tok, _ = request.getfixturevalue(fixture)
    text = "emoji 🦙 and 👍🏽, CJK 䢗㼙 and 中文, accents é̃."
    ids = tok.encode(text, add_bos=False)
    pieces = [tok.token_to_bytes(i) for i in ids]
    # the point of the test: some character really is split over several tokens
    assert any(p and not _complete_utf8(p) for p in pieces), [tok.token_text(i) for i in ids]
    sd = StreamDecoder(tok)
    outs, held = [], False
    for i in ids:
        outs.append(sd.feed(i))
        held |= bool(sd.pending)
    outs.append(sd.flush())
    assert held and not any("\ufffd" in o for o in outs)
    assert "".join(outs) == b"".join(pieces).decode("utf-8")
    assert "".join(outs) == (" " + text if tok.add_space_prefix else text) and tok.decode(ids) == text


def _complete_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_decoder_invalid_bytes(llama_spm):
    _, tok, _ = llama_spm
    sd = tok.stream_decoder()
    assert sd.feed(tok.token_to_id("<0xE4>")) == ""          # a lead byte waits
    assert sd.pending == b"\xe4"
    assert sd.feed(tok.token_to_id("▁a")) == "\ufffd a"      # ... and is replaced when broken
    assert sd.feed(tok.token_to_id("<0xF0>")) == ""
    assert sd.flush() == "\ufffd" and sd.pending == b""


# -- properties, defaults, errors --------------------------------------------------------------

def test_properties(llama_spm, gpt2, smollm2, gemma3):
    _, t, _ = llama_spm
    assert (t.n_vocab, t.bos_id, t.eos_id, t.unk_id, t.add_bos, t.add_eos) == (32000, 1, 2, 0, True, False)
    assert t.eog_ids == {2} and t.is_eog(2) and not t.is_eog(1)
    assert t.special_ids == {0, 1, 2} and t.token_text(1) == "<s>"
    _, t, _ = gpt2
    assert (t.n_vocab, t.bos_id, t.eos_id, t.add_bos) == (50257, 50256, 50256, False)
    assert t.eog_ids == {50256} and t.eot_id == 50256
    _, t, _ = smollm2
    assert (t.n_vocab, t.bos_id, t.eos_id, t.add_bos, t.eot_id) == (49152, 1, 2, False, 2)
    assert {0, 2} <= t.eog_ids and 1 not in t.eog_ids        # <|endoftext|>, <|im_end|>
    assert t.is_eog(2) and 1 in t.special_ids and t.vocab_type == "bpe"
    _, t, _ = gemma3
    assert (t.n_vocab, t.bos_id, t.eos_id, t.eot_id, t.add_bos, t.add_space_prefix) == \
        (262144, 2, 1, 106, True, False)
    assert {1, 106} <= t.eog_ids and t.is_eog(106) and t.vocab_type == "spm"
    assert 105 in t.special_ids and 107 not in t.special_ids and 107 in t.user_defined_ids


def test_defaults_without_keys(llama_spm, smollm2):
    meta, _, _ = llama_spm
    m = {k: v for k, v in meta.items() if k not in (
        "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.bos_token_id")}
    t = Tokenizer.from_gguf(m)
    assert t.add_bos and not t.add_eos and t.add_space_prefix and t.bos_id == 1   # llama.cpp SPM defaults
    m.pop("tokenizer.ggml.scores")
    assert Tokenizer.from_gguf(m).encode("ab", add_bos=False)                       # scores optional
    meta, _, _ = smollm2
    m = {k: v for k, v in meta.items() if k != "tokenizer.ggml.add_bos_token"}
    assert not Tokenizer.from_gguf(m).add_bos                                       # gpt2 default
    m["tokenizer.ggml.pre"] = "llama-bpe"
    t = Tokenizer.from_gguf(m)
    assert t.add_bos and t.ignore_merges and t.encode("Hi")[0] == t.bos_id        # Llama 3 default
    t = Tokenizer.from_gguf({**m, "tokenizer.ggml.pre": "qwen2"})
    assert not t.add_bos and t.decode(t.encode("x = 12345 + 'y'")) == "x = 12345 + 'y'"


def test_errors(smollm2):
    meta, _, _ = smollm2
    with pytest.raises(ValueError, match=r"'t5'.*'llama'.*'gpt2'.*'bert'"):     # bert (WordPiece): wpm.py
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.model": "t5"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf({k: v for k, v in meta.items() if k != "tokenizer.ggml.model"})
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_gguf({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(ValueError, match="pre-tokenizer 'nonsense'"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "nonsense"})
    with pytest.raises(ValueError, match="token_type"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.token_type": np.ones(3, np.int32)})
    with pytest.raises(ValueError, match="tokens"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="duplicate token"):
        toks = list(meta["tokenizer.ggml.tokens"])
        toks[5] = toks[7]
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.tokens": toks})
    with pytest.raises(TypeError):
        Tokenizer.from_gguf(meta).encode(123)




def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_merge_ranks_by_pair_when_a_merge_line_holds_two_spaces(smollm2):
    """Merge ranks are keyed by the line "a b" unless some line holds two spaces (a token containing a
    space); then by the pair split at the first space. Both keyings tokenize alike."""
    meta, tok, _ = smollm2
    text = "Hello world, the quick brown fox: 12345 + naïve café!\n  indented"
    odd = Tokenizer.from_gguf({**meta, "tokenizer.ggml.merges": list(meta["tokenizer.ggml.merges"]) + ["x y z"]})
    assert tok._rank_table()[1] is True and odd._rank_table()[1] is False
    assert odd._rank_table()[0][("x", "y z")] == len(meta["tokenizer.ggml.merges"])
    assert odd.encode(text, add_bos=False) == tok.encode(text, add_bos=False)
