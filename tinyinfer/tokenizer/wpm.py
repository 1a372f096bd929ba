"""WordPiece vocabularies (``tokenizer.ggml.model`` = ``bert``): llama.cpp's llm_tokenizer_wpm.

The converter (tools/convert.py, as convert_hf_to_gguf.py) stores BERT's vocabulary in "phantom
space" form: a word-initial piece ``hello`` becomes ``▁hello``, a continuation ``##lo`` becomes
``lo``, control tokens ([CLS], [SEP], ...) stay as they are. Encoding a text:

    words = split(normalize(text))        # whitespace ends a word; punctuation, ASCII symbols and
                                          # CJK ideographs are words of one character; control
                                          # characters dropped; lowercase, and when the file asks for
                                          # it each character to the first code point of its NFD
                                          # and accent marks (\\p{M}) dropped
    for w in words:                       # greedy longest match from the left on "▁" + w;
        ids += longest_pieces("▁" + w)    # a word with an unmatched rest becomes [UNK]
    [CLS] ids [SEP]                       # with add_special, as llama.cpp's WPM case

Normalizer options come from ``tokenizer.ggml.normalizer.lowercase`` / ``.strip_accents`` (both
default to true, and strip_accents defaults to lowercase, as llama.cpp's loader). Character classes
come from Python's ``unicodedata`` (see base.py on the Unicode version).
"""

from __future__ import annotations

import unicodedata

from .base import _SPACE, Tokenizer, _utf8
from .bpe import _WS_CHARS


def _is_chinese(cp: int) -> bool:
    """llama.cpp's (and HF BERT's) CJK ideograph ranges."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


# per code point: 0 = part of a word, 1 = whitespace (ends a word), 2 = dropped, 3 = a word alone,
# 4 = an accent mark (dropped when stripping accents)
_WORD, _SPACE_C, _DROP, _ALONE, _MARK = range(5)


def _char_class(c: str) -> int:
    cp = ord(c)
    if c in _WS_CHARS:
        return _SPACE_C
    cat = unicodedata.category(c)
    if cp == 0 or cp == 0xFFFD or cat[0] == "C":
        return _DROP
    if cat[0] == "M":
        return _MARK
    if cat[0] == "P" or (cp < 0x7F and cat[0] == "S") or _is_chinese(cp):
        return _ALONE
    return _WORD


def _lower(c: str) -> str:
    """One code point to one (simple lowercase mapping, as llama.cpp's unicode_tolower: İ -> i)."""
    return c.lower()[0] if c.lower() else c


def _nfd_first(c: str) -> str:
    """llama.cpp's unicode_cpts_normalize_nfd: each code point becomes the FIRST code point of its
    canonical decomposition (é -> e, 한 -> ᄒ); the rest of the decomposition is dropped, not kept as
    marks (where the tokenizers library keeps every Jamo of a Hangul syllable and drops only Mn marks)."""
    return unicodedata.normalize("NFD", c)[0]


@Tokenizer.register("bert")
class WPMTokenizer(Tokenizer):
    """llama.cpp's llm_tokenizer_wpm: greedy longest-match WordPiece over phantom-space pieces."""

    vocab_type = "wpm"

    def __init__(self, metadata: dict):
        super().__init__(metadata)
        self._max_len = max(len(t) for t in self._tokens)
        lower = metadata.get("tokenizer.ggml.normalizer.lowercase")
        self.lowercase = True if lower is None else bool(lower)
        strip = metadata.get("tokenizer.ggml.normalizer.strip_accents")
        self.strip_accents = self.lowercase if strip is None else bool(strip)
        self._classes: dict = {}
        self._nfd: dict = {}
        self._finish_init(metadata, bos=101, eos=None, unk=100, add_bos=True, add_eos=False,
                          add_space_prefix=False)
        self._ids["sep"] = self._ids["sep"] if self._ids["sep"] is not None else (102 if self.n_vocab > 102 else None)
        self._ids["pad"] = self._ids["pad"] if self._ids["pad"] is not None else 0
        v = metadata.get("tokenizer.ggml.add_sep_token")
        self.add_sep = True if v is None else bool(v)

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None,
               special: bool = False) -> list:
        """As llama_tokenize for WPM: with ``add_bos`` (the file's default: true) the ids are wrapped
        in [CLS] ... [SEP] (the separator when ``tokenizer.ggml.add_sep_token`` is not false)."""
        with_special = self._add_bos if add_bos is None else add_bos
        out = super().encode(text, add_bos, False if add_eos is None else add_eos, special)
        if with_special and self.add_sep:
            if self.sep_id is None:
                raise ValueError("this vocabulary has no separator token")
            out.append(self.sep_id)
        return out

    def words(self, text: str) -> list:
        """The normalized words of ``text`` (llama.cpp's llm_tokenizer_wpm_session::preprocess)."""
        if self.strip_accents and not text.isascii():
            nfd = self._nfd
            text = "".join([nfd.get(c) or nfd.setdefault(c, _nfd_first(c)) for c in text])
        classes = self._classes
        words: list = []
        cur: list = []
        for c in text:
            k = classes.get(c)
            if k is None:
                k = classes[c] = _char_class(c)
            if k == _SPACE_C:
                if cur:
                    words.append("".join(cur))
                    cur = []
                continue
            if k == _DROP or (k == _MARK and self.strip_accents):
                continue
            if self.lowercase:
                c = _lower(c)
            if k == _ALONE:
                if cur:
                    words.append("".join(cur))
                    cur = []
                words.append(c)
            else:
                cur.append(c)
        if cur:
            words.append("".join(cur))
        return words

    def _encode_word(self, word: str) -> list:
        get = self._t2i.get
        w = _SPACE + word
        n = len(w)
        out = []
        i = 0
        while i < n:
            for j in range(min(n, i + self._max_len), i, -1):
                t = get(w[i:j])
                if t is not None:
                    out.append(t)
                    i = j
                    break
            else:                          # an unmatched rest: the whole word is unknown
                return [self.unk_id]
        return out

    def _encode_fragments(self, frags: list, out: list) -> None:
        cache = self._cache
        for f in frags:
            if type(f) is int:
                out.append(f)
                continue
            for w in self.words(f):
                ids = cache.get(w)
                if ids is None:
                    ids = self._encode_word(w)
                    self._cache_put(w, ids)
                out.extend(ids)

    # -- decoding -----------------------------------------------------------------------------
    def _normal_piece(self, text: str) -> bytes:
        return _utf8(text.replace(_SPACE, " "))
