"""Chat templates: the GGUF's ``tokenizer.chat_template`` rendered in jinja2's sandbox.

Rendered the way ``transformers`` does it (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception``, ``strftime_now``) in an
``ImmutableSandboxedEnvironment``, so a hostile template cannot reach Python
internals or the filesystem (the CVE-2024-34359 class). Files without a template
fall back to a built-in one chosen from the architecture / vocabulary.
"""

from __future__ import annotations

import datetime
from typing import Optional

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template failed to render (bad template, refused operation, bad messages)."""


BUILTIN = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system %}{{ bos_token + '[INST] <<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}


def _raise(msg):
    raise ChatTemplateError(f"chat template raised: {msg}")


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's sandbox, but an unsafe attribute fails at once: the stock sandbox returns an
    Undefined that prints as "" (``{{ raise_exception.__globals__ }}`` would render silently)."""

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _env() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined,
                   extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env


def _tojson(x, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    import json
    return json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def guess_builtin(metadata: dict) -> str:
    """Pick a built-in template for a file that has none (as llama.cpp guesses from the vocabulary)."""
    toks = metadata.get("tokenizer.ggml.tokens") or []
    arch = metadata.get("general.architecture", "")
    vocab = set(toks[:300]) | set(toks[-300:]) if toks else set()
    if arch.startswith("gemma") or "<start_of_turn>" in vocab:
        return "gemma"
    if "<|start_header_id|>" in vocab or "<|eot_id|>" in vocab:
        return "llama-3"
    if "<|im_start|>" in vocab:
        return "chatml"
    if "<|assistant|>" in vocab:
        return "zephyr"
    return "llama-2" if metadata.get("tokenizer.ggml.model") == "llama" else "chatml"


class ChatFormatter:
    def __init__(self, template: str, bos_token: str = "", eos_token: str = "", name: str = "gguf"):
        self.name = name
        self.source = template
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self.template = _env().from_string(template)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not parse: {e}") from None

    @classmethod
    def from_metadata(cls, metadata: dict, bos_token: str = "", eos_token: str = "",
                      chat_format: Optional[str] = None) -> "ChatFormatter":
        if chat_format and chat_format not in ("auto", "gguf"):
            if chat_format not in BUILTIN:
                raise ChatTemplateError(f"unknown chat format {chat_format!r}; known: {', '.join(BUILTIN)}")
            return cls(BUILTIN[chat_format], bos_token, eos_token, name=chat_format)
        tmpl = metadata.get("tokenizer.chat_template")
        if isinstance(tmpl, str) and tmpl.strip():
            return cls(tmpl, bos_token, eos_token, name="gguf")
        name = guess_builtin(metadata)
        return cls(BUILTIN[name], bos_token, eos_token, name=name)

    @classmethod
    def for_tokenizer(cls, metadata: dict, tok, chat_format: Optional[str] = None) -> "ChatFormatter":
        """The file's template (or a built-in one) with the tokenizer's BOS / EOS texts."""
        def text(i):
            return tok.token_text(i) if i is not None else ""
        return cls.from_metadata(metadata, text(tok.bos_id), text(tok.eos_id), chat_format=chat_format)

    def render(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        if not isinstance(messages, (list, tuple)):
            raise ChatTemplateError("messages must be a list of {role, content} objects")
        msgs = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ChatTemplateError("each message needs a 'role' and 'content'")
            m = dict(m)
            c = m.get("content")
            if isinstance(c, list):  # OpenAI content parts: keep the text parts
                m["content"] = "".join(p.get("text", "") for p in c if isinstance(p, dict))
            elif c is None:
                m["content"] = ""
            msgs.append(m)
        try:
            return self.template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"chat template refused by the sandbox: {e}") from None
        except Exception as e:  # a template is data from the file: any failure is its error
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def chat_prompt_ids(formatter, tok, messages, tools=None) -> list:
    """Render ``messages`` (and ``tools``, OpenAI function specs the template may list) with the chat
    template and tokenize (special tokens parsed, BOS once)."""
    extra = {"tools": tools} if tools else {}
    prompt = formatter.render(messages, add_generation_prompt=True, **extra)
    ids = tok.encode(prompt, add_bos=False, special=True)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids
