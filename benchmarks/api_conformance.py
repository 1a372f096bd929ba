"""The server against its own OpenAPI document: schemathesis (all checks, coverage + fuzzing phases).

    python benchmarks/api_conformance.py [-m MODEL] [--max-time 300] [--examples 5]

Starts ``serve`` on a free loopback port (SmolLM2 by default, a small context so that generations are
short), runs ``st run`` against ``/openapi.json`` with the API key, the operations that change the model
store left out (pull, delete), and prints schemathesis' summary: server errors and conformance failures by
check. Exit status: schemathesis'. Needs ``pip install schemathesis`` (not a dependency of tinyinfer).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_serving import start_server

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-conformance"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the fetched SmolLM2)")
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--max-time", type=int, default=300, help="schemathesis' time budget, seconds")
    ap.add_argument("--examples", type=int, default=5, help="schemathesis' -n per operation")
    a = ap.parse_args(argv)
    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        print("schemathesis is not installed: pip install schemathesis", file=sys.stderr)
        return 2
    if a.model is None:
        from tinyinfer.fetch import fetch
        a.model = str(fetch("smollm2"))
    store = tempfile.mkdtemp(prefix="tinyinfer-conformance-")       # the server's model store: its own
    proc, base = start_server(a.model, "-c", a.ctx_size, "--api-key", KEY,
                              env={"TINYINFER_CACHE": store, "NUMBA_NUM_THREADS": "1"})
    try:
        t0 = time.perf_counter()
        r = subprocess.run([st, "run", base + "/openapi.json", "--checks", "all", "--phases", "coverage,fuzzing",
                            "-n", str(a.examples), "--max-time", str(a.max_time), "-w", "1",
                            "--request-timeout", "120", "-H", f"Authorization: Bearer {KEY}",
                            "--exclude-path-regex", "/api/(pull|delete)"], cwd=ROOT)
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
