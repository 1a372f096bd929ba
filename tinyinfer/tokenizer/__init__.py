"""Tokenizers from GGUF metadata, behaving like llama.cpp's ``llama-vocab``: one module per algorithm.

* :mod:`.base` -- what both share: special tokens and their partition of the text, end-of-generation
  detection, decoding, :class:`StreamDecoder`; :meth:`Tokenizer.from_gguf` picks the algorithm.
* :mod:`.spm` -- SentencePiece (``tokenizer.ggml.model`` = ``llama``): Llama 2, Gemma, Phi-3.
* :mod:`.bpe` -- byte-level BPE (``gpt2``) with llama.cpp's pre-tokenizers (gpt-2, llama-bpe,
  qwen2, smollm, ...): SmolLM, Llama 3, Qwen2.
* :mod:`.wpm` -- WordPiece (``bert``): BERT-family embedding models (all-MiniLM, bge).
* :mod:`.merge` -- the priority-queue merge loop both algorithms run.
"""

from .base import ATTR_CONTROL, ATTR_NORMAL, ATTR_USER_DEFINED, SUPPORTED_MODELS, StreamDecoder, Tokenizer
from .bpe import BPETokenizer
from .spm import SPMTokenizer
from .wpm import WPMTokenizer

__all__ = ["Tokenizer", "SPMTokenizer", "BPETokenizer", "WPMTokenizer", "StreamDecoder", "SUPPORTED_MODELS",
           "ATTR_CONTROL", "ATTR_NORMAL", "ATTR_USER_DEFINED"]
