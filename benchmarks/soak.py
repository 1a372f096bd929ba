"""Soak test: a few thousand mixed requests against one ``serve`` on loopback, the server's RSS sampled.

    python benchmarks/soak.py [-m MODEL] [-n 2000] [-c 4] [--parallel 4] [--seconds 1800]

Mixed load from ``-c`` client threads, each request drawn from a seeded generator: OpenAI chat
(plain, streamed), JSON object / JSON schema replies with small budgets, a tool call, completions,
embeddings, ollama chat / generate, and cancellations (a streamed request closed after its first
chunks). The server's RSS (``/proc/PID/status`` VmRSS) is sampled every 0.5 s. Printed: the counts by
kind and status, errors (any 5xx, transport error, or unparsable JSON reply), and RSS after the warm-up
(first 10% of requests), its maximum, at the end, and the growth over the last half of the run (a
plateau shows as a growth near zero). Bounded by ``-n`` requests and ``--seconds``; traffic goes to
127.0.0.1 only. Exit status 1 when anything errored.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from bench_serving import start_server

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
PROMPTS = ["Write a haiku about the sea.", "What is 17 times 3?", "Name three colours.", "Tell me about Paris.",
           "Say hello in French.", "List two fruits.", "Why is the sky blue?", "Give a short tip for sleep."]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(client: httpx.Client, base: str, rng: random.Random, model: str) -> str:
    """One request of a random kind; returns its kind (raises on an error)."""
    kind = rng.choice(["chat", "chat", "stream", "json", "schema", "tools", "completion", "embed", "ollama_chat",
                       "ollama_generate", "cancel"])
    msgs = [{"role": "user", "content": rng.choice(PROMPTS)}]
    n = rng.randint(4, 32)
    seed = rng.randint(0, 1 << 20)
    if kind == "chat":
        r = client.post(base + "/v1/chat/completions", json={"model": model, "messages": msgs, "max_tokens": n,
                                                             "temperature": rng.choice([0, 0.8]), "seed": seed})
    elif kind == "stream":
        with client.stream("POST", base + "/v1/chat/completions",
                           json={"model": model, "messages": msgs, "max_tokens": n, "stream": True}) as r:
            body = "".join(r.iter_text())
        _check(r)
        if "[DONE]" not in body:
            raise RuntimeError("stream without [DONE]")
        return kind
    elif kind in ("json", "schema"):
        rf = {"type": "json_object"} if kind == "json" else \
            {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
        r = client.post(base + "/v1/chat/completions", json={"model": model, "messages": msgs, "max_tokens": n + 8,
                                                             "temperature": 0.8, "seed": seed,
                                                             "response_format": rf})
        _check(r)
        json.loads(r.json()["choices"][0]["message"]["content"])     # closed by its grammar: always parses
        return kind
    elif kind == "tools":
        r = client.post(base + "/v1/chat/completions", json={
            "model": model, "max_tokens": 48, "tools": [TOOL], "tool_choice": "required",
            "messages": [{"role": "user", "content": "What is the weather in Oslo?"}]})
    elif kind == "completion":
        r = client.post(base + "/v1/completions", json={"model": model, "prompt": msgs[0]["content"], "max_tokens": n})
    elif kind == "embed":
        r = client.post(base + "/v1/embeddings", json={"model": model, "input": rng.sample(PROMPTS, 3)})
    elif kind == "ollama_chat":
        r = client.post(base + "/api/chat", json={"model": model, "messages": msgs, "stream": False,
                                                  "options": {"num_predict": n, "seed": seed}})
    elif kind == "ollama_generate":
        r = client.post(base + "/api/generate", json={"model": model, "prompt": msgs[0]["content"], "stream": False,
                                                      "options": {"num_predict": n}})
    else:           # a client that goes away after the first chunks
        with client.stream("POST", base + "/v1/chat/completions",
                           json={"model": model, "messages": msgs, "max_tokens": 64, "stream": True}) as r:
            _check(r)
            for i, _ in enumerate(r.iter_lines()):
                if i >= 2:
                    break
        return kind
    _check(r)
    return kind


def _check(r: httpx.Response) -> None:
    if r.status_code >= 500 or r.status_code in (400, 404, 422):
        body = r.read().decode(errors="replace") if not r.is_closed else r.text
        raise RuntimeError(f"HTTP {r.status_code}: {body[:200]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the fetched Qwen2.5-Coder, which takes tools)")
    ap.add_argument("-n", "--requests", type=int, default=2000)
    ap.add_argument("-c", "--clients", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=1800, help="stop sending after this long")
    ap.add_argument("--seed", type=int, default=26)
    a = ap.parse_args(argv)
    if a.model is None:
        from tinyinfer.fetch import fetch
        a.model = str(fetch("qwen2.5"))
    model = "soak"
    proc, base = start_server(a.model, "--alias", model, "--parallel", a.parallel, "-t", a.threads, "-c", 4096,
                              "--max-queue", 256)
    try:
        samples: list = []           # (seconds, requests done, RSS MiB)
        done = Counter()
        errors: list = []
        lock = threading.Lock()
        stop = threading.Event()
        t0 = time.perf_counter()
        counter = iter(range(a.requests))

        def sampler():
            while not stop.is_set():
                with lock:
                    n = sum(done.values()) + len(errors)
                samples.append((time.perf_counter() - t0, n, rss_mib(proc.pid)))
                stop.wait(0.5)

        def worker(k):
            rng = random.Random(a.seed * 1000 + k)
            with httpx.Client(timeout=300) as client:
                while time.perf_counter() - t0 < a.seconds:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    try:
                        kind = one(client, base, rng, model)
                        with lock:
                            done[kind] += 1
                    except Exception as e:  # noqa: BLE001 - every failure is counted and printed
                        with lock:
                            errors.append(f"{type(e).__name__}: {e}")

        st = threading.Thread(target=sampler, daemon=True)
        st.start()
        ws = [threading.Thread(target=worker, args=(k,)) for k in range(a.clients)]
        for w in ws:
            w.start()
        for w in ws:
            w.join()
        stop.set()
        st.join()
        wall = time.perf_counter() - t0
        total = sum(done.values()) + len(errors)
        warm = [r for _, n, r in samples if n >= total * 0.1] or [samples[-1][2]]
        half = [(t, r) for t, n, r in samples if n >= total * 0.5]
        growth = (half[-1][1] - half[0][1]) if len(half) > 1 else 0.0
        print(f"soak: {total} requests in {wall:.0f} s from {a.clients} clients, --parallel {a.parallel}, "
              f"-t {a.threads}, {Path(a.model).name}")
        print("| kind | ok |\n| --- | --- |")
        for k, v in sorted(done.items()):
            print(f"| {k} | {v} |")
        print(f"errors: {len(errors)}")
        for e in errors[:10]:
            print("  ", e)
        print(f"RSS MiB: start {samples[0][2]:.0f}, after warm-up {warm[0]:.0f}, max {max(r for *_, r in samples):.0f}, "
              f"end {samples[-1][2]:.0f}; growth over the last half {growth:+.0f} MiB")
        marks = []
        for q in (0.1, 0.25, 0.5, 0.75, 1.0):
            at = [r for _, n, r in samples if n >= total * q] or [samples[-1][2]]
            marks.append(f"{q:.0%} {at[0]:.0f}")
        print("RSS MiB after each share of the requests: " + ", ".join(marks))
        return 1 if errors else 0
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
