"""Server hardening, each finding of the reliability pass with a real client or a raw socket:
bounded bodies whatever the transfer encoding, early refusal of over-long prompts, ollama's
"model not found", queue places given back on disconnect, HEAD /health, keep_alive 0, chat roles,
non-finite numbers, /slots and /props.

One server for the module (SmolLM2, -c 512, one slot).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_server import (ALIAS, AUTH, KEY, N_CTX, ROOT, Server, _free_port, _ollama, _openai, _raw,  # noqa: E402
                         _start_server, _stop)


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    srv = _start_server(smollm2_path, tmp_path_factory.mktemp("hardening"))
    yield srv
    _stop(srv.proc)


def _rss(srv) -> float:
    psutil = pytest.importorskip("psutil")
    return psutil.Process(srv.proc.pid).memory_info().rss / 2**20


def _chunked(srv, path: str, chunks) -> bytes:
    """POST with Transfer-Encoding: chunked (no Content-Length); the whole answer."""
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    s.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode())
    try:
        for c in chunks:
            s.sendall(f"{len(c):x}\r\n".encode() + c + b"\r\n")
        s.sendall(b"0\r\n\r\n")
    except OSError:          # the server answered and hung up before the upload ended: what we want
        pass
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except OSError:
        pass
    s.close()
    return out


def test_chunked_upload_is_bounded(server):
    # a small chunked body is read and served
    body = json.dumps({"prompt": "One, two,", "max_tokens": 2, "temperature": 0}).encode()
    out = _chunked(server, "/v1/completions", [body[:10], body[10:]])
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    # 40 MB without Content-Length: refused once 16 MiB have come, and the rest is never held
    rss0 = _rss(server)
    t0 = time.perf_counter()
    piece = b'{"prompt": "' + b"x" * (1 << 20)
    out = _chunked(server, "/v1/completions", [piece] + [b"y" * (1 << 20)] * 39)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert b"request body over 16 MiB" in out
    assert time.perf_counter() - t0 < 60
    assert _rss(server) - rss0 < 64                 # was +430 MB
    assert server.health()["slots_processing"] == 0  # no slot was taken
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_overlong_prompt_refused_before_tokenizing(server):
    before = server.metrics()
    big = "lorem ipsum dolor " * 60000          # ~1 MB: far over 512 tokens whatever the tokenization
    r = server.post("/v1/completions", {"prompt": big, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "at least" in r.json()["error"]["message"]       # the byte bound, not the tokenizer's count
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]})
    assert r.status_code == 400 and "at least" in r.json()["error"]["message"]
    ollama = pytest.importorskip("ollama")
    with pytest.raises(ollama.ResponseError) as e:
        _ollama(server).generate(model=ALIAS, prompt=big)
    assert e.value.status_code == 400 and "context" in e.value.error
    after = server.metrics()
    jobs = lambda m: sum(v for k, v in m.items() if k[0] == "tinyinfer_jobs_total")  # noqa: E731
    assert jobs(after) == jobs(before)             # refused in the handler: no job ran, no slot time


def test_ollama_unknown_model_is_404(server):
    ollama = pytest.importorskip("ollama")
    client = _ollama(server)
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="llama3:70b", prompt="hi")
    assert e.value.status_code == 404 and 'model "llama3:70b" not found' in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nope")
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="nope", input="hi")
    assert e.value.status_code == 404
    # the alias, with ollama's tag, and the file name are the loaded model
    r = client.generate(model=ALIAS + ":latest", prompt="hi", options={"num_predict": 1})
    assert r.done and r.model == ALIAS + ":latest"
    assert client.show(ALIAS).modelinfo["general.architecture"] == "llama"


def test_openai_serves_any_name_and_reports_the_real_id(server):
    client = _openai(server)
    out = client.completions.create(model="gpt-4o", prompt="hi", max_tokens=1)
    assert out.model == ALIAS
    out = client.chat.completions.create(model="whatever", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=1)
    assert out.model == ALIAS


def test_queue_place_freed_when_a_waiting_client_leaves(server):
    running = _raw(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400, "stream": True})
    waiting = []
    try:
        server.wait_until(lambda h: h["slots_processing"] == 1, 30, "a running request")
        waiting = [_raw(server, "/v1/completions", {"prompt": "hi", "max_tokens": 400, "stream": True})
                   for _ in range(3)]
        server.wait_until(lambda h: h["requests_deferred"] == 3, 30, "three waiting requests")
        for s in waiting:
            s.close()
        # their places are free while the first request still runs (not when the slot frees)
        server.wait_until(lambda h: h["requests_deferred"] == 0, 10, "the queue to empty")
        assert server.health()["slots_processing"] == 1
    finally:
        running.close()
        for s in waiting:
            s.close()
    server.wait_until(lambda h: h["slots_processing"] == 0, 15, "an idle server")


def test_head_health(server):
    r = httpx.head(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.content == b""


def test_keep_alive_zero_unloads(server):
    client = _ollama(server)
    r = client.generate(model=ALIAS, prompt="", keep_alive=0)
    assert r.done and r.done_reason == "unload"
    r = client.chat(model=ALIAS, messages=[], keep_alive="0s")
    assert r.done and r.done_reason == "unload"
    assert client.generate(model=ALIAS, prompt="", keep_alive="5m").done_reason == "load"


def test_unknown_role_and_non_finite_numbers_are_400(server):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as e:
        _openai(server).chat.completions.create(model=ALIAS, messages=[{"role": "wizard", "content": "hi"}],
                                                max_tokens=1)
    assert "role" in str(e.value)
    ollama = pytest.importorskip("ollama")
    with pytest.raises(ollama.ResponseError) as e:
        _ollama(server).chat(model=ALIAS, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.status_code == 400 and "role" in e.value.error
    for path, body in (("/v1/completions", b'{"prompt": "hi", "temperature": Infinity}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}'),
                       ("/api/generate", b'{"model": "smollm2", "prompt": "hi", "options": {"temperature": -Infinity}}'),
                       ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"5": Infinity}}')):
        r = httpx.post(server.url + path, content=body, headers={**AUTH, "Content-Type": "application/json"},
                       timeout=30)
        assert r.status_code == 400, (path, r.text)
        assert "finite" in r.text


def test_cache_prompt(server):
    """A repeated prompt evaluates only its last token (llama-server's cache_prompt, the default);
    cache_prompt false evaluates it all."""
    body = {"prompt": "The quick brown fox jumps over the lazy dog and", "max_tokens": 1}
    n = server.post("/v1/completions", body).json()["usage"]["prompt_tokens"]
    evaluated = lambda: server.metrics()[("llamacpp:prompt_tokens_total", ())]  # noqa: E731
    before = evaluated()
    assert server.post("/v1/completions", body).status_code == 200
    assert evaluated() - before == 1
    before = evaluated()
    assert server.post("/v1/completions", {**body, "cache_prompt": False}).status_code == 200
    assert evaluated() - before == n


def test_slots_and_props(server):
    s = _raw(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 300, "stream": True,
                                         "temperature": 0})
    try:
        server.wait_until(lambda h: h["slots_processing"] == 1, 30, "a running request")
        slots = server.get("/slots").json()
        assert isinstance(slots, list) and len(slots) == 1
        sl = slots[0]
        assert sl["id"] == 0 and sl["n_ctx"] == N_CTX and sl["is_processing"] is True and sl["id_task"] >= 0
        assert sl["params"]["n_predict"] == 300 and sl["params"]["temperature"] == 0
        assert sl["next_token"]["has_next_token"] is True and 0 <= sl["next_token"]["n_remain"] <= 300
    finally:
        s.close()
    server.wait_until(lambda h: h["slots_processing"] == 0, 15, "an idle server")
    sl = server.get("/slots").json()[0]
    assert sl["is_processing"] is False and sl["id_task"] == -1
    p = server.get("/props").json()
    assert p["total_slots"] == 1 and p["default_generation_settings"]["n_ctx"] == N_CTX
    assert "im_start" in p["chat_template"] and p["model_path"].endswith(".gguf")
    assert httpx.get(server.url + "/slots", timeout=10).status_code == 401     # behind the API key


# --- a second server: two slots decoded as one batch, context shift on --------------------------

@pytest.fixture(scope="module")
def batch_server(smollm2_path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("batch") / "server.log"
    cmd = [sys.executable, "-m", "tinyinfer", "serve", "-m", str(smollm2_path), "--port", str(port), "-c", "96",
           "--parallel", "2", "--context-shift", "-t", "1", "--no-access-log"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    srv = Server(f"http://127.0.0.1:{port}", port, proc, log)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 300:
        assert proc.poll() is None, srv.log_tail()
        try:
            if httpx.get(srv.url + "/health", timeout=5).json().get("status") == "ok":
                break
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.25)
    yield srv
    _stop(proc)


def _complete(url, prompt, n):
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                   "repeat_penalty": 1.0}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_server_context_shift_runs_past_the_context(batch_server):
    out = _complete(batch_server.url, "Once upon a time", 200)      # -c 96: two shifts
    assert out["usage"]["completion_tokens"] == 200 or out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] > 96


def test_server_batched_slots_equal_solo(batch_server):
    prompts = ["One, two, three,", "The capital of France is"]
    solo = [_complete(batch_server.url, p, 12)["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(2) as ex:
        both = list(ex.map(lambda p: _complete(batch_server.url, p, 12)["choices"][0]["text"], prompts))
    assert both == solo
    slots = httpx.get(batch_server.url + "/slots", timeout=10).json()
    assert [s["id"] for s in slots] == [0, 1] and all(s["n_ctx"] == 96 for s in slots)
