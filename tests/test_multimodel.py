"""One server, many models (tinyinfer/server/models.py): two real models (SmolLM2, Qwen2.5-Coder) in a
--models-dir beside a corrupt file, a real ``serve`` on loopback, the ollama and openai clients.

Each name answers from its own model, greedily as a one-model server of that file does;
--max-models 1 swaps them (/api/ps); keep_alive 0 and an expired keep_alive unload; a corrupt file
fails only its own requests; an unknown name is a 404 in both dialects; 8 concurrent clients
alternating two models with --max-models 2 all get their model's answer.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import need_module, serve_process

N_CTX = 512
MESSAGES = [{"role": "user", "content": "Name a color."}]
N_PREDICT = 8


@pytest.fixture(scope="module")
def models_dir(smollm2_path, qwen25_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    os.symlink(smollm2_path, d / "smol.gguf")
    os.symlink(qwen25_path, d / "qwen.gguf")
    with open(smollm2_path, "rb") as f:            # a GGUF cut short: its header promises tensors it lacks
        (d / "broken.gguf").write_bytes(f.read(5000))
    return d


@pytest.fixture(scope="module")
def expected(smollm2_path, qwen25_path):
    """Each model's greedy answer from a one-model server (``serve -m`` that file alone)."""
    out = {}
    for name, path in (("smol", smollm2_path), ("qwen", qwen25_path)):
        gen = serve_process(path, "-c", str(N_CTX))
        try:
            out[name] = _openai_chat(next(gen), name)
        finally:
            gen.close()
    assert out["smol"] != out["qwen"], out         # else "answers from its own model" tests nothing
    return out


def _serve(models_dir, *args):
    return serve_process(None, "--models-dir", str(models_dir), "-c", str(N_CTX), *args)


@pytest.fixture(scope="module")
def one_at_a_time(models_dir):
    """--max-models 1: every other model swaps the loaded one out."""
    yield from _serve(models_dir, "--max-models", "1")


@pytest.fixture(scope="module")
def two_at_a_time(models_dir):
    yield from _serve(models_dir, "--max-models", "2")


def _loaded(base) -> list:
    return [m["name"] for m in httpx.get(base + "/api/ps", timeout=30).json()["models"]]


def _wait_loaded(base, want, timeout=15.0) -> list:
    t_end = time.time() + timeout
    while True:
        now = _loaded(base)
        if sorted(now) == sorted(want) or time.time() > t_end:
            return now
        time.sleep(0.1)


def _ollama_chat(base, model, **kw):
    ollama = need_module("ollama")
    r = ollama.Client(host=base, timeout=120).chat(model=model, messages=MESSAGES,
                                                     options={"temperature": 0, "num_predict": N_PREDICT,
                                                              "repeat_penalty": 1.0}, **kw)
    return r["message"]["content"]


def _openai_chat(base, model):
    openai = need_module("openai")
    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    r = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=N_PREDICT, temperature=0)
    return r.choices[0].message.content


def test_lists_every_servable_model(one_at_a_time):
    base = one_at_a_time
    tags = {m["name"]: m for m in httpx.get(base + "/api/tags").json()["models"]}
    assert {"smol", "qwen", "broken"} <= set(tags)
    assert tags["qwen"]["details"]["family"] == "qwen2"
    ids = {m["id"] for m in httpx.get(base + "/v1/models").json()["data"]}
    assert {"smol", "qwen", "broken"} <= ids


def test_each_name_answers_from_its_own_model_and_swaps(one_at_a_time, expected):
    base = one_at_a_time
    assert _ollama_chat(base, "smol") == expected["smol"]
    assert _loaded(base) == ["smol"]
    assert _openai_chat(base, "qwen") == expected["qwen"]      # --max-models 1: smol made room
    assert _loaded(base) == ["qwen"]
    ps = httpx.get(base + "/api/ps").json()["models"][0]
    assert ps["context_length"] == N_CTX and ps["size"] > 0 and ps["expires_at"].startswith("20")
    assert _openai_chat(base, "smol") == expected["smol"]
    assert _ollama_chat(base, "qwen:latest") == expected["qwen"]
    m = httpx.get(base + "/metrics", params={"model": "qwen"}).text
    assert 'model="qwen"' in m and 'model="smol"' not in m
    assert httpx.get(base + "/props", params={"model": "qwen"}).json()["model_alias"] == "qwen"
    assert httpx.get(base + "/slots", params={"model": "smol"}).status_code == 404     # not loaded now


def test_unknown_name_is_a_404_in_both_dialects(one_at_a_time):
    ollama, openai = need_module("ollama"), need_module("openai")
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=one_at_a_time).generate(model="no-such-model", prompt="hi")
    assert e.value.status_code == 404 and "not found" in str(e.value)
    c = openai.OpenAI(base_url=one_at_a_time + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e2:
        c.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    assert e2.value.body["code"] == "model_not_found"
    assert httpx.get(one_at_a_time + "/v1/models/no-such-model").status_code == 404


def test_corrupt_file_fails_only_its_own_requests(one_at_a_time, expected, models_dir):
    base = one_at_a_time
    assert _ollama_chat(base, "smol") == expected["smol"]
    for _ in range(2):                                     # the second answer is the cached failure
        r = httpx.post(base + "/api/generate", json={"model": "broken", "prompt": "hi"}, timeout=60)
        assert r.status_code == 500 and "broken" in r.json()["error"] and "GGUFError" in r.json()["error"]
    r = httpx.post(base + "/v1/completions", json={"model": "broken", "prompt": "hi"}, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
    assert _loaded(base) == ["smol"]                       # nothing was evicted for it
    assert _ollama_chat(base, "smol") == expected["smol"]
    # the failure is remembered until the file changes: a good file under that name then loads
    os.replace(models_dir / "broken.gguf", models_dir / "broken.bad")
    try:
        os.symlink(os.path.realpath(models_dir / "smol.gguf"), models_dir / "broken.gguf")
        assert _openai_chat(base, "broken") == expected["smol"]
    finally:
        os.remove(models_dir / "broken.gguf")
        os.replace(models_dir / "broken.bad", models_dir / "broken.gguf")


def test_keep_alive_preload_unload_and_expiry(one_at_a_time):
    base = one_at_a_time
    gen = base + "/api/generate"
    r = httpx.post(gen, json={"model": "smol"}, timeout=60).json()          # empty: preload
    assert r["done_reason"] == "load" and _loaded(base) == ["smol"]
    r = httpx.post(gen, json={"model": "smol", "keep_alive": 0}, timeout=60).json()    # empty + 0: unload
    assert r["done_reason"] == "unload"
    assert _wait_loaded(base, []) == []
    # keep_alive 0 on a real request: unloaded once it is answered
    r = httpx.post(gen, json={"model": "smol", "prompt": "hi", "stream": False, "keep_alive": 0,
                              "options": {"num_predict": 2}}, timeout=60)
    assert r.status_code == 200 and r.json()["done"]
    assert _wait_loaded(base, []) == []
    # an expiring keep_alive: loaded, shown with its expiry, gone after it
    r = httpx.post(gen, json={"model": "smol", "keep_alive": "6s"}, timeout=60).json()   # (room for a busy machine)
    assert r["done_reason"] == "load"
    ps = httpx.get(base + "/api/ps").json()["models"]
    assert [m["name"] for m in ps] == ["smol"] and ps[0]["expires_at"].startswith("20")
    assert _wait_loaded(base, [], timeout=20) == []
    # negative: forever (stays past the default check interval)
    httpx.post(gen, json={"model": "smol", "keep_alive": -1}, timeout=60)
    time.sleep(1.0)
    assert _loaded(base) == ["smol"]
    assert httpx.post(gen, json={"model": "smol", "keep_alive": "soon"}).status_code == 400


def test_eight_clients_alternating_two_models(two_at_a_time, expected):
    base = two_at_a_time
    names = ["smol", "qwen"] * 4

    def one(i):
        name = names[i]
        return name, (_ollama_chat(base, name) if i % 4 < 2 else _openai_chat(base, name))

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    for name, text in results:
        assert text == expected[name], (name, text)
    assert sorted(_loaded(base)) == ["qwen", "smol"]


RUNTIME_MARGIN = 256 << 20     # the server process without a model: Python, numpy, numba + kernels (~190 MiB)


def test_memory_budget_swaps_and_rss_stays_within_it(models_dir, expected):
    """A --max-memory that fits the larger model but not both: the server swaps them, never holds two,
    and its RSS (sampled every 20 ms) never exceeds the budget plus RUNTIME_MARGIN."""
    import threading

    psutil = need_module("psutil")
    from tinyinfer.server.config import ServerConfig
    from tinyinfer.server.models import Entry, ModelManager
    mgr = ModelManager.__new__(ModelManager)
    mgr.config = ServerConfig(n_ctx=N_CTX)
    est = {n: mgr.estimate(Entry(n, str(models_dir / f"{n}.gguf"), "dir")) for n in ("smol", "qwen")}
    budget = est["qwen"] + est["smol"] // 2
    gen = serve_process(None, "--models-dir", str(models_dir), "-c", str(N_CTX), "--max-memory", str(budget),
                        "--max-models", "8")
    base = next(gen)
    try:
        port = base.rsplit(":", 1)[1]
        proc = next(p for p in psutil.Process().children() if port in " ".join(p.cmdline()))
        peak, stop = [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.02)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        for name in ("smol", "qwen", "smol", "qwen"):
            assert _openai_chat(base, name) == expected[name]
            assert _loaded(base) == [name]
        stop.set()
        t.join()
        assert peak[0] <= budget + RUNTIME_MARGIN, (peak[0] >> 20, budget >> 20)
        ps = httpx.get(base + "/api/ps").json()["models"]
        assert ps[0]["size"] == est["qwen"]
    finally:
        gen.close()


def test_busy_models_are_never_evicted_full_queue_503_and_sleep_idle(models_dir, expected):
    """--max-models 1 --max-queue 0: while smol serves a request another model cannot make room (503 +
    Retry-After, smol keeps streaming); once smol is idle it can. --sleep-idle-seconds unloads all."""
    gen = serve_process(None, "--models-dir", str(models_dir), "-c", str(N_CTX), "--max-models", "1",
                        "--max-queue", "0", "--sleep-idle-seconds", "2")
    base = next(gen)
    try:
        with httpx.Client(timeout=120) as c:
            body = {"model": "smol", "prompt": "Count from one to one thousand:", "raw": True,
                    "options": {"num_predict": 400, "temperature": 0}}
            with c.stream("POST", base + "/api/generate", json=body) as r:
                lines = r.iter_lines()
                assert '"done":false' in next(lines)              # generating now
                busy = c.post(base + "/v1/completions", json={"model": "qwen", "prompt": "hi", "max_tokens": 1})
                assert busy.status_code == 503 and int(busy.headers["Retry-After"]) > 0
                assert _loaded(base) == ["smol"]
                assert '"done":false' in next(lines)              # still streaming: never evicted
        assert _openai_chat(base, "qwen") == expected["qwen"]    # smol idle now (client left): swapped
        assert _loaded(base) == ["qwen"]
        assert _wait_loaded(base, [], timeout=10) == []           # --sleep-idle-seconds 2
    finally:
        gen.close()


def test_llama_server_router_routes(one_at_a_time):
    base = one_at_a_time
    assert httpx.post(base + "/models/load", json={"model": "smol"}, timeout=60).json() == {"success": True}
    models = {m["id"]: m["status"] for m in httpx.get(base + "/models").json()["data"]}
    assert models["smol"]["value"] == "loaded" and models["qwen"]["value"] == "unloaded"
    assert httpx.post(base + "/models/unload", json={"model": "smol"}).json() == {"success": True}
    assert _wait_loaded(base, []) == []
    r = httpx.post(base + "/models/load", json={"model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_concurrent_requests_share_one_load(one_at_a_time, expected):
    base = one_at_a_time
    httpx.post(base + "/api/generate", json={"model": "smol"}, timeout=60)          # qwen is cold now
    assert _loaded(base) == ["smol"]
    before = httpx.get(base + "/props").json()["n_loads"]
    with ThreadPoolExecutor(3) as ex:
        answers = list(ex.map(lambda _: _openai_chat(base, "qwen"), range(3)))
    assert answers == [expected["qwen"]] * 3
    assert httpx.get(base + "/props").json()["n_loads"] == before + 1


def test_m_with_models_dir_is_preloaded(models_dir, qwen25_path, expected):
    gen = serve_process(qwen25_path, "--alias", "coder", "--models-dir", str(models_dir), "-c", str(N_CTX))
    base = next(gen)
    try:
        assert _wait_loaded(base, ["coder"], timeout=60) == ["coder"]      # loaded at start, no request
        openai = need_module("openai")
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="", messages=MESSAGES, max_tokens=N_PREDICT, temperature=0)
        assert r.model == "coder" and r.choices[0].message.content == expected["qwen"]   # no name: -m's
        assert _ollama_chat(base, "smol") == expected["smol"]               # the folder's too
        assert sorted(_loaded(base)) == ["coder", "smol"]
    finally:
        gen.close()


def test_a_request_waits_for_room_while_the_loaded_model_serves(one_at_a_time, expected):
    """--max-models 1: qwen's request waits until smol's running request is done (never cut short)."""
    base = one_at_a_time
    body = {"model": "smol", "prompt": "Count from one to one hundred:", "raw": True,
            "options": {"num_predict": 48, "temperature": 0}}
    with httpx.Client(timeout=120) as c, ThreadPoolExecutor(1) as ex:
        with c.stream("POST", base + "/api/generate", json=body) as r:
            lines = r.iter_lines()
            assert '"done":false' in next(lines)
            other = ex.submit(_openai_chat, base, "qwen")          # waits for room
            time.sleep(0.3)
            assert not other.done()
            last = [ln for ln in lines if ln][-1]
        assert '"done":true' in last and '"eval_count":48' in last
        assert other.result() == expected["qwen"]
    assert _loaded(base) == ["qwen"]


def _props(base) -> dict:
    return httpx.get(base + "/props", timeout=30).json()


def _status(base, name) -> str:
    return {m["id"]: m["status"]["value"] for m in httpx.get(base + "/v1/models", timeout=30).json()["data"]}[name]


def _until(cond, timeout=60.0, what="condition"):
    t_end = time.time() + timeout
    while not cond():
        assert time.time() < t_end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_show_reads_the_file_without_loading_it(one_at_a_time):
    """/api/show of a model that is not loaded answers from its file (metadata, tokenizer, template):
    nothing is loaded or evicted, and the answer is the one the loaded model gives."""
    ollama = need_module("ollama")
    base = one_at_a_time
    show = base + "/api/show"
    httpx.post(base + "/api/generate", json={"model": "smol"}, timeout=60)     # smol loaded, qwen not
    assert _loaded(base) == ["smol"]
    n_loads = _props(base)["n_loads"]
    cold = httpx.post(show, json={"model": "qwen"}, timeout=60).json()
    cold_verbose = httpx.post(show, json={"model": "qwen", "verbose": True}, timeout=60).json()
    client = ollama.Client(host=base, timeout=60).show("qwen")
    assert _loaded(base) == ["smol"] and _props(base)["n_loads"] == n_loads     # --max-models 1: no swap
    assert cold["details"]["family"] == "qwen2" and {"completion", "tools"} <= set(cold["capabilities"])
    assert "<|im_start|>" in cold["template"] and "<|im_end|>" in cold["parameters"]
    assert client.capabilities == cold["capabilities"] and client.template == cold["template"]
    r = httpx.post(show, json={"model": "broken"}, timeout=60)
    assert r.status_code == 500 and "GGUFError" in r.json()["error"]
    assert httpx.post(show, json={"model": "nope"}).status_code == 404
    httpx.post(base + "/api/generate", json={"model": "qwen"}, timeout=60)     # now loaded: the same answers
    assert _loaded(base) == ["qwen"]
    assert httpx.post(show, json={"model": "qwen"}, timeout=60).json() == cold
    assert httpx.post(show, json={"model": "qwen", "verbose": True}, timeout=60).json() == cold_verbose
    # and nothing of this was counted: the server still has one model (and shows smol without loading it)
    assert httpx.post(show, json={"model": "smol"}, timeout=60).status_code == 200
    assert _loaded(base) == ["qwen"]


def _leaving_client(base, model):
    """A real HTTP client (http.client) that asks ``model`` for a chat answer; close() leaves."""
    import http.client
    import json
    host, port = base.rsplit("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"model": model, "messages": MESSAGES, "max_tokens": N_PREDICT, "temperature": 0}),
        headers={"Content-Type": "application/json"})
    return conn


def test_a_load_nobody_waits_for_is_abandoned(one_at_a_time, expected):
    """The only client waiting for qwen's load leaves during it: the load is abandoned (unloaded as soon
    as its thread returns, never left 'loading'), and a later request loads it afresh."""
    base = one_at_a_time
    httpx.post(base + "/api/generate", json={"model": "smol"}, timeout=60)
    assert _loaded(base) == ["smol"]
    before = _props(base)
    conn = _leaving_client(base, "qwen")
    _until(lambda: _status(base, "qwen") == "loading", what="qwen's load to start")
    conn.close()                                                   # the client leaves mid-load
    _until(lambda: _props(base)["n_loads_abandoned"] == before["n_loads_abandoned"] + 1, what="the abandon")
    assert _status(base, "qwen") == "unloaded" and _loaded(base) == []
    assert _props(base)["n_loads"] == before["n_loads"] + 1
    assert _openai_chat(base, "qwen") == expected["qwen"]          # loads again, answers
    assert _loaded(base) == ["qwen"]


def test_a_client_that_leaves_while_waiting_for_room_evicts_nothing(one_at_a_time, expected):
    """--max-models 1, smol busy: a request for qwen waits for room; its client leaves; once smol is
    idle, nothing is evicted for the request that left and qwen is never loaded."""
    base = one_at_a_time
    httpx.post(base + "/api/generate", json={"model": "smol"}, timeout=60)
    n_loads = _props(base)["n_loads"]
    body = {"model": "smol", "prompt": "Count from one to one thousand:", "raw": True,
            "options": {"num_predict": 400, "temperature": 0}}
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", base + "/api/generate", json=body) as r:
            lines = r.iter_lines()
            assert '"done":false' in next(lines)                   # smol busy
            conn = _leaving_client(base, "qwen")
            _until(lambda: _props(base)["n_waiting_for_room"] == 1, what="qwen's request to wait for room")
            conn.close()
            _until(lambda: _props(base)["n_waiting_for_room"] == 0, what="the waiter to leave")
            assert '"done":false' in next(lines)
    time.sleep(0.5)                                                # smol idle now (its client left too)
    assert _loaded(base) == ["smol"] and _props(base)["n_loads"] == n_loads
    assert _status(base, "qwen") == "unloaded"
    assert _ollama_chat(base, "smol") == expected["smol"]


def test_a_model_larger_than_the_budget_is_an_error_and_show_needs_no_room(models_dir):
    """--max-memory below any model: a request is a clear 500 (never an out-of-memory kill), and
    /api/show still answers, as it loads nothing."""
    ollama = need_module("ollama")
    gen = _serve(models_dir, "--max-memory", "64M")
    base = next(gen)
    try:
        r = httpx.post(base + "/v1/chat/completions", json={"model": "smol", "messages": MESSAGES,
                                                             "max_tokens": 1}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "insufficient_memory"
        assert "--max-memory" in r.json()["error"]["message"]
        client = ollama.Client(host=base, timeout=60)
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="qwen", prompt="hi")
        assert e.value.status_code == 500 and "memory budget" in e.value.error
        assert client.show("smol").details.family == "llama"
        assert _loaded(base) == [] and _props(base)["n_loads"] == 0
    finally:
        gen.close()
