"""Serving load test: C concurrent clients x R completions x N tokens (greedy) against a server on
loopback; generated tokens per second over the whole run and the latency percentiles of a request.

    python benchmarks/bench_serving.py [-m MODEL] [--parallel 1 4] [-t 2] [-c 4096] [--clients 8]
                                       [--requests 4] [--tokens 32] [--url URL]

Without --url it starts ``python -m tinyinfer serve`` once per --parallel value (so the figures of
both settings come from the same session) and stops it afterwards. With --url it loads a running
server (ours or llama-server: the same OpenAI ``/v1/completions`` request). With ``--llama-server
BIN`` it also starts that llama-server on the same file (``-t``, ``-np`` = --parallel, ``-c``,
default settings otherwise) and loads the two in turn, ours first, ``--repeat`` times, so that a
shared machine's load falls on both alike; it prints each server's runs, their median and spread,
the server process's CPU seconds per generated token, and the ratio of the medians. llama-server's figures on
this machine kind (../shared/reference/speed.md): --parallel 1 278 tok/s (p50 0.92 s), --parallel 4
503 tok/s (p50 0.50 s), with the same load.

``--trace``: our server writes its batcher's timeline (``TINYINFER_STEP_TRACE``) and each run prints where
its time went (:func:`step_timeline`: forward passes, the time with none running, how long after its pass a
row is back). Every run also prints the load generator's own CPU time per token (it shares the CPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Once upon a time", "The capital of France is", "Write a short poem about the sea.",
           "def fibonacci(n):", "The three primary colours are", "In 1969, the first humans",
           "A good breakfast includes", "The main causes of the French Revolution were"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, port, what="server", timeout=300.0) -> str:
    """The base URL of the server ``proc`` on loopback ``port`` once its /health answers 200; its stderr's
    end in the error if it exits first, killed after ``timeout`` s."""
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            log = getattr(proc, "log_path", None)
            err = (Path(log).read_text(errors="replace") if log else
                   proc.stderr.read().decode(errors="replace") if proc.stderr else "")[-2000:]
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s")


def start_server(model, *args, env=None):
    """``python -m tinyinfer serve -m MODEL ARGS...`` on a free loopback port, once /health says ok:
    (the process, its base URL). The other benchmarks that need a server use this too. ``model`` None:
    no -m (many models, with --models-dir in ARGS)."""
    port = _free_port()
    m = ["-m", str(model)] if model is not None else []
    cmd = [sys.executable, "-m", "tinyinfer", "serve", *m, "--port", str(port), "--no-access-log",
           "--log-level", "warning", *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    return proc, wait_ready(proc, port, "server")


def cpu_seconds(pid) -> float | None:
    """User + system CPU time of process ``pid`` and its threads so far (Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def start_llama_server(binary, model, threads, parallel, ctx, extra=()):
    """llama-server on ``model`` (default settings but these) on a free loopback port, once /health is
    200: (the process, its base URL)."""
    port = _free_port()
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-np", str(parallel), "-c", str(ctx),
           "--host", "127.0.0.1", "--port", str(port), *extra]
    # its log goes to a file: a pipe nobody reads fills up under a long load and stalls the server
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    proc.log_path = log.name
    return proc, wait_ready(proc, port, "llama-server")


def side_by_side(a, model):
    """Our server and llama-server, both running, loaded in turn (see the module's docstring)."""
    par = a.parallel[-1]
    ours, url = start_server(model, "-c", a.ctx_size, "-t", a.threads, "--parallel", par,
                             *(["--batch-invariant"] if a.batch_invariant else []), env=a.env)
    trace = a.env.get("TINYINFER_STEP_TRACE")
    try:
        ll, lurl = start_llama_server(a.llama_server, model, a.threads, par, a.ctx_size, shlex.split(a.llama_args))
    except Exception:
        ours.terminate()
        raise
    res = {"tinyinfer": [], "llama-server": []}
    try:
        for _ in range(a.repeat):
            for name, proc, u in (("tinyinfer", ours, url), ("llama-server", ll, lurl)):
                c0 = cpu_seconds(proc.pid)
                r = run_load(u, a.clients, a.requests, a.tokens)
                c1 = cpu_seconds(proc.pid)
                r["cpu_ms_per_tok"] = 1000 * (c1 - c0) / r["tokens"] if c0 is not None and c1 is not None else None
                res[name].append(r)
                print(f"  {name}: {r['tok_s']:.1f} tok/s, p50 {r['p50_s']:.2f} s, {r['tokens']} tokens, CPU "
                      f"{r['cpu_ms_per_tok'] or float('nan'):.1f} ms/token (load generator {r['client_cpu_ms_per_tok']:.2f}), "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
                if trace and name == "tinyinfer":
                    print("    " + step_timeline(trace, r["t0"], r["t1"]), flush=True)
    finally:
        for p in (ours, ll):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:        # llama-server can take longer to shut down
                p.kill()
                p.wait(30)
    flags = f"-t {a.threads} --parallel {par}" + (" --batch-invariant" if a.batch_invariant else "")
    print("\n| server | tok/s median (min-max) | runs | p50 s median | CPU ms/token median |\n| --- | --- | --- | --- | --- |")
    med = {}
    for name, runs in res.items():
        t = [r["tok_s"] for r in runs]
        med[name] = statistics.median(t)
        cpu = [r["cpu_ms_per_tok"] for r in runs if r["cpu_ms_per_tok"] is not None]
        label = f"tinyinfer {flags}" if name == "tinyinfer" else f"llama-server -t {a.threads} -np {par} {a.llama_args}".rstrip()
        print(f"| {label} | {med[name]:.0f} ({min(t):.0f}-{max(t):.0f}) | {', '.join(f'{x:.0f}' for x in t)} | "
              f"{statistics.median(r['p50_s'] for r in runs):.2f} | "
              f"{statistics.median(cpu) if cpu else float('nan'):.1f} |")
    print(f"\nratio of medians (tinyinfer / llama-server): {med['tinyinfer'] / med['llama-server']:.2f}x")
    if a.json:
        print(json.dumps(res))
    return 0


def run_load(url, clients, requests, tokens):
    def one(client, prompt):
        t0 = time.perf_counter()
        r = client.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": tokens, "temperature": 0})
        r.raise_for_status()
        j = r.json()
        n = j.get("usage", {}).get("completion_tokens")
        if n is None:                                    # llama-server's native fields
            n = j.get("tokens_predicted", 0)
        return time.perf_counter() - t0, n

    def client_run(ci):
        out = []
        with httpx.Client(timeout=600) as c:
            for ri in range(requests):
                out.append(one(c, PROMPTS[(ci + ri) % len(PROMPTS)]))
        return out

    with httpx.Client(timeout=600) as c:                 # warm-up (kernels, caches)
        one(c, "Hello")
    c0 = time.process_time()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        res = [x for f in [ex.submit(client_run, i) for i in range(clients)] for x in f.result()]
    t1 = time.perf_counter()
    client_cpu = time.process_time() - c0
    wall = t1 - t0
    lat = sorted(r[0] for r in res)
    n_tok = sum(r[1] for r in res)
    return {"requests": len(res), "tokens": n_tok, "wall_s": wall, "tok_s": n_tok / wall,
            "p50_s": statistics.median(lat), "p90_s": lat[int(0.9 * (len(lat) - 1))], "max_s": lat[-1],
            "t0": t0, "t1": t1, "client_cpu_ms_per_tok": 1000 * client_cpu / max(1, n_tok)}


def step_timeline(path, t0, t1) -> str:
    """Where the server's time went between ``t0`` and ``t1`` (perf_counter, the same clock in both
    processes on Linux), from its ``TINYINFER_STEP_TRACE`` file (tinyinfer/batcher.py): the forward
    passes (count, rows, ms), the share of the wall time with a pass running and with none, and how
    long after a pass ends its rows are back (sampling, detokenizing, handing the token to the HTTP
    side: a slot's work between its passes)."""
    runs, arrivals = [], []
    for line in Path(path).read_text().splitlines():
        f = line.split()
        try:                             # (the server's threads append lines: skip one that came out torn)
            if f[0] == "R" and len(f) == 6 and t0 <= float(f[1]) <= t1:
                runs.append((float(f[1]), min(float(f[2]), t1), int(f[3]), int(f[4]), int(f[5])))
            elif f[0] == "A" and len(f) == 4 and t0 <= float(f[1]) <= t1:
                arrivals.append(float(f[1]))
        except (IndexError, ValueError):
            continue
    if not runs:
        return "no passes traced"
    edges = sorted([(r[0], 1) for r in runs] + [(r[1], -1) for r in runs])
    level, last, time_at = 0, t0, {0: 0.0, 1: 0.0, 2: 0.0}
    for t, d in edges:
        time_at[min(level, 2)] += t - last
        level, last = level + d, t
    time_at[0] += t1 - last
    wall = t1 - t0
    ends = sorted(r[1] for r in runs)
    import bisect
    back = [a - ends[i - 1] for a in arrivals if (i := bisect.bisect_left(ends, a)) > 0]
    ms = sorted(1000 * (r[1] - r[0]) for r in runs)
    thr = sorted({r[4] for r in runs})
    return (f"{len(runs)} passes, {sum(r[2] for r in runs) / len(runs):.2f} rows ({sum(r[3] for r in runs) / len(runs):.2f} "
            f"tokens) a pass at {'/'.join(map(str, thr))} thread(s), pass {statistics.median(ms):.1f} ms median "
            f"(p10 {ms[len(ms) // 10]:.1f}, p90 {ms[9 * len(ms) // 10]:.1f}); wall: "
            f"a pass running {100 * (time_at[1] + time_at[2]) / wall:.0f}%, "
            f"none {100 * time_at[0] / wall:.0f}% ({1000 * time_at[0] / max(1, len(runs)):.2f} ms a pass); a row back "
            f"{1000 * statistics.median(back) if back else float('nan'):.2f} ms after its pass (median)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M Q4_0, requantized once)")
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="completions per client")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (the spread is reported)")
    ap.add_argument("--url", default=None, help="load this running server instead of starting ours")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--batch-invariant", action="store_true", help="serve --batch-invariant")
    ap.add_argument("--llama-server", default=None, metavar="BIN",
                    help="also start this llama-server and load the two in turn (the last --parallel value)")
    ap.add_argument("--llama-args", default="", help="more llama-server arguments (e.g. --no-repack)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in our server's environment only (e.g. GOMP_SPINCOUNT=30000); repeatable")
    ap.add_argument("--trace", action="store_true",
                    help="print where our server's time went in each run (its TINYINFER_STEP_TRACE timeline)")
    a = ap.parse_args(argv)
    a.env = dict(kv.split("=", 1) for kv in a.env)
    if a.trace:
        a.env["TINYINFER_STEP_TRACE"] = tempfile.mkstemp(prefix="tinyinfer-steps-", suffix=".txt")[1]
    model = a.model
    if model is None and a.url is None:
        sys.path.insert(0, str(ROOT))
        from tinyinfer.tools.quantize import ensure_requantized
        model = ensure_requantized("Q4_0")
    if a.llama_server:
        return side_by_side(a, model)
    rows = []
    for par in ([None] if a.url else a.parallel):
        proc = None
        url = a.url
        if url is None:
            proc, url = start_server(model, "-c", a.ctx_size, "-t", a.threads, "--parallel", par,
                                     *(["--batch-invariant"] if a.batch_invariant else []), env=a.env)
        try:
            runs = [run_load(url, a.clients, a.requests, a.tokens) for _ in range(a.repeat)]
            for r in runs:
                print(f"    load generator: {r['client_cpu_ms_per_tok']:.2f} ms CPU a token", flush=True)
                if a.env.get("TINYINFER_STEP_TRACE") and proc is not None:
                    print("    " + step_timeline(a.env["TINYINFER_STEP_TRACE"], r["t0"], r["t1"]), flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        best = max(runs, key=lambda r: r["tok_s"])
        row = {"parallel": par, **best, "tok_s_runs": [round(r["tok_s"], 1) for r in runs],
               "p50_runs": [round(r["p50_s"], 3) for r in runs]}
        rows.append(row)
        print(f"| {par if par is not None else '-'} | {a.clients} x {a.requests} x {a.tokens} | "
              f"{row['tokens']} | {row['tok_s']:.0f} | {row['p50_s']:.2f} | {row['p90_s']:.2f} | "
              f"{row['tok_s_runs']} | {row['p50_runs']} |", flush=True)
    if a.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
