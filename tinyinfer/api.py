"""``Llama``: the library face, shaped like llama-cpp-python's class of that name."""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np

from .chat import ChatFormatter, chat_prompt_ids
from .embedding import EmbeddingMixin
from .engine import Engine, Step
from .grammar import Grammar, grammar_for_response_format
from .toolcall import ToolSet, ToolStream
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
        from .kernels.matmul import using_config
        with using_config(kernel_config):
            self._engine = Engine(model_path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                  vocab_only=vocab_only, logits_all=logits_all, verbose=verbose,
                                  type_k=_cache_type(type_k if type_k is not None else cache_type_k),
                                  type_v=_cache_type(type_v if type_v is not None else cache_type_v),
                                  defaults=GenOptions(context_shift=context_shift, n_keep=n_keep), split=split)
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


# -- shared with the HTTP server (tinyinfer/server): OpenAI-shaped chunks from Engine.generate ----------

def prepare_chat(formatter, tok, messages, tools=None, tool_choice=None, response_format=None, toolset=None):
    """A chat request -> (prompt ids, grammar or None, ToolSet): tools rendered through the model's own
    template, a forced tool call (tool_choice required / named) or ``response_format`` as the grammar.
    Bad tools, tool_choice or response_format raise ToolError / GrammarError (one line)."""
    if toolset is None:
        toolset = ToolSet(tools, tool_choice, getattr(formatter, "source", ""))
    ids = chat_prompt_ids(formatter, tok, toolset.messages(messages), **toolset.template_kwargs())
    grammar = toolset.call_grammar()
    if grammar is None and response_format is not None:
        grammar = response_format if isinstance(response_format, Grammar) else \
            grammar_for_response_format(response_format)
    return ids, grammar, toolset


def tool_chat_chunks(chunks: Iterator[dict], toolset: ToolSet) -> Iterator[dict]:
    """``chat.completion.chunk`` objects with tool calls parsed out of the content: content streams
    while it cannot be a call; calls come as ``tool_calls`` deltas (one per call, complete arguments)
    before the last chunk, whose finish_reason is then "tool_calls"."""
    if not toolset.active:
        yield from chunks
        return
    ts = ToolStream(toolset)
    for c in chunks:
        ch = c["choices"][0]
        delta = ch["delta"]
        if "content" in delta:
            out = ts.feed(delta["content"])
            if out or ch["logprobs"]:
                yield {**c, "choices": [{**ch, "delta": {"content": out}}]}
            continue
        if ch["finish_reason"] is None:
            yield c
            continue
        rest, calls = ts.finish()
        if rest:
            yield {**c, "choices": [{"index": 0, "delta": {"content": rest}, "logprobs": None, "finish_reason": None}]}
        for i, call in enumerate(calls):
            yield {**c, "choices": [{"index": 0, "logprobs": None, "finish_reason": None,
                                     "delta": {"tool_calls": [{"index": i, **call}]}}]}
        finish = "tool_calls" if calls else ch["finish_reason"]
        yield {**c, "choices": [{**ch, "finish_reason": finish}]}

@dataclass
class GenStats:
    """What one generation did: usage, and wall-clock times split the way llama-server splits them."""
    prompt_tokens: int = 0        # tokens in the prompt
    prompt_evaluated: int = 0     # of those, evaluated now (the rest were reused from the KV cache)
    completion_tokens: int = 0    # tokens sampled (an end-of-generation token included)
    prompt_s: float = 0.0         # from the call to the first sampled token (prompt processing)
    gen_s: float = 0.0            # from the first sampled token to the last (generation)
    finish_reason: Optional[str] = None
    truncated: bool = False       # a JSON reply was closed early to fit max_tokens
    token_ids: List[int] = field(default_factory=list)   # the tokens sampled
    draft_n: int = 0              # speculative decoding: tokens proposed, and of those accepted
    draft_n_accepted: int = 0

    def usage(self, details: bool = False) -> dict:
        """llama-cpp-python's usage; ``details``: with OpenAI's ``prompt_tokens_details.cached_tokens``
        (prompt tokens reused from the KV cache)."""
        u = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
             "total_tokens": self.prompt_tokens + self.completion_tokens}
        if details:
            u["prompt_tokens_details"] = {"cached_tokens": max(0, self.prompt_tokens - self.prompt_evaluated)}
        return u

    def timings(self) -> dict:
        """llama-server's ``timings`` object."""
        pn, pms = self.prompt_evaluated, self.prompt_s * 1000.0
        gn, gms = self.completion_tokens, self.gen_s * 1000.0
        return {"cache_n": max(0, self.prompt_tokens - self.prompt_evaluated),
                "prompt_n": pn, "prompt_ms": pms, "prompt_per_token_ms": pms / pn if pn else 0.0,
                "prompt_per_second": pn * 1000.0 / pms if pms > 0 else 0.0,
                "predicted_n": gn, "predicted_ms": gms, "predicted_per_token_ms": gms / gn if gn else 0.0,
                "predicted_per_second": gn * 1000.0 / gms if gms > 0 else 0.0,
                **({"draft_n": self.draft_n, "draft_n_accepted": self.draft_n_accepted} if self.draft_n else {})}


def completion_chunks(engine: Engine, prompt_ids: List[int], options, *, model: str = "",
                      echo_text: Optional[str] = None, suffix: Optional[str] = None,
                      stats: Optional[GenStats] = None, cid: Optional[str] = None,
                      created: Optional[int] = None) -> Iterator[dict]:
    """OpenAI ``text_completion`` chunks for one run of :meth:`Engine.generate` with ``options`` (a
    :class:`~tinyinfer.options.GenOptions`, or a SamplerParams).

    One chunk per step that produced text or logprobs, the last one with ``finish_reason``.
    ``stats`` (if given) is filled as the run goes; closing the iterator stops generation.
    """
    opts = GenOptions.of(options)
    logprobs = opts.logprobs
    cid = cid or f"cmpl-{uuid.uuid4()}"
    created = int(time.time()) if created is None else created
    stats = stats if stats is not None else GenStats()
    stats.prompt_tokens = len(prompt_ids)
    tok = engine.tokenizer
    offset = 0
    if echo_text:
        offset = len(echo_text)
        yield _chunk(cid, created, model, echo_text, None, None)
    t0 = time.perf_counter()
    t_first = None
    # generation time counts from the end of prompt processing: the first token's sampling
    # belongs to it, so gen_s > 0 even for a single token (tokens/s never divides by zero)
    for step in engine.generate(prompt_ids, opts):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            t = engine.timings        # reset by generate(): so far it holds the prompt only
            stats.prompt_evaluated = t.n_prompt + t.n_eval
            stats.prompt_s = min(now - t0, (t.prompt_ms + t.eval_ms) / 1000.0)
        stats.gen_s = now - t0 - stats.prompt_s
        stats.draft_n, stats.draft_n_accepted = engine.timings.draft_n, engine.timings.draft_n_accepted
        if step.token >= 0:
            stats.completion_tokens += 1
            stats.token_ids.append(step.token)
        lp = None
        if logprobs is not None and step.token >= 0:
            lp = {"tokens": [tok.token_to_bytes(step.token).decode("utf-8", errors="replace")],
                  "text_offset": [offset], "token_logprobs": [step.logprob],
                  "top_logprobs": [{tok.token_to_bytes(i).decode("utf-8", errors="replace"): v
                                    for i, v in (step.top_logprobs or {}).items()}]}
        offset += len(step.text)
        if step.finish_reason:
            stats.finish_reason = step.finish_reason
            stats.truncated = step.truncated
            if suffix:
                yield _chunk(cid, created, model, step.text, lp, None)
                yield _chunk(cid, created, model, suffix, None, step.finish_reason)
                continue
        if step.text or lp is not None or step.finish_reason:
            yield _chunk(cid, created, model, step.text, lp, step.finish_reason, step.truncated)


def _chunk(cid, created, model, text, logprobs, finish, truncated=False):
    choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
    if truncated:      # a JSON reply closed early so that it parses (finish_reason stays "length")
        choice["truncated"] = True
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def _truncated(chunks, key="choices") -> dict:
    return {"truncated": True} if any(c[key] and c[key][0].get("truncated") for c in chunks) else {}


def merge_completion(chunks: list, usage: Optional[dict] = None) -> dict:
    """One ``text_completion`` object from its chunks."""
    first = chunks[0]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    logprobs = None
    if lps:
        logprobs = {k: [x for lp in lps for x in lp[k]]
                    for k in ("tokens", "text_offset", "token_logprobs", "top_logprobs")}
    finish = next((c["choices"][0]["finish_reason"] for c in reversed(chunks) if c["choices"][0]["finish_reason"]),
                  None)
    return {"id": first["id"], "object": "text_completion", "created": first["created"], "model": first["model"],
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish,
                         **_truncated(chunks)}],
            "usage": usage}




def _chat_logprobs(lp: Optional[dict]) -> Optional[dict]:
    """Completion-style logprobs of one step -> the chat ``{"content": [...]}`` shape."""
    if not lp:
        return None
    content = []
    for text, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                                         for t, v in (top or {}).items()]})
    return {"content": content}


def chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    """``text_completion`` chunks -> ``chat.completion.chunk`` objects (role first, finish last)."""
    first = True
    for c in chunks:
        cid = "chat" + c["id"][4:] if c["id"].startswith("cmpl") else c["id"]
        base = {"id": cid, "object": "chat.completion.chunk", "created": c["created"], "model": c["model"]}
        if first:
            yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
            first = False
        ch = c["choices"][0]
        lp = _chat_logprobs(ch["logprobs"])
        if ch["text"] or lp:
            yield {**base, "choices": [{"index": 0, "delta": {"content": ch["text"]}, "logprobs": lp,
                                        "finish_reason": None}]}
        if ch["finish_reason"]:
            yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": ch["finish_reason"], **_truncated([c])}]}




def merge_chat(parts: list, usage: Optional[dict] = None) -> dict:
    """One ``chat.completion`` object from its chunks."""
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in parts)
    calls = [{k: v for k, v in tc.items() if k != "index"}
             for p in parts for tc in p["choices"][0]["delta"].get("tool_calls", [])]
    message = {"role": "assistant", "content": text}
    if calls:
        message = {"role": "assistant", "content": text or None, "tool_calls": calls}
    lps = [x for p in parts if p["choices"][0]["logprobs"] for x in p["choices"][0]["logprobs"]["content"]]
    first = parts[0]
    finish = next((p["choices"][0]["finish_reason"] for p in reversed(parts) if p["choices"][0]["finish_reason"]),
                  None)
    return {"id": first["id"], "object": "chat.completion", "created": first["created"], "model": first["model"],
            "choices": [{"index": 0, "message": message,
                         "logprobs": {"content": lps} if lps else None, "finish_reason": finish,
                         **_truncated(parts)}],
            "usage": usage}
