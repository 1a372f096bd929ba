"""Many short sentences per second: ``tinyinfer embedding`` vs llama.cpp's ``llama-embedding``, load time subtracted.

    python benchmarks/bench_embedding.py -m MODEL.gguf --llama-embedding PATH/llama-embedding [-n 512] [-t 1] [-r 3]

Both tools run as processes on the same file and the same input (``n`` short sentences, one per line,
made from tests/data/embeddings/sentences.txt cut to at most 12 words); each is also run on a single
line, and that run's wall time (load, warm-up, one sentence) is subtracted, so the rate is the
steady-state ``n - 1`` extra sentences per second. Rounds alternate the tools; median [min..max].
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sentences(n: int) -> list:
    base = (ROOT / "tests/data/embeddings/sentences.txt").read_text(encoding="utf-8").splitlines()
    out = []
    i = 0
    while len(out) < n:
        words = base[i % len(base)].split()[:12]
        out.append(" ".join(words[(i // len(base)) % max(1, len(words) - 3):]) or words[0])
        i += 1
    return out


def wall(cmd) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"{cmd[0]} failed: {r.stderr[-500:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--llama-embedding", required=True)
    ap.add_argument("-n", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--llama-args", default="--no-repack", help="extra llama-embedding flags")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        many, one = Path(d) / "many.txt", Path(d) / "one.txt"
        lines = sentences(a.n)
        many.write_text("\n".join(lines) + "\n", encoding="utf-8")
        one.write_text(lines[0] + "\n", encoding="utf-8")
        tools = {
            "tinyinfer": lambda f: [sys.executable, "-m", "tinyinfer", "embedding", "-m", a.model, "-f", str(f),
                                    "-t", str(a.threads), "--embd-output-format", "array"],
            "llama.cpp": lambda f: [a.llama_embedding, "-m", a.model, "-f", str(f), "-t", str(a.threads),
                                    "--embd-output-format", "array", *a.llama_args.split()],
        }
        rates = {k: [] for k in tools}
        for _ in range(a.repeats):
            for k, cmd in tools.items():
                t1, tn = wall(cmd(one)), wall(cmd(many))
                rates[k].append((a.n - 1) / max(tn - t1, 1e-9))
    print(f"| tool | sentences/s, {a.n} short sentences, {a.threads} thread(s), load subtracted [min..max] |")
    print("| --- | --- |")
    for k, v in rates.items():
        print(f"| {k} | {statistics.median(v):.1f} [{min(v):.1f}..{max(v):.1f}] |")
    r = statistics.median(rates["tinyinfer"]) / statistics.median(rates["llama.cpp"])
    print(f"\ntinyinfer / llama.cpp = {r:.2f}x  ({Path(a.model).name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
