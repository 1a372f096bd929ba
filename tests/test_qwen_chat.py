"""Qwen2.5 chat with the file's own template (ChatML turns, tools) through the library, the CLI's chat
mode and the HTTP server; <|im_end|> ends generation (finish_reason "stop", nothing after it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tinyinfer import Llama
from tinyinfer.chat import chat_prompt_ids

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "What is 2+2? Answer with the number only."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def llm(qwen25_path):
    return Llama(str(qwen25_path), n_ctx=1024, n_threads=2, verbose=False)


def test_the_files_template_renders_chatml(llm):
    assert llm.chat_format == "gguf"
    tok = llm._engine.tokenizer
    ids = chat_prompt_ids(llm.chat_formatter, tok, QUESTION)
    text = tok.decode(ids, special=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nWhat is 2+2? Answer with the number only.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ids[0] == tok.token_to_id("<|im_start|>")          # no BOS: add_bos_token is false
    with_tools = tok.decode(chat_prompt_ids(llm.chat_formatter, tok, QUESTION, tools=TOOLS), special=True)
    assert "# Tools" in with_tools and '"name": "get_weather"' in with_tools and "<tool_call>" in with_tools


def test_library_chat_stops_at_im_end(llm):
    r = llm.create_chat_completion(messages=QUESTION, temperature=0, max_tokens=32)
    ch = r["choices"][0]
    assert ch["finish_reason"] == "stop" and ch["message"]["content"].strip() == "4"
    assert r["usage"]["completion_tokens"] <= 3     # "4" then <|im_end|>
    r = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                                   tools=TOOLS, temperature=0, max_tokens=48)
    msg = r["choices"][0]["message"]          # parsed into tool_calls (tinyinfer/toolcall.py)
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather", msg


def test_cli_chat_mode(qwen25_path):
    p = subprocess.run([sys.executable, "-m", "tinyinfer", "-m", str(qwen25_path), "-cnv", "--temp", "0", "-n", "32",
                        "-c", "512", "-t", "2", "--no-perf"], input="What is 2+2? Answer with the number only.\n",
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "chat mode (gguf template)" in p.stderr
    assert p.stdout.replace("> ", "").strip() == "4"


def test_server_chat(qwen25_path, tmp_path):
    from test_server import _start_server, _stop
    srv = _start_server(qwen25_path, tmp_path)
    try:
        r = srv.post("/v1/chat/completions", {"messages": QUESTION, "temperature": 0, "max_tokens": 32})
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert ch["finish_reason"] == "stop" and ch["message"]["content"].strip() == "4"
    finally:
        _stop(srv.proc)
