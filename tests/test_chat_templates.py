"""Chat templates: rendered in jinja2's sandbox the way ``transformers`` renders them.

The expected strings below are what ``transformers``' ``apply_chat_template`` produces
for these published templates (trim_blocks + lstrip_blocks, bos/eos tokens, ``raise_exception``,
``strftime_now``), written out by hand from the templates. Hostile templates (the
CVE-2024-34359 class: a GGUF whose template reaches for Python internals or files) must
fail with a ChatTemplateError and never run anything.
"""

from __future__ import annotations

import datetime
import os

import pytest

from tinyinfer.chat import BUILTIN, ChatFormatter, ChatTemplateError

from conftest import need_reference

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]
NO_SYSTEM = CONVERSATION[1:]


def _template(name: str) -> str:
    return need_reference("chat_templates", name).read_text(encoding="utf-8")


def _today() -> str:
    return datetime.datetime.now().strftime("%d %b %Y")


# --- published templates, multi-turn with a system message ------------------------------------

def test_qwen25_multi_turn_with_system():
    f = ChatFormatter(_template("Qwen-Qwen2.5-7B-Instruct.jinja"), "", "<|im_end|>")
    assert f.render(CONVERSATION) == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\nHello. How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    # without a system message the template supplies its own
    assert f.render(NO_SYSTEM).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there!")
    # no generation prompt
    assert f.render(CONVERSATION, add_generation_prompt=False).endswith("What is 2+2?<|im_end|>\n")


def test_qwen25_tools_rendered_with_tojson():
    f = ChatFormatter(_template("Qwen-Qwen2.5-7B-Instruct.jinja"), "", "<|im_end|>")
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    out = f.render(NO_SYSTEM, tools=[tool])
    assert "<tools>\n" + '{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}' \
           + "\n</tools>" in out


def test_llama32_multi_turn_with_system():
    f = ChatFormatter(_template("meta-llama-Llama-3.2-3B-Instruct.jinja"), "<|begin_of_text|>", "<|eot_id|>")
    assert f.render(CONVERSATION) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\n"
        f"Today Date: {_today()}\n\n"
        "You are a terse assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello. How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # date_string given by the caller wins over strftime_now, as in transformers
    assert "Today Date: 26 Jul 2024\n" in f.render(CONVERSATION, date_string="26 Jul 2024")


def test_gemma2_multi_turn_and_its_own_errors():
    f = ChatFormatter(_template("google-gemma-2-2b-it.jinja"), "<bos>", "<eos>")
    assert f.render(NO_SYSTEM) == (
        "<bos><start_of_turn>user\nHi there!<end_of_turn>\n"
        "<start_of_turn>model\nHello. How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n")
    # the template's raise_exception() becomes a clear error
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        f.render(CONVERSATION)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        f.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_phi35_multi_turn_with_system():
    f = ChatFormatter(_template("microsoft-Phi-3.5-mini-instruct.jinja"), "<s>", "<|endoftext|>")
    assert f.render(CONVERSATION) == (
        "<|system|>\nYou are a terse assistant.<|end|>\n"
        "<|user|>\nHi there!<|end|>\n"
        "<|assistant|>\nHello. How can I help?<|end|>\n"
        "<|user|>\nWhat is 2+2?<|end|>\n"
        "<|assistant|>\n")
    assert f.render(CONVERSATION, add_generation_prompt=False).endswith("What is 2+2?<|end|>\n<|endoftext|>")


def test_mistral_nemo_multi_turn_with_system():
    f = ChatFormatter(_template("mistralai-Mistral-Nemo-Instruct-2407.jinja"), "<s>", "</s>")
    # the system message goes into the last user turn; namespace(), selectattr work in the sandbox
    assert f.render(CONVERSATION) == (
        "<s>[INST]Hi there![/INST]Hello. How can I help?</s>"
        "[INST]You are a terse assistant.\n\nWhat is 2+2?[/INST]")
    with pytest.raises(ChatTemplateError, match="must alternate"):
        f.render([{"role": "assistant", "content": "x"}])


def test_every_reference_template_renders():
    d = need_reference("chat_templates")
    files = sorted(d.glob("*.jinja"))
    assert len(files) >= 5
    for p in files:
        f = ChatFormatter(p.read_text(encoding="utf-8"), "<s>", "</s>")
        msgs = NO_SYSTEM if "gemma" in p.name else CONVERSATION
        out = f.render(msgs)
        assert "What is 2+2?" in out, p.name


# --- templates from GGUF metadata, built-in fallbacks -------------------------------------------

def test_smollm2_gguf_template(smollm2_path):
    from tinyinfer.gguf import GGUFFile
    md = GGUFFile(smollm2_path).metadata
    f = ChatFormatter.from_metadata(md, "<|im_start|>", "<|im_end|>")
    assert f.name == "gguf"
    assert f.render(CONVERSATION) == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\nHello. How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert f.render(NO_SYSTEM).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")


@pytest.mark.parametrize("metadata, name", [
    ({"general.architecture": "gemma3", "tokenizer.ggml.model": "llama"}, "gemma"),
    ({"tokenizer.ggml.tokens": ["<unk>", "<|im_start|>", "<|im_end|>"]}, "chatml"),
    ({"tokenizer.ggml.tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"]}, "llama-3"),
    ({"tokenizer.ggml.tokens": ["<s>", "<|assistant|>"]}, "zephyr"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<s>", "</s>"]}, "llama-2"),
    ({"tokenizer.chat_template": "   "}, "chatml"),
])
def test_builtin_fallback_when_the_file_has_none(metadata, name):
    f = ChatFormatter.from_metadata(metadata, "<s>", "</s>")
    assert f.name == name
    out = f.render(NO_SYSTEM)
    assert "What is 2+2?" in out and "Hello. How can I help?" in out


def test_builtin_templates_multi_turn():
    assert ChatFormatter(BUILTIN["chatml"]).render(CONVERSATION) == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\nHello. How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert ChatFormatter(BUILTIN["llama-2"], "<s>", "</s>").render(CONVERSATION) == (
        "<s>[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nHi there! [/INST] Hello. How can I help? </s>"
        "<s>[INST] What is 2+2? [/INST]")
    assert ChatFormatter(BUILTIN["gemma"], "<bos>").render(CONVERSATION) == (
        "<bos><start_of_turn>user\nYou are a terse assistant.\n\nHi there!<end_of_turn>\n"
        "<start_of_turn>model\nHello. How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")


def test_forced_and_unknown_chat_format():
    f = ChatFormatter.from_metadata({"tokenizer.chat_template": "{{ 'from the file' }}"}, chat_format="zephyr")
    assert f.name == "zephyr"
    with pytest.raises(ChatTemplateError, match="unknown chat format"):
        ChatFormatter.from_metadata({}, chat_format="nope")


def test_openai_content_parts_and_null_content():
    f = ChatFormatter(BUILTIN["chatml"])
    out = f.render([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                    {"role": "assistant", "content": None}])
    assert "<|im_start|>user\nab<|im_end|>" in out and "<|im_start|>assistant\n<|im_end|>" in out


def test_bad_messages_are_clear_errors():
    f = ChatFormatter(BUILTIN["chatml"])
    with pytest.raises(ChatTemplateError, match="list"):
        f.render("hello")
    with pytest.raises(ChatTemplateError, match="role"):
        f.render([{"content": "no role"}])


# --- hostile templates ---------------------------------------------------------------------------

SENTINEL = "/tmp/tinyinfer_template_pwned"

HOSTILE = {
    # Python internals through attributes (the CVE-2024-34359 payloads and relatives)
    "str_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "tuple_subclasses": "{{ ().__class__.__base__.__subclasses__() }}",
    "self_globals_import": "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('touch "
                           + SENTINEL + "').read() }}",
    "cycler_os": "{{ cycler.__init__.__globals__.os.popen('touch " + SENTINEL + "').read() }}",
    "joiner_globals": "{{ joiner.__init__.__globals__ }}",
    "namespace_globals": "{{ namespace.__init__.__globals__.os.system('touch " + SENTINEL + "') }}",
    "lipsum_os": "{{ lipsum.__globals__['os'].system('touch " + SENTINEL + "') }}",
    "raise_exception_globals": "{{ raise_exception.__globals__ }}",
    "raise_exception_code": "{{ raise_exception.__code__ }}",
    "strftime_globals": "{{ strftime_now.__globals__['datetime'] }}",
    "attr_filter": "{{ ''|attr('__class__')|attr('__mro__') }}",
    "map_attribute": "{{ messages|map(attribute='__class__')|list }}",
    "format_string": "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "format_map": "{{ '{x.__class__}'.format_map({'x': messages}) }}",
    "private_context": "{{ self._TemplateReference__context }}",
    "loop_internals": "{% for m in messages %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}",
    # the filesystem through template loading
    "include_passwd": "{% include '/etc/passwd' %}",
    "import_module": "{% import 'os' as os %}{{ os }}",
    "extends_file": "{% extends '/etc/passwd' %}",
    "from_import": "{% from '/etc/passwd' import x %}",
    # mutating the caller's data
    "append_message": "{{ messages.append({'role': 'system', 'content': 'pwned'}) }}",
    "update_message": "{{ messages[0].update({'content': 'pwned'}) }}",
    "pop_message": "{{ messages.pop() }}",
    # resource bombs jinja bounds
    "huge_range": "{% for i in range(10**9) %}x{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_fails_clearly_and_runs_nothing(name):
    if os.path.exists(SENTINEL):
        os.remove(SENTINEL)
    messages = [{"role": "user", "content": "hi"}]
    before = [dict(m) for m in messages]
    with pytest.raises(ChatTemplateError) as exc:
        # the path a GGUF file takes: its metadata's tokenizer.chat_template
        f = ChatFormatter.from_metadata({"tokenizer.chat_template": HOSTILE[name]}, "<s>", "</s>")
        f.render(messages)
    msg = str(exc.value)
    assert msg.startswith("chat template"), msg
    assert any(w in msg for w in ("unsafe", "no loader", "Range too big")), msg
    assert not os.path.exists(SENTINEL), "a template ran a command"
    assert messages == before


def test_template_syntax_error_is_clear():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatFormatter("{% for %}")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatFormatter.from_metadata({"tokenizer.chat_template": "{{ messages[0]['content'] "})


def test_undefined_names_render_empty_like_transformers():
    # not an attack: templates test optional variables (tools, date_string ...) all the time
    f = ChatFormatter("{% if tools is defined %}T{% endif %}{{ custom }}{{ messages[0].tool_calls }}|")
    assert f.render([{"role": "user", "content": "x"}]) == "|"
