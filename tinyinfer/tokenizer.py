r"""Tokenizers from GGUF metadata, behaving like llama.cpp's ``llama-vocab``.

Two vocabulary types, chosen by ``tokenizer.ggml.model``:

* ``llama`` -- SentencePiece (SPM): spaces become ``▁``, an optional space prefix,
  then llama.cpp's bigram merge on piece scores (highest score first, leftmost
  on ties), and byte fallback (``<0xXX>`` pieces) for characters that are not
  pieces.
* ``gpt2`` -- byte-level BPE: a pre-tokenizer (regexes chosen by
  ``tokenizer.ggml.pre``) cuts the text into words, each word's UTF-8 bytes are
  mapped to the GPT-2 byte alphabet, then merges are applied by rank (lowest rank
  first, leftmost on ties).

Before either, the text is partitioned on special tokens the way llama.cpp does
it (``tokenizer_st_partition``): user-defined tokens always, control and unknown
tokens only with ``special=True``; longer token texts are cut out first.

Everything is computed from the metadata dict of :class:`tinyinfer.gguf.GGUFFile`
without building per-token Python objects (a dict text -> id and numpy attribute
flags), so Gemma 3's 262k-piece vocabulary builds in about 0.1 s; other tables
(merge ranks, pre-tokenizer regexes, the bytes of each token, the special-token
search groups) are built on first use. Encoding caches the ids of each word (BPE)
or ▁-segment (SPM), so long texts (perplexity runs) tokenize at ~0.3-1 M chars/s.

Where this differs from llama.cpp on purpose:

* ``decode`` concatenates token pieces like llama.cpp's ``token_to_piece`` (what
  llama-cli / llama-server stream out) and removes the one space the SPM tokenizer
  put in front of the text; it does not apply llama_detokenize's ``clean_spaces``
  passes (" ," -> ","), which would break ``decode(encode(x)) == x``.
* Character classes (\p{L}, \p{N}, \p{P}) come from Python's ``unicodedata``; llama.cpp
  ships its own Unicode 15 tables, so characters assigned after Python's Unicode
  version (14.0 on Python 3.11) may pre-tokenize differently. Whitespace is
  llama.cpp's set, not ``str.isspace``.
"""

from __future__ import annotations

import codecs
import heapq
import re
import unicodedata
from typing import Iterable

import numpy as np

__all__ = ["Tokenizer", "SPMTokenizer", "BPETokenizer", "StreamDecoder", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = ("llama", "gpt2")

# GGUF tokenizer.ggml.token_type values (llama_token_type)
TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = range(7)

# llama_token_attr bits
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_NORMALIZED = 1 << 6
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
ATTR_SINGLE_WORD = 1 << 9

_TYPE_TO_ATTR = np.array([ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL,
                          ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE], dtype=np.int32)

_ATTR_HIDDEN = ATTR_UNKNOWN | ATTR_CONTROL              # dropped by decode unless special=True
_ATTR_PARTITION = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN

# Tokens llama.cpp recognises by their text (llama-vocab.cpp, "auto-detect special tokens by text").
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")
_ALWAYS_RENDER = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")   # gpt-oss

_SPACE = "\u2581"   # ▁
_C_SPACES = " \t\n\v\f\r"   # C isspace(), used for lstrip/rstrip of special tokens


def _utf8(s: str) -> bytes:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:   # lone surrogates: GGUF strings were decoded with surrogateescape
        try:
            return s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return s.encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------

class Tokenizer:
    """Common part of both vocabulary types: special tokens, partition, decoding.

    Build one with :meth:`Tokenizer.from_gguf` (metadata dict) or
    :meth:`Tokenizer.from_file` (path of a GGUF file).
    """

    vocab_type = "none"
    _CACHE_MAX = 1 << 17     # entries in the per-word (BPE) / per-segment (SPM) cache

    # -- construction ---------------------------------------------------------------------------
    @staticmethod
    def from_gguf(metadata: dict) -> "Tokenizer":
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.model: no vocabulary in this file "
                             f"(supported tokenizer models: {', '.join(SUPPORTED_MODELS)})")
        if model == "llama":
            return SPMTokenizer(metadata)
        if model == "gpt2":
            return BPETokenizer(metadata)
        raise ValueError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                         f"supported: {', '.join(repr(m) for m in SUPPORTED_MODELS)}")

    @staticmethod
    def from_file(path) -> "Tokenizer":
        from .gguf import GGUFFile
        g = GGUFFile(path)
        try:
            return Tokenizer.from_gguf(g.metadata)
        finally:
            g.close()

    def __init__(self, metadata: dict):
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError("GGUF metadata: tokenizer.ggml.tokens is missing or empty")
        n = len(tokens)
        t2i = dict(zip(tokens, range(n)))
        if "" in t2i:                       # llama.cpp renames empty tokens
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
            t2i = dict(zip(tokens, range(n)))
        if len(t2i) != n:                   # as current llama.cpp: an ambiguous vocabulary is an error
            seen: dict = {}
            for i, t in enumerate(tokens):
                if t in seen:
                    raise ValueError(f"GGUF metadata: duplicate token in vocabulary: {t!r} has ids "
                                     f"{seen[t]} and {i}")
                seen[t] = i
        self._tokens: list = tokens
        self._t2i: dict = t2i

        types = metadata.get("tokenizer.ggml.token_type")
        if types is None:
            attrs = np.full(n, ATTR_NORMAL, dtype=np.int32)
        else:
            types = np.asarray(types)
            if types.ndim != 1 or types.size < n:
                raise ValueError(f"GGUF metadata: tokenizer.ggml.token_type has {types.size} entries "
                                 f"for {n} tokens")
            t = types[:n].astype(np.int64)
            attrs = np.where((t >= 0) & (t < len(_TYPE_TO_ATTR)),
                             _TYPE_TO_ATTR[np.clip(t, 0, len(_TYPE_TO_ATTR) - 1)], ATTR_UNDEFINED)
            attrs = attrs.astype(np.int32)
        self._attrs: np.ndarray = attrs

        self.model_name = str(metadata.get("general.name", "")).lower()
        self.pre = metadata.get("tokenizer.ggml.pre", "")
        self._cache: dict = {}
        self._pieces: list | None = None          # token -> bytes (as with special=True), lazily
        self._partition_groups = None
        self._special_ids = None

    def _finish_init(self, metadata: dict, bos, eos, unk, add_bos, add_eos, add_space_prefix):
        """Special ids, add_* flags and EOG detection, after the subclass set its defaults."""
        n = self.n_vocab
        ids = {"bos": bos, "eos": eos, "eot": None, "eom": None, "unk": unk, "sep": None, "pad": None,
               "mask": None, "fim_pre": None, "fim_suf": None, "fim_mid": None, "fim_pad": None,
               "fim_rep": None, "fim_sep": None}
        keys = {"bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id",
                "eom": "eom_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
                "pad": "padding_token_id", "mask": "mask_token_id", "fim_pre": "fim_pre_token_id",
                "fim_suf": "fim_suf_token_id", "fim_mid": "fim_mid_token_id",
                "fim_pad": "fim_pad_token_id", "fim_rep": "fim_rep_token_id",
                "fim_sep": "fim_sep_token_id"}
        for name, key in keys.items():
            v = metadata.get("tokenizer.ggml." + key)
            if v is None:
                continue
            v = int(v)
            if 0 <= v < n:     # llama.cpp warns and keeps its default for out-of-range ids
                ids[name] = v
        for name in ids:       # defaults that do not exist in a small vocabulary
            if ids[name] is not None and not 0 <= ids[name] < n:
                ids[name] = None

        v = metadata.get("tokenizer.ggml.add_space_prefix")
        if v is not None:
            add_space_prefix = bool(v)
        v = metadata.get("tokenizer.ggml.add_bos_token")
        if v is not None:
            add_bos = bool(v)
        v = metadata.get("tokenizer.ggml.add_eos_token")
        if v is not None:
            add_eos = bool(v)
        # llama.cpp: asking for a BOS/EOS the vocabulary does not have disables it (with a warning)
        self._add_bos = add_bos and ids["bos"] is not None
        self._add_eos = add_eos and ids["eos"] is not None
        self.add_space_prefix = add_space_prefix

        attrs = self._attrs
        # end-of-turn / end-of-message / fill-in-the-middle tokens by text, where the file does not
        # name them; like llama.cpp, a token found this way is made a control token.
        t2i = self._t2i
        for name, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), ("fim_pad", _FIM_PAD_TEXTS),
                            ("fim_rep", _FIM_REP_TEXTS), ("fim_sep", _FIM_SEP_TEXTS)):
            if ids.get(name) is not None:
                continue
            for text in texts:
                i = t2i.get(text)
                if i is not None:
                    ids[name] = i
                    attrs[i] |= ATTR_CONTROL
                    break
        # control tokens named "...unused..." are unused
        toks = self._tokens
        for i in np.nonzero(attrs & ATTR_CONTROL)[0].tolist():
            if "unused" in toks[i]:
                attrs[i] |= ATTR_UNUSED
        # end of generation
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids.get(k) is not None}
        for text in _EOG_TEXTS:
            i = t2i.get(text)
            if i is not None:
                eog.add(i)
                attrs[i] |= ATTR_CONTROL
        for text in _ALWAYS_RENDER:
            i = t2i.get(text)
            if i is not None:
                attrs[i] = ATTR_USER_DEFINED
        for name in ("eos", "eot", "eom"):
            if ids[name] is not None:
                eog.add(ids[name])
        texts = {self._tokens[i]: i for i in eog}
        end = texts.get("<|end|>")
        has_call = "<|call|>" in texts or "<|calls|>" in texts
        if end is not None and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
            eog.discard(end)                     # gpt-oss / solar-open: <|end|> does not end generation
            attrs[end] = ATTR_USER_DEFINED
        if "<|tool_response>" in texts and "</s>" in texts:   # gemma4: </s> is not EOG there
            eog.discard(texts["</s>"])
            attrs[texts["</s>"]] = ATTR_NORMAL
        # per-model token attributes, applied last as llama.cpp does (it hard-codes them by name)
        if any(s in self.pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")):
            i = self._t2i.get("<mask>")
            if i is not None:
                attrs[i] |= ATTR_LSTRIP
        elif "phi-3" in self.model_name or "phi3" in self.model_name:
            special = (attrs & _ATTR_PARTITION) != 0
            attrs[special] |= ATTR_RSTRIP
            for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                i = self._t2i.get(text)
                if i is not None:
                    attrs[i] = (attrs[i] | ATTR_RSTRIP) if on else (attrs[i] & ~ATTR_RSTRIP)

        self._ids = ids
        self._eog = frozenset(eog)

    # -- properties -----------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return len(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    bos_id = property(lambda self: self._ids["bos"], doc="beginning-of-sequence id (or None)")
    eos_id = property(lambda self: self._ids["eos"], doc="end-of-sequence id (or None)")
    eot_id = property(lambda self: self._ids["eot"], doc="end-of-turn id (or None)")
    eom_id = property(lambda self: self._ids["eom"], doc="end-of-message id (or None)")
    unk_id = property(lambda self: self._ids["unk"], doc="unknown-token id (or None)")
    pad_id = property(lambda self: self._ids["pad"], doc="padding id (or None)")
    sep_id = property(lambda self: self._ids["sep"], doc="separator id (or None)")
    mask_id = property(lambda self: self._ids["mask"], doc="mask id (or None)")
    add_bos = property(lambda self: self._add_bos, doc="encode() adds BOS by default")
    add_eos = property(lambda self: self._add_eos, doc="encode() adds EOS by default")

    @property
    def eog_ids(self) -> frozenset:
        """Ids that end generation (eos, eot, eom, and <|im_end|>, <end_of_turn>, ... by text)."""
        return self._eog

    def is_eog(self, token_id: int) -> bool:
        return token_id in self._eog

    @property
    def special_ids(self) -> frozenset:
        """Control and unknown tokens: hidden by decode() unless special=True, and cut out of
        the text by encode() only with special=True."""
        if self._special_ids is None:
            self._special_ids = frozenset(np.nonzero(self._attrs & _ATTR_HIDDEN)[0].tolist())
        return self._special_ids

    @property
    def user_defined_ids(self) -> frozenset:
        """User-defined tokens: always cut out of the text by encode(), decoded verbatim."""
        return frozenset(np.nonzero(self._attrs & ATTR_USER_DEFINED)[0].tolist())

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[token_id] & ATTR_CONTROL)

    def token_text(self, token_id: int) -> str:
        """The token's string as stored in the vocabulary (``▁Hello``, ``ĠHello``, ``<0x0A>``)."""
        return self._tokens[token_id]

    def token_to_id(self, text: str):
        """Vocabulary lookup of a token string (None if absent)."""
        return self._t2i.get(text)

    def token_attr(self, token_id: int) -> int:
        return int(self._attrs[token_id])

    def token_type(self, token_id: int) -> int:
        a = int(self._attrs[token_id])
        for t, bit in enumerate(_TYPE_TO_ATTR.tolist()):
            if bit and a & bit:
                return t
        return TYPE_UNDEFINED

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_vocab={self.n_vocab}, pre={self.pre!r}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos}, eog={sorted(self._eog)})")

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None,
               special: bool = False) -> list:
        """Token ids of ``text`` (llama_tokenize).

        ``add_bos`` / ``add_eos``: None takes the file's defaults (:attr:`add_bos`, :attr:`add_eos`).
        ``special``: parse control tokens written in the text (``<|im_start|>``) as single ids;
        user-defined tokens are always parsed, as in llama.cpp.
        """
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "surrogateescape")
        elif not isinstance(text, str):
            raise TypeError(f"encode() takes str, not {type(text).__name__}")
        if add_bos is None:
            add_bos = self._add_bos
        if add_eos is None:
            add_eos = self._add_eos
        out = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError("this vocabulary has no BOS token")
            out.append(self.bos_id)
        frags = self._partition(text, special) if text else []
        self._encode_fragments(frags, out)
        if add_eos:
            if self.eos_id is None:
                raise ValueError("this vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    def _encode_fragments(self, frags: list, out: list) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _cache_put(self, key, value) -> None:
        if len(self._cache) >= self._CACHE_MAX:
            self._cache.clear()
        self._cache[key] = value

    def _special_groups(self):
        """Partition candidates, longest text first, grouped by their first 4 characters so that a
        long text is searched once per group rather than once per special token."""
        if self._partition_groups is None:
            ids = np.nonzero(self._attrs & _ATTR_PARTITION)[0].tolist()
            toks = self._tokens
            ids.sort(key=lambda i: -len(_utf8(toks[i])))   # llama.cpp: by byte length, descending
            rank = {i: r for r, i in enumerate(ids)}
            groups: dict = {}
            for i in ids:
                groups.setdefault(toks[i][:4], []).append(i)
            self._partition_groups = (rank, list(groups.items()))
        return self._partition_groups

    def _partition(self, text: str, special: bool) -> list:
        """Split ``text`` into raw-text fragments (str) and special token ids (int), as
        llama.cpp's tokenizer_st_partition: for each special token, longest first, cut every
        occurrence out of every remaining raw fragment, left to right."""
        rank, groups = self._special_groups()
        attrs = self._attrs
        toks = self._tokens
        present = []
        for prefix, ids in groups:
            if prefix not in text:
                continue
            for i in ids:
                if not special and attrs[i] & _ATTR_HIDDEN:
                    continue
                if toks[i] in text:
                    present.append(i)
        if not present:
            return [text]
        present.sort(key=rank.__getitem__)
        frags: list = [text]
        for tid in present:
            tt = toks[tid]
            a = int(attrs[tid])
            new: list = []
            for f in frags:
                if type(f) is int or tt not in f:
                    new.append(f)
                    continue
                pos = 0
                end = len(f)
                while True:
                    m = f.find(tt, pos)
                    if m < 0:
                        if pos < end:
                            new.append(f[pos:])
                        break
                    if m > pos:
                        left = f[pos:m]
                        if a & ATTR_LSTRIP:
                            left = left.rstrip(_C_SPACES)
                        if left:
                            new.append(left)
                    new.append(tid)
                    pos = m + len(tt)
                    if pos >= end:
                        break
                    if a & ATTR_RSTRIP:
                        while pos < end and f[pos] in _C_SPACES:
                            pos += 1
            frags = new
        return frags

    # -- decoding -------------------------------------------------------------------------------
    def _piece(self, token_id: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_to_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The raw bytes token ``token_id`` contributes to the text (llama_token_to_piece):
        ``▁`` -> space (SPM), ``<0xXX>`` -> that byte, BPE pieces unmapped from the GPT-2 byte
        alphabet, user-defined tokens verbatim; control/unknown tokens give b"" unless
        ``special``, unused ones always b""."""
        if not 0 <= token_id < len(self._tokens):
            raise ValueError(f"token id {token_id} out of range [0, {len(self._tokens)})")
        if not special and self._attrs[token_id] & _ATTR_HIDDEN:
            return b""
        pieces = self._pieces
        if pieces is None:
            pieces = self._pieces = [None] * len(self._tokens)
        p = pieces[token_id]
        if p is None:
            p = pieces[token_id] = self._piece(token_id)
        return p

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        """Concatenated :meth:`token_to_bytes`; with a space prefix vocabulary (llama SPM) the one
        space the tokenizer put in front of the text is removed again (from the first token that
        is not BOS), so that ``decode(encode(x)) == x``."""
        parts = []
        strip = self.add_space_prefix
        bos = self.bos_id
        for i in ids:
            i = int(i)
            b = self.token_to_bytes(i, special)
            if strip and i != bos:
                strip = False
                if b[:1] == b" ":
                    b = b[1:]
            parts.append(b)
        return b"".join(parts)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of ``ids``: control tokens (BOS, EOS, <|im_start|>...) are skipped unless
        ``special``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", "replace")

    def stream_decoder(self, special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, special)


class StreamDecoder:
    """Incremental detokenizer: ``feed(id)`` returns the text that became complete, holding back
    the bytes of a UTF-8 character split over several tokens (byte-fallback / byte-level pieces)
    until it is whole. ``flush()`` returns what is left (incomplete bytes as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(self.tokenizer.token_to_bytes(int(token_id), self.special))

    def feed_many(self, ids: Iterable[int]) -> str:
        return "".join(self.feed(i) for i in ids)

    @property
    def pending(self) -> bytes:
        """Bytes held back, waiting for the rest of a character."""
        return self._dec.getstate()[0]

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    def reset(self) -> None:
        self._dec.reset()


# ----------------------------------------------------------------------------------------------
# SentencePiece (tokenizer.ggml.model == "llama")
# ----------------------------------------------------------------------------------------------

class SPMTokenizer(Tokenizer):
    """llama.cpp's llm_tokenizer_spm: bigram merges by piece score, byte fallback."""

    vocab_type = "spm"
    _SEGMENT_MIN = 64    # texts longer than this are cut at safe ▁ boundaries (cache per segment)

    def __init__(self, metadata: dict):
        super().__init__(metadata)
        n = len(self._tokens)
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            self._scores = [0.0] * n
        else:
            scores = np.asarray(scores)
            if scores.ndim != 1 or scores.size < n or scores.dtype.kind not in "iuf":
                raise ValueError(f"GGUF metadata: tokenizer.ggml.scores must hold a number for each of "
                                 f"the {n} tokens (got {scores.size} of {scores.dtype})")
            self._scores = scores[:n].astype(np.float32).tolist()
        self._byte_ids = None
        self._glue_before_space = None
        self._finish_init(metadata, bos=1, eos=2, unk=0, add_bos=True, add_eos=False,
                          add_space_prefix=True)

    # byte fallback: <0xXX> (uppercase hex) or, failing that, the byte itself as a token
    def _byte_table(self) -> list:
        if self._byte_ids is None:
            t2i = self._t2i
            table = []
            for b in range(256):
                i = t2i.get(f"<0x{b:02X}>")
                if i is None:
                    i = t2i.get(bytes([b]).decode("utf-8", "surrogateescape"))
                if i is None:
                    i = self.unk_id
                table.append(i)
            self._byte_ids = table
        return self._byte_ids

    def _encode_fragments(self, frags: list, out: list) -> None:
        prev_special = True      # llama.cpp: space prefix at the start and after every special token
        for f in frags:
            if type(f) is int:
                out.append(f)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                f = " " + f
            prev_special = False
            text = f.replace(" ", _SPACE)
            if len(text) <= self._SEGMENT_MIN:
                out.extend(self._segment(text))
            else:
                for seg in self._split_segments(text):
                    out.extend(self._segment(seg))

    def _split_segments(self, text: str) -> list:
        """Cut before each ▁ whose left neighbour ``c`` never appears as ``c▁`` inside a piece:
        no merge can cross such a boundary, so tokenizing the pieces separately is exact."""
        glue = self._glue_before_space
        if glue is None:
            glue = set()
            for t in self._tokens:
                j = t.find(_SPACE, 1)
                while j > 0:
                    glue.add(t[j - 1])
                    j = t.find(_SPACE, j + 1)
            self._glue_before_space = glue = frozenset(glue)
        segs = []
        start = 0
        j = text.find(_SPACE, 1)
        while j > 0:
            if text[j - 1] not in glue:
                segs.append(text[start:j])
                start = j
            j = text.find(_SPACE, j + 1)
        segs.append(text[start:])
        return segs

    def _segment(self, text: str) -> list:
        r = self._cache.get(text)
        if r is None:
            r = self._bigram_merge(text)
            self._cache_put(text, r)
        return r

    def _bigram_merge(self, text: str) -> list:
        """llm_tokenizer_spm_session::tokenize on one ▁-escaped string.

        Symbol i covers text[i:i+ln[i]] (symbols stay contiguous, a merge grows the left one), so
        the right neighbour of i is i+ln[i]. Queue entries are (-score, left, size); an entry is
        stale when either symbol changed, i.e. when ln[left] + ln[right] != size.
        """
        n = len(text)
        get = self._t2i.get
        scores = self._scores
        if n == 1:
            i = get(text)
            return [i] if i is not None else self._bytes_of(text)
        ln = [1] * n
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            t = get(text[i:i + 2])
            if t is not None:
                heap.append((-scores[t], i, 2))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, l, size = pop(heap)
            ll = ln[l]
            if ll == 0:
                continue
            r = l + ll
            if r >= n or ln[r] == 0 or ll + ln[r] != size:
                continue
            ln[l] = size
            ln[r] = 0
            rn = l + size
            if rn < n:
                prv[rn] = l
                t = get(text[l:rn + ln[rn]])
                if t is not None:
                    push(heap, (-scores[t], l, size + ln[rn]))
            p = prv[l]
            if p >= 0:
                t = get(text[p:rn])
                if t is not None:
                    push(heap, (-scores[t], p, rn - p))
        out = []
        i = 0
        while i < n:
            piece = text[i:i + ln[i]]
            t = get(piece)
            if t is not None:
                out.append(t)
            else:
                out.extend(self._bytes_of(piece))
            i += ln[i]
        return out

    def _bytes_of(self, piece: str) -> list:
        table = self._byte_table()
        out = []
        for b in _utf8(piece):
            t = table[b]
            if t is None:
                raise ValueError(f"cannot tokenize {piece!r}: no byte token <0x{b:02X}> and no unknown token")
            out.append(t)
        return out

    def _piece(self, token_id: int) -> bytes:
        a = int(self._attrs[token_id])
        text = self._tokens[token_id]
        if a & (_ATTR_HIDDEN | ATTR_USER_DEFINED):
            return _utf8(text)
        if a & ATTR_NORMAL:
            return _utf8(text.replace(_SPACE, " "))
        if a & ATTR_BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""   # unused / undefined tokens print nothing


# ----------------------------------------------------------------------------------------------
# Byte-level BPE (tokenizer.ggml.model == "gpt2")
# ----------------------------------------------------------------------------------------------

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

    def _rank_table(self) -> dict:
        if self._ranks is None:
            ranks = {}
            for r in range(len(self._merges) - 1, -1, -1):   # the first of duplicates wins
                m = self._merges[r]
                p = m.find(" ", 1)
                ranks[(m[:p], m[p + 1:]) if p >= 0 else ("", "")] = r
            self._ranks = ranks
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
        """llm_tokenizer_bpe_session::tokenize on one byte-mapped word."""
        get = self._t2i.get
        if self.ignore_merges:
            t = get(word)
            if t is not None:
                return [t]
        n = len(word)
        if n == 1:
            t = get(word)
            return [t] if t is not None else self._fallback(word)
        ranks = self._rank_table()
        rget = ranks.get
        ln = [1] * n
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            r = rget((word[i], word[i + 1]))
            if r is not None:
                heap.append((r, i, 2))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, l, size = pop(heap)
            ll = ln[l]
            if ll == 0:
                continue
            r = l + ll
            if r >= n or ln[r] == 0 or ll + ln[r] != size:
                continue
            ln[l] = size
            ln[r] = 0
            rn = l + size
            if rn < n:
                prv[rn] = l
                k = rget((word[l:rn], word[rn:rn + ln[rn]]))
                if k is not None:
                    push(heap, (k, l, size + ln[rn]))
            p = prv[l]
            if p >= 0:
                k = rget((word[p:l], word[l:rn]))
                if k is not None:
                    push(heap, (k, p, rn - p))
        out = []
        i = 0
        while i < n:
            piece = word[i:i + ln[i]]
            t = get(piece)
            if t is not None:
                out.append(t)
            else:
                out.extend(self._fallback(piece))
            i += ln[i]
        return out

    def _fallback(self, piece: str) -> list:
        # llama.cpp: each byte of the (mapped) symbol's UTF-8 that is itself a token
        get = self._t2i.get
        out = []
        for b in _utf8(piece):
            t = get(bytes([b]).decode("utf-8", "surrogateescape"))
            if t is not None:
                out.append(t)
        return out

    def _piece(self, token_id: int) -> bytes:
        a = int(self._attrs[token_id])
        text = self._tokens[token_id]
        if a & (_ATTR_HIDDEN | ATTR_USER_DEFINED):
            return _utf8(text)
        if a & ATTR_NORMAL:
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
        if a & ATTR_BYTE:   # SPM-style <0xXX> byte tokens in a BPE vocabulary
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""
