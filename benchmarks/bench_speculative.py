"""Speculative decoding, side by side in one run: plain greedy decoding vs the same with a proposer.

    python benchmarks/bench_speculative.py [-n 128] [-r 3] [--setups draft,ngram] [--p-min 0,0.5,0.75] [--native-float off|on|both] [-o out.json]
    python benchmarks/bench_speculative.py --row-costs F16,Q4_0     # a forward pass of 1, 2, 4, 9, 16 tokens

Setups (1 thread, greedy, the same prompts for both sides, runs alternated so drift hits both):

* ``draft``: SmolLM2-135M F16 target (requantized from the fetched Q4_1 file by ``quantize``'s
  ensure_requantized) with SmolLM2 Q4_0 as the draft model, ``--spec-draft-n-max 8``, at each
  ``--spec-draft-p-min`` of ``--p-min``.
* ``ngram``: Qwen2.5-Coder-0.5B Q4_K_M with ``--spec-type ngram-simple`` on a "rewrite this code"
  prompt, at llama.cpp's default sizes (12, 48) and at 3, 16.

SmolLM2 runs to -n tokens (--ignore-eos); the rewrite prompt to its end token.
Generation speed = (tokens - 1) / (time from the first sampled token to the last): prompt
processing excluded, sampling and proposing included; also the same over this process's CPU time
(``cpu x``: steadier than wall time on a shared machine). The outputs of both sides are checked equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def gen_speed(eng, ids, n, ignore_eos=True, **kw):
    from tinyinfer.sampler import SamplerParams
    toks, t_first, c_first = [], None, None
    for s in eng.generate(ids, SamplerParams(temperature=0.0, repeat_penalty=1.0), max_tokens=n, ignore_eos=ignore_eos,
                          **kw):
        if t_first is None:
            t_first, c_first = time.perf_counter(), time.process_time()
        toks.append(s.token)
    dt, dc = time.perf_counter() - t_first, time.process_time() - c_first
    t = eng.timings
    return toks, (len(toks) - 1) / dt, t.draft_n, t.draft_n_accepted, t.n_eval, (len(toks) - 1) / dc


def compare(name, eng, prompts, n, reps, proposer, **kw):
    rows = []
    for label, ids in prompts:
        plain_s, spec_s, plain_c, spec_c, drafted, accepted, runs = [], [], [], [], 0, 0, 0
        for r in range(reps):
            a, sp, _, _, _, cp = gen_speed(eng, ids, n, **{k: v for k, v in kw.items() if k == "ignore_eos"})
            b, ss, dn, da, ne, cs = gen_speed(eng, ids, n, draft_model=proposer, **kw)
            if a != b:
                raise SystemExit(f"{name} {label}: speculative output differs from plain decoding")
            plain_s.append(sp)
            spec_s.append(ss)
            plain_c.append(cp)
            spec_c.append(cs)
            drafted, accepted, runs = drafted + dn, accepted + da, runs + ne
        ratios = [s / p for s, p in zip(spec_s, plain_s)]
        cratios = [s / p for s, p in zip(spec_c, plain_c)]
        row = dict(setup=name, prompt=label, n=len(a), reps=reps, plain_tps=statistics.median(plain_s),
                   spec_tps=statistics.median(spec_s), speedup=statistics.median(ratios),
                   speedup_min=min(ratios), speedup_max=max(ratios), cpu_speedup=statistics.median(cratios),
                   cpu_speedup_min=min(cratios), cpu_speedup_max=max(cratios), draft_n=drafted // reps,
                   draft_n_accepted=accepted // reps, acceptance=accepted / drafted if drafted else 0.0,
                   target_passes=runs // reps)
        rows.append(row)
        print(f"{name:30s} {label:8s} n={row['n']:3d} plain {row['plain_tps']:6.1f} t/s  "
              f"spec {row['spec_tps']:6.1f} t/s  "
              f"x{row['speedup']:.2f} [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]  "
              f"cpu x{row['cpu_speedup']:.2f} [{row['cpu_speedup_min']:.2f}-{row['cpu_speedup_max']:.2f}]  "
              f"drafted {row['draft_n']:4d} accepted {row['draft_n_accepted']:4d} "
              f"({100 * row['acceptance']:.0f}%)  passes {row['target_passes']}", flush=True)
    return rows


def row_costs(types, ns=(1, 2, 4, 9, 16), reps=15):
    """What one forward pass of n tokens costs (SmolLM2 of each type, context 64, process CPU time, median
    of ``reps`` [min-max]), and the matmul time per weight shape (a second pass with ``mm.run`` timed)."""
    from collections import defaultdict

    import numpy as np

    import tinyinfer.models.base as base
    from tinyinfer.engine import Engine
    from tinyinfer.kvcache import Batch
    from tinyinfer.tools.quantize import ensure_requantized
    for q in types:
        eng = Engine(ensure_requantized(q), n_ctx=512, n_threads=1)
        m = eng.model
        ids = np.arange(100, 180, dtype=np.int64)
        m.forward(ids[:64], Batch.run(0, 0, 64), eng.cache)
        tim, orig = defaultdict(float), base.mm.run

        def timed(pw, x, out):
            t = time.process_time()
            r = orig(pw, x, out)
            tim[(pw.rows, pw.k)] += time.process_time() - t
            return r

        base1 = None
        for n in ns:
            ts = []
            for _ in range(reps):
                t = time.process_time()
                m.forward(ids[64:64 + n], Batch.run(0, 64, n), eng.cache, n_out=n)
                ts.append(time.process_time() - t)
            tim.clear()
            base.mm.run = timed
            try:
                for _ in range(5):
                    m.forward(ids[64:64 + n], Batch.run(0, 64, n), eng.cache, n_out=n)
            finally:
                base.mm.run = orig
            med = statistics.median(ts) * 1e3
            base1 = base1 or med
            det = "  ".join(f"{r}x{k} {v / 5 * 1e3:.1f}" for (r, k), v in sorted(tim.items()))
            print(f"{q:5s} n={n:2d} forward {med:6.1f} ms CPU ({med / base1:.2f}x n=1) [{min(ts) * 1e3:.1f}-"
                  f"{max(ts) * 1e3:.1f}]  matmul {sum(tim.values()) / 5 * 1e3:5.1f}: {det}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--setups", default="draft,ngram")
    ap.add_argument("--p-min", default="0,0.5,0.75", help="--spec-draft-p-min values of the draft setup")
    ap.add_argument("-o", default=None)
    ap.add_argument("--native-float", choices=("off", "on", "both"), default="off",
                    help="the F16 target on the native float tiles (KernelConfig(float_fma=False)): the kernels "
                         "before the fused multiply-add ones; both: each p-min on both targets in turn")
    ap.add_argument("--row-costs", default=None, metavar="TYPES",
                    help="only print what a forward pass of 1, 2, 4, 9, 16 tokens costs, e.g. F16,Q4_0")
    a = ap.parse_args(argv)
    if a.row_costs:
        return row_costs(a.row_costs.split(","))
    from tinyinfer.engine import Engine
    from tinyinfer.fetch import fetch
    from tinyinfer.speculative import DraftModel, NgramSimple
    from tinyinfer.tools.quantize import ensure_requantized
    from test_speculative import CODE, PROMPTS
    rows = []
    if "draft" in a.setups:
        from tinyinfer.kernels import matmul as mm
        targets = []
        for native in ((False, True) if a.native_float == "both" else (a.native_float == "on",)):
            with mm.using_config(mm.KernelConfig(float_fma=False) if native else None):
                targets.append((" native" if native else "", Engine(ensure_requantized("F16"), n_ctx=1024,
                                                                     n_threads=1)))
        dr = DraftModel(Engine(ensure_requantized("Q4_0"), n_ctx=1024, n_threads=1))
        prompts = [(f"p{i}", targets[0][1].tokenizer.encode(p, special=True)) for i, p in enumerate(PROMPTS)]
        for pm in (float(v) for v in a.p_min.split(",")):
            for tag, tgt in targets:
                rows += compare(f"smollm2 F16{tag}+Q4_0 n8 p-min {pm:g}", tgt, prompts, a.n, a.r, dr,
                                draft_n_max=8, draft_p_min=pm)
    if "ngram" in a.setups:
        eng = Engine(fetch("qwen2.5"), n_ctx=1024, n_threads=1)
        prompts = [("rewrite", eng.tokenizer.encode(CODE, special=True))]
        # the answer's natural length (to its end token): no repetition after it inflating the lookup
        rows += compare("qwen-coder ngram-simple 12,48", eng, prompts, a.n, a.r, NgramSimple(12, 48),
                        ignore_eos=False)
        rows += compare("qwen-coder ngram-simple 3,16", eng, prompts, a.n, a.r, NgramSimple(3, 16), ignore_eos=False)
    if a.o:
        Path(a.o).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
