"""OpenAI-shaped chunks from :meth:`Engine.generate`, shared by the library (:class:`tinyinfer.api.Llama`)
and the HTTP server (tinyinfer/server): chat preparation with tools, ``text_completion`` chunks and their
merge, ``chat.completion.chunk`` conversion, tool-call parsing, and :class:`GenStats` (usage, llama-server's
timings)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

from .chat import chat_prompt_ids
from .engine import Engine
from .grammar import Grammar, grammar_for_response_format
from .options import GenOptions
from .toolcall import ToolSet, ToolStream


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
