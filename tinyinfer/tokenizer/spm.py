"""SentencePiece vocabularies (``tokenizer.ggml.model`` = ``llama``): llama.cpp's llm_tokenizer_spm.

Spaces become ``▁``, an optional space prefix, then the bigram merge on piece scores (highest score
first, leftmost on ties), and byte fallback (``<0xXX>`` pieces) for characters that are not pieces.
"""

from __future__ import annotations

import numpy as np

from .base import _SPACE, Tokenizer, _utf8


@Tokenizer.register("llama")
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
        """llm_tokenizer_spm_session::tokenize on one ▁-escaped string: the highest-scoring piece first."""
        get = self._t2i.get
        scores = self._scores

        def priority(a, m, b):
            t = get(text[a:b])
            return None if t is None else -scores[t]

        return self._merge(text, priority, self._bytes_of)

    def _bytes_of(self, piece: str) -> list:
        table = self._byte_table()
        out = []
        for b in _utf8(piece):
            t = table[b]
            if t is None:
                raise ValueError(f"cannot tokenize {piece!r}: no byte token <0x{b:02X}> and no unknown token")
            out.append(t)
        return out

    def _normal_piece(self, text: str) -> bytes:
        return _utf8(text.replace(_SPACE, " "))
