"""One options object per generation, built in one place from each face's names.

:class:`GenOptions` holds what one run of :meth:`tinyinfer.engine.Engine.generate` needs besides the
prompt: the sampler's parameters (a :class:`~tinyinfer.sampler.SamplerParams`) and the generation's
own (max_tokens, stop, logprobs, grammar, n_keep, ...). Each face speaks a dialect with its own names
and defaults; :func:`build` maps them through two tables:

* ``NAMES[dialect]``: the dialect's name -> the canonical name (a GenOptions field, or a SamplerParams
  field). A name not in the table is a TypeError naming it (``strict``: the library, as
  llama-cpp-python's keyword arguments) or is ignored (the HTTP server, as llama-server and ollama
  ignore unknown JSON fields).
* ``DEFAULTS[dialect]``: the dialect's defaults where they differ from the dataclasses' (llama.cpp's).
  This is the one place where a face's defaults are decided.

Adding a sampler option: a SamplerParams field, its stage in the chain (sampler.py), and its names in
``NAMES``; nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional

from .sampler import SamplerParams

_SAMPLER = set(SamplerParams.__dataclass_fields__)


@dataclass
class GenOptions:
    """Everything one generation is asked besides its prompt."""
    sampler: SamplerParams = field(default_factory=SamplerParams)
    max_tokens: int = -1                    # < 0: until an end token (or the context is full)
    stop: List[str] = field(default_factory=list)
    logprobs: Optional[int] = None          # None: none; n >= 0: the sampled token's and the top n
    grammar: Any = None                     # a tinyinfer.grammar.Grammar
    ignore_eos: bool = False
    n_keep: Optional[int] = None            # tokens a context shift keeps (-1 = the prompt); None: the engine's
    context_shift: Optional[bool] = None    # None: the engine's setting
    cache_prompt: Optional[bool] = None     # None: the engine's setting (reuse a cached prefix)
    logits_processor: Optional[Callable] = None
    # speculative decoding (tinyinfer/speculative.py); None: the engine's setting
    draft_model: Any = None                 # a Proposer, a LlamaPromptLookupDecoding, a draft Llama or a callable
    draft_n_max: Optional[int] = None       # the most tokens a draft model proposes at once (llama.cpp: 3)
    draft_n_min: Optional[int] = None       # fewer proposed tokens than this: not checked (llama.cpp: 0)
    draft_p_min: Optional[float] = None     # a draft model stops below this probability (llama.cpp: 0.0)

    def __post_init__(self):
        for name in ("max_tokens", "n_keep", "logprobs", "draft_n_max", "draft_n_min"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                if not (isinstance(v, float) and v.is_integer()):
                    raise ValueError(f"{name} must be an integer, got {v!r}")
                setattr(self, name, int(v))
        for name in ("ignore_eos", "context_shift", "cache_prompt"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {v!r}")
        self.max_tokens = -1 if self.max_tokens is None or self.max_tokens < 0 else self.max_tokens
        s = self.stop
        if s is not None and not isinstance(s, (str, list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {s!r}")
        self.stop = [s] if isinstance(s, str) else [str(x) for x in (s or [])]
        if self.logprobs is not None:
            if self.logprobs < 0:
                raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        for name in ("draft_n_max", "draft_n_min"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        p = self.draft_p_min
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"draft_p_min must be a number in [0, 1], got {p!r}")
            self.draft_p_min = float(p)

    @classmethod
    def of(cls, options=None, **changes) -> "GenOptions":
        """``options`` (a GenOptions, a SamplerParams or None) with ``changes`` (GenOptions fields;
        another name is a TypeError)."""
        if isinstance(options, GenOptions):
            return dataclasses.replace(options, **changes) if changes else options
        if options is not None and not isinstance(options, SamplerParams):
            raise TypeError(f"expected GenOptions or SamplerParams, got {type(options).__name__}")
        bad = sorted(set(changes) - set(cls.__dataclass_fields__) | ({"sampler"} & set(changes)))
        if bad:
            raise TypeError(f"unexpected keyword argument {bad[0]!r}")
        return cls(sampler=options or SamplerParams(), **changes)


def _same(*names) -> dict:
    return {n: n for n in names}


_COMMON = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
           "presence_penalty", "frequency_penalty", "mirostat_tau", "mirostat_eta", "seed", "stop")

#: speculative decoding: llama.cpp's flags (argparse dest names) and llama-server's request fields
_SPEC_CLI = {"spec_draft_n_max": "draft_n_max", "spec_draft_n_min": "draft_n_min", "spec_draft_p_min": "draft_p_min"}
_SPEC_SERVER = {"speculative.n_max": "draft_n_max", "speculative.n_min": "draft_n_min",
                "speculative.p_min": "draft_p_min"}

#: each dialect's names -> the canonical ones (GenOptions / SamplerParams fields)
NAMES = {
    # llama-cli's flags (argparse's dest names)
    "cli": {**_same("top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
                    "frequency_penalty", "mirostat", "seed", "ignore_eos", "context_shift", "grammar"),
            "temp": "temperature", "typical": "typical_p", "mirostat_lr": "mirostat_eta",
            "mirostat_ent": "mirostat_tau", "n_predict": "max_tokens", "reverse_prompt": "stop", "keep": "n_keep",
            **_SPEC_CLI},
    # llama.cpp's common_params_sampling names (llama-server accepts several of them too)
    "llama.cpp": {**_same(*_COMMON, "mirostat", "logit_bias", "min_keep"), "temp": "temperature",
                  "typ_p": "typical_p", "typical": "typical_p", "penalty_repeat": "repeat_penalty",
                  "penalty_last_n": "repeat_last_n", "penalty_freq": "frequency_penalty",
                  "penalty_present": "presence_penalty", "mirostat_ent": "mirostat_tau",
                  "mirostat_lr": "mirostat_eta", "n_predict": "max_tokens", **_SPEC_SERVER},
    # llama-cpp-python's Llama.create_completion keywords
    "llama_cpp": {**_same(*_COMMON, "max_tokens", "logprobs", "logit_bias", "grammar", "logits_processor"),
                  "mirostat_mode": "mirostat"},
    # the OpenAI-shaped server bodies (llama-cpp-python's server, plus llama-server's extras)
    "openai": {**_same(*_COMMON, "max_tokens", "logprobs", "logit_bias", "cache_prompt", "n_keep", "ignore_eos"),
               "mirostat_mode": "mirostat", "max_completion_tokens": "max_tokens", "n_predict": "max_tokens",
               "top_logprobs": "top_logprobs", **_SPEC_SERVER},
    # ollama's "options"
    "ollama": {**_same(*_COMMON, "mirostat", "n_keep"), "num_predict": "max_tokens", "num_keep": "n_keep"},
}
NAMES["llama_cpp_chat"] = {**NAMES["llama_cpp"], "top_logprobs": "top_logprobs"}
NAMES["openai_chat"] = NAMES["openai"]

#: each dialect's defaults, where they differ from SamplerParams' / GenOptions' (llama.cpp's)
DEFAULTS = {
    "cli": {},
    "llama.cpp": {},
    "llama_cpp": {"max_tokens": 16},
    "llama_cpp_chat": {"temperature": 0.2},
    # llama-server's: no repeat penalty, no token limit (until an end token, a stop or the context's end)
    "openai": {"cache_prompt": True},
    "openai_chat": {"cache_prompt": True},
    "ollama": {"top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1},
}


_ZERO_IS_ALL = {"llama_cpp", "llama_cpp_chat", "openai", "openai_chat"}

#: a server body may name one option twice (llama-server reads n_predict, then max_tokens): the name
#: earlier here wins there; a library call (strict) naming it twice is an error
_PRECEDENCE = ("n_predict", "max_completion_tokens", "max_tokens")


def _rank(name: str) -> int:
    return _PRECEDENCE.index(name) if name in _PRECEDENCE else len(_PRECEDENCE)


class OptionError(ValueError):
    """A bad value of one option; ``field`` is its name in the caller's dialect."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def build(dialect: str, values: Mapping[str, Any], *, strict: bool = True,
          defaults: Optional[Mapping[str, Any]] = None) -> GenOptions:
    """GenOptions from ``values`` named in ``dialect`` (see NAMES), over DEFAULTS[dialect] and then
    ``defaults`` (canonical names: a face's own, e.g. ``Llama(seed=...)``). One option named twice: a TypeError
    when ``strict``, else the name earlier in _PRECEDENCE wins (llama-server's order).

    A sampler value of None means the default; a seed < 0 means a random one. Unknown names: TypeError
    naming them when ``strict``, else ignored. A bad value: OptionError naming the dialect's field."""
    names = NAMES[dialect]
    unknown = [k for k in values if k not in names]
    if unknown and strict:
        raise TypeError(f"unexpected keyword argument{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(k) for k in unknown)}")
    canon = {**DEFAULTS[dialect], **(defaults or {})}
    given = {}                               # canonical name -> the dialect's name (for errors)
    for k, v in values.items():
        if k not in names:
            continue
        c = names[k]
        if c in given and given[c] != k:
            if strict:
                raise TypeError(f"{k!r} and {given[c]!r} name the same option")
            if _rank(k) >= _rank(given[c]):
                continue
        given[c] = k
        if v is None and c in _SAMPLER:
            continue
        canon[c] = v
    top = canon.pop("top_logprobs", None)
    if isinstance(canon.get("logprobs"), bool):  # the chat shape: logprobs true + top_logprobs n
        canon["logprobs"] = (top or 0) if canon["logprobs"] else None
    if dialect in _ZERO_IS_ALL and canon.get("max_tokens") == 0:
        canon["max_tokens"] = -1            # llama-cpp-python / OpenAI: 0 or null = no limit
    seed = canon.get("seed")
    if seed is not None and not isinstance(seed, bool) and isinstance(seed, (int, float)) and seed < 0:
        canon["seed"] = None
    samp = {}
    for c in [c for c in canon if c in _SAMPLER]:
        v = canon.pop(c)
        try:
            SamplerParams(**{c: v})         # one at a time, so that an error names its field
        except (ValueError, TypeError) as e:
            raise OptionError(given.get(c, c), str(e)) from None
        samp[c] = v
    try:
        return GenOptions(sampler=SamplerParams(**samp), **canon)
    except (ValueError, TypeError) as e:
        bad = next((given.get(c, c) for c in canon if c in str(e)), dialect)
        raise OptionError(bad, str(e)) from None


def accepted(dialect: str) -> str:
    """The names a dialect accepts, for docstrings and error hints."""
    return ", ".join(sorted(NAMES[dialect]))
