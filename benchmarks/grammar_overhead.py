"""Per-token cost of constrained decoding: sampling ms/token with and without a grammar.

    python benchmarks/grammar_overhead.py [--models qwen2.5,gemma3] [-n 64] [-r 3]

For each model, the same prompt is generated greedily (-n tokens, 1 thread) with no grammar, with
JSON mode (any JSON object), with a JSON schema and with llama.cpp's json.gbnf. Reported per
token: sampling time (the grammar mask is part of it, as in llama.cpp's "sampling time"), model
evaluation time, and the overhead of the grammar against the unconstrained run (median of -r runs).
The one-time cost of handing the vocabulary to llguidance is reported apart. The machine may be
shared: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinyinfer.engine import Engine  # noqa: E402
from tinyinfer.fetch import fetch  # noqa: E402
from tinyinfer.grammar import Grammar, ll_tokenizer  # noqa: E402
from tinyinfer.sampler import SamplerParams  # noqa: E402

PROMPT = "Write a JSON object describing a city with its name, country, population and three landmarks:\n"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer", "minimum": 0},
    "landmarks": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "country", "population", "landmarks"]}


def run(eng, ids, grammar, n):
    steps = list(eng.generate(ids, SamplerParams(temperature=0), max_tokens=n, grammar=grammar))
    t = eng.timings
    return t.sample_ms / max(t.n_sample, 1), t.eval_ms / max(t.n_eval, 1), len(steps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="qwen2.5,gemma3")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-r", type=int, default=3)
    a = ap.parse_args(argv)
    grammars = {
        "none": lambda: None,
        "json_object": Grammar.json_object,
        "json_schema": lambda: Grammar.from_json_schema(SCHEMA),
        "json.gbnf": lambda: Grammar.from_file(ROOT / "tests" / "data" / "grammars" / "json.gbnf"),
    }
    print(f"# constrained decoding overhead, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"1 thread, greedy, {a.n} tokens, median of {a.r}")
    print("\n| model | vocab | grammar | sampling ms/token | overhead ms/token | eval ms/token | tokens |")
    print("|---|---|---|---|---|---|---|")
    for name in a.models.split(","):
        eng = Engine(fetch(name), n_ctx=512, n_threads=1)
        t0 = time.perf_counter()
        ll_tokenizer(eng.tokenizer, eng.n_vocab)
        t_vocab = time.perf_counter() - t0
        ids = eng.tokenizer.encode(PROMPT, add_bos=eng.tokenizer.add_bos)
        base = None
        for gname, make in grammars.items():
            runs = [run(eng, ids, make(), a.n) for _ in range(a.r)]
            s = statistics.median(r[0] for r in runs)
            e = statistics.median(r[1] for r in runs)
            spread = max(r[0] for r in runs) - min(r[0] for r in runs)
            if base is None:
                base = s
            print(f"| {name} | {eng.n_vocab} | {gname} | {s:.2f} (±{spread / 2:.2f}) | {s - base:+.2f} | {e:.1f} | "
                  f"{runs[0][2]} |", flush=True)
        print(f"| {name} | {eng.n_vocab} | (vocabulary to llguidance, once) | {t_vocab * 1000:.0f} ms | | | |")


if __name__ == "__main__":
    main()
