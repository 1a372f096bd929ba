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

With ``--llama-bin DIR`` (a llama.cpp build's ``bin/``: ``llama-quantize``, ``llama-server``) it
also checks against llama.cpp on the same file: ``llama-quantize`` makes the same type from the same
source and the two files are compared byte for byte, and the reference logits become llama.cpp's
own on the requantized file (``llama-server``'s ``/completion`` with ``n_probs`` = the vocabulary:
its whole first-step distribution), so the KL is a fidelity bound:

    python benchmarks/requant_check.py --llama-bin ~/llama.cpp/build/bin qwen2.5 Q2_K IQ4_XS
"""

from __future__ import annotations

import filecmp
import json
import socket
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


def llama_quantize(bin_dir: Path, src: Path, typ: str) -> Path:
    out = src.with_name(f"{src.stem}.llama-quantize-{typ}.gguf")
    subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(src), str(out), typ, "2"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def llama_server_logprobs(bin_dir: Path, path: Path, prompts: list, n_vocab: int) -> list:
    """llama.cpp's first-step log-probabilities for each prompt (token ids) on ``path``, or None where
    the server held the token back (an incomplete UTF-8 piece comes with no probabilities)."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(path), "--host", "127.0.0.1", "--port",
                             str(port), "-c", "2048", "-np", "1", "-t", "2", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        out = []
        for ids in prompts:
            r = httpx.post(url + "/completion", timeout=600, json={
                "prompt": ids, "n_predict": 1, "n_probs": n_vocab, "cache_prompt": False, "temperature": 0}).json()
            probs = r.get("completion_probabilities")
            if not probs:
                out.append(None)
                continue
            lp = np.full(n_vocab, -np.inf)
            for e in probs[0]["top_logprobs"]:
                lp[e["id"]] = e["logprob"]
            out.append(lp)
        return out
    finally:
        proc.terminate()
        proc.wait()


def check(path: Path, ref_dir: Path, tag: str, llama_bin: Path | None = None) -> dict:
    from tinyinfer.engine import Engine
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.sampler import SamplerParams
    from tinyinfer.tools.perplexity import kl_divergence as kl

    refs = [json.loads(line) for line in open(ref_dir / f"greedy_{tag}.jsonl")]
    logits = np.fromfile(ref_dir / f"first_logits_{tag}.f32", np.float32).reshape(len(refs), -1)
    if llama_bin is not None:     # llama.cpp's own distribution on this very file
        logits = llama_server_logprobs(llama_bin, path, [r["prompt_ids"] for r in refs], logits.shape[1])
    g = GGUFFile(path)
    types = Counter(t.type_name for t in g.tensors.values())
    g.close()
    eng = Engine(path, n_ctx=512, n_threads=1)
    deq = Engine(requantized(path, "F32"), n_ctx=512, n_threads=1)
    kls, kern, agree, gapped, greedy_ok, greedy_n = [], [], 0, 0, 0, 0
    for i, r in enumerate(refs):
        if logits[i] is None:
            continue
        eng.reset()
        ours = eng.ingest_prompt(r["prompt_ids"])
        kls.append(kl(logits[i], ours))
        deq.reset()
        kern.append(kl(deq.ingest_prompt(r["prompt_ids"]), ours))
        top2 = np.sort(logits[i])[-2:]
        if top2[1] - top2[0] >= 0.5:
            gapped += 1
            agree += int(np.argmax(ours)) == int(np.argmax(logits[i]))
        if llama_bin is not None:
            continue              # the greedy references belong to the original file
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
                argmax=f"{agree}/{gapped}", greedy=f"{greedy_ok}/{greedy_n}", kernels=float(np.mean(kern)),
                n=len(kls))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    llama_bin = None
    if argv[:1] == ["--llama-bin"] and len(argv) > 1:
        llama_bin, argv = Path(argv[1]).expanduser(), argv[2:]
    if len(argv) < 2:
        print(__doc__)
        return 2
    src, ref_dir, tag = source(argv[0])
    for typ in argv[1:]:
        t0 = time.perf_counter()
        p = requantized(src, typ)
        tq = time.perf_counter() - t0
        same = ""
        if llama_bin is not None:
            theirs = llama_quantize(llama_bin, src, typ)
            same = f"  bytes {'identical' if filecmp.cmp(p, theirs, shallow=False) else 'DIFFER'} from llama-quantize"
        r = check(p, ref_dir, tag, llama_bin)
        greedy = "" if llama_bin is not None else f"  greedy {r['greedy']}"
        print(f"{argv[0]} {typ:7s} quantize {tq:6.1f} s{same}  KL mean {r['kl_mean']:.2e} max {r['kl_max']:.2e} "
              f"(n {r['n']})  argmax {r['argmax']}{greedy}  kernels {r['kernels']:.4f}  types {r['types']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
