"""llama.cpp's outputs on the synthetic mixture-of-experts files, written to tests/data/moe/ (not part of
tinyinfer; needs a llama.cpp build and llama-cpp-python's ctypes binding, which loads its libllama.so):

    LLAMA_CPP_LIB_PATH=.../llama.cpp/build/bin PYTHONPATH=.../llama_cpp_python-0.3.36 \\
        python benchmarks/moe_reference.py MODEL_DIR qwen3moe-F16 olmoe-Q8_0 ...

MODEL_DIR holds ``synthetic-<arch>-<TYPE>.gguf`` (F16 from the make_*_models.py scripts, the others from
``llama-quantize``). Per file it writes ``<arch>-<TYPE>.npz`` and ``greedy_<arch>-<TYPE>.jsonl`` and
records the file's sha256 in ``sha256.txt``.

The first-step distributions of these random-weight models are flat (the top 8192 of a 152k vocabulary
hold ~92% of the mass), so neither top-k truncation nor full float16 logits (~300 KB a prompt) suit a
repository. Each prompt's logits are kept as: the top ``TOP`` token ids and logits, the logits of a fixed
uniform sample of ``SAMPLE`` token ids (drawn from a generator seeded by the vocabulary size, so not
stored), and the log-sum-exp of the whole vector. tests/test_moe.py's ``kl_estimate`` sums KL(ref || ours)
exactly over the top tokens and estimates the rest of the vocabulary from the sample (unbiased; its
spread is ~1% of the KL here), with our full softmax on the other side.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "moe"
SHORT = (ROOT.parent / "shared" / "reference" / "arch" / "prompts.txt")
LONG_SOURCE = ROOT.parent / "shared" / "data" / "wikitext2-test.txt"
LONG_TOKENS = 900
TOP, SAMPLE, N_GREEDY = 1024, 4096, 32
REPACK_OFF = False      # set per file in main: the quantized ones


def sample_ids(n_vocab: int) -> np.ndarray:
    return np.sort(np.random.default_rng(n_vocab).choice(n_vocab, SAMPLE, replace=False))


def prompts() -> list:
    short = [line.encode().decode("unicode_escape").encode("latin-1").decode()
             for line in SHORT.read_text().splitlines() if line]
    return short


def main(model_dir: str, *tags: str):
    import llama_cpp
    import llama_cpp.llama_cpp as C
    default_params = C.llama_model_default_params

    def no_repack():
        # this build (llama-cpp-python 0.3.36's llama.cpp, x86 GGML_NATIVE) segfaults in the repacked Q8_0
        # mul_mat_id on these files; the quantized references run without repacking (llama-cli --no-repack)
        p = default_params()
        p.use_extra_bufts = not REPACK_OFF
        return p
    C.llama_model_default_params = no_repack
    OUT.mkdir(parents=True, exist_ok=True)
    sums = {}
    sha_file = OUT / "sha256.txt"
    if sha_file.exists():
        sums = dict(reversed(line.split()) for line in sha_file.read_text().splitlines() if line.strip())
    global REPACK_OFF
    for tag in tags:
        path = Path(model_dir) / f"synthetic-{tag}.gguf"
        REPACK_OFF = not tag.endswith("-F16")
        sums[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        m = llama_cpp.Llama(str(path), n_ctx=2048, n_batch=512, n_threads=2, logits_all=True, verbose=False)
        n_vocab = m.n_vocab()
        samp = sample_ids(n_vocab)
        cases = [(p, m.tokenize(p.encode(), add_bos=True, special=True)) for p in prompts()]
        text = LONG_SOURCE.read_text()[:20000]
        long_ids = m.tokenize(text.encode(), add_bos=True, special=True)[:LONG_TOKENS]
        cases.append(("wikitext2-test.txt, first 900 tokens", long_ids))
        top_ids, top_logits, samp_logits, lse, rows = [], [], [], [], []
        for i, (prompt, ids) in enumerate(cases):
            m.reset()
            m.eval(ids)
            logits = np.array(m.scores[len(ids) - 1], np.float32)
            order = np.argsort(-logits, kind="stable")[:TOP]
            top_ids.append(order.astype(np.int32))
            top_logits.append(logits[order])
            samp_logits.append(logits[samp])
            mx = float(logits.max())
            lse.append(mx + np.log(np.exp(logits.astype(np.float64) - mx).sum()))
            greedy, top5 = [], []
            if i < len(cases) - 1:          # greedy continuations of the short prompts
                cur = logits
                for _ in range(N_GREEDY):
                    t5 = np.argsort(-cur, kind="stable")[:5]
                    top5.append([[int(t), round(float(cur[t]), 5)] for t in t5])
                    nxt = int(t5[0])
                    greedy.append(nxt)
                    m.eval([nxt])
                    cur = np.array(m.scores[m.n_tokens - 1], np.float32)
            rows.append({"index": i, "prompt": prompt, "prompt_ids": list(map(int, ids)), "greedy_ids": greedy,
                         "top5": top5})
        np.savez_compressed(OUT / f"{tag}.npz", top_ids=np.stack(top_ids), top_logits=np.stack(top_logits),
                            sample_logits=np.stack(samp_logits), lse=np.array(lse), n_vocab=n_vocab)
        with open(OUT / f"greedy_{tag}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(tag, n_vocab, [len(c[1]) for c in cases])
        del m
    sha_file.write_text("".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
