"""The HTTP server: the real server on loopback, driven by the real ``openai`` and ``ollama``
client packages, raw HTTP for errors, a bounded load test, and SIGTERM last.

One server process for the module (SmolLM2-135M, -c 512, --max-queue 8, an API key); small
max_tokens and temperature 0 keep it fast and deterministic. The load test's size can be
changed with TINYINFER_LOAD_CLIENTS / TINYINFER_LOAD_REQUESTS (default 8 x 25).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import empty_store_env, need_module  # noqa: E402

httpx = need_module("httpx")
need_module("fastapi")
need_module("uvicorn")

KEY = "sk-test-7f3a9c"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALIAS = "smollm2"
N_CTX = 512
MAX_QUEUE = 8
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
ROOT = Path(__file__).resolve().parent.parent


# --- unit tests: no model, no server ------------------------------------------------------------

def test_slot_pool_queue_cancel_drain():
    from tinyinfer.server.slots import END, QueueFull, ShuttingDown, SlotPool

    async def main():
        loop = asyncio.get_running_loop()
        outcomes = []
        pool = SlotPool(1, 2, on_done=lambda job, outcome: outcomes.append(outcome))
        gate = threading.Event()
        produced = []

        def slow(engine, job):
            for i in range(1000):
                gate.wait()
                time.sleep(0.01)             # a token's worth of work
                produced.append(i)
                yield i

        pool.start([object()])
        a = pool.submit(slow, loop)
        b = pool.submit(slow, loop)
        c = pool.submit(slow, loop)
        with pytest.raises(QueueFull) as e:
            pool.submit(slow, loop)          # 1 running + 2 waiting: full
        assert e.value.retry_after >= 1
        b.cancel()                           # its client left while it waited: it will never run
        gate.set()
        assert await a.next() == 0
        a.cancel()                           # the client went away: the slot moves on at once
        while (await a.next()) is not END:
            pass
        assert await b.next() is END
        assert await c.next() == 0
        pool.drain()                         # SIGTERM: no new jobs; the running one may finish
        with pytest.raises(ShuttingDown):
            pool.submit(slow, loop)
        c.cancel()
        while (await c.next()) is not END:
            pass
        pool.stop()
        assert len(produced) < 100          # not 2000: both stopped when cancelled
        return outcomes

    outcomes = asyncio.run(main())
    assert outcomes == ["cancelled", "cancelled", "cancelled"]


def test_slot_pool_parallel_slots_run_together():
    from tinyinfer.server.slots import END, SlotPool

    async def main():
        loop = asyncio.get_running_loop()
        pool = SlotPool(2, 0)
        both = threading.Barrier(2, timeout=10)
        seen = []

        def job_fn(engine, job):
            seen.append(engine)
            both.wait()                      # passes only if the two jobs run at the same time
            yield engine

        pool.start(["engine-a", "engine-b"])
        jobs = [pool.submit(job_fn, loop) for _ in range(2)]
        items = [await j.next() for j in jobs]
        assert all([await j.next() is END for j in jobs])
        pool.stop()
        return items, seen

    items, seen = asyncio.run(main())
    assert sorted(items) == ["engine-a", "engine-b"] and sorted(seen) == ["engine-a", "engine-b"]


def test_slot_pool_errors_reach_the_request():
    from tinyinfer.server.slots import SlotPool

    async def main():
        pool = SlotPool(1, 0)
        pool.start([object()])

        def bad(engine, job):
            raise ValueError("boom")
            yield  # noqa

        job = pool.submit(bad, asyncio.get_running_loop())
        item = await job.next()
        pool.stop()
        return item

    item = asyncio.run(main())
    assert isinstance(item, ValueError) and str(item) == "boom"


def test_metrics_text_format():
    from tinyinfer.completions import GenStats
    from tinyinfer.server.metrics import Metrics
    m = Metrics()
    m.record_generation(GenStats(prompt_tokens=10, prompt_evaluated=7, completion_tokens=5, prompt_s=0.5, gen_s=1.0))
    m.record_request("/v1/completions", 200, 0.3)
    m.record_request("/v1/completions", 200, 7.0)
    text = m.render(processing=1, deferred=2, kv_tokens=12, kv_ratio=0.1, slots=1)
    vals = _parse_metrics(text)
    assert vals[("llamacpp:prompt_tokens_total", ())] == 7
    assert vals[("llamacpp:tokens_predicted_total", ())] == 5
    assert vals[("llamacpp:predicted_tokens_seconds", ())] == 5.0
    assert vals[("llamacpp:requests_deferred", ())] == 2
    assert vals[("tinyinfer_prompt_tokens_requested_total", ())] == 10
    h = "tinyinfer_request_duration_seconds"
    assert vals[(h + "_bucket", (("endpoint", "/v1/completions"), ("le", "0.5")))] == 1
    assert vals[(h + "_bucket", (("endpoint", "/v1/completions"), ("le", "10")))] == 2
    assert vals[(h + "_bucket", (("endpoint", "/v1/completions"), ("le", "+Inf")))] == 2
    assert vals[(h + "_count", (("endpoint", "/v1/completions"),))] == 2


# --- helpers -------------------------------------------------------------------------------------

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})? (-?[0-9.eE+-]+|\+Inf|NaN)$')


def _parse_metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"not Prometheus text format: {line!r}"
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    health_seen: list = field(default_factory=list)

    def get(self, path, **kw):
        kw.setdefault("headers", AUTH)
        return httpx.get(self.url + path, timeout=120, **kw)

    def post(self, path, body=None, **kw):
        kw.setdefault("headers", AUTH)
        return httpx.post(self.url + path, json=body, timeout=120, **kw)

    def metrics(self) -> dict:
        r = self.get("/metrics")
        assert r.status_code == 200
        return _parse_metrics(r.text)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_until(self, pred, timeout=30.0, what="condition"):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            h = self.health()
            if pred(h):
                return time.perf_counter() - t0
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last health {h}")

    def log_tail(self, n=4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _start_server(model, tmp: Path, *extra) -> Server:
    port = _free_port()
    log = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "tinyinfer", "serve", "-m", str(model), "--port", str(port), "-c", str(N_CTX),
           "--max-queue", str(MAX_QUEUE), "--api-key", KEY, "--alias", ALIAS, "--shutdown-timeout", "30", *extra]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **empty_store_env()})   # /api/tags: the served model only
    srv = Server(f"http://127.0.0.1:{port}", port, proc, log)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 300:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{srv.log_tail()}")
        try:
            r = httpx.get(srv.url + "/health", timeout=5)
            st = r.json().get("status")
            srv.health_seen.append((r.status_code, st))
            if st == "ok":
                return srv
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.25)
    proc.kill()
    raise AssertionError(f"server not ready after 300 s:\n{srv.log_tail()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    srv = _start_server(smollm2_path, tmp_path_factory.mktemp("server"))
    yield srv
    _stop(srv.proc)


def _raw(srv: Server, path: str, body: dict, key: str = KEY) -> socket.socket:
    """Send a request on a raw socket and leave it there (to hold a slot, or to hang up on)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=120)
    s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
              + data)
    return s


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        b = s.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _openai(srv):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _ollama(srv):
    ollama = pytest.importorskip("ollama")
    return ollama.Client(host=srv.url, headers=AUTH, timeout=120)


# --- operations ----------------------------------------------------------------------------------

def test_health_loading_then_ok_and_docs(server):
    assert all(st in ("loading", "ok") for _, st in server.health_seen)
    assert all(code == (200 if st == "ok" else 503) for code, st in server.health_seen)
    h = server.health()
    assert h["status"] == "ok" and h["slots_idle"] == 1
    # public without the key: /health, /docs, /openapi.json
    assert httpx.get(server.url + "/docs", timeout=10).status_code == 200
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    for p in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/api/generate",
              "/api/chat", "/api/tags", "/api/show", "/api/ps", "/api/version", "/health", "/metrics"):
        assert p in spec["paths"], p
    # what it rejects, said (tests/test_openapi_conformance.py holds the server to it): token ids below the
    # vocabulary's size, integer bounds in JSON Schema's words, no router unload and no rerank here
    assert "/models/unload" not in spec["paths"] and "/v1/rerank" not in spec["paths"]
    n_vocab = server.get("/v1/models").json()["data"][0]["meta"]["n_vocab"]
    ids = spec["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"][2]["items"]
    assert ids == {"type": "integer", "minimum": 0, "maximum": n_vocab - 1}
    assert '"ge":' not in json.dumps(spec) and '"le":' not in json.dumps(spec)


def test_metrics_names(server):
    vals = server.metrics()
    names = {k[0] for k in vals}
    for n in ("llamacpp:prompt_tokens_total", "llamacpp:prompt_seconds_total", "llamacpp:tokens_predicted_total",
              "llamacpp:tokens_predicted_seconds_total", "llamacpp:prompt_tokens_seconds",
              "llamacpp:predicted_tokens_seconds", "llamacpp:requests_processing", "llamacpp:requests_deferred",
              "llamacpp:kv_cache_usage_ratio", "tinyinfer_requests_total", "tinyinfer_request_duration_seconds_bucket",
              "tinyinfer_request_duration_seconds_count", "process_resident_memory_bytes"):
        assert n in names, n


# --- OpenAI dialect with the openai client --------------------------------------------------------

def test_openai_models(server):
    client = _openai(server)
    models = client.models.list()
    assert [m.id for m in models.data] == [ALIAS]
    assert client.models.retrieve(ALIAS).id == ALIAS


def test_openai_completion_plain_and_stream(server):
    client = _openai(server)
    out = client.completions.create(model=ALIAS, prompt="One, two, three,", max_tokens=6, extra_body=GREEDY,
                                    temperature=0)
    ch = out.choices[0]
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == ALIAS
    assert ch.finish_reason == "length" and ch.text.strip().startswith("four")
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    parts, finish = [], None
    for c in client.completions.create(model=ALIAS, prompt="One, two, three,", max_tokens=6, temperature=0,
                                       extra_body=GREEDY, stream=True):
        parts.append(c.choices[0].text)
        finish = c.choices[0].finish_reason or finish
    assert "".join(parts) == ch.text and finish == "length"


def test_openai_chat_plain_and_stream_agree(server):
    client = _openai(server)
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=ALIAS, messages=msgs, max_tokens=8, temperature=0, extra_body=GREEDY)
    assert out.object == "chat.completion" and out.id.startswith("chat")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")
    assert 0 < out.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model=ALIAS, messages=msgs, max_tokens=8, temperature=0,
                                            extra_body=GREEDY, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [out.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_openai_stop_seed_logprobs(server):
    client = _openai(server)
    out = client.completions.create(model=ALIAS, prompt="One, two, three,", max_tokens=8, temperature=0,
                                    stop=[" five"], extra_body=GREEDY)
    assert out.choices[0].finish_reason == "stop" and "five" not in out.choices[0].text
    # the same seed, the same sample (each after another prompt, so both evaluate the whole prompt)
    texts = []
    for _ in range(2):
        client.completions.create(model=ALIAS, prompt="Zebra", max_tokens=1)
        texts.append(client.completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=5,
                                               temperature=1.0, seed=7).choices[0].text)
    assert texts[0] == texts[1]
    lp = client.completions.create(model=ALIAS, prompt="The capital of France is", max_tokens=2, temperature=0,
                                   logprobs=2).choices[0].logprobs
    assert len(lp.tokens) == 2 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and content[0].logprob <= 0 and len(content[0].top_logprobs) == 3


def test_openai_embeddings(server):
    client = _openai(server)
    out = client.embeddings.create(model=ALIAS, input=["hello world", "goodbye"])   # base64 on the wire
    assert [d.index for d in out.data] == [0, 1]
    v = np.array(out.data[0].embedding)
    assert v.shape == (576,) and abs(np.linalg.norm(v) - 1) < 1e-3
    raw = server.post("/v1/embeddings", {"input": "hello world", "encoding_format": "float"}).json()
    assert np.allclose(raw["data"][0]["embedding"], v, atol=1e-6)
    assert raw["usage"]["prompt_tokens"] > 0


JSON_PROMPT = "Describe a cat as JSON with keys name and age."


def _check_json_reply(text, finish):
    # a JSON object, also when max_tokens cut it short (closed within the budget: grammar.json_closer)
    assert finish in ("stop", "length") and isinstance(json.loads(text), dict), text


def test_openai_json_response_format(server):
    client = _openai(server)
    out = client.chat.completions.create(model=ALIAS, max_tokens=24, temperature=0,
                                         response_format={"type": "json_object"},
                                         messages=[{"role": "user", "content": JSON_PROMPT}])
    _check_json_reply(out.choices[0].message.content, out.choices[0].finish_reason)


def test_openai_errors_through_the_client(server):
    openai = pytest.importorskip("openai")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    client = _openai(server)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=ALIAS, prompt="hello " * 600, max_tokens=4)
    assert "context" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=ALIAS, prompt="hi", max_tokens=-3)
    assert "max_tokens" in str(e.value)


# --- ollama dialect with the ollama client --------------------------------------------------------

def _check_durations(r):
    assert r.done is True and r.done_reason in ("stop", "length")
    for k in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(r[k], int) and r[k] >= 0, k
    assert r.eval_duration > 0 and r.prompt_eval_count >= 1 and r.eval_count >= 1
    assert r.total_duration >= r.prompt_eval_duration + r.eval_duration


def test_ollama_generate_plain_and_stream(server):
    client = _ollama(server)
    opts = {"num_predict": 6, "temperature": 0, "repeat_penalty": 1.0}
    r = client.generate(model=ALIAS, prompt="One, two, three,", raw=True, options=opts)
    _check_durations(r)
    assert r.done_reason == "length" and r.eval_count == 6 and r.response.strip().startswith("four")
    assert isinstance(r.context, list) and len(r.context) > 6
    # ollama's context: the next prompt continues the conversation
    more = client.generate(model=ALIAS, prompt=" seven,", raw=True, context=r.context, options=opts)
    assert more.done and more.context[:len(r.context)] == r.context
    # the same as the OpenAI dialect with the same settings: one generation loop
    same = server.post("/v1/completions", {"prompt": "One, two, three,", "max_tokens": 6, **GREEDY}).json()
    assert same["choices"][0]["text"] == r.response
    parts = list(client.generate(model=ALIAS, prompt="One, two, three,", raw=True, options=opts, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.response for p in parts) == r.response
    _check_durations(parts[-1])


def test_ollama_chat_plain_and_stream(server):
    client = _ollama(server)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    opts = {"num_predict": 6, "temperature": 0}
    r = client.chat(model=ALIAS, messages=msgs, options=opts)
    _check_durations(r)
    assert r.message.role == "assistant" and r.message.content
    parts = list(client.chat(model=ALIAS, messages=msgs, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    _check_durations(parts[-1])


def test_ollama_json_format(server):
    client = _ollama(server)
    r = client.chat(model=ALIAS, format="json", options={"num_predict": 24, "temperature": 0},
                    messages=[{"role": "user", "content": JSON_PROMPT}])
    _check_json_reply(r.message.content, r.done_reason)
    # a JSON schema is enforced (tests/test_grammar.py checks replies with jsonschema)
    r = client.generate(model=ALIAS, prompt=JSON_PROMPT, options={"num_predict": 24, "temperature": 0},
                        format={"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
    _check_json_reply(r.response, r.done_reason)
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.response)["name"], str)


def test_ollama_list_show_ps_version_embed(server):
    client = _ollama(server)
    models = client.list().models
    assert [m.model for m in models] == [ALIAS]
    assert models[0].details.format == "gguf" and models[0].details.family == "llama"
    assert models[0].details.quantization_level == "Q4_1" and models[0].size > 50_000_000
    show = client.show(ALIAS)
    assert "im_start" in show.template and show.modelinfo["general.architecture"] == "llama"
    ps = client.ps().models
    assert ps[0].model == ALIAS and ps[0].context_length == N_CTX
    assert server.get("/api/version").json()["version"]
    e = client.embed(model=ALIAS, input=["hello world", "goodbye"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 576
    assert e.prompt_eval_count > 0
    legacy = client.embeddings(model=ALIAS, prompt="hello world")
    assert np.allclose(legacy.embedding, e.embeddings[0], atol=1e-6)
    # an empty prompt loads the model and answers at once, as ollama does
    r = client.generate(model=ALIAS, prompt="")
    assert r.done and r.done_reason == "load"


def test_ollama_errors_through_the_client(server):
    ollama = pytest.importorskip("ollama")
    client = _ollama(server)
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=ALIAS, prompt="hello " * 600, options={"num_predict": 2})
    assert e.value.status_code == 400 and "context" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server.url).list()
    assert e.value.status_code == 401


# --- raw HTTP: curl-style requests and error shapes -----------------------------------------------

def test_curl_style_requests_without_content_type(server):
    # curl -d '{...}' sends application/x-www-form-urlencoded; ollama's own docs do this
    body = json.dumps({"model": ALIAS, "prompt": "One, two,", "raw": True, "stream": False, "options": {"num_predict": 2}})
    r = httpx.post(server.url + "/api/generate", content=body, timeout=60,
                   headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["done"] is True
    r = httpx.post(server.url + "/v1/completions", content=json.dumps({"prompt": "a", "max_tokens": 1}),
                   headers=AUTH, timeout=60)
    assert r.status_code == 200


def test_streams_are_sse_and_ndjson(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": "One, two,", "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    with httpx.stream("POST", server.url + "/api/chat", headers=AUTH, timeout=60,
                      json={"model": ALIAS, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 3}}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1])
    assert lines[-1]["eval_count"] == 3 and lines[-1]["done_reason"] == "length"


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -2}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "top_p": 3}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"-5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": [99999999]}, 400, "out of range"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400,
     "max_tokens"),
    ("/v1/embeddings", {}, 400, "input"),
    ("/api/generate", {"model": ALIAS, "prompt": "hi", "options": {"num_predict": "many"}}, 400, "options.num_predict"),
    ("/api/generate", {"model": ALIAS, "prompt": "hi", "options": {"num_predict": -7}}, 400, "num_predict"),
    ("/api/generate", {"model": ALIAS, "prompt": "hi", "format": "yaml"}, 400, "format"),
    ("/api/generate", {"model": ALIAS, "prompt": "hi", "images": ["aGk="]}, 400, "images"),
    ("/api/chat", {"model": ALIAS, "messages": [{"role": "user"}], "options": {"temperature": -1}}, 400, "temperature"),
])
def test_bad_requests_name_the_field(server, path, body, status, needle):
    r = server.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    msg = err if path.startswith("/api/") else err["message"]
    assert needle in msg, msg
    if not path.startswith("/api/"):
        assert err["type"] == "invalid_request_error"


def test_logit_bias_past_the_vocabulary_is_ignored(server):
    """As llama-server: a logit_bias id past the vocabulary is dropped (tinyinfer/server/core.py)."""
    base = {"prompt": "One, two,", "max_tokens": 2, **GREEDY}
    plain = server.post("/v1/completions", base).json()["choices"][0]["text"]
    r = server.post("/v1/completions", {**base, "logit_bias": {"999999999": 5}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain


def test_malformed_json_and_unknown_routes(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=10,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/api/chat", content=b'not json', timeout=10, headers=AUTH)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = server.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = server.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = server.get("/v1/models/not-this-one")
    assert r.status_code == 404
    # an oversized body is refused before it is read
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {64 << 20}\r\n\r\n".encode())
    head = s.recv(4096).decode()
    s.close()
    assert head.startswith("HTTP/1.1 413")


def test_unknown_fields_ignored_bad_values_400_naming_them(server):
    """As llama-server and ollama: a field the server does not know is ignored; a known one with a wrong
    type or value is a 400 naming it (tinyinfer/options.py decides for the fields pydantic does not list)."""
    base = {"prompt": "One, two,", "max_tokens": 2, **GREEDY}
    r = server.post("/v1/completions", {**base, "temprature": 5, "not_an_option": [1]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    r = server.post("/api/generate", {"model": ALIAS, "prompt": "One, two,", "stream": False, "raw": True,
                                      "options": {"num_predict": 2, "temprature": 5, "num_gpu": 1}})
    assert r.status_code == 200 and r.json()["eval_count"] == 2
    for path, body, field in [("/v1/completions", {**base, "n_keep": "some"}, "n_keep"),
                              ("/v1/completions", {**base, "top_k": "many"}, "top_k"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                        "cache_prompt": "maybe"}, "cache_prompt"),
                              ("/api/generate", {"model": ALIAS, "prompt": "Hi", "options": {"num_keep": "x"}},
                               "num_keep"),
                              ("/api/chat", {"model": ALIAS, "messages": [{"role": "user", "content": "Hi"}],
                                             "options": {"mirostat": 7}}, "mirostat")]:
        r = server.post(path, body)
        assert r.status_code == 400, (path, body, r.text)
        err = r.json()["error"]
        msg = err if path.startswith("/api/") else err["message"]
        assert field in msg, (field, msg)
        if not path.startswith("/api/"):
            assert err["param"].endswith(field)


def test_prompt_too_long_is_400(server):
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 700}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and str(N_CTX) in err["message"]
    r = server.post("/api/generate", {"model": ALIAS, "prompt": "word " * 700, "stream": True})     # before any byte of a stream
    assert r.status_code == 400 and "context" in r.json()["error"]


def test_api_key(server):
    for path in ("/v1/models", "/api/tags", "/metrics"):
        r = httpx.get(server.url + path, timeout=10)
        assert r.status_code == 401, path
        r = httpx.get(server.url + path, headers={"Authorization": "Bearer nope"}, timeout=10)
        assert r.status_code == 401, path
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/api/generate", json={"model": ALIAS, "prompt": "x"}, timeout=10)
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


# --- slots, disconnects, the queue ------------------------------------------------------------------

def test_disconnect_mid_stream_frees_the_slot(server):
    before = server.metrics()
    s = _raw(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400, "stream": True})
    got = b""
    while b"data: " not in got:
        got += s.recv(4096)
    assert b" 200 " in got.split(b"\r\n", 1)[0]
    s.close()                                    # hang up mid-stream
    dt = server.wait_until(lambda h: h["slots_processing"] == 0, 10, "the slot to be freed")
    assert dt < 5
    after = server.metrics()
    cancelled = ("tinyinfer_jobs_total", (("outcome", "cancelled"),))
    assert after.get(cancelled, 0) == before.get(cancelled, 0) + 1
    generated = after[("llamacpp:tokens_predicted_total", ())] - before[("llamacpp:tokens_predicted_total", ())]
    assert generated < 100                      # it stopped, far from 400
    # and the slot serves the next request
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_disconnect_while_waiting_non_streaming(server):
    s = _raw(server, "/api/generate", {"model": ALIAS, "prompt": "Once upon a time", "raw": True, "stream": False,
                                       "options": {"num_predict": 400}})
    server.wait_until(lambda h: h["slots_processing"] == 1, 30, "the request to start")
    s.close()
    dt = server.wait_until(lambda h: h["slots_processing"] == 0, 10, "the slot to be freed")
    assert dt < 5


def test_queue_full_is_503_with_retry_after(server):
    before = server.metrics()
    socks = [_raw(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400, "stream": True})]
    try:
        server.wait_until(lambda h: h["slots_processing"] == 1, 30, "a running request")
        for _ in range(MAX_QUEUE):
            socks.append(_raw(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400,
                                                          "stream": True}))
        server.wait_until(lambda h: h["requests_deferred"] == MAX_QUEUE, 30, "a full queue")
        r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert "busy" in r.json()["error"]["message"]
        r = server.post("/api/generate", {"model": ALIAS, "prompt": "hi"})
        assert r.status_code == 503 and "busy" in r.json()["error"] and "Retry-After" in r.headers
        m = server.metrics()
        assert m[("llamacpp:requests_deferred", ())] == MAX_QUEUE
        assert m[("llamacpp:requests_processing", ())] == 1
        assert m[("tinyinfer_requests_rejected_total", ())] == before[("tinyinfer_requests_rejected_total", ())] + 2
    finally:
        for s in socks:
            s.close()
    # every client left: the running job stops and the waiting ones never run
    server.wait_until(lambda h: h["slots_processing"] == 0 and h["requests_deferred"] == 0, 15, "an idle server")
    t0 = time.perf_counter()
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200
    assert time.perf_counter() - t0 < 10


# --- load -----------------------------------------------------------------------------------------

LOAD_PROMPTS = ["One, two, three,", "The capital of France is", "Water boils at", "My favourite colour is"]


def _completion(client, url, prompt, k, stream):
    body = {"prompt": prompt, "max_tokens": k, "stream": stream, **GREEDY}
    if not stream:
        r = client.post(url + "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        j = r.json()
        return j["choices"][0]["text"], j["choices"][0]["finish_reason"], j["usage"]["completion_tokens"]
    body["stream_options"] = {"include_usage": True}
    text, finish, done, n = [], None, False, None
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            j = json.loads(line[6:])
            if j.get("usage"):
                n = j["usage"]["completion_tokens"]
            if not j["choices"]:
                continue
            c = j["choices"][0]
            text.append(c["text"])
            finish = c["finish_reason"] or finish
    assert done, "stream ended without [DONE]"
    assert n is not None, "no usage chunk with stream_options.include_usage"
    return "".join(text), finish, n


def _ollama_generate(client, url, prompt, k):
    body = {"model": ALIAS, "prompt": prompt, "raw": True, "options": {"num_predict": k, "temperature": 0, "repeat_penalty": 1.0}}
    text, final = [], None
    with client.stream("POST", url + "/api/generate", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                o = json.loads(line)
                text.append(o["response"])
                if o["done"]:
                    final = o
    assert final is not None, "stream ended without done"
    return "".join(text), final["done_reason"], final["eval_count"]


def test_load_concurrent_clients(server):
    psutil = pytest.importorskip("psutil")
    n_clients = int(os.environ.get("TINYINFER_LOAD_CLIENTS", "8"))
    n_requests = int(os.environ.get("TINYINFER_LOAD_REQUESTS", "25"))
    url = server.url
    # references: each prompt's 4 greedy tokens, after a different prompt (whole prompt evaluated) and
    # right after itself (prompt from the KV cache): either is a correct answer
    refs, prompt_tokens = {}, {}
    with httpx.Client(headers=AUTH, timeout=120) as c:
        for p in LOAD_PROMPTS:
            c.post(url + "/v1/completions", json={"prompt": "Zebra", "max_tokens": 1})
            outs = []
            for _ in range(2):
                r = c.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 4, **GREEDY}).json()
                outs.append(r["choices"][0]["text"])
                prompt_tokens[p] = r["usage"]["prompt_tokens"]
            refs[p] = set(outs)
    proc = psutil.Process(server.proc.pid)
    rss_before = proc.memory_info().rss
    before = server.metrics()

    def client_run(ci):
        results = []
        with httpx.Client(headers=AUTH, timeout=300) as c:
            for ri in range(n_requests):
                p = LOAD_PROMPTS[(ci + ri) % len(LOAD_PROMPTS)]
                k = 1 + (ci * 7 + ri) % 4
                kind = ("plain", "stream", "ollama")[(ci + ri) % 3]
                if kind == "ollama":
                    text, finish, n = _ollama_generate(c, url, p, k)
                else:
                    text, finish, n = _completion(c, url, p, k, kind == "stream")
                results.append((ci, ri, kind, p, k, text, finish, n))
        return results

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as ex:
        results = [r for fut in [ex.submit(client_run, i) for i in range(n_clients)] for r in fut.result()]
    wall = time.perf_counter() - t0
    after = server.metrics()
    rss_after = proc.memory_info().rss

    assert len(results) == n_clients * n_requests                  # none lost
    for ci, ri, kind, p, k, text, finish, n in results:
        assert finish in ("stop", "length"), (kind, finish)
        assert any(ref.startswith(text) for ref in refs[p]), (kind, p, k, text, refs[p])
        if finish == "length" and n is not None:
            assert n == k
    n_by_kind = {kind: sum(1 for r in results if r[2] == kind) for kind in ("plain", "stream", "ollama")}

    def delta(name, *labels):
        key = (name, tuple(sorted(labels)))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("tinyinfer_requests_total", ("endpoint", "/v1/completions"), ("code", "200")) == \
        n_by_kind["plain"] + n_by_kind["stream"]
    assert delta("tinyinfer_requests_total", ("endpoint", "/api/generate"), ("code", "200")) == n_by_kind["ollama"]
    assert delta("tinyinfer_request_duration_seconds_count", ("endpoint", "/api/generate")) == n_by_kind["ollama"]
    assert delta("tinyinfer_jobs_total", ("outcome", "ok")) == len(results)
    assert delta("tinyinfer_requests_rejected_total") == 0
    # token counters equal what was answered (plain and stream: usage; ollama: eval_count)
    answered = sum(n for (_, _, kind, p, k, text, finish, n) in results)
    assert delta("llamacpp:tokens_predicted_total") == answered
    assert delta("tinyinfer_prompt_tokens_requested_total") == sum(prompt_tokens[r[3]] for r in results)
    assert after[("llamacpp:requests_processing", ())] == 0 and after[("llamacpp:requests_deferred", ())] == 0
    growth = (rss_after - rss_before) / 2**20
    print(f"\nload: {len(results)} requests from {n_clients} clients in {wall:.1f} s "
          f"({len(results) / wall:.1f} req/s); RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
    assert growth < 32, f"RSS grew by {growth:.1f} MiB"


# --- SIGTERM: last, it ends the module's server -----------------------------------------------------

def test_sigterm_finishes_in_flight_and_tells_the_waiting(server):
    # long enough (~1-2 s) that it is still running when the second request queues up
    running = _raw(server, "/v1/completions", {"prompt": "One, two, three,", "max_tokens": 200, "stream": True,
                                               **GREEDY})
    server.wait_until(lambda h: h["slots_processing"] == 1, 30, "a running request")
    waiting = _raw(server, "/api/generate", {"model": ALIAS, "prompt": "hi", "stream": False})
    server.wait_until(lambda h: h["requests_deferred"] == 1, 30, "a waiting request")
    server.proc.send_signal(signal.SIGTERM)
    first = _read_all(running).decode()
    second = _read_all(waiting).decode()
    assert " 200 " in first.split("\r\n", 1)[0]
    assert "data: [DONE]" in first and re.search(r'"finish_reason":"(length|stop)"', first)  # it finished
    assert " 503 " in second.split("\r\n", 1)[0] and "shutting down" in second  # it was told
    # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly: the usual status of a
    # service stopped by SIGTERM (systemd counts it as success)
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    log = server.log_tail(20000)
    assert "Shutting down" in log and "Finished server process" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)


# --- start-up failures ---------------------------------------------------------------------------

def test_bad_model_file_fails_loudly(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    port = _free_port()
    p = subprocess.run([sys.executable, "-m", "tinyinfer", "serve", "-m", str(bad), "--port", str(port)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 1 and "could not load" in p.stderr
    p = subprocess.run([sys.executable, "-m", "tinyinfer", "serve", "-m", str(tmp_path / "missing.gguf")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 1 and "not found" in p.stderr
