"""Swap latency and memory of one server holding many models (tinyinfer/server/models.py).

    python benchmarks/bench_multimodel.py [--rounds 3] [--budget fit-one]

Two real models (SmolLM2-135M Q4_1, Qwen2.5-Coder-0.5B Q4_K_M) in a --models-dir; the server may hold
one at a time (--max-models 1, or with --budget fit-one a --max-memory that fits the larger model but
not both), so asking for the other one unloads the loaded one and loads it from the (warm) page cache.
For each request: the wall time, and ollama's ``load_duration`` (arrival until a slot took it: the
wait for the load when the model was cold). A thread samples the server's RSS every 20 ms: the peak
is compared with the RSS before any model was loaded plus the budget. Each round also times ollama's
/api/show of the model that is not loaded (read from its file; nothing may load: checked with /api/ps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import start_server  # noqa: E402


def estimate(path, n_ctx):
    from tinyinfer.server.config import ServerConfig
    from tinyinfer.server.models import Entry, ModelManager
    mgr = ModelManager.__new__(ModelManager)
    mgr.config = ServerConfig(n_ctx=n_ctx)
    return mgr.estimate(Entry("x", str(path), "dir"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--budget", choices=("none", "fit-one"), default="none")
    a = ap.parse_args(argv)
    from tinyinfer.fetch import fetch
    paths = {"smol": fetch("smollm2"), "qwen": fetch("qwen2.5")}
    d = tempfile.mkdtemp(prefix="tinyinfer-models-")
    for n, p in paths.items():
        os.symlink(p, os.path.join(d, n + ".gguf"))
    est = {n: estimate(p, a.ctx_size) for n, p in paths.items()}
    args = ["--models-dir", d, "-c", a.ctx_size, "-t", 1]
    budget = None
    if a.budget == "fit-one":
        budget = max(est.values()) + min(est.values()) // 2
        args += ["--max-memory", budget, "--max-models", 8]
    else:
        args += ["--max-models", 1]
    env = {"TINYINFER_CACHE": tempfile.mkdtemp(prefix="tinyinfer-store-"), "NUMBA_NUM_THREADS": "1"}
    proc, url = start_server(None, *args, env=env)
    ps = psutil.Process(proc.pid)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)
    base_rss = ps.memory_info().rss
    threading.Thread(target=sample, daemon=True).start()
    c = httpx.Client(timeout=300)

    def ask(name):
        t0 = time.perf_counter()
        r = c.post(url + "/api/generate", json={"model": name, "prompt": "Hi", "stream": False,
                                                "options": {"temperature": 0, "num_predict": 4}})
        r.raise_for_status()
        loaded = [m["name"] for m in c.get(url + "/api/ps").json()["models"]]
        return time.perf_counter() - t0, r.json()["load_duration"] / 1e9, loaded

    try:
        ask("smol")                  # the process's first load also loads the numba kernels: not counted
        ask("qwen")
        cold = {n: [] for n in paths}
        warm = {n: [] for n in paths}
        show = {n: [] for n in paths}
        both_loaded = 0
        for _ in range(a.rounds):
            for n in ("smol", "qwen"):
                wall, load, loaded = ask(n)            # the other one is loaded: a swap
                cold[n].append((wall, load))
                both_loaded += len(loaded) > 1
                wall, load, loaded = ask(n)
                warm[n].append((wall, load))
                other = "qwen" if n == "smol" else "smol"
                t0 = time.perf_counter()
                c.post(url + "/api/show", json={"model": other}).raise_for_status()
                show[other].append(time.perf_counter() - t0)
                assert [m["name"] for m in c.get(url + "/api/ps").json()["models"]] == loaded, "show loaded it"
        stop.set()
        time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)

    def fmt(xs):
        return f"{statistics.median(xs):.2f} [{min(xs):.2f}..{max(xs):.2f}]"
    print(f"estimates (inspect, -c {a.ctx_size}): " + ", ".join(f"{n} {v / 2**20:.0f} MiB" for n, v in est.items()))
    print(f"mode: {'--max-memory %d MiB' % (budget >> 20) if budget else '--max-models 1'}; rounds {a.rounds}")
    print("| model | cold request (s) | of which load_duration (s) | warm request (s) |")
    print("| --- | --- | --- | --- |")
    for n in paths:
        print(f"| {n} | {fmt([w for w, _ in cold[n]])} | {fmt([l for _, l in cold[n]])} | "
              f"{fmt([w for w, _ in warm[n]])} |")
    print("| model | /api/show, not loaded (s) |")
    print("| --- | --- |")
    for n in paths:
        print(f"| {n} | {fmt(show[n])} |")
    print(f"RSS before any model {base_rss / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB "
          f"(peak - before = {(peak[0] - base_rss) / 2**20:.0f} MiB); both models loaded at once: {both_loaded} times")
    return 0


if __name__ == "__main__":
    sys.exit(main())
