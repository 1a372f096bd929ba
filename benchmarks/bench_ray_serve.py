"""Replicas on Ray Serve against one plain ``serve``: throughput, and what a killed replica costs.

    python benchmarks/bench_ray_serve.py [-m MODEL] [--replicas 2] [--clients 8] [--requests 4]
                                         [--tokens 32] [--kill] [--plain] [--json OUT]

Starts ``python -m tinyinfer serve --ray --replicas N`` on loopback (one thread per replica), waits
for every replica, then runs the load: CLIENTS threads, each sending REQUESTS OpenAI completions of
TOKENS tokens (temperature 0, end tokens banned). With ``--kill`` the load runs a second time and
one replica's process gets SIGKILL once a third of those requests are done: each request that fails must be a 503 with Retry-After and ``code: replica_lost``
(the ones the dead replica held); the client then retries once after Retry-After, as a client should.
The script waits until Ray has replaced the replica. With ``--plain`` the same load goes to one plain
``python -m tinyinfer serve -t 1`` afterwards. Everything on 127.0.0.1, bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
REPLICA_TITLE = "ServeReplica:tinyinfer:TinyInferReplica"
PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain how a bicycle works, step by step.",
           "List some facts about the ocean and the animals that live in it.",
           "Describe a walk through a busy market in the morning."]

NO_EOS = {"0": -100, "1": -100, "2": -100}     # SmolLM2's end tokens: every request generates TOKENS tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_pids() -> list:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(REPLICA_TITLE in c for c in (p.info["cmdline"] or ())):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sorted(out)


def wait_health(url: str, proc: subprocess.Popen, timeout: float, replicas: int = 0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            ok = httpx.get(url + "/health", timeout=3).json().get("status") == "ok"
        except (httpx.HTTPError, ValueError):
            ok = False
        if ok and (not replicas or len(replica_pids()) >= replicas):
            return time.monotonic() - t0
        time.sleep(0.25)
    raise RuntimeError(f"not ready after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_load(url: str, clients: int, requests: int, tokens: int, kill_after: int = 0) -> dict:
    done = [0]
    lock = threading.Lock()
    results = []          # one dict per request
    killed = {}

    def maybe_kill():
        with lock:
            if kill_after and not killed and done[0] >= kill_after:
                pids = replica_pids()
                killed["pid"] = pids[0]
                killed["t"] = time.monotonic()
                os.kill(pids[0], signal.SIGKILL)

    def client(ci):
        with httpx.Client(timeout=300) as c:
            for ri in range(requests):
                body = {"prompt": PROMPTS[(ci + ri) % len(PROMPTS)], "max_tokens": tokens, "temperature": 0,
                        "logit_bias": NO_EOS}
                rec = {"client": ci, "i": ri, "tries": []}
                for attempt in range(2):
                    t0 = time.monotonic()
                    try:
                        r = c.post(url + "/v1/completions", json=body)
                        status, js = r.status_code, (r.json() if r.headers.get("content-type", "").startswith(
                            "application/json") else {"raw": r.text[:200]})
                        retry = r.headers.get("retry-after")
                    except httpx.HTTPError as e:
                        status, js, retry = -1, {"exception": repr(e)}, None
                    rec["tries"].append({"status": status, "retry_after": retry, "s": time.monotonic() - t0,
                                         "tokens": (js.get("usage") or {}).get("completion_tokens", 0)
                                         if status == 200 else 0,
                                         "code": (js.get("error") or {}).get("code") if status != 200 else None})
                    if status == 200 or not retry:
                        break
                    time.sleep(float(retry))
                results.append(rec)
                with lock:
                    done[0] += 1
                maybe_kill()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    wall = time.monotonic() - t0
    first = [r["tries"][0] for r in results]
    final = [r["tries"][-1] for r in results]
    return {"wall_s": wall, "requests": len(results),
            "tokens": sum(t["tokens"] for r in results for t in r["tries"]),
            "first_try_errors": [(t["status"], t["retry_after"], t["code"]) for t in first if t["status"] != 200],
            "final_errors": [(t["status"], t["code"]) for t in final if t["status"] != 200],
            "killed": killed, "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--kill", action="store_true", help="SIGKILL one replica a third of the way through")
    ap.add_argument("--plain", action="store_true", help="then the same load against one plain serve -t 1")
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args(argv)
    if a.model is None:
        from tinyinfer.fetch import fetch
        a.model = str(fetch("smollm2"))
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    out = {"replicas": a.replicas, "clients": a.clients, "requests": a.requests, "tokens": a.tokens}
    total = a.clients * a.requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(f"/tmp/bench_ray_serve_{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tinyinfer", "serve", "--ray", "--replicas", str(a.replicas),
                             "-m", a.model, "--port", str(port), "-c", "512", "-t", "1", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        out["ray_start_s"] = wait_health(url, proc, 300, a.replicas)
        httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
        res = run_load(url, a.clients, a.requests, a.tokens)
        out["ray"] = {k: v for k, v in res.items() if k != "results"}
        out["ray"]["tok_s"] = res["tokens"] / res["wall_s"]
        if a.kill:
            res = run_load(url, a.clients, a.requests, a.tokens, kill_after=total // 3)
            out["ray_kill"] = {k: v for k, v in res.items() if k != "results"}
            out["ray_kill"]["tok_s"] = res["tokens"] / res["wall_s"]
            pids_before = res["killed"]["pid"]
            t0 = time.monotonic()
            while time.monotonic() - t0 < 300:
                pids = replica_pids()
                if len(pids) >= a.replicas and pids_before not in pids:
                    break
                time.sleep(0.5)
            out["ray_kill"]["replicas_after"] = len(replica_pids())
            out["ray_kill"]["back_after_kill_s"] = time.monotonic() - res["killed"]["t"]
            wait_health(url, proc, 120, a.replicas)
            r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
            out["ray_kill"]["after_kill_status"] = r.status_code
    finally:
        stop(proc)
        log.close()

    if a.plain:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "tinyinfer", "serve", "-m", a.model, "--port", str(port),
                                 "-c", "512", "-t", "1", "--max-queue", str(total), "--no-access-log",
                                 "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            wait_health(url, proc, 300)
            httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
            res = run_load(url, a.clients, a.requests, a.tokens)
            out["plain"] = {k: v for k, v in res.items() if k != "results"}
            out["plain"]["tok_s"] = res["tokens"] / res["wall_s"]
        finally:
            stop(proc)

    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    bad = bool(out["ray"]["final_errors"] or out["ray"]["first_try_errors"])
    if a.kill:
        k = out["ray_kill"]
        bad = bad or bool(k["final_errors"]) or any(e[0] != 503 or e[2] != "replica_lost" or not e[1]
                                                     for e in k["first_try_errors"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
