"""Start-up costs: GGUF open, tokenizer build, whole-model dequantize/quantize, model load.

    python benchmarks/bench_load.py [-r 3]

Prints the best and median of ``-r`` runs for SmolLM2-135M (Q4_1 as shipped) and
Gemma 3 270M (262,144-piece vocabulary). These used to be asserted in tests; timings
belong here (a shared machine makes timed tests flaky).
"""

from __future__ import annotations

import argparse
import statistics
import time


def timed(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    a = ap.parse_args(argv)
    from gguf import GGMLQuantizationType as GT

    from tinyinfer.fetch import fetch
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.kernels import quants as Q
    from tinyinfer.models import load_model
    from tinyinfer.tokenizer import Tokenizer

    rows = []
    for key in ("smollm2", "gemma3"):
        path = fetch(key)
        g = GGUFFile(path)
        rows.append((key, "GGUF open + metadata", timed(lambda: GGUFFile(path), a.repetitions)))
        rows.append((key, "Tokenizer.from_gguf", timed(lambda: Tokenizer.from_gguf(g.metadata), a.repetitions)))
        rows.append((key, "load_model (prepare/repack weights)", timed(lambda: load_model(g), a.repetitions)))
        deq = {}

        def dequantize_all():
            for t in g.tensors.values():
                deq[t.name] = Q.dequantize(t.data, t.ggml_type, t.shape[0])
        rows.append((key, "dequantize every tensor", timed(dequantize_all, a.repetitions)))
        for typ in (GT.Q4_0, GT.Q8_0, GT.F16):
            def quantize_all():
                for x in deq.values():
                    if x.shape[1] % Q.TYPES[typ].block_size == 0:
                        Q.quantize(x, typ)
            rows.append((key, f"quantize every tensor to {typ.name}", timed(quantize_all, a.repetitions)))
    print(f"| model | step | best | median |\n|---|---|---|---|")
    for key, step, (best, med) in rows:
        print(f"| {key} | {step} | {best * 1e3:.0f} ms | {med * 1e3:.0f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
