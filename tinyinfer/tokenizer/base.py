r"""The part of every tokenizer that does not depend on the algorithm (llama.cpp's ``llama-vocab``).

Two vocabulary types, chosen by ``tokenizer.ggml.model`` (spm.py and bpe.py):

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
from typing import Iterable

import numpy as np

from .merge import merge_symbols

SUPPORTED_MODELS = ("llama", "gpt2", "bert")

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


class Tokenizer:
    """Common part of both vocabulary types: special tokens, partition, decoding.

    Build one with :meth:`Tokenizer.from_gguf` (metadata dict) or
    :meth:`Tokenizer.from_file` (path of a GGUF file).
    """

    vocab_type = "none"
    _CACHE_MAX = 1 << 17     # entries in the per-word (BPE) / per-segment (SPM) cache

    # -- construction ---------------------------------------------------------------------------
    #: tokenizer.ggml.model -> the class (each algorithm's module registers itself: no import of it here)
    ALGORITHMS: dict = {}

    @classmethod
    def register(cls, model: str):
        def add(sub):
            cls.ALGORITHMS[model] = sub
            return sub
        return add

    @staticmethod
    def from_gguf(metadata: dict) -> "Tokenizer":
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.model: no vocabulary in this file "
                             f"(supported tokenizer models: {', '.join(SUPPORTED_MODELS)})")
        if model in Tokenizer.ALGORITHMS:
            return Tokenizer.ALGORITHMS[model](metadata)
        raise ValueError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                         f"supported: {', '.join(repr(m) for m in SUPPORTED_MODELS)}")

    @staticmethod
    def from_file(path) -> "Tokenizer":
        from ..gguf import GGUFFile
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

    def _merge(self, text: str, priority, fallback) -> list:
        """Ids of ``text`` after the algorithm's merges (see merge.py); ``fallback(piece)`` gives the
        ids of a final symbol that is not a token."""
        get = self._t2i.get
        out = []
        for piece in merge_symbols(text, priority):
            t = get(piece)
            if t is not None:
                out.append(t)
            else:
                out.extend(fallback(piece))
        return out

    # -- decoding -------------------------------------------------------------------------------
    def _normal_piece(self, text: str) -> bytes:  # pragma: no cover - abstract
        """The bytes of a normal token's text (▁ -> space for SPM, the GPT-2 byte alphabet for BPE)."""
        raise NotImplementedError

    def _piece(self, token_id: int) -> bytes:
        a = int(self._attrs[token_id])
        text = self._tokens[token_id]
        if a & (_ATTR_HIDDEN | ATTR_USER_DEFINED):
            return _utf8(text)
        if a & ATTR_NORMAL:
            return self._normal_piece(text)
        if a & ATTR_BYTE:   # <0xXX> byte tokens (SPM, and some BPE vocabularies)
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""   # unused / undefined tokens print nothing

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

