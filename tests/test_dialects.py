"""Each dialect's own defaults and shapes (a real server on loopback, SmolLM2, the openai / ollama clients
and plain HTTP): OpenAI-side defaults as llama-server's, ollama's "model is required", JSON bodies whatever
the content type, usage with cached prompt tokens, llama-server's timings, /props and /api/show fields."""

from __future__ import annotations

import pytest

from conftest import REFERENCE, need_reference
from test_server import ALIAS, AUTH, _ollama, _openai, _start_server, _stop

httpx = pytest.importorskip("httpx")

ASK = [{"role": "user", "content": "Write a list of ten fruits, one per line."}]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    srv = _start_server(smollm2_path, tmp_path_factory.mktemp("dialects"))
    yield srv
    _stop(srv.proc)


def _post(srv, path, body, **kw):
    return httpx.post(srv.url + path, json=body, headers=AUTH, timeout=120, **kw)


def test_openai_defaults_are_llama_servers(server):
    """No repeat penalty by default (llama-server's 1.0): the greedy reply equals one with
    repeat_penalty 1.0 and differs from one with ollama's 1.1; no token limit by default."""
    client = _openai(server)

    def reply(**kw):
        r = client.chat.completions.create(model=ALIAS, messages=ASK, temperature=0, max_tokens=48, **kw)
        return r.choices[0].message.content

    plain = reply()
    assert plain == reply(extra_body={"repeat_penalty": 1.0})
    assert plain != reply(extra_body={"repeat_penalty": 1.1})
    params = httpx.get(server.url + "/props", headers=AUTH, timeout=10).json()["default_generation_settings"]["params"]
    assert params["repeat_penalty"] == 1.0 and params["n_predict"] == -1
    # max_tokens absent or -1: until an end token or the context's end (not llama-cpp-python's 16); a long
    # prompt leaves ~40 tokens of the server's 512
    prompt = "one two three four five six seven eight nine ten " * 47
    for extra in ({}, {"max_tokens": -1}):
        r = _post(server, "/v1/completions", {"model": ALIAS, "prompt": prompt, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        assert u["completion_tokens"] > 16 and u["prompt_tokens"] + u["completion_tokens"] >= 500, u


def test_openai_ignore_eos(server):
    """llama-server's `ignore_eos` on the OpenAI routes: a greedy chat reply that ends with its end token
    runs on to max_tokens instead (finish_reason "length")."""
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, "max_tokens": 64}
    short = _post(server, "/v1/chat/completions", body).json()
    assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 64, short
    long = _post(server, "/v1/chat/completions", {**body, "ignore_eos": True}).json()
    assert long["choices"][0]["finish_reason"] == "length" and long["usage"]["completion_tokens"] == 64, long


def test_ollama_model_is_required(server):
    for path, body in (("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/api/generate", {"prompt": "Hi"}), ("/api/generate", {"model": "", "prompt": "Hi"})):
        r = _post(server, path, {"stream": False, **body})
        assert r.status_code == 400 and r.json()["error"] == "model is required", (path, r.text)
    assert _ollama(server).generate(model=ALIAS, prompt="Hi", options={"num_predict": 2}).done


def test_ollama_json_whatever_the_content_type(server):
    """ollama's own curl examples send JSON as application/x-www-form-urlencoded (curl -d)."""
    form = {"content-type": "application/x-www-form-urlencoded", **AUTH}
    r = httpx.request("DELETE", server.url + "/api/delete", content=b'{"model": "smollm2:135m-q8_0"}', headers=form,
                      timeout=30)
    assert r.status_code == 404 and "not found" in r.json()["error"], r.text
    r = httpx.post(server.url + "/api/generate", content=b'{"model": "%s", "prompt": "Hi", "stream": false, '
                   b'"options": {"num_predict": 2}}' % ALIAS.encode(), headers=form, timeout=60)
    assert r.status_code == 200 and r.json()["done"], r.text


def test_usage_cached_tokens_and_timings(server):
    msgs = [{"role": "user", "content": "Tell me three facts about the Moon, one per line, and nothing else."}]
    body = {"model": ALIAS, "messages": msgs, "max_tokens": 8, "temperature": 0}
    first, second = _post(server, "/v1/chat/completions", body).json(), _post(server, "/v1/chat/completions", body).json()
    for r in (first, second):
        u, t = r["usage"], r["timings"]
        assert t["prompt_n"] + t["cache_n"] == u["prompt_tokens"]
        assert u["prompt_tokens_details"]["cached_tokens"] == t["cache_n"]
        assert t["predicted_n"] == u["completion_tokens"] and t["predicted_ms"] > 0 and t["predicted_per_second"] > 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens_details"][
        "cached_tokens"]
    # the openai client sees the same fields; a stream carries timings on its last chunk
    r = _openai(server).chat.completions.create(model=ALIAS, messages=msgs, max_tokens=4)
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: {")]
    assert '"timings"' in lines[-1] and '"finish_reason":"length"' in lines[-1].replace(" ", "")


def test_props_and_show_fields(server):
    p = httpx.get(server.url + "/props", headers=AUTH, timeout=10).json()
    assert p["bos_token"] == "<|im_start|>" and p["eos_token"] == "<|im_end|>"     # SmolLM2's
    assert p["chat_template_caps"]["supports_system_role"] is True
    show = _post(server, "/api/show", {"model": ALIAS}).json()
    assert show["capabilities"][0] == "completion" and "tools" not in show["capabilities"]   # no tools in its template


def test_template_caps_from_real_templates():
    from tinyinfer.toolcall import template_caps
    need_reference("chat_templates")
    caps = {p.stem: template_caps(p.read_text()) for p in (REFERENCE / "chat_templates").glob("*.jinja")}
    assert caps["Qwen-Qwen2.5-7B-Instruct"]["supports_tools"] and caps["meta-llama-Llama-3.2-3B-Instruct"]["supports_tools"]
    assert caps["Qwen-Qwen2.5-7B-Instruct"]["supports_parallel_tool_calls"]
    assert not caps["google-gemma-2-2b-it"]["supports_tools"] and not caps["google-gemma-2-2b-it"]["supports_tool_calls"]
    assert not any(c["supports_thinking"] for c in caps.values())
