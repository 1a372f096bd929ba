"""Greedy replies alone and under load: does a sequence's answer depend on who else is in the batch?

    python benchmarks/batch_invariance.py [MODEL_NAME] [serve flags ...]     e.g.  qwen2.5 --batch-invariant

Starts ``serve --parallel 4 -t 2 -c 2048`` on the fetched model (default qwen2.5), sends 8 greedy chat prompts
with logprobs one at a time, then the same 8 four at a time, and prints how many replies have identical text
and identical logprobs (with the largest logprob difference of those that differ).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
from bench_serving import start_server

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Name three colours.",
           "Explain gravity in one sentence.", "Say hello in Spanish.", "List two fruits.",
           "Why is the sky blue?", "Give a tip for sleeping well."]


def main(argv) -> int:
    from tinyinfer.fetch import fetch
    name = argv[0] if argv else "qwen2.5"
    proc, base = start_server(fetch(name), "--parallel", 4, "-t", 2, "-c", 2048, *argv[1:])

    def ask(p):
        r = httpx.post(base + "/v1/chat/completions", timeout=600, json={
            "messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0, "logprobs": True})
        c = r.json()["choices"][0]
        return c["message"]["content"], [t["logprob"] for t in c["logprobs"]["content"]]
    try:
        alone = [ask(p) for p in PROMPTS]
        with ThreadPoolExecutor(4) as ex:
            together = list(ex.map(ask, PROMPTS))
    finally:
        proc.terminate()
        proc.wait(30)
    same_text = sum(a[0] == b[0] for a, b in zip(alone, together))
    same_lp = sum(a[1] == b[1] for a, b in zip(alone, together))
    diffs = [max(abs(x - y) for x, y in zip(a[1], b[1])) for a, b in zip(alone, together) if a[1] != b[1]]
    print(f"{name} {' '.join(argv[1:])}: text identical {same_text}/8, logprobs identical {same_lp}/8"
          + (f", largest |dlogprob| {max(diffs):.3g}" if diffs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
