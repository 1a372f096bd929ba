"""Short sentences per second through /v1/embeddings: ``tinyinfer serve`` vs ``llama-server --embedding``.

    python benchmarks/bench_embedding_server.py -m MODEL.gguf --llama-server PATH/llama-server [-t 1] [-r 3]

Both servers run on loopback with the same file, threads and tokens per pass (-b; llama-server -b and -ub);
llama-server packs up to 4 concurrent sequences into a pass (-np 4). After a warm-up request, two loads:
``batch``: requests of 32 sentences each, one after the other; ``single``: one sentence per request from
4 concurrent clients, each on its own keep-alive connection (as an SDK's connection pool; a new
``httpx.Client`` per request costs the client ~29 ms of CPU, several times the server's work, and made
the load measure the client; ``--loads single-fresh`` still runs that one). Both servers stay up; each
round runs every load on one then the other (the order flips each round). Median [min..max] sentences
per second and server CPU time per sentence (user + system of the process, all threads: less sensitive
to a shared machine), and the median [min..max] of each round's tinyinfer / llama.cpp ratio.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embedding import sentences  # noqa: E402
from bench_serving import _free_port as _port, wait_ready  # noqa: E402


def start(cmd, port):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS", "2")})
    return proc, wait_ready(proc, port, Path(cmd[0]).name, timeout=120)


def cpu_seconds(pid) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc; nan elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def load(base, pid, lines, mode) -> tuple:
    """(sentences per second, server CPU ms per sentence) of one load, warm-up requests excluded."""
    with httpx.Client(timeout=600) as c:
        c.post(base + "/v1/embeddings", json={"input": lines[:4]}).raise_for_status()
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        if mode == "batch":
            for i in range(0, len(lines), 32):
                c.post(base + "/v1/embeddings", json={"input": lines[i:i + 32]}).raise_for_status()
        elif mode == "single-fresh":        # the earlier load: a new client (and connection) per request
            with cf.ThreadPoolExecutor(4) as ex:
                list(ex.map(lambda s: httpx.post(base + "/v1/embeddings", json={"input": s}, timeout=600)
                            .raise_for_status(), lines))
        else:                               # 4 clients, each on its keep-alive connection, a sentence a request
            clients = [httpx.Client(timeout=600) for _ in range(4)]
            try:
                for x in clients:
                    x.post(base + "/v1/embeddings", json={"input": lines[0]}).raise_for_status()
                c0, t0 = cpu_seconds(pid), time.perf_counter()

                def client(i):
                    for s in lines[i::4]:
                        clients[i].post(base + "/v1/embeddings", json={"input": s}).raise_for_status()
                with cf.ThreadPoolExecutor(4) as ex:
                    list(ex.map(client, range(4)))
            finally:
                for x in clients:
                    x.close()
        t1, c1 = time.perf_counter(), cpu_seconds(pid)
    return len(lines) / (t1 - t0), (c1 - c0) * 1e3 / len(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("-b", "--batch-size", type=int, default=512,
                    help="tokens per pass: tinyinfer -b, llama-server -b and -ub (default 512)")
    ap.add_argument("--loads", default="batch,single", help="which loads to run (default batch,single)")
    ap.add_argument("--llama-args", default="",
                    help="extra llama-server flags (e.g. --no-repack for a build made on another CPU)")
    a = ap.parse_args(argv)
    lines = sentences(a.n)
    servers = {
        "tinyinfer": lambda p: [sys.executable, "-m", "tinyinfer", "serve", "-m", a.model, "--port", str(p),
                                "-t", str(a.threads), "-c", "512", "-b", str(a.batch_size), "--no-access-log",
                                "--log-level", "warning"],
        "llama.cpp": lambda p: [a.llama_server, "-m", a.model, "--port", str(p), "-t", str(a.threads), "--embedding",
                                "-c", "2048", "-b", str(a.batch_size), "-ub", str(a.batch_size),
                                "-np", "4"] + a.llama_args.split(),
    }
    loads = a.loads.split(",")
    rates = {(k, m): [] for k in servers for m in loads}
    cpu = {(k, m): [] for k in servers for m in loads}         # server CPU ms per sentence
    procs = {}
    try:
        for k, cmd in servers.items():                          # both stay up: rounds alternate, warm
            port = _port()
            procs[k] = start(cmd(port), port)
        for r in range(a.repeats):
            for m in loads:
                for k in (list(servers) if r % 2 == 0 else list(servers)[::-1]):   # ABBA: drift cancels
                    proc, base = procs[k]
                    try:
                        rate, ms = load(base, proc.pid, lines, m)
                    except httpx.HTTPStatusError as e:       # say whose answer it was, and what it said
                        raise SystemExit(f"{k} ({m} load, round {r + 1}): {e.response.status_code} "
                                         f"{e.response.text[:300]}") from e
                    rates[(k, m)].append(rate)
                    cpu[(k, m)].append(ms)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(f"| server | load | sentences/s ({a.n} short sentences, {a.threads} thread(s)) [min..max] "
          f"| server CPU ms / sentence [min..max] |")
    print("| --- | --- | --- | --- |")
    for (k, m), v in rates.items():
        c = cpu[(k, m)]
        print(f"| {k} | {m} | {statistics.median(v):.1f} [{min(v):.1f}..{max(v):.1f}] "
              f"| {statistics.median(c):.2f} [{min(c):.2f}..{max(c):.2f}] |")
    for m in loads:      # the ratio of each round (the two servers measured back to back), median [min..max]
        rr = [x / y for x, y in zip(rates[("tinyinfer", m)], rates[("llama.cpp", m)])]
        cc = [y / x for x, y in zip(cpu[("tinyinfer", m)], cpu[("llama.cpp", m)])]
        print(f"{m}: tinyinfer / llama.cpp = {statistics.median(rr):.2f}x [{min(rr):.2f}..{max(rr):.2f}] "
              f"sentences/s, {statistics.median(cc):.2f}x [{min(cc):.2f}..{max(cc):.2f}] less CPU per sentence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
