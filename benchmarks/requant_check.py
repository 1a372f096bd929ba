"""Requantize real and synthetic files to every new type; load, generate, compare with llama.cpp.

    python benchmarks/requant_check.py qwen2.5 Q2_K Q3_K_M Q5_K_M Q6_K IQ4_NL IQ4_XS Q4_1 Q5_1
    python benchmarks/requant_check.py llama3 Q2_K Q3_K_M Q5_K_M IQ4_XS IQ4_NL

``qwen2.5``: the Qwen2.5-Coder-0.5B Q4_K_M file, requantized with ``--allow-requantize``
(cached next to it by ``ensure_requantized``). The only llama.cpp logits here are the
Q4_K_M file's (../shared/reference/qwen2), so the KL of another type against them is a
loose sanity check (it mixes that type's own quantization error in), not a fidelity bound.

``llama3``: the synthetic Llama 3 F16 file (../shared/tools/make_arch_models.py; d 256, so
every matrix takes the K / IQ type itself), compared with llama.cpp's F16 logits on it
(../shared/reference/arch).

Prints, per type: the file's tensor types, quantize time, mean / max first-step KL,
argmax agreement where the reference's top-2 gap >= 0.5, greedy tokens equal to the
reference's before the first near tie, and ``kernels``: the mean KL between this file run
by the quantized kernels and the same file dequantized to F32 (``quantize ... F32``) run in
float, which isolates the kernels' own error (activation quantization) from the format's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT.parent / "shared" / "reference"


def source(name: str) -> tuple:
    """(source file, reference folder, reference type tag)."""
    if name == "qwen2.5":
        from tinyinfer.fetch import fetch
        return fetch("qwen2.5", quiet=True), REF / "qwen2", "Q4_K_M"
    if name == "llama3":
        from tinyinfer.fetch import cache_dir
        d = cache_dir() / "synthetic"
        p = d / "synthetic-llama3-F16.gguf"
        if not p.exists():
            d.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(ROOT.parent / "shared" / "tools" / "make_arch_models.py"),
                            str(REF / "vocab"), str(d), "llama3"], check=True)
        return p, REF / "arch", "llama3-F16"
    raise SystemExit(f"unknown source {name!r}: qwen2.5 or llama3")


def requantized(src: Path, typ: str) -> Path:
    from tinyinfer.tools.quantize import Options, parse_ftype, quantize_file
    out = src.with_name(f"{src.stem}.requant-{parse_ftype(typ)}.gguf")
    if src.stem.count(".requant-"):
        out = src.with_name(f"{src.stem}.deq-{parse_ftype(typ)}.gguf")
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        tmp = out.with_suffix(".tmp")
        quantize_file(src, tmp, typ, Options(allow_requantize=True), progress=False)
        tmp.rename(out)
    return out


def check(path: Path, ref_dir: Path, tag: str) -> dict:
    from tinyinfer.engine import Engine
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.sampler import SamplerParams
    from tinyinfer.tools.perplexity import kl_divergence as kl

    refs = [json.loads(line) for line in open(ref_dir / f"greedy_{tag}.jsonl")]
    logits = np.fromfile(ref_dir / f"first_logits_{tag}.f32", np.float32).reshape(len(refs), -1)
    g = GGUFFile(path)
    types = Counter(t.type_name for t in g.tensors.values())
    g.close()
    eng = Engine(path, n_ctx=512, n_threads=1)
    deq = Engine(requantized(path, "F32"), n_ctx=512, n_threads=1)
    kls, kern, agree, gapped, greedy_ok, greedy_n = [], [], 0, 0, 0, 0
    for i, r in enumerate(refs):
        eng.reset()
        ours = eng.ingest_prompt(r["prompt_ids"])
        kls.append(kl(logits[i], ours))
        deq.reset()
        kern.append(kl(deq.ingest_prompt(r["prompt_ids"]), ours))
        top2 = np.sort(logits[i])[-2:]
        if top2[1] - top2[0] >= 0.5:
            gapped += 1
            agree += int(np.argmax(ours)) == int(np.argmax(logits[i]))
        eng.reset()
        toks = [s.token for s in eng.generate(r["prompt_ids"], SamplerParams(temperature=0.0),
                                             max_tokens=len(r["greedy_ids"]))]
        for step, (want, top5) in enumerate(zip(r["greedy_ids"], r["top5"])):
            if top5[0][1] - top5[1][1] < 0.5:
                break
            greedy_n += 1
            if step >= len(toks) or toks[step] != want:
                break
            greedy_ok += 1
    return dict(types=dict(types.most_common()), kl_mean=float(np.mean(kls)), kl_max=float(np.max(kls)),
                argmax=f"{agree}/{gapped}", greedy=f"{greedy_ok}/{greedy_n}", kernels=float(np.mean(kern)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    src, ref_dir, tag = source(argv[0])
    for typ in argv[1:]:
        t0 = time.perf_counter()
        p = requantized(src, typ)
        tq = time.perf_counter() - t0
        r = check(p, ref_dir, tag)
        print(f"{argv[0]} {typ:7s} quantize {tq:6.1f} s  KL mean {r['kl_mean']:.4f} max {r['kl_max']:.4f}  "
              f"argmax {r['argmax']}  greedy {r['greedy']}  kernels {r['kernels']:.4f}  types {r['types']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
