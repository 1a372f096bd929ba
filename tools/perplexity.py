"""``python -m tinyinfer perplexity -m M -f FILE [-c 512] [--chunks N]``: llama-perplexity's method.

The whole file is tokenized once, cut into chunks of ``n_ctx`` tokens; when the
vocabulary adds BOS, the first token of each chunk is replaced by BOS; each
chunk is evaluated from an empty cache and only its second half is scored (the
first half is context). Output as llama-perplexity prints it: running
``[i]ppl`` values and ``Final estimate: PPL = x +/- y``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref: np.ndarray, ours: np.ndarray) -> float:
    """KL(ref || ours) of one row of logits each, in nats (llama-perplexity's --kl-divergence measure)."""
    p, q = log_softmax(ref), log_softmax(ours)
    return float((np.exp(p) * (p - q)).sum())


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(targets[i]) of each row i: ``log_softmax(logits)[i, targets[i]]``, the same float64
    values, one row at a time (a whole chunk at once makes float64 temporaries of rows x n_vocab,
    0.5 GB for 256 rows of a 262k vocabulary: several times slower than the arithmetic itself)."""
    out = np.empty(len(targets), np.float64)
    for i, t in enumerate(targets):
        out[i] = log_softmax(logits[i])[t]
    return out


def perplexity(engine, text: str, n_ctx: int = 512, n_chunks: int = -1, out=sys.stdout, progress=True):
    """Return (ppl, uncertainty, per-chunk running values)."""
    tok = engine.tokenizer
    t0 = time.perf_counter()
    tokens = tok.encode(text, add_bos=tok.add_bos, special=False)
    t_tok = time.perf_counter() - t0
    total_chunks = len(tokens) // n_ctx
    if total_chunks == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx} (use a smaller -c)")
    if n_ctx > engine.n_ctx:
        raise ValueError(f"-c {n_ctx} is larger than the engine's context {engine.n_ctx}")
    n = total_chunks if n_chunks is None or n_chunks < 0 else min(n_chunks, total_chunks)
    first = n_ctx // 2
    print(f"perplexity: tokenizing the input .. {len(tokens)} tokens in {t_tok:.2f} s", file=sys.stderr)
    print(f"perplexity: calculating perplexity over {n} chunks, n_ctx={n_ctx}, batch_size={engine.n_batch}",
          file=sys.stderr)
    nll = nll2 = 0.0
    count = 0
    running = []
    t_start = time.perf_counter()
    for i in range(n):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if tok.add_bos and tok.bos_id is not None:
            chunk[0] = tok.bos_id
        engine.reset()
        engine.eval(chunk, n_logits=n_ctx - first)
        logits = engine.scores            # rows for positions first .. n_ctx-1
        lp = _log_softmax_at(logits[:-1], np.asarray(chunk[first + 1:], dtype=np.int64))
        nll += float(-lp.sum())
        nll2 += float((lp * lp).sum())
        count += lp.size
        running.append(math.exp(nll / count))
        if i == 0:
            dt = time.perf_counter() - t_start
            print(f"perplexity: {dt:.2f} seconds per pass - ETA {dt * n / 60:.2f} minutes", file=sys.stderr)
        out.write(f"[{i + 1}]{running[-1]:.4f},")
        out.flush()
    out.write("\n")
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    unc = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    out.write(f"Final estimate: PPL = {ppl:.4f} +/- {unc:.5f}\n")
    return ppl, unc, running


def main(argv=None) -> int:
    from ..cli import add_model_args, cache_kwargs, resolve_model
    from ..engine import Engine

    ap = argparse.ArgumentParser(prog="python -m tinyinfer perplexity",
                                 description="perplexity of a model on a text file (llama-perplexity's method)")
    add_model_args(ap)
    ap.set_defaults(ctx_size=512)
    ap.add_argument("-f", "--file", required=True, help="text file (e.g. wikitext-2 test)")
    ap.add_argument("--chunks", type=int, default=-1, help="max chunks to process (-1 = all)")
    a = ap.parse_args(argv)
    if a.ctx_size < 8:
        raise ValueError(f"-c must be at least 8 for perplexity, got {a.ctx_size}")
    with open(a.file, encoding="utf-8") as f:
        text = f.read()
    eng = Engine(resolve_model(a.model), n_ctx=a.ctx_size, n_batch=max(a.batch_size, 1), n_threads=a.threads,
                 **cache_kwargs(a))
    perplexity(eng, text, n_ctx=a.ctx_size, n_chunks=a.chunks)
    return 0


if __name__ == "__main__":
    from ..cli import _guard
    sys.exit(_guard(main))
