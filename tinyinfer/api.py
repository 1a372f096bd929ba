"""``Llama``: the library face, shaped like llama-cpp-python's class of that name."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np

from .chat import ChatFormatter
from .embedding import EmbeddingMixin
from .engine import Engine
from .grammar import Grammar
from .completions import (GenStats, chat_chunks, completion_chunks, merge_chat, merge_completion,
                          prepare_chat, tool_chat_chunks)
from .options import GenOptions, build

#: llama-cpp-python's name for a grammar object: ``LlamaGrammar.from_string(gbnf)``,
#: ``LlamaGrammar.from_file(path)``, ``LlamaGrammar.from_json_schema(schema)``.
LlamaGrammar = Grammar


class Llama(EmbeddingMixin):
    def __init__(self, model_path: str, *, n_ctx: int = 512, n_batch: int = 512, n_threads: Optional[int] = None,
                 seed: int = -1, vocab_only: bool = False, logits_all: bool = False, verbose: bool = True,
                 chat_format: Optional[str] = None, split: int = 1,
                 cache_type_k: str = "f16", cache_type_v: str = "f16",
                 type_k=None, type_v=None, context_shift: bool = False, n_keep: int = 0,
                 n_gpu_layers: int = 0, use_mmap: bool = True, use_mlock: bool = False, n_ubatch: int = 512,
                 n_threads_batch: Optional[int] = None, embedding: bool = False, pooling_type: int = -1,
                 flash_attn: bool = False, kernel_config=None, draft_model=None):
        """llama-cpp-python's keywords; another name is a TypeError.

        cache_type_k / cache_type_v: the KV cache's types, "f16" (default), "q8_0" or "q4_0" (``type_k`` /
        ``type_v``, llama-cpp-python's names, take those names or ggml type numbers 1, 8, 2).
        context_shift: when a generation fills the context, drop the oldest tokens after ``n_keep``
        (-1 = the whole prompt) and go on, as llama.cpp does.
        embedding / pooling_type: enable :meth:`embed` / :meth:`create_embedding` (tinyinfer/embedding.py);
        pooling_type -1 takes the file's, or 0..4 / a name (none, mean, cls, last, rank).
        kernel_config: the matmul kernels' knobs (a :class:`tinyinfer.kernels.matmul.KernelConfig`, e.g.
        ``batch_invariant=True``), applied to every weight as the model loads (``matmul.using_config``,
        which an :class:`Engine` built directly reads the same way).
        draft_model: speculative decoding (tinyinfer/speculative.py), llama-cpp-python's parameter: a
        ``LlamaPromptLookupDecoding(max_ngram_size, num_pred_tokens)``, another ``Llama`` with the same
        vocabulary as a draft model (ValueError otherwise), an ``NgramSimple`` or any
        ``f(input_ids) -> token ids``; output is the same as without it, token for token.
        Accepted for llama-cpp-python's sake, with no effect here (CPU only, weights always mmapped, one
        batch size): n_gpu_layers, use_mmap, use_mlock, n_ubatch, n_threads_batch, flash_attn."""
        self.embedding, self.pooling_type = embedding, pooling_type
        self.model_path = str(model_path)
        self.verbose = verbose
        self.seed = seed
        if split < 1:
            raise ValueError(f"split must be >= 1, got {split}")
        from .kernels.matmul import using_config
        with using_config(kernel_config):     # split 0: no weights (Engine.vocab_only)
            self._engine = Engine(model_path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                  logits_all=logits_all, verbose=verbose,
                                  type_k=_cache_type(type_k if type_k is not None else cache_type_k),
                                  type_v=_cache_type(type_v if type_v is not None else cache_type_v),
                                  defaults=GenOptions(context_shift=context_shift, n_keep=n_keep),
                                  split=0 if vocab_only else split)
        if draft_model is not None:
            from .speculative import check_vocab, proposer_of
            proposer = proposer_of(draft_model)
            eng = getattr(proposer, "engine", None)
            if eng is not None:
                check_vocab(self._engine.tokenizer, eng.tokenizer, getattr(draft_model, "model_path", "draft_model"))
            self._engine.defaults = GenOptions.of(self._engine.defaults, draft_model=proposer)
        self.draft_model = draft_model
        self.n_threads = self._engine.n_threads
        tok = self._engine.tokenizer
        self.metadata = {k: v for k, v in self._engine.gguf.metadata.items() if isinstance(v, (str, int, float))}
        self.chat_formatter = ChatFormatter.for_tokenizer(self._engine.gguf.metadata, tok, chat_format)
        self.chat_format = self.chat_formatter.name
        if verbose:
            t = self._engine.timings
            print(f"tinyinfer: loaded {self.model_path} in {t.load_ms:.0f} ms (+{t.compile_ms:.0f} ms kernels)",
                  file=sys.stderr)

    # -- low level, as llama-cpp-python ---------------------------------------------
    @property
    def tokenizer_(self):
        return self._engine.tokenizer

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        tok = self._engine.tokenizer
        return tok.encode(text, add_bos=add_bos and tok.add_bos, special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        tok = self._engine.tokenizer
        return b"".join(tok.token_to_bytes(int(t)) for t in tokens
                        if special or int(t) not in tok.special_ids)

    def n_ctx(self) -> int:
        return self._engine.n_ctx

    def n_vocab(self) -> int:
        return self._engine.n_vocab

    def token_bos(self) -> int:
        return self._engine.tokenizer.bos_id

    def token_eos(self) -> int:
        return self._engine.tokenizer.eos_id

    @property
    def n_tokens(self) -> int:
        return len(self._engine.tokens)

    @property
    def input_ids(self) -> np.ndarray:
        return np.array(self._engine.tokens, dtype=np.intc)

    @property
    def scores(self) -> np.ndarray:
        s = self._engine.scores
        return np.zeros((0, self.n_vocab()), np.float32) if s is None else s

    def reset(self) -> None:
        self._engine.reset()

    def eval(self, tokens: Sequence[int]) -> None:
        self._engine.eval(list(tokens))

    @property
    def timings(self):
        return self._engine.timings

    # -- state, as llama-cpp-python ------------------------------------------------------
    def save_state(self) -> "LlamaState":
        """The evaluated tokens, their KV cache and the last logits (restore with load_state)."""
        e = self._engine
        return LlamaState(input_ids=np.array(e.tokens, dtype=np.intc), scores=self.scores.copy(),
                          n_tokens=len(e.tokens), llama_state=e.save_state())

    def load_state(self, state: "LlamaState") -> None:
        """Restore a save_state(); another model's or cache type's state, or a damaged one, raises ValueError."""
        blob = state.llama_state if isinstance(state, LlamaState) else state
        self._engine.load_state(blob)

    # -- completion ----------------------------------------------------------------
    def __call__(self, prompt, **kwargs):
        return self.create_completion(prompt, **kwargs)

    def _prompt_ids(self, prompt: Union[str, List[int]], special: bool) -> List[int]:
        if isinstance(prompt, (list, tuple)):
            return [int(t) for t in prompt]
        tok = self._engine.tokenizer
        return tok.encode(prompt, add_bos=tok.add_bos, special=special)

    def _options(self, dialect: str, options: dict) -> GenOptions:
        o = build(dialect, options, defaults={"seed": self.seed})
        if o.grammar is not None and not isinstance(o.grammar, Grammar):
            raise TypeError(f"grammar must be a LlamaGrammar, got {type(o.grammar).__name__}")
        return o

    def create_completion(self, prompt: Union[str, List[int]], suffix: Optional[str] = None, *, echo: bool = False,
                          stream: bool = False, model: Optional[str] = None, special: bool = True, **options):
        """llama-cpp-python's create_completion; ``options``: max_tokens (16), temperature (0.8), top_p,
        min_p, typical_p, top_k, logprobs, stop, frequency_penalty, presence_penalty, repeat_penalty,
        seed, mirostat_mode, mirostat_tau, mirostat_eta, logit_bias, repeat_last_n, grammar,
        logits_processor (tinyinfer/options.py: NAMES["llama_cpp"], DEFAULTS). Another name: TypeError."""
        return self._complete(prompt, self._options("llama_cpp", options), suffix, echo, stream, model, special)

    def _complete(self, prompt, opts: GenOptions, suffix=None, echo=False, stream=False, model=None, special=True):
        prompt_ids = self._prompt_ids(prompt, special)
        echo_text = None
        if echo:
            echo_text = prompt if isinstance(prompt, str) else self._engine.tokenizer.decode(prompt_ids)
        it = self._chunks(prompt_ids, opts, model=model or self.model_path, echo_text=echo_text, suffix=suffix)
        if stream:
            return it
        chunks = list(it)
        return merge_completion(chunks, dict(self._last_usage))

    def _chunks(self, prompt_ids, opts: GenOptions, **shape) -> Iterator[dict]:
        stats = GenStats()
        yield from completion_chunks(self._engine, prompt_ids, opts, stats=stats, **shape)
        self._last_usage = stats.usage()
        if self.verbose:
            print(self._engine.timings.report(), file=sys.stderr)

    # -- chat ------------------------------------------------------------------------
    def create_chat_completion(self, messages: List[dict], *, stream: bool = False, model: Optional[str] = None,
                               response_format: Optional[dict] = None, tools: Optional[List[dict]] = None,
                               tool_choice=None, **options):
        """llama-cpp-python's create_chat_completion; ``options`` as create_completion's (temperature 0.2,
        max_tokens None: until the end or the context is full) plus logprobs (bool) / top_logprobs."""
        opts = self._options("llama_cpp_chat", options)
        ids, req_grammar, toolset = prepare_chat(self.chat_formatter, self._engine.tokenizer, messages, tools,
                                                 tool_choice, response_format)
        if opts.grammar is None and req_grammar is not None:
            opts = GenOptions.of(opts, grammar=req_grammar)
        chunks = self._chunks(ids, opts, model=model or self.model_path)
        it = tool_chat_chunks(chat_chunks(chunks), toolset)
        if stream:
            return it
        return merge_chat(list(it), dict(self._last_usage))

@dataclass
class LlamaState:
    """What Llama.save_state returns (llama-cpp-python's fields); ``llama_state`` is the engine's blob."""
    input_ids: np.ndarray
    scores: np.ndarray
    n_tokens: int
    llama_state: bytes

    @property
    def llama_state_size(self) -> int:
        return len(self.llama_state)


_GGML_CACHE_TYPES = {1: "f16", 8: "q8_0", 2: "q4_0"}


def _cache_type(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        if v not in _GGML_CACHE_TYPES:
            raise ValueError(f"KV cache type {v} is not supported; supported: 1 (f16), 8 (q8_0), 2 (q4_0)")
        return _GGML_CACHE_TYPES[v]
    return str(v)
