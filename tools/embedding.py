"""``python -m tinyinfer embedding -m F -p TEXT | -f FILE``: llama-embedding's flags and output.

Each line of the prompt (``--embd-separator``, default a newline) is one input; all of them are
embedded in batched passes (tinyinfer/embedding.py). ``--pooling none|mean|cls|last|rank`` overrides
the file's; ``--embd-normalize`` -1 / 0 / 1 / 2 (default) / p; ``--embd-output-format``: empty (the
text report, with the cosine similarity matrix), ``json``, ``json+`` (with ``cosineSimilarity``) or
``array``. With rank pooling an input ``query<TAB>document`` (``--cls-separator``) is scored as a pair.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _fmt(x: float, norm: float) -> str:
    return f"{x:1.0f}" if norm == 0 else f"{x:1.7f}"


def report(vecs, prompts, fmt: str, norm: float, pooling: str) -> str:
    """llama-embedding's stdout for ``vecs`` (one row per output)."""
    rows = [np.asarray(v, np.float32).reshape(-1, np.asarray(v).shape[-1]) for v in vecs]
    flat = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    out = []
    if fmt in ("json", "json+", "array"):
        f = "%1.0f," if norm == 0 else "%1.7f,"       # _fmt, one %-format per row
        items = ["[" + (f * r.size % tuple(r.tolist()))[:-1] + "]" for r in flat]
        if fmt == "array":
            out.append("[" + ",".join(items) + "]")
        else:
            body = ",\n".join(f'    {{\n      "object": "embedding",\n      "index": {j},\n      "embedding": {e}\n    }}'
                              for j, e in enumerate(items))
            s = '{\n  "object": "list",\n  "data": [\n' + body + "\n  ]"
            if fmt == "json+" and len(flat) > 1:
                sim = _cos(flat)
                s += ',\n  "cosineSimilarity": [\n' + ",\n".join(
                    "    [" + ", ".join(f"{x:6.2f}" for x in r) + " ]" for r in sim) + "\n  ]"
            out.append(s + "\n}")
        return "\n".join(out) + "\n"
    num = (lambda x: f"{x:6.0f}") if norm == 0 else (lambda x: f"{x:9.6f}")
    if pooling == "rank":
        for j, r in enumerate(flat):
            out.append(f"rerank score {j}: {r[0]:8.3f}")
    elif pooling == "none":
        for j, r in enumerate(flat):
            out.append(f"embedding {j}: " + " ".join(num(x) for x in r[:3]) + "  ...  "
                       + " ".join(num(x) for x in r[-3:]))
    else:
        n = len(flat)
        for j, r in enumerate(flat):
            out.append(f"embedding {j}: " + " ".join(num(x) for x in (r[:16] if n > 1 else r)))
        if n > 1:
            sim = _cos(flat)
            out += ["", "cosine similarity matrix:", "", " ".join(f"{p[:6]:>6}" for p in prompts)]
            for i in range(n):
                out.append(" ".join(f"{x:6.2f}" for x in sim[i]) + " " + prompts[i][:10])
    return "\n".join(out) + "\n"


def _cos(m: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(m, axis=1, keepdims=True)
    n[n == 0] = 1
    u = m / n
    return u @ u.T


def main(argv=None) -> int:
    from ..embedding import POOLING_TYPES, embed, model_pooling, pooling_name, rerank_prompt
    from ..engine import Engine

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            print(f"tinyinfer embedding: error: {message}", file=sys.stderr)
            sys.exit(2)

    ap = _Parser(prog="tinyinfer embedding", description="embeddings of text lines (llama-embedding)")
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-p", "--prompt")
    ap.add_argument("-f", "--file")
    ap.add_argument("--pooling", choices=POOLING_TYPES, help="default: the model's")
    ap.add_argument("--embd-normalize", type=float, default=2.0,
                    help="-1 none, 0 max absolute int16, 1 taxicab, 2 euclidean (default), >2 p-norm")
    ap.add_argument("--embd-output-format", default="", choices=("", "json", "json+", "array"))
    ap.add_argument("--embd-separator", default="\n")
    ap.add_argument("--cls-separator", default="\t")
    ap.add_argument("-c", "--ctx-size", type=int, default=0)
    ap.add_argument("-b", "--batch-size", type=int, default=2048)
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    if (a.prompt is None) == (a.file is None):
        ap.error("give the text with exactly one of -p or -f")
    text = a.prompt if a.prompt is not None else open(a.file, encoding="utf-8").read()
    sep = a.embd_separator.encode().decode("unicode_escape")
    prompts = [p for p in text.split(sep)]
    if prompts and prompts[-1] == "":
        prompts = prompts[:-1]
    if not prompts:
        ap.error("no input text")
    t0 = time.perf_counter()
    eng = Engine(a.model, n_ctx=a.ctx_size, n_batch=max(1, min(a.batch_size, a.ubatch_size)),
                 n_threads=a.threads, verbose=a.verbose)
    t_load = time.perf_counter() - t0
    pooling = pooling_name(a.pooling) or model_pooling(eng)
    tok = eng.tokenizer
    seqs = []
    for p in prompts:
        if pooling == "rank" and a.cls_separator in p:
            q, d = p.split(a.cls_separator, 1)
            seqs.append(rerank_prompt(tok, q, d))
        else:
            seqs.append(tok.encode(p, add_bos=tok.add_bos, special=True))
    t1 = time.perf_counter()
    vecs = embed(eng, seqs, pooling=pooling, normalize_mode=a.embd_normalize)
    dt = time.perf_counter() - t1
    sys.stdout.write(report(vecs, prompts, a.embd_output_format, a.embd_normalize, pooling))
    n_tok = sum(len(s) for s in seqs)
    print(f"llama_perf_context_print:        load time = {t_load * 1000:10.2f} ms\n"
          f"llama_perf_context_print: prompt eval time = {dt * 1000:10.2f} ms / {n_tok:5d} tokens "
          f"({dt * 1000 / max(n_tok, 1):8.2f} ms per token, {n_tok / dt if dt > 0 else 0:8.2f} tokens per second)\n"
          f"tinyinfer embedding: {len(seqs)} inputs in {dt * 1000:.1f} ms ({len(seqs) / dt if dt > 0 else 0:.1f} per second)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
