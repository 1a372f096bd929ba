"""``Llama``: the library face, shaped like llama-cpp-python's class of that name."""

from __future__ import annotations

import sys
import time
import uuid
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np

from .chat import ChatFormatter
from .engine import Engine, Step
from .sampler import SamplerParams


def _sampler_params(temperature, top_k, top_p, min_p, typical_p, repeat_penalty, repeat_last_n,
                    presence_penalty, frequency_penalty, mirostat_mode, mirostat_tau, mirostat_eta,
                    seed, logit_bias) -> SamplerParams:
    return SamplerParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
        repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, mirostat=mirostat_mode, mirostat_tau=mirostat_tau,
        mirostat_eta=mirostat_eta, seed=seed,
        logit_bias={int(k): float(v) for k, v in (logit_bias or {}).items()})


class Llama:
    def __init__(self, model_path: str, *, n_ctx: int = 512, n_batch: int = 512, n_threads: Optional[int] = None,
                 seed: int = -1, vocab_only: bool = False, logits_all: bool = False, verbose: bool = True,
                 chat_format: Optional[str] = None, **_ignored):
        self.model_path = str(model_path)
        self.verbose = verbose
        self.seed = seed
        self._engine = Engine(model_path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                              vocab_only=vocab_only, logits_all=logits_all, verbose=verbose)
        tok = self._engine.tokenizer
        self.metadata = {k: v for k, v in self._engine.gguf.metadata.items() if isinstance(v, (str, int, float))}
        self.chat_formatter = ChatFormatter.from_metadata(
            self._engine.gguf.metadata,
            bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
            eos_token=tok.token_text(tok.eos_id) if tok.eos_id is not None else "",
            chat_format=chat_format)
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

    # -- completion ----------------------------------------------------------------
    def __call__(self, prompt, **kwargs):
        return self.create_completion(prompt, **kwargs)

    def _prompt_ids(self, prompt: Union[str, List[int]], special: bool) -> List[int]:
        if isinstance(prompt, (list, tuple)):
            return [int(t) for t in prompt]
        tok = self._engine.tokenizer
        return tok.encode(prompt, add_bos=tok.add_bos, special=special)

    def create_completion(self, prompt: Union[str, List[int]], suffix: Optional[str] = None, max_tokens: Optional[int] = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
                          logprobs: Optional[int] = None, echo: bool = False, stop: Optional[Union[str, List[str]]] = None,
                          frequency_penalty: float = 0.0, presence_penalty: float = 0.0, repeat_penalty: float = 1.0,
                          top_k: int = 40, stream: bool = False, seed: Optional[int] = None,
                          mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model: Optional[str] = None, logit_bias: Optional[dict] = None, repeat_last_n: int = 64,
                          special: bool = True, **_ignored):
        it = self._completion_chunks(prompt, suffix, max_tokens, temperature, top_p, min_p, typical_p, logprobs, echo,
                                     stop, frequency_penalty, presence_penalty, repeat_penalty, top_k, seed,
                                     mirostat_mode, mirostat_tau, mirostat_eta, model, logit_bias, repeat_last_n,
                                     special)
        if stream:
            return it
        result = _merge_completion(list(it))
        result["usage"] = dict(self._last_usage)
        return result

    def _completion_chunks(self, prompt, suffix, max_tokens, temperature, top_p, min_p, typical_p, logprobs, echo,
                           stop, frequency_penalty, presence_penalty, repeat_penalty, top_k, seed, mirostat_mode,
                           mirostat_tau, mirostat_eta, model, logit_bias, repeat_last_n, special) -> Iterator[dict]:
        cid = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model or self.model_path
        prompt_ids = self._prompt_ids(prompt, special)
        if seed is None:
            seed = self.seed
        params = _sampler_params(temperature, top_k, top_p, min_p, typical_p, repeat_penalty, repeat_last_n,
                                 presence_penalty, frequency_penalty, mirostat_mode, mirostat_tau, mirostat_eta,
                                 None if seed is None or seed < 0 else seed, logit_bias)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if max_tokens is None or max_tokens <= 0:
            max_tokens = -1
        tok = self._engine.tokenizer
        n_gen = 0
        offset = 0
        if echo:
            text = prompt if isinstance(prompt, str) else tok.decode(prompt_ids)
            offset = len(text)
            yield _chunk(cid, created, model_name, text, None, None)
        finish = None
        for step in self._engine.generate(prompt_ids, params, max_tokens=max_tokens, stop=stops,
                                          logprobs=logprobs):
            if step.token >= 0:
                n_gen += 1
            lp = None
            if logprobs is not None and step.token >= 0:
                lp = {"tokens": [tok.token_to_bytes(step.token).decode("utf-8", errors="replace")],
                      "text_offset": [offset], "token_logprobs": [step.logprob],
                      "top_logprobs": [{tok.token_to_bytes(i).decode("utf-8", errors="replace"): v
                                        for i, v in (step.top_logprobs or {}).items()}]}
            offset += len(step.text)
            finish = step.finish_reason
            if step.text or lp is not None or finish:
                yield _chunk(cid, created, model_name, step.text, lp, finish)
        if suffix:
            yield _chunk(cid, created, model_name, suffix, None, None)
        self._last_usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n_gen,
                            "total_tokens": len(prompt_ids) + n_gen}
        if self.verbose:
            print(self._engine.timings.report(), file=sys.stderr)

    # -- chat ------------------------------------------------------------------------
    def create_chat_completion(self, messages: List[dict], temperature: float = 0.2, top_p: float = 0.95,
                               top_k: int = 40, min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False,
                               stop: Optional[Union[str, List[str]]] = None, seed: Optional[int] = None,
                               max_tokens: Optional[int] = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0,
                               mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                               model: Optional[str] = None, logit_bias: Optional[dict] = None,
                               logprobs: Optional[bool] = None, top_logprobs: Optional[int] = None, **_ignored):
        prompt = self.chat_formatter.render(messages, add_generation_prompt=True)
        tok = self._engine.tokenizer
        ids = tok.encode(prompt, add_bos=False, special=True)
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id] + ids
        chunks = self.create_completion(
            ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            typical_p=typical_p, stream=True, stop=stop, seed=seed, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model, logit_bias=logit_bias,
            logprobs=(top_logprobs or 0) if logprobs else None)
        it = _chat_chunks(chunks)
        if stream:
            return it
        parts = list(it)
        text = "".join(p["choices"][0]["delta"].get("content", "") for p in parts)
        first = parts[0]
        return {"id": "chat" + first["id"][4:] if first["id"].startswith("cmpl") else first["id"],
                "object": "chat.completion", "created": first["created"], "model": first["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": parts[-1]["choices"][0]["finish_reason"]}],
                "usage": dict(self._last_usage)}


def _chunk(cid, created, model, text, logprobs, finish):
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}


def _merge_completion(chunks: list) -> dict:
    first = chunks[0]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    logprobs = None
    if lps:
        logprobs = {k: sum((lp[k] for lp in lps), []) for k in ("tokens", "text_offset", "token_logprobs",
                                                               "top_logprobs")}
    return {"id": first["id"], "object": "text_completion", "created": first["created"], "model": first["model"],
            "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                         "finish_reason": chunks[-1]["choices"][0]["finish_reason"]}],
            "usage": None}


def _chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    first = True
    for c in chunks:
        cid = "chat" + c["id"][4:]
        base = {"id": cid, "object": "chat.completion.chunk", "created": c["created"], "model": c["model"]}
        if first:
            yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
            first = False
        ch = c["choices"][0]
        if ch["text"]:
            yield {**base, "choices": [{"index": 0, "delta": {"content": ch["text"]}, "logprobs": None,
                                        "finish_reason": None}]}
        if ch["finish_reason"]:
            yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": ch["finish_reason"]}]}
