"""The server against its own OpenAPI document: schemathesis (all checks, coverage + fuzzing phases).

    python benchmarks/api_conformance.py [-m MODEL] [--max-time 300] [--examples 5] [--seed N]

Starts ``serve`` on a free loopback port (SmolLM2 by default, a small context so that generations are
short), runs ``st run`` against ``/openapi.json`` with the API key, the operations that change the model
store left out (pull, delete), and prints schemathesis' summary: server errors and conformance failures by
check. benchmarks/conformance_hooks.py keeps the generated schema-valid requests inside the few rules that
tie one field to another (a named tool_choice names a given tool, ...), which JSON Schema cannot state.
The response-time check's limit is ``--max-response-time`` (default 120 s: a generation of up to the
whole context on a small, shared CPU), not schemathesis' 10 s. Exit status: schemathesis'.
tests/test_openapi_conformance.py runs this with a short budget. Needs ``pip install schemathesis``
(the ``test`` extra).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_serving import start_server

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-conformance"
ALIAS = "conformance"
HOOKS = Path(__file__).resolve().parent / "conformance_hooks.py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the fetched SmolLM2)")
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--max-time", type=int, default=300, help="schemathesis' time budget, seconds")
    ap.add_argument("--examples", type=int, default=5, help="schemathesis' -n per operation")
    ap.add_argument("--max-response-time", type=float, default=120.0, help="the response-time check's limit, s")
    ap.add_argument("--seed", type=int, default=None, help="schemathesis' seed (default: a random one)")
    a = ap.parse_args(argv)
    import importlib.util
    if importlib.util.find_spec("schemathesis") is None:
        print("schemathesis is not installed: pip install schemathesis", file=sys.stderr)
        return 2
    if a.model is None:
        from tinyinfer.fetch import fetch
        a.model = str(fetch("smollm2"))
    store = tempfile.mkdtemp(prefix="tinyinfer-conformance-")       # the server's model store: its own
    proc, base = start_server(a.model, "-c", a.ctx_size, "--api-key", KEY, "--alias", ALIAS,
                              env={"TINYINFER_CACHE": store, "NUMBA_NUM_THREADS": "1"})
    try:
        t0 = time.perf_counter()
        seed = ["--seed", str(a.seed)] if a.seed is not None else []
        r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", base + "/openapi.json", "--checks", "all", "--phases", "coverage,fuzzing",
                            "-n", str(a.examples), "--max-time", str(a.max_time), "-w", "1", *seed,
                            "--request-timeout", str(a.max_response_time),
                            "--max-response-time", str(a.max_response_time),
                            "-H", f"Authorization: Bearer {KEY}", "--exclude-path-regex", "/api/(pull|delete)"],
                           cwd=ROOT, env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "CONFORMANCE_MODEL": ALIAS})
        print(f"schemathesis: {time.perf_counter() - t0:.0f} s, exit {r.returncode}")
        return r.returncode
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
