"""Replicas on Ray Serve (tinyinfer/ray_serve.py): the server's own routes behind Ray's proxy.

The short run (default): ``python -m tinyinfer serve --ray --replicas 1`` on loopback with an API
key, driven by the real ``openai`` and ``ollama`` clients; answers equal the ``Llama`` class's;
errors pass through unchanged; then the replica's process is killed while it holds a request:
that request gets 503 + Retry-After + ``replica_lost``, Ray starts a new replica, and the next
request is answered. The full run (``-m slow``): benchmarks/bench_ray_serve.py with 2 replicas,
8 clients x 4 x 32 tokens and a replica killed mid-load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import empty_store_env, need_module  # noqa: E402

httpx = need_module("httpx")
need_module("ray.serve")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
KEY = "sk-ray-51c0"
AUTH = {"Authorization": f"Bearer {KEY}"}
NO_EOS = {"0": -100, "1": -100, "2": -100}


def test_options_are_checked():
    from tinyinfer.ray_serve import RayServeOptions
    o = RayServeOptions.from_args({"model": "m.gguf", "replicas": "2", "threads": 1, "ctx-size": "256"})
    assert (o.replicas, o.threads, o.ctx_size) == (2, 1, 256)
    assert o.server_config()["n_ctx"] == 256 and o.server_config()["model_path"] == "m.gguf"
    for bad, msg in [({"model": "m", "replica": 2}, "unknown tinyinfer Ray Serve argument(s) replica"),
                     ({"replicas": 2}, "needs model="), ({"model": "m", "replicas": 0}, "replicas must be >= 1"),
                     ({"model": "m", "autoscale": "4:1"}, "autoscale='4:1'"),
                     ({"model": "m", "threads": "two"}, "threads='two': expected a number")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            RayServeOptions.from_args(bad)
    # what Ray Serve is given (its own config classes validate it): a fixed count, or autoscaling on
    # ongoing requests with a target of one per slot; a replica holds slots + 1 requests at most
    from tinyinfer.ray_serve import build
    gateway = build(RayServeOptions.from_args({"model": "m.gguf", "autoscale": "1:3", "parallel": 2}))._bound_deployment
    replica = gateway.init_args[0]._bound_deployment
    cfg = replica._deployment_config
    assert (cfg.autoscaling_config.min_replicas, cfg.autoscaling_config.max_replicas) == (1, 3)
    assert cfg.autoscaling_config.target_ongoing_requests == 2 and cfg.max_ongoing_requests == 3
    fixed = build(RayServeOptions.from_args({"model": "m.gguf", "replicas": 3}))._bound_deployment
    assert fixed.init_args[0]._bound_deployment.num_replicas == 3


@pytest.fixture(scope="module")
def ray_server(smollm2_path, tmp_path_factory):
    from bench_ray_serve import free_port, replica_pids, stop, wait_health
    assert replica_pids() == [], "another tinyinfer Ray Serve is running"
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tinyinfer", "serve", "--ray", "--replicas", "1",
                                 "-m", str(smollm2_path), "--port", str(port), "-c", "512", "-t", "1",
                                 "--api-key", KEY, "--alias", "smollm2"],
                                stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, NUMBA_NUM_THREADS="1", **empty_store_env()))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc, 300, replicas=1)
    except Exception:
        stop(proc)
        raise AssertionError(log.read_text(errors="replace")[-4000:])
    yield url, proc
    stop(proc)
    assert replica_pids() == []


def test_same_routes_and_answers_as_serve(ray_server, smollm2_path):
    import ollama
    import openai
    from tinyinfer import Llama
    url, _ = ray_server
    llm = Llama(str(smollm2_path), n_ctx=512, verbose=False)
    want = llm.create_completion("The capital of France is", max_tokens=8, temperature=0,
                                repeat_penalty=1.0)["choices"][0]["text"]
    want_chat = llm.create_chat_completion([{"role": "user", "content": "Say hello."}], max_tokens=8,
                                           temperature=0, repeat_penalty=1.0)["choices"][0]["message"]["content"]
    oa = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    r = oa.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0,
                              extra_body={"repeat_penalty": 1.0})
    assert r.choices[0].text == want
    chunks = list(oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                                             max_tokens=8, temperature=0, stream=True,
                                             extra_body={"repeat_penalty": 1.0}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
    ol = ollama.Client(host=url, headers=AUTH)
    g = ol.generate(model="smollm2", prompt="The capital of France is", raw=True,
                    options={"num_predict": 8, "temperature": 0, "repeat_penalty": 1.0})
    assert g.response == want
    assert [m.model for m in ol.list().models] == ["smollm2"]
    # errors are the app's own, unchanged
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": -5}, headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=60)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/metrics", headers=AUTH, timeout=60).text.count("llamacpp:tokens_predicted_total") >= 1


def test_killed_replica_gives_retryable_error_and_comes_back(ray_server):
    from bench_ray_serve import replica_pids
    url, _ = ray_server
    (pid,) = replica_pids()
    held = {}

    def long_request():
        r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=120,
                       json={"prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
                             "logit_bias": NO_EOS})
        held["r"] = r

    t = threading.Thread(target=long_request)
    t.start()
    t0 = time.monotonic()
    while httpx.get(url + "/health", timeout=30).json().get("slots_processing") != 1:
        assert time.monotonic() - t0 < 60 and t.is_alive(), "the long request never started"
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    r = held["r"]
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "replica_lost" and "retry" in err["message"]
    # Ray replaces the replica; a request (retried as Retry-After says) is answered by the new one
    deadline = time.monotonic() + 180
    while True:
        r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=120,
                       json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        if r.status_code == 200:
            break
        assert r.status_code == 503 and "retry-after" in r.headers, r.text
        assert time.monotonic() < deadline, "no replica came back"
        time.sleep(int(r.headers["retry-after"]))
    new = replica_pids()
    assert len(new) == 1 and new != [pid]


@pytest.mark.slow
def test_two_replicas_load_with_a_kill(smollm2_path, tmp_path):
    import json
    from bench_ray_serve import main
    out = tmp_path / "out.json"
    rc = main(["-m", str(smollm2_path), "--replicas", "2", "--clients", "8", "--requests", "4", "--tokens", "32",
               "--kill", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["ray"]["first_try_errors"] == [] and figures["ray"]["tokens"] == 8 * 4 * 32
    res = figures["ray_kill"]
    assert rc == 0 and res["final_errors"] == [] and res["requests"] == 32
    assert all(e[0] == 503 and e[2] == "replica_lost" for e in res["first_try_errors"])
    assert len(res["first_try_errors"]) <= 2          # at most what one replica holds (1 slot + 1 waiting)
    assert res["replicas_after"] == 2 and res["after_kill_status"] == 200
