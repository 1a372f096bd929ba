"""Speculative decoding, side by side in one run: plain greedy decoding vs the same with a proposer.

    python benchmarks/bench_speculative.py [-n 128] [-r 3] [--setups draft,ngram] [--p-min 0,0.5,0.75] [--native-float off|on|both] [--draft Q4_0|FILE] [--llamacpp BIN] [-o out.json]
    python benchmarks/bench_speculative.py --row-costs F16,Q4_0     # a forward pass of 1, 2, 4, 9, 16 tokens
    python benchmarks/bench_speculative.py --acceptance Q4_0,DRAFT.gguf [--target F16.gguf]  # acceptance, no decoding

Setups (1 thread, greedy, the same prompts for both sides, runs alternated so drift hits both):

* ``draft``: SmolLM2-135M F16 target (requantized from the fetched Q4_1 file by ``quantize``'s
  ensure_requantized) with SmolLM2 Q4_0 as the draft model, ``--spec-draft-n-max 8``, at each
  ``--spec-draft-p-min`` of ``--p-min``.
* ``ngram``: Qwen2.5-Coder-0.5B Q4_K_M with ``--spec-type ngram-simple`` on a "rewrite this code"
  prompt, at llama.cpp's default sizes (12, 48) and at 3, 16.

``--acceptance``: which guesses a draft gets right, without speculative decoding: the target's greedy
text for each prompt (-n tokens) is run through each draft as one batch (teacher forcing); with greedy
target and draft, a guess is accepted exactly when every earlier guess of its cycle was, and the draft's
argmax after the target's text is the target's next token, so the drafted / accepted counts and the
target passes of any ``--spec-draft-n-max`` / ``--spec-draft-p-min`` follow from that one pass
(exact for p-min 0; with p-min > 0 the guesses after a wrong one stop on the teacher-forced
probabilities, an approximation of what the draft sees after its own wrong guess). ``est x``: the
speed-up those counts give with the forward-pass costs measured here (process CPU time): a cycle costs
one draft pass per drafted token (plus one when p-min or nothing stopped it) and one target pass of
drafted + 1 tokens.

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


def _run_llamacpp(cmd):
    """One llama-speculative-simple run: (its generation speed in t/s, tokens decoded, the process's CPU
    seconds, drafted, accepted)."""
    import re
    import resource
    import subprocess
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        tail = out.strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"{Path(cmd[0]).name} exited with {p.returncode}: {tail[0]}")
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", out)
    if not m:
        raise SystemExit(f"{Path(cmd[0]).name}: no speed in its output")
    dn, da = (int(re.search(rf"{k}\s*=\s*(\d+)", out).group(1)) for k in ("n_drafted", "n_accept"))
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    return float(m.group(3)), int(m.group(1)), cpu, dn, da


def llamacpp_cmds(bin_dir, target, prompt, n, ignore_eos=True, draft=None, spec_type=None, n_max=8, p_min=0.0,
                  ngram=None, extra=()):
    """llama.cpp's commands for one prompt, plain and speculative, both llama-speculative-simple (the same
    loop and timer; plain: ngram-simple with 1024-token patterns, which never match in a 1024-token
    context, so every pass is one token), 1 thread, greedy, the same files, prompt text and flags as ours."""
    common = [str(Path(bin_dir) / "llama-speculative-simple"), "-m", str(target), "-p", prompt, "-n", str(n), "-t",
              "1", "--temp", "0", "-c", "1024"] + (["--ignore-eos"] if ignore_eos else []) + list(extra)
    plain = common + ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "1024",
                      "--spec-ngram-simple-size-m", "1024"]
    if draft is not None:
        spec = common + ["-md", str(draft), "-td", "1", "--spec-type", "draft-simple", "--spec-draft-n-max",
                         str(n_max), "--spec-draft-p-min", str(p_min)]
    else:
        spec = common + ["--spec-type", spec_type, "--spec-ngram-simple-size-n", str(ngram[0]),
                         "--spec-ngram-simple-size-m", str(ngram[1])]
    return plain, spec


def _llama_cpu_tps(cmd, base):
    """A run's generation speed over process CPU time: its tokens and CPU seconds less those of the same
    command with -n 1 (loading, prompt), measured once per command in ``base``."""
    key = tuple(cmd)
    if key not in base:
        c1 = list(cmd)
        c1[c1.index("-n") + 1] = "1"
        base[key] = _run_llamacpp(c1)
    w, dec, cpu, dn, da = _run_llamacpp(cmd)
    _, dec1, cpu1, _, _ = base[key]
    return w, (dec - dec1) / max(cpu - cpu1, 1e-9), dn, da


_LLAMA_BASE = {}


def compare(name, eng, prompts, n, reps, proposer, llama=None, **kw):
    """Plain vs speculative on ``eng`` for each (label, ids[, text]) prompt, ``reps`` times alternated;
    with ``llama`` (a function of the prompt text giving llama.cpp's plain and speculative commands) each
    rep also runs llama.cpp's two right after ours."""
    rows = []
    for label, ids, *text in prompts:
        plain_s, spec_s, plain_c, spec_c, drafted, accepted, runs = [], [], [], [], 0, 0, 0
        lp, ls, lpc, lsc, ldn, lda = [], [], [], [], 0, 0
        for r in range(reps):
            a, sp, _, _, _, cp = gen_speed(eng, ids, n, **{k: v for k, v in kw.items() if k == "ignore_eos"})
            b, ss, dn, da, ne, cs = gen_speed(eng, ids, n, draft_model=proposer, **kw)
            if a != b:
                raise SystemExit(f"{name} {label}: speculative output differs from plain decoding")
            if llama is not None:
                cmd_plain, cmd_spec = llama(text[0])
                w, c, _, _ = _llama_cpu_tps(cmd_plain, _LLAMA_BASE)
                lp.append(w)
                lpc.append(c)
                w, c, d1, d2 = _llama_cpu_tps(cmd_spec, _LLAMA_BASE)
                ls.append(w)
                lsc.append(c)
                ldn, lda = ldn + d1, lda + d2
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
        if lp:
            row.update(llama_plain_tps=statistics.median(lp), llama_spec_tps=statistics.median(ls),
                       llama_speedup=statistics.median([s / p for s, p in zip(ls, lp)]), llama_draft_n=ldn // reps,
                       llama_draft_n_accepted=lda // reps, llama_acceptance=lda / ldn if ldn else 0.0,
                       ours_over_llama_spec=statistics.median([o / t for o, t in zip(spec_s, ls)]),
                       llama_cpu_plain_tps=statistics.median(lpc), llama_cpu_spec_tps=statistics.median(lsc),
                       llama_cpu_speedup=statistics.median([s / p for s, p in zip(lsc, lpc)]),
                       cpu_plain_tps=statistics.median(plain_c), cpu_spec_tps=statistics.median(spec_c),
                       ours_over_llama_spec_cpu=statistics.median([o / t for o, t in zip(spec_c, lsc)]))
        rows.append(row)
        print(f"{name:30s} {label:8s} n={row['n']:3d} plain {row['plain_tps']:6.1f} t/s  "
              f"spec {row['spec_tps']:6.1f} t/s  "
              f"x{row['speedup']:.2f} [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]  "
              f"cpu x{row['cpu_speedup']:.2f} [{row['cpu_speedup_min']:.2f}-{row['cpu_speedup_max']:.2f}]  "
              f"drafted {row['draft_n']:4d} accepted {row['draft_n_accepted']:4d} "
              f"({100 * row['acceptance']:.0f}%)  passes {row['target_passes']}", flush=True)
        if lp:
            print(f"{'  llama.cpp':30s} {label:8s}        plain {row['llama_plain_tps']:6.1f} t/s  "
                  f"spec {row['llama_spec_tps']:6.1f} t/s  x{row['llama_speedup']:.2f} [{min(ls[i] / lp[i] for i in range(reps)):.2f}-"
                  f"{max(ls[i] / lp[i] for i in range(reps)):.2f}]  drafted {row['llama_draft_n']:4d} accepted "
                  f"{row['llama_draft_n_accepted']:4d} ({100 * row['llama_acceptance']:.0f}%)  ours/llama.cpp spec "
                  f"x{row['ours_over_llama_spec']:.2f} (cpu x{row['ours_over_llama_spec_cpu']:.2f})", flush=True)
            print(f"{'  CPU-time t/s':30s} {label:8s}        ours plain {row['cpu_plain_tps']:6.1f} spec "
                  f"{row['cpu_spec_tps']:6.1f}; llama.cpp plain {row['llama_cpu_plain_tps']:6.1f} spec "
                  f"{row['llama_cpu_spec_tps']:6.1f} (x{row['llama_cpu_speedup']:.2f})", flush=True)
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
        times = pass_times(eng, ns, reps)
        tim, orig = defaultdict(float), base.mm.run

        def timed(pw, x, out):
            t = time.process_time()
            r = orig(pw, x, out)
            tim[(pw.rows, pw.k)] += time.process_time() - t
            return r

        base1 = None
        for n in ns:
            ts = times[n]
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


def _draft_path(name):
    """A draft given as a file or as a quantization type of SmolLM2 (``ensure_requantized``)."""
    from tinyinfer.tools.quantize import ensure_requantized
    return Path(name) if name.endswith(".gguf") else ensure_requantized(name)


def pass_times(eng, ns, reps=7):
    """Process CPU times in s of ``reps`` forward passes of n tokens at context 64, for each n."""
    import numpy as np

    from tinyinfer.kvcache import Batch
    m, ids = eng.model, np.arange(100, 180, dtype=np.int64)
    m.forward(ids[:64], Batch.run(0, 0, 64), eng.cache)
    out = {}
    for n in ns:
        ts = []
        for _ in range(reps):
            t = time.process_time()
            m.forward(ids[64:64 + n], Batch.run(0, 64, n), eng.cache, n_out=n)
            ts.append(time.process_time() - t)
        out[n] = ts
    return out


def pass_costs(eng, ns, reps=7):
    """Median process CPU time in ms of one forward pass of n tokens at context 64, for each n."""
    return {n: statistics.median(ts) * 1e3 for n, ts in pass_times(eng, ns, reps).items()}


def teacher_forced(eng, ids, toks):
    """The model's argmax and top probability at each generated position after the first (the guess for
    toks[i], i >= 1, given the prompt and toks[:i]), from one batched pass."""
    import numpy as np

    from tinyinfer.kvcache import Batch
    full = np.asarray(list(ids) + list(toks), np.int64)
    lg = eng.model.forward(full, Batch.run(0, 0, full.size), eng.cache, n_out=len(toks))[:-1]
    x = lg - lg.max(1, keepdims=True)
    return lg.argmax(1), 1.0 / np.exp(x).sum(1)


def simulate(right, prob, n_max, p_min, cost_t, cost_d):
    """Greedy speculative decoding replayed from the per-position agreement ``right`` (right[i - 1]: the
    draft's guess for generated token i is the target's) and top probabilities: (estimated speed-up,
    drafted, accepted, target passes)."""
    n_tok, i, cost, drafted, accepted, passes = len(right) + 1, 1, 0.0, 0, 0, 0
    while i < n_tok:
        k, stopped = 0, False
        while k < n_max and i + k + 1 < n_tok:     # no guess for the last token (the check gives it)
            if p_min > 0 and prob[i + k - 1] < p_min:
                stopped = True
                break
            k += 1
        a = 0
        while a < k and right[i + a - 1]:
            a += 1
        cost += (k + (stopped or k == 0)) * cost_d + cost_t[k + 1]
        drafted, accepted, passes, i = drafted + k, accepted + a, passes + 1, i + a + 1
    return (n_tok - 1) * cost_t[1] / cost, drafted, accepted, passes


def acceptance(drafts, target, n, n_maxes=(3, 8), p_mins=(0.0, 0.5, 0.75, 0.9)):
    import numpy as np

    from tinyinfer.engine import Engine
    from tinyinfer.sampler import SamplerParams
    from test_speculative import PROMPTS
    tgt = Engine(_draft_path(target), n_ctx=1024, n_threads=1)
    texts = []
    for p in PROMPTS:
        ids = tgt.tokenizer.encode(p, special=True)
        texts.append((ids, [s.token for s in tgt.generate(ids, SamplerParams(temperature=0.0, repeat_penalty=1.0),
                                                          max_tokens=n, ignore_eos=True)]))
    ct = pass_costs(tgt, range(1, max(n_maxes) + 2))
    own = [float((teacher_forced(tgt, i, t)[0] == np.asarray(t[1:])).mean()) for i, t in texts]
    print(f"target {Path(tgt.path).name}: pass ms CPU "
          + " ".join(f"n={k}:{v:.1f}" for k, v in ct.items())
          + f"; its batched argmax = its greedy text: {own}", flush=True)
    rows = []
    for d in drafts:
        eng = Engine(_draft_path(d), n_ctx=1024, n_threads=1)
        cd = pass_costs(eng, (1,))[1]
        tf = [teacher_forced(eng, i, t) for i, t in texts]
        right = [am == np.asarray(t[1:]) for (am, _), (_, t) in zip(tf, texts)]
        print(f"draft {d}: pass {cd:.1f} ms CPU (r = {cd / ct[1]:.2f} of the target's); guesses right after the "
              f"target's text: " + " ".join(f"p{j} {r.mean():.0%}" for j, r in enumerate(right)), flush=True)
        for nm in n_maxes:
            for pm in p_mins:
                res = [simulate(r, p, nm, pm, ct, cd) for r, (_, p) in zip(right, tf)]
                rows += [dict(draft=str(d), prompt=f"p{j}", n_max=nm, p_min=pm, est_speedup=x, draft_n=dn,
                              draft_n_accepted=da, target_passes=ps, r=cd / ct[1])
                         for j, (x, dn, da, ps) in enumerate(res)]
                print(f"  n_max {nm} p_min {pm:<4g} " + "  ".join(
                    f"p{j}: est x{x:.2f} {da}/{dn} ({da / max(dn, 1):.0%}) {ps} passes"
                    for j, (x, dn, da, ps) in enumerate(res)), flush=True)
        eng.close()
    return rows


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
    ap.add_argument("--acceptance", default=None, metavar="DRAFTS",
                    help="only replay the draft setup's acceptance from one batched pass per draft (types of "
                         "SmolLM2 such as Q4_0, or .gguf files), e.g. Q4_0,Q4_1,/tmp/draft.gguf")
    ap.add_argument("--draft", default="Q4_0", help="the draft setup's draft: a type of SmolLM2 or a .gguf file")
    ap.add_argument("--llamacpp", default=None, metavar="BIN",
                    help="also run llama.cpp's llama-speculative-simple (plain and speculative) from BIN (a build/bin "
                         "folder) after each of our runs: the same files, prompt text and flags")
    ap.add_argument("--llamacpp-args", default="", help="more llama.cpp flags, e.g. --no-repack for a build that "
                    "crashes in its repacked kernels")
    ap.add_argument("--target", default="F16", help="--acceptance's target (a type of SmolLM2 or a .gguf file)")
    a = ap.parse_args(argv)
    if a.acceptance:
        rows = acceptance(a.acceptance.split(","), a.target, a.n)
        if a.o:
            Path(a.o).write_text(json.dumps(rows, indent=1))
        return rows
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
        dr = DraftModel(Engine(_draft_path(a.draft), n_ctx=1024, n_threads=1))
        dname = a.draft if not a.draft.endswith(".gguf") else Path(a.draft).name
        prompts = [(f"p{i}", targets[0][1].tokenizer.encode(p, special=True), p) for i, p in enumerate(PROMPTS)]
        for pm in (float(v) for v in a.p_min.split(",")):
            llama = None
            if a.llamacpp:
                def llama(text, pm=pm):
                    return llamacpp_cmds(a.llamacpp, targets[0][1].path, text, a.n, draft=dr.engine.path, p_min=pm,
                                         extra=a.llamacpp_args.split())
            for tag, tgt in targets:
                rows += compare(f"smollm2 F16{tag}+{dname} n8 p-min {pm:g}", tgt, prompts, a.n, a.r, dr,
                                llama=llama, draft_n_max=8, draft_p_min=pm)
    if "ngram" in a.setups:
        eng = Engine(fetch("qwen2.5"), n_ctx=1024, n_threads=1)
        prompts = [("rewrite", eng.tokenizer.encode(CODE, special=True), CODE)]
        # the answer's natural length (to its end token): no repetition after it inflating the lookup
        for nm in ((12, 48), (3, 16)):
            llama = None
            if a.llamacpp:
                def llama(text, nm=nm):
                    return llamacpp_cmds(a.llamacpp, eng.path, text, a.n, ignore_eos=False, spec_type="ngram-simple",
                                         ngram=nm, extra=a.llamacpp_args.split())
            rows += compare(f"qwen-coder ngram-simple {nm[0]},{nm[1]}", eng, prompts, a.n, a.r, NgramSimple(*nm),
                            llama=llama, ignore_eos=False)
    if a.o:
        Path(a.o).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
