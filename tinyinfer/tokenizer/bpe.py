"""Byte-level BPE vocabularies (``tokenizer.ggml.model`` = ``gpt2``): llama.cpp's llm_tokenizer_bpe.

A pre-tokenizer (regexes chosen by ``tokenizer.ggml.pre``: gpt-2, llama-bpe, qwen2, smollm, ...)
cuts the text into words, each word's UTF-8 bytes are mapped to the GPT-2 byte alphabet, then
merges are applied by rank (lowest rank first, leftmost on ties). Pre-tokenizers with
``ignore_merges`` (llama-bpe) take a word that is itself a token as that token, unmerged.
"""

from __future__ import annotations

import re
import unicodedata

from .base import Tokenizer, _utf8


def _bytes_to_unicode() -> list:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = [""] * 256
    for b, c in zip(bs, cs):
        table[b] = chr(c)
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
_LATIN1_TO_GPT2 = str.maketrans({chr(b): c for b, c in enumerate(_BYTE_TO_CHAR) if chr(b) != c})

# The pre-tokenizer regexes run on a "collapsed" copy of the text, as llama.cpp's own regex path
# does: ASCII stays as it is, every other character becomes one stand-in per class (letter,
# number, punctuation, whitespace, other). Positions are unchanged (one character for one), the
# regex classes stay small (Python's re scans huge non-BMP classes linearly), and pure-ASCII text,
# the common case, needs no translation at all.
#
# Whitespace is llama.cpp's \s (its unicode tables), not Python's isspace (which adds 0x1C-0x1F).
_WS_CHARS = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                      + "".join(map(chr, range(0x2000, 0x200B))))
_C_LETTER, _C_NUMBER, _C_PUNCT, _C_SPACE, _C_OTHER = "\u0100", "\u0101", "\u0102", "\u0103", "\u0104"


class _CollapseTable(dict):
    """str.translate table, filled on demand: code point -> its class stand-in."""

    def __missing__(self, cp: int):
        c = chr(cp)
        if cp < 128:
            r = cp
        elif c in _WS_CHARS:
            r = _C_SPACE
        else:
            r = {"L": _C_LETTER, "N": _C_NUMBER, "P": _C_PUNCT}.get(unicodedata.category(c)[0], _C_OTHER)
        self[cp] = r
        return r


_COLLAPSE = _CollapseTable()


def _collapse(text: str) -> str:
    return text if text.isascii() else text.translate(_COLLAPSE)


def _pretokenizer_patterns(kind: str) -> list:
    L = "A-Za-z" + _C_LETTER                                     # \p{L}
    N = "0-9" + _C_NUMBER                                        # \p{N}
    P = re.escape("!\"#%&'()*,-./:;?@[\\]_{}") + _C_PUNCT         # \p{P}
    WS = "\t\n\x0b\x0c\r " + _C_SPACE                               # \s
    cl, cn, ws, nonws = f"[{L}]", f"[{N}]", f"[{WS}]", f"[^{WS}]"
    other = f"[^{WS}{L}{N}]"                                     # [^\s\p{L}\p{N}]
    gpt2 = rf"'s|'t|'re|'ve|'m|'ll|'d| ?{cl}+| ?{cn}+| ?{other}+|{ws}+(?!{nonws})"
    contractions = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

    def llama3(digits):
        return (rf"{contractions}|[^\r\n{L}{N}]?{cl}+|{cn}{digits}| ?{other}+[\r\n]*|"
                rf"{ws}*[\r\n]+|{ws}+(?!{nonws})|{ws}+")

    table = {
        "gpt2": [gpt2],
        "llama3": [llama3("{1,3}")],
        "qwen2": [llama3("")],
        "smollm": [cn, gpt2],
        "default": [rf"[{P}\$\+<=>\^~\|]+", gpt2, rf"{cn}+", r"[0-9][0-9][0-9]"],
    }
    return [re.compile(p) for p in table[kind]]


_PATTERN_CACHE: dict = {}

# tokenizer.ggml.pre -> (regex set, clean_spaces, ignore_merges, add_bos default), as llama-vocab.cpp
_PRE_TYPES = {}
for _names, _spec in (
    (("default",), ("default", True, False, False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
     ("llama3", True, True, True)),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
      "mellum", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais",
      "trillion", "granite-docling"),
     ("gpt2", True, False, False)),
    (("qwen2", "deepseek-r1-qwen", "megrez"), ("qwen2", False, False, False)),
    (("starcoder", "refact", "codeshell", "exaone", "minerva-7b"), ("smollm", True, False, False)),
    (("smollm", "command-r"), ("smollm", False, False, False)),
):
    for _n in _names:
        _PRE_TYPES[_n] = _spec


@Tokenizer.register("gpt2")
class BPETokenizer(Tokenizer):
    """llama.cpp's llm_tokenizer_bpe: regex pre-tokenizer, byte-level BPE by merge rank."""

    vocab_type = "bpe"

    def __init__(self, metadata: dict):
        super().__init__(metadata)
        merges = metadata.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise ValueError("GGUF metadata: tokenizer.ggml.merges is missing (required for a gpt2 vocabulary)")
        self._merges = merges
        self._ranks = None
        pre = self.pre or "default"
        spec = _PRE_TYPES.get(pre)
        if spec is None:
            raise ValueError(f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
                             f"{', '.join(sorted(_PRE_TYPES))}")
        self.pre_kind, self.clean_spaces, self.ignore_merges, add_bos = spec
        self._patterns = None
        self._finish_init(metadata, bos=11, eos=11, unk=None, add_bos=add_bos, add_eos=False,
                          add_space_prefix=False)

    def _rank_table(self):
        """The merge ranks and the key function for a pair. Keyed by the merge line itself ("a b")
        when no line holds two spaces (no token contains one: every byte-level vocabulary), which is
        3x faster to build than pairs; else by (a, b) split at the first space after position 0."""
        if self._ranks is None:
            merges = self._merges
            n = len(merges)
            order = range(n - 1, -1, -1)        # built from the end: the first of duplicates wins
            joined = "\x00".join(merges)
            if joined.count("\x00") == n - 1 and not re.search(" [^\x00]* ", joined):
                self._ranks = dict(zip(reversed(merges), order)), True
            else:
                ranks = {}
                for r in order:
                    m = merges[r]
                    p = m.find(" ", 1)
                    ranks[(m[:p], m[p + 1:]) if p >= 0 else ("", "")] = r
                self._ranks = ranks, False
        return self._ranks

    def _split_words(self, text: str) -> list:
        pats = self._patterns
        if pats is None:
            pats = _PATTERN_CACHE.get(self.pre_kind)
            if pats is None:
                pats = _PATTERN_CACHE[self.pre_kind] = _pretokenizer_patterns(self.pre_kind)
            self._patterns = pats
        coll = _collapse(text)
        spans = [(0, len(text))]
        for pat in pats:
            out = []
            for s, e in spans:
                pos = s
                for m in pat.finditer(coll, s, e):
                    a, b = m.span()
                    if a > pos:
                        out.append((pos, a))
                    if b > a:
                        out.append((a, b))
                    pos = b
                if pos < e:
                    out.append((pos, e))
            spans = out
        return [text[a:b] for a, b in spans]

    def _encode_fragments(self, frags: list, out: list) -> None:
        cache = self._cache
        for f in frags:
            if type(f) is int:
                out.append(f)
                continue
            for w in self._split_words(f):
                r = cache.get(w)
                if r is None:
                    r = self._bpe(_utf8(w).decode("latin-1").translate(_LATIN1_TO_GPT2))
                    self._cache_put(w, r)
                out.extend(r)

    def _bpe(self, word: str) -> list:
        """llm_tokenizer_bpe_session::tokenize on one byte-mapped word: the lowest merge rank first."""
        if self.ignore_merges or len(word) == 1:
            t = self._t2i.get(word)
            if t is not None:
                return [t]
        ranks, by_line = self._rank_table()
        rget = ranks.get
        if by_line:
            return self._merge(word, lambda a, m, b: rget(word[a:m] + " " + word[m:b]), self._fallback)
        return self._merge(word, lambda a, m, b: rget((word[a:m], word[m:b])), self._fallback)

    def _fallback(self, piece: str) -> list:
        # llama.cpp: each byte of the (mapped) symbol's UTF-8 that is itself a token
        get = self._t2i.get
        out = []
        for b in _utf8(piece):
            t = get(bytes([b]).decode("utf-8", "surrogateescape"))
            if t is not None:
                out.append(t)
        return out

    def _normal_piece(self, text: str) -> bytes:
        c2b = _CHAR_TO_BYTE
        try:
            return bytes([c2b[c] for c in text])
        except KeyError:
            out = bytearray()
            for c in text:
                b = c2b.get(c)
                if b is not None:
                    out.append(b)
                else:   # llama_decode_text's marker for characters outside the byte alphabet
                    out += _utf8(f"[UNK_BYTE_0x{_utf8(c).hex()}{text}]")
            return bytes(out)
